"""Direct preference optimisation (DPO, IPO, robust DPO) of a LoRA adapter, read top to bottom like nanoGPT.

    recipe -> 4-bit base + LoRA adapter -> preference batches (K sequences per record)
           -> log π(y|x) with the adapter, log π_ref(y|x) with adapters disabled (or from a precomputed cache)
           -> DPO loss over every pair -> (accumulate, clip, step) x max_steps -> held-out implicit-reward accuracy

The reference model is the policy's own base with its adapters switched off: one copy of the weights
serves both. A fresh adapter (B = 0) leaves the policy equal to the reference, so the first loss is ln 2.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qtune.align.preference_losses import dpo_loss, preference_accuracy
from qtune.align.reward_model import pair_summary
from qtune.data.prefs import build_preference_data, fixed_batches
from qtune.data.render import IGNORE
from qtune.kernels.logprobs import token_logprobs
from qtune.lora import adapters_disabled, lora_parameters
from qtune.recipe.align import DPORecipe
from qtune.train import common
from qtune.train.common import ADAPTER, attach_adapter
from qtune.train.run import start_run, step_record, total_steps
from qtune.weights.checkpoint import resolve

REFERENCE_CACHE_VERSION = 1


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over each sequence's response tokens (labels != -100). (S,) fp32.

    Goes through the fused log-prob op (with `model.kernels`): only response positions reach the vocabulary
    projection, and the (tokens, vocab) logits are never materialised.
    """
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])  # (S, T, D)
    targets = common.shifted_targets(batch["labels"])  # (S, T): position t predicts token t + 1
    keep = targets != IGNORE
    logp = token_logprobs(hidden[keep], model.output_weight(), targets[keep], kernels=model.kernels)  # (n_response,)
    rows = keep.nonzero()[:, 0]  # the sequence of each kept token, in the same row-major order
    return torch.zeros(len(targets), device=logp.device, dtype=torch.float32).index_add(0, rows, logp)


@torch.no_grad()
def reference_logprobs(model, batch: dict) -> torch.Tensor:
    """log π_ref(y|x): the same base with every adapter switched off. (S,)"""
    with adapters_disabled(model):
        return sequence_logprobs(model, batch)


def pair_losses(policy: torch.Tensor, reference: torch.Tensor, batch: dict, beta: float, loss_type: str,
                label_smoothing: float):
    """The DPO loss and implicit rewards of every pair (better, worse) of the batch's records, (P,) each."""
    b, w = batch["better"], batch["worse"]
    return dpo_loss(policy[b], policy[w], reference[b], reference[w], beta, loss_type, label_smoothing)


# ----------------------------------------------------------------------------- precomputed reference

