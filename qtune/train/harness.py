"""qtune models in lm-evaluation-harness (the `eval` extra): `qtune eval-harness` registers this backend.

    qtune eval-harness DIR --adapter ADAPTER --tasks hellaswag   # or, in Python: lm_eval.simple_evaluate(model="qtune", ...)

Log-likelihoods come from qtune's own forward pass and fused log-prob kernel (`token_logprobs`), generation
from `qtune.generate` (batched, KV cache). Contexts and continuations are tokenized as lm-eval's Hugging
Face backend does: trailing spaces of the context move to the continuation, and the continuation's tokens
are those of context + continuation after the context's.
"""

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from qtune.generate import generate
from qtune.kernels.logprobs import token_logprobs
from qtune.peft import load_adapter
from qtune.peft.placement import place_in_batch
from qtune.tokenizer import load_tokenizer
from qtune.train.common import shifted_targets, training_device
from qtune.weights.checkpoint import load_model, resolve


@register_model("qtune")
class QtuneLM(LM):
    """`--model_args pretrained=DIR,adapter=DIR,quantize=nf4|none,dtype=...,batch_size=8,max_length=N`."""

    def __init__(self, pretrained: str, adapter: str | None = None, quantize: str = "nf4", dtype: str | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, max_gen_toks: int = 256, **_):
        super().__init__()
        model_dir = resolve(pretrained)
        quantize = quantize or "none"  # lm-eval's model_args parser turns the string "none" into None
        self.model = load_model(model_dir, quantize=quantize, dtype=dtype, device=training_device())
        if adapter:
            load_adapter(self.model, adapter)
        self.tok = load_tokenizer(model_dir)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.prefix = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_bos=self.tok.add_bos_token and self.tok.bos_id is not None)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return (ctx or [self.prefix]), whole[len(ctx):]

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per pair."""
        device = self.model.model.embed_tokens.weight.device
        results = []
        for start in range(0, len(pairs), self.batch_size):
            batch = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in pairs[start:start + self.batch_size]]
            n_cont = [len(cont) for _, cont in pairs[start:start + self.batch_size]]
            T = max(len(seq) for seq in batch)
            ids = torch.full((len(batch), T), self.tok.pad_id, dtype=torch.long)
            labels = torch.full((len(batch), T), -100, dtype=torch.long)  # the continuation, as training labels it
            segments = torch.zeros((len(batch), T), dtype=torch.long)
            for b, (seq, n) in enumerate(zip(batch, n_cont)):
                ids[b, :len(seq)] = torch.tensor(seq)
                segments[b, :len(seq)] = 1
                labels[b, len(seq) - n:len(seq)] = torch.tensor(seq[-n:])
            # a P-tuning adapter may place virtual tokens before the continuation, as before a reply in training
            batch = place_in_batch(self.model, {"input_ids": ids.to(device), "labels": labels.to(device),
                                                "attention_mask": segments.to(device)})
            segments = batch["attention_mask"]
            targets = shifted_targets(batch["labels"], segments)  # (B, T'): position t predicts token t + 1
            hidden = self.model.hidden_states(batch["input_ids"], segments, batch.get("position_ids"))  # (B, T', D)
            weight = self.model.output_weight()
            logp = token_logprobs(hidden, weight, targets, kernels=self.model.kernels,
                                  softcap=self.model.logit_softcap)  # (B, T), 0 where masked
            scored = targets != -100
            # soft-capping is monotonic: the greedy token is the argmax of the plain logits
            greedy = (hidden[scored] @ weight.T).argmax(-1) == targets[scored]
            per_row = scored.sum(1).tolist()
            for b, chunk in enumerate(greedy.split(per_row)):
                results.append((float(logp[b].sum()), bool(chunk.all())))
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.score([self.encode_pair(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        totals = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok.encode(text), prefix_token=self.prefix, max_seq_len=self.max_length, context_len=1)]
            totals.append(sum(logp for logp, _ in self.score(windows)))
        return totals

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            prompt = self.encode(context)[-self.max_length:]
            [out] = generate(self.model, [prompt], tokenizer=self.tok, stop_strings=tuple(until),
                             max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                             greedy=not kwargs.get("do_sample", False),
                             temperature=float(kwargs.get("temperature", 1.0)) or 1.0)
            outputs.append(out.text)
        return outputs
