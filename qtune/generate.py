"""KV-cache decoding: batched with left padding, greedy / temperature / top-k / top-p, stop tokens and strings.

Prompts are sorted by length and decoded in batches; a sequence that finishes leaves the batch (its cache
rows are dropped) so the remaining ones decode faster. Only the last position's logits are computed.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qtune.model import CausalLM

NF4_CPU_KERNELS = ("dense", "bitsandbytes")

@dataclass
class Generation:
    token_ids: list[int]  # the completion's tokens (an ending eos token included)
    text: str  # the completion's text, cut before the first stop string
    finish_reason: str  # "eos" (a stop token), "stop" (a stop string) or "length"


@dataclass
class Sampling:
    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling (got {self.temperature}); use greedy=True instead")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")


def next_token(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from last-position logits (B, V)."""
    if s.greedy:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        # nucleus sampling: keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= s.top_p  # mass before this token already reaches top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(model: CausalLM, prompts: list[list[int]], *, tokenizer=None, max_new_tokens: int = 128,
             greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids=None, stop_strings=(), seed: int | None = None, batch_size: int = 16,
             nf4_cpu_kernel: str = "dense") -> list[Generation]:
    """Complete token-id prompts. `stop_ids` defaults to the tokenizer's eos ids; `stop_strings` need a tokenizer.

    `nf4_cpu_kernel` says how NF4 layers multiply on a CPU: "dense" from fp32 copies made for the call (exact:
    the numbers of the training forward), "bitsandbytes" through bitsandbytes' 4-bit kernel in bf16 where the
    CPU has one (AVX-512 BF16; as transformers + bitsandbytes decode there; faster, bf16 rounding in those
    products) and from dense copies elsewhere. See `decoding_weights`.
    """
    s = Sampling(max_new_tokens, greedy, temperature, top_k, top_p)
    s.check()
    if nf4_cpu_kernel not in NF4_CPU_KERNELS:
        raise ValueError(f"nf4_cpu_kernel must be one of {NF4_CPU_KERNELS} (got {nf4_cpu_kernel!r})")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the completions")
    if stop_ids is None:
        stop_ids = set(tokenizer.eos_ids) if tokenizer is not None else set()
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: give at least one token (e.g. the bos token)")
    place = getattr(model.virtual_tokens, "place_prompt", None)  # P-tuning's virtual tokens placed in the prompt
    prompts = [place(p) for p in prompts] if place is not None else prompts
    device = model.model.embed_tokens.weight.device
    gen = torch.Generator(device).manual_seed(seed) if seed is not None else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    with decoding_weights(model, nf4_cpu_kernel):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            outs = _generate_batch(model, [prompts[i] for i in idx], s, set(stop_ids), tuple(stop_strings), tokenizer, gen)
            for i, out in zip(idx, outs):
                results[i] = out
    model.train(was_training)
    return results