class ReferenceLogprobs:
    """log π_ref of every sequence of the training and held-out records, computed once before training.

    Tensors "<split>.logps" hold the values record after record (best response first) and "<split>.offsets"
    where each record starts, so a batch's values are found from its records' dataset indices.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def lookup(self, split: str, batch: dict) -> torch.Tensor:
        """The batch's reference log-probs (S,), on the batch's device."""
        offsets, logps = self.tensors[f"{split}.offsets"], self.tensors[f"{split}.logps"]
        first = offsets[batch["index"].cpu()]  # (G,) where each record's values start
        return logps[first[batch["ranking"].cpu()] + batch["rank"].cpu()].to(batch["input_ids"].device)

    @classmethod
    def compute(cls, model, splits: dict, pad_id: int, micro_batch_size: int, device, console) -> "ReferenceLogprobs":
        """Run the adapter-free model once over `splits` ({name: tokenized records}) in eval mode."""
        was_training = model.training
        model.eval()
        tensors = {}
        sizes = " + ".join(f"{len(items)} {name}" for name, items in splits.items())
        console.print(f"reference log-probs: one pass with adapters disabled over {sizes} records")
        for name, items in splits.items():
            values = [reference_logprobs(model, common.to_device(batch, device)).cpu()
                      for batch in fixed_batches(items, micro_batch_size, pad_id)]
            counts = torch.tensor([0] + [len(it.response_ids) for it in items])
            tensors[f"{name}.logps"] = torch.cat(values) if values else torch.zeros(0)
            tensors[f"{name}.offsets"] = counts.cumsum(0)
        model.train(was_training)
        return cls(tensors)

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file renamed into place once complete."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "ReferenceLogprobs":
        return cls(load_file(str(path)))


def model_fingerprint(model_section) -> dict:
    """What identifies the reference model: config, weight files (name, size, mtime) and how they are loaded.

    A copied or rewritten weight file gets a new mtime and so misses the cache: a miss costs one pass over
    the data, a stale hit would silently train against the wrong reference.
    """
    model_dir = resolve(model_section.path)
    files = sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors")
    return {"config": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
            "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
            "quantize": model_section.quantize, "double_quant": model_section.double_quant,
            "dtype": model_section.dtype}


def reference_cache_path(cache_dir: str, splits: dict, model_section) -> Path | None:
    """cache_dir/dpo_reference/<hash of the tokenized records and the model>.safetensors (None: no cache)."""
    if not cache_dir:
        return None
    h = hashlib.sha256(json.dumps({"version": REFERENCE_CACHE_VERSION, "model": model_fingerprint(model_section)},
                                  sort_keys=True).encode())
    for name, items in splits.items():
        h.update(f"\0{name}:{len(items)}".encode())
        for it in items:
            h.update(b"\1" + it.prompt_ids.tobytes())
            for response in it.response_ids:
                h.update(b"\2" + response.tobytes())
    return Path(cache_dir).expanduser() / "dpo_reference" / f"{h.hexdigest()[:24]}.safetensors"


def precomputed_reference(model, data, recipe: DPORecipe, device, console) -> ReferenceLogprobs:
    """The cached reference log-probs of `data`, computed (and cached) on a miss."""
    splits = {"train": data.train, "val": data.val}
    path = reference_cache_path(recipe.data.cache_dir, splits, recipe.model)
    if path is not None and path.is_file():
        console.print(f"reference log-probs: cached at {path}")
        return ReferenceLogprobs.load(path)
    reference = ReferenceLogprobs.compute(model, splits, data.pad_id, recipe.train.micro_batch_size, device, console)
    if path is not None:
        reference.save(path)
    return reference


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_dpo(model, batches, device, beta: float, reference: ReferenceLogprobs | None = None,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, max_batches: int = 0) -> dict:
    """Implicit-reward accuracy on held-out pairs, in eval mode: r = β (log π − log π_ref) of each response.

    Returns accuracy (ties count 1/2), mean_margin (mean r⁺ − r⁻), n (pairs) and loss (mean DPO loss).
    """
    was_training = model.training
    model.eval()
    margins, losses = [], []
    try:
        for k, batch in enumerate(batches):
            if max_batches and k >= max_batches:
                break
            batch = common.to_device(batch, device)
            policy = sequence_logprobs(model, batch)
            ref = reference.lookup("val", batch) if reference is not None else reference_logprobs(model, batch)
            pair_loss, chosen, rejected = pair_losses(policy, ref, batch, beta, loss_type, label_smoothing)
            margins.append(chosen - rejected)
            losses.append(pair_loss)
    finally:
        model.train(was_training)
    return {**pair_summary(torch.cat(margins)), "loss": float(torch.cat(losses).mean())}


def validation(model, data, recipe: DPORecipe, device, reference) -> dict:
    d = recipe.dpo
    result = evaluate_dpo(model, data.val_batches(recipe.train.micro_batch_size), device, d.beta, reference, d.loss,
                          d.label_smoothing, recipe.eval.max_batches)
    return {"val_accuracy": result["accuracy"], "val_margin": result["mean_margin"], "val_loss": result["loss"]}


# ----------------------------------------------------------------------------- training

def train_step(model, micro: list[dict], params, optimizer, scheduler, recipe: DPORecipe, device, model_dtype,
               reference: ReferenceLogprobs | None) -> dict:
    """One optimizer step over the micro-batches `micro`: loss, implicit rewards, accuracy, margin, lr, grad norm.

    loss = Σ over micro-batches and pairs p of loss(p) / P, P = the pairs of the whole step, so accumulation
    equals one large batch.
    """
    d = recipe.dpo
    n_pairs = sum(len(b["better"]) for b in micro)
    loss_total, chosen, rejected = 0.0, [], []
    for batch in micro:
        batch = common.to_device(batch, device)
        with common.autocast(device, model_dtype):
            ref = reference.lookup("train", batch) if reference is not None else reference_logprobs(model, batch)
            policy = sequence_logprobs(model, batch)
        losses, chosen_rewards, rejected_rewards = pair_losses(policy, ref, batch, d.beta, d.loss, d.label_smoothing)
        (losses.sum() / n_pairs).backward()
        loss_total += losses.sum().item()
        chosen.append(chosen_rewards)
        rejected.append(rejected_rewards)
    loss = loss_total / n_pairs
    grad_norm, lr = common.optimizer_step(params, optimizer, scheduler, recipe.train.max_grad_norm, loss)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return {"loss": loss, "chosen_reward": float(chosen.mean()), "rejected_reward": float(rejected.mean()),
            "accuracy": float(preference_accuracy(chosen - rejected).mean()), "margin": float((chosen - rejected).mean()),
            "lr": lr, "grad_norm": grad_norm, "real_tokens": sum(common.count_tokens(b) for b in micro)}


def run_dpo(recipe: DPORecipe, resume: bool = False, console=None) -> dict:
    """Train the recipe's adapter with DPO; returns the run summary (also written to `output.dir/summary.json`).

    The summary holds the held-out implicit-reward accuracy after training (`val_accuracy_after`); before
    training it is 0.5 by construction, since a fresh adapter makes every implicit reward 0.
    """
    t, e = recipe.train, recipe.eval
    run, model, tokenizer, device = start_run(recipe, resume, console)
    attach_adapter(model, recipe.lora, t.seed)
    data = build_preference_data(recipe.data, tokenizer, t.seed)
    run.console.print(data.describe())
    params, model_dtype = lora_parameters(model, ADAPTER), model.model.embed_tokens.weight.dtype
    steps = total_steps(recipe, data.batches_per_epoch(t.micro_batch_size))
    optimizer, scheduler, start_step, position = run.begin(recipe, model, ADAPTER, params, steps)
    reference = precomputed_reference(model, data, recipe, device, run.console) if recipe.dpo.precompute_reference \
        else None
    batches = data.batches(t.micro_batch_size, t.seed, start=position)
    after = None
    with run.training(steps, start_step) as stop:
        for step in range(start_step + 1, steps + 1):
            t0, micro = time.perf_counter(), [next(batches) for _ in range(t.grad_accum_steps)]
            out = train_step(model, [b for _, b in micro], params, optimizer, scheduler, recipe, device,
                             model_dtype, reference)
            run.check_finite(step, loss=out["loss"], grad_norm=out["grad_norm"])
            position = micro[-1][0]
            record = step_record(step, out, t0, position, device)
            if step == steps and data.val:  # the last step's record carries the held-out evaluation
                with run.last_step(record):
                    after = validation(model, data, recipe, device, reference)
                run.log({**record, **after})
                break
            if e.every and step % e.every == 0 and data.val:
                record.update(validation(model, data, recipe, device, reference))
            run.step_done(record, log=step % t.log_every == 0 or step == steps or "val_loss" in record)
            run.step_end(step, position, stop)
    run.save_checkpoint(steps, position)
    if after is None and data.val:  # resumed from the final checkpoint: nothing left to train
        after = validation(model, data, recipe, device, reference)
    after = after or {}
    return run.finish({"steps": steps, "pairs": data.stats["train_pairs"], "val_pairs": data.stats["val_pairs"],
                       "val_accuracy_after": after.get("val_accuracy"), "val_margin_after": after.get("val_margin")})
