"""The round-trip check every GGUF export passes before it is kept.

The file is read back with qtune's own converter (`convert_gguf`) and must give
  - the same logits on a fixed prompt as the model it was written from: f16 / bf16 / f32 against that
    model with its 2-D weights rounded to the type (so only the order of fp32 operations differs), the
    quantized types within the KL divergence stated in QUANT_TOLERANCE;
  - the same token ids for one conversation rendered by its chat template as the training-time
    tokenizer gives through its own template, and the same add_bos_token;
  - the template's end-of-turn token among the ids that stop generation.
"""

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import torch

from qtune.tokenizer import Tokenizer, load_tokenizer
from qtune.weights.checkpoint import load_model
from qtune.weights.gguf import convert_gguf

# Mean KL divergence (nats per token) of the file's next-token distributions from the fp32 model's, allowed
# for the quantized types. Measured on SmolLM2-135M (whose weights already went through Q4_1 once, the hard
# case): q8_0 0.002, q5_0 0.08, q4_0 0.43; random tiny models stay under 0.001. The bounds catch a broken
# layout, not a small model's loss of quality at 4 bits: judge that on your own task.
QUANT_TOLERANCE = {"q8_0": 0.02, "q5_0": 0.2, "q5_1": 0.2, "q4_0": 0.6, "q4_1": 0.6}
FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Float types: the largest logit difference, relative to the largest logit, left by fp32 op order alone.
ROUNDED_TOLERANCE = 1e-4

CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What colour is the sky on a clear day?"},
    {"role": "assistant", "content": "It is blue: light near 470 nm scatters most, 2024-01-02 or 12345 days on."},
    {"role": "user", "content": "And at sunset?"},
]


def conversation_text(tok: Tokenizer) -> str:
    """CONVERSATION through the tokenizer's chat template (without the system turn where the template
    refuses one, as Mistral's does), ready for the assistant's reply."""
    try:
        return tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    except jinja2.TemplateError:
        return tok.apply_chat_template(CONVERSATION[1:], add_generation_prompt=True)


def prompt_ids(tok: Tokenizer, vocab_size: int, length: int = 48) -> list[int]:
    """The fixed prompt the logits are compared on: the rendered conversation, or plain text without a template."""
    text = conversation_text(tok) if tok.has_chat_template else "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text, add_bos=tok.add_bos_token and tok.bos_id is not None)
    return [i for i in ids if i < vocab_size][:length]


def end_of_turn_id(tok: Tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant reply (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>, Mistral's </s>): the token that must stop generation."""
    marker = "qtune end-of-turn probe"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}])
    except jinja2.TemplateError:  # a template that cannot render a plain user / assistant exchange
        return None
    ids = tok.encode(text[text.index(marker) + len(marker):])
    if ids and tok.decode(ids[:1], skip_special=True) == "":  # a special token: decoding drops it
        return ids[0]
    return None


def check_tokenizer(trained: Tokenizer, exported: Tokenizer) -> list[str]:
    """What differs between the training-time tokenizer and the one read back from the GGUF."""
    problems = []
    if trained.add_bos_token != exported.add_bos_token:
        problems.append(f"add_bos_token is {exported.add_bos_token} in the file, {trained.add_bos_token} in training")
    if not trained.has_chat_template:
        return problems
    if not exported.has_chat_template:
        return problems + ["the file has no chat template"]
    ids, back = trained.encode(conversation_text(trained)), exported.encode(conversation_text(exported))
    if ids != back:
        at = next((i for i, (a, b) in enumerate(zip(ids, back)) if a != b), min(len(ids), len(back)))
        problems.append(f"the conversation renders to different token ids (first difference at position {at}: "
                        f"{ids[at:at + 3]} in training, {back[at:at + 3]} from the file)")
    eot = end_of_turn_id(trained)
    if eot is None:
        problems.append("the chat template ends an assistant turn with no special token, so nothing would stop "
                        "generation")
    elif eot not in exported.eos_ids:
        problems.append(f"the end-of-turn token {eot} is not a stop token of the file (stop ids: "
                        f"{sorted(exported.eos_ids)})")
    return problems


@dataclass
class RoundTrip:
    """The outcome of `check_round_trip`."""

    problems: list[str] = field(default_factory=list)
    """What the file gets wrong, one sentence each; empty when it passes."""
    logit_error: float = float("nan")
    """The measured logit difference (see `what`)."""
    tolerance: float = float("nan")
    """The largest `logit_error` that passes."""
    what: str = ""
    """How `logit_error` is measured."""


@torch.no_grad()
def check_logits(model_dir: Path, readback_dir: Path, type_name: str, ids: list[int], result: RoundTrip) -> None:
    """Logits of the file (read back) against the model it was written from; see the module docstring."""
    reference = load_model(model_dir, quantize="none", dtype=torch.float32, kernels="torch")
    exported = load_model(readback_dir, quantize="none", dtype=torch.float32, kernels="torch")
    if type_name in FLOAT_TYPES:
        for p in reference.parameters():
            if p.ndim == 2:  # 1-D tensors (norms, biases) are stored as F32
                p.copy_(p.to(FLOAT_TYPES[type_name]).float())
    x = torch.tensor([ids])
    want, got = reference(x).double(), exported(x).double()
    if type_name in FLOAT_TYPES:
        result.logit_error = ((got - want).abs().max() / want.abs().max()).item()
        result.tolerance, result.what = ROUNDED_TOLERANCE, f"max |difference| / max |logit| vs the {type_name}-rounded model"
    else:  # llama.cpp's own yardstick for quantized files: KL divergence of the next-token distributions
        log_want, log_got = want.log_softmax(-1), got.log_softmax(-1)
        result.logit_error = (log_want.exp() * (log_want - log_got)).sum(-1).mean().item()
        result.tolerance, result.what = QUANT_TOLERANCE[type_name], "mean KL(fp32 model || file) per token"
    if not result.logit_error <= result.tolerance:
        result.problems.append(f"logits on the {len(ids)}-token test prompt differ: {result.what} "
                               f"{result.logit_error:.3g} > {result.tolerance:g}")


def check_round_trip(model_dir, gguf_path, type_name: str) -> RoundTrip:
    """Everything the file at `gguf_path` gets wrong about `model_dir` (`problems` empty when it passes)."""
    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    with tempfile.TemporaryDirectory(prefix=".qtune-readback-", dir=gguf_path.parent) as tmp:
        try:
            readback = convert_gguf(gguf_path, Path(tmp) / "model", torch.float32)
        except (ValueError, KeyError) as e:
            return RoundTrip([f"qtune's converter cannot read it back ({e})"])
        trained, exported = load_tokenizer(model_dir), load_tokenizer(readback)
        result = RoundTrip(check_tokenizer(trained, exported))
        vocab = min(trained.vocab_size, exported.vocab_size)
        check_logits(model_dir, readback, type_name, prompt_ids(trained, vocab), result)
        return result