def _generate_batch(model, prompts, s: Sampling, stop_ids: set, stop_strings: tuple, tokenizer, gen):
    device = model.model.embed_tokens.weight.device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.long, device=device)
    mask = torch.zeros(B, L, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):  # left padding: every prompt ends at column L - 1
        ids[b, L - len(p):] = torch.tensor(p, device=device)
        mask[b, L - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache(B, L + s.max_new_tokens)
    hidden = model.hidden_states(ids, mask, pos, cache)[:, -1]  # (B, D)
    next_pos = pos[:, -1] + 1
    rows = torch.arange(B, device=device)  # which original rows are still decoding
    out_ids: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    for step in range(s.max_new_tokens):
        tok = next_token(model.logits(hidden), s, gen)  # (B_active,)
        done = []
        for j, (r, t) in enumerate(zip(rows.tolist(), tok.tolist())):
            out_ids[r].append(t)
            if t in stop_ids:
                reasons[r] = "eos"
                done.append(j)
            elif stop_strings and _hits_stop(tokenizer.decode(out_ids[r]), stop_strings):
                reasons[r] = "stop"
                done.append(j)
        if step == s.max_new_tokens - 1:
            break
        if done:
            keep = torch.tensor([j for j in range(len(rows)) if j not in set(done)], dtype=torch.long, device=device)
            if keep.numel() == 0:
                break
            rows, tok, next_pos = rows[keep], tok[keep], next_pos[keep]
            cache.keep_rows(keep)
        one = torch.ones(len(rows), 1, dtype=torch.long, device=device)
        hidden = model.hidden_states(tok[:, None], one, next_pos[:, None], cache)[:, -1]
        next_pos = next_pos + 1
    return [_finish(o, r, stop_ids, stop_strings, tokenizer) for o, r in zip(out_ids, reasons)]


def _hits_stop(text: str, stop_strings: tuple) -> bool:
    return any(st in text for st in stop_strings)


def _finish(token_ids, reason, stop_ids, stop_strings, tokenizer) -> Generation:
    if tokenizer is None:
        return Generation(token_ids, "", reason)
    body = token_ids[:-1] if reason == "eos" else token_ids
    text = tokenizer.decode(body)
    if stop_strings:
        cuts = [text.find(st) for st in stop_strings if st in text]
        if cuts:
            text = text[: min(cuts)]
    return Generation(token_ids, text, reason)


def generate_text(model: CausalLM, tokenizer, prompts: list[str], chat: bool = False, system: str | None = None,
                  **kwargs) -> list[Generation]:
    """Complete text prompts; with chat=True each prompt is a user turn rendered with the model's chat template."""
    encoded = []
    for p in prompts:
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            encoded.append(tokenizer.encode(text, add_bos=False))
        else:
            encoded.append(tokenizer.encode(p, add_bos=tokenizer.bos_id is not None and _wants_bos(tokenizer)))
    return generate(model, encoded, tokenizer=tokenizer, **kwargs)


def _wants_bos(tokenizer) -> bool:
    return bool(getattr(tokenizer, "add_bos_token", False))


@contextmanager
def decoding_weights(model: CausalLM, nf4_cpu_kernel: str = "dense"):
    """On CPU, decode NF4 layers from stand-ins made once per call instead of dequantizing every step.

    Decoding reads every weight once per token; dequantizing 4-bit weights with plain torch costs more than
    the matmul itself on a CPU. Each quantized projection gives its stand-in (`decoding_module`): a dense copy
    in the model's dtype (exact), or with nf4_cpu_kernel="bitsandbytes" bitsandbytes' 4-bit kernel in bf16
    where the CPU has it (a quarter of the bytes to read per token). The stand-ins are in the model only for
    the generate call and only while they fit in a quarter of the free memory; the NF4 modules are put back
    afterwards, even on error (the kernel's relaid copy stays cached on its NF4 layer until the weights change).
    On CUDA the fused NF4 kernel reads the 4-bit weights directly, so nothing is made there.
    """
    # A quantized projection is one that can give a decoding stand-in (NF4Linear.decoding_module): asking for
    # that, rather than testing for a class, keeps the model family free of quantization code.
    quantized = [(name, m) for name, m in model.named_modules() if callable(getattr(m, "decoding_module", None))]
    if not quantized or model.model.embed_tokens.weight.is_cuda:
        yield
        return
    dtype, budget = model.model.embed_tokens.weight.dtype, _free_memory_bytes() // 4
    stand_ins = []
    for name, m in quantized:
        stand_in = m.decoding_module(nf4_cpu_kernel, dtype)
        budget -= sum(t.numel() * t.element_size() for t in (*stand_in.parameters(), *stand_in.buffers()))
        if budget < 0:  # too big to copy: decode from the NF4 weights themselves
            stand_ins = []
            break
        stand_ins.append((name, stand_in))
    try:
        for name, stand_in in stand_ins:
            model.set_submodule(name, stand_in)
        yield
    finally:
        for name, m in quantized:
            model.set_submodule(name, m)


def _free_memory_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available
