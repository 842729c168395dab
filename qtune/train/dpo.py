"""Direct preference optimisation of a LoRA adapter (DPO, IPO, robust DPO, the reference-free SimPO, CPO and
ORPO, and KTO on unpaired records), read top to bottom like nanoGPT.

    recipe -> 4-bit base + LoRA adapter -> preference batches (K sequences per record)
           -> log π(y|x) with the adapter, log π_ref(y|x) with adapters disabled (or from a precomputed cache)
           -> preference loss over every pair -> (accumulate, clip, step) x max_steps -> held-out reward accuracy

The reference model is the policy's own base with its adapters switched off: one copy of the weights
serves both. A fresh adapter (B = 0) leaves the policy equal to the reference, so the first DPO loss is ln 2.
SimPO, CPO and ORPO score responses by the policy alone, so for them the reference pass never runs. KTO scores
each completion on its own against a reference point estimated from mismatched (prompt, completion) pairs.
"""

import hashlib
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from qtune.align.preference_losses import (REFERENCE_FREE_LOSSES, cpo_loss, dpo_loss, kto_kl_estimate, kto_loss,
                                           orpo_loss, preference_accuracy, simpo_loss)
from qtune.align.reward_model import pair_summary
from qtune.data.kto import build_kto_data
from qtune.data.prefs import build_preference_data, fixed_batches
from qtune.data.render import IGNORE
from qtune.kernels.logprobs import token_logprobs
from qtune.lora import adapters_disabled, adapter_parameters
from qtune.peft.placement import place_in_batch
from qtune.recipe.align import DPORecipe, DPOSection
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
    batch = place_in_batch(model, batch)  # P-tuning's placed virtual tokens (none with adapters off)
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])  # (S, T, D)
    targets = common.shifted_targets(batch["labels"])  # (S, T): position t predicts token t + 1
    keep = targets != IGNORE
    logp = token_logprobs(hidden[keep], model.output_weight(), targets[keep], kernels=model.kernels,
                          softcap=model.logit_softcap)  # (n_response,)
    rows = keep.nonzero()[:, 0]  # the sequence of each kept token, in the same row-major order
    return torch.zeros(len(targets), device=logp.device, dtype=torch.float32).index_add(0, rows, logp)


@torch.no_grad()
def reference_logprobs(model, batch: dict) -> torch.Tensor:
    """log π_ref(y|x): the same base with every adapter switched off. (S,)"""
    with adapters_disabled(model):
        return sequence_logprobs(model, batch)


def response_lengths(batch: dict) -> torch.Tensor:
    """|y|: the response tokens of each sequence, those `sequence_logprobs` sums over. (S,) fp32."""
    return (common.shifted_targets(batch["labels"]) != IGNORE).sum(1).float()


def needs_reference(dpo: DPOSection) -> bool:
    return dpo.loss not in REFERENCE_FREE_LOSSES


def pair_losses(policy: torch.Tensor, reference: torch.Tensor | None, batch: dict, dpo: DPOSection):
    """The loss and rewards (r⁺, r⁻) of every pair (better, worse) of the batch's records, (P,) each.

    policy / reference are sequence log-probs (S,); reference is None for the reference-free losses.
    """
    b, w = batch["better"], batch["worse"]
    if needs_reference(dpo):
        return dpo_loss(policy[b], policy[w], reference[b], reference[w], dpo.beta, dpo.loss, dpo.label_smoothing)
    mean_logp = policy / response_lengths(batch).to(policy.device)  # ℓ(y) = log π(y|x) / |y|
    if dpo.loss == "simpo":
        return simpo_loss(mean_logp[b], mean_logp[w], dpo.beta, dpo.simpo_gamma, dpo.label_smoothing)
    if dpo.loss == "cpo":
        return cpo_loss(policy[b], policy[w], -mean_logp[b], dpo.beta, dpo.cpo_alpha, dpo.label_smoothing)
    return orpo_loss(mean_logp[b], mean_logp[w], dpo.orpo_lambda)


def batch_reference(model, batch: dict, split: str, dpo: DPOSection, reference) -> torch.Tensor | None:
    """The batch's log π_ref: from the precomputed cache, else one adapter-free pass; None for reference-free losses."""
    if not needs_reference(dpo):
        return None
    return reference.lookup(split, batch) if reference is not None else reference_logprobs(model, batch)


class ScoredBatch(NamedTuple):
    """A micro-batch's losses and rewards: per pair, or for KTO per record."""

    losses: torch.Tensor  # (N,)
    chosen: torch.Tensor  # rewards of the preferred responses (KTO: of the desirable completions)
    rejected: torch.Tensor  # rewards of the dispreferred responses (KTO: of the undesirable completions)
    margins: torch.Tensor  # (N,) > 0 where the ranking is right: r⁺ − r⁻ per pair; KTO: r signed by the label
    kl: float | None = None  # KTO's reference point z₀


def score_kto(model, batch: dict, dpo: DPOSection, device, model_dtype) -> ScoredBatch:
    """KTO on a micro-batch of `qtune.data.kto.collate_kto`: z₀ from its mismatched pairs (no gradient flows
    through z₀, so their policy pass keeps no graph), then each completion's loss against it."""
    completions, mismatched, desirable = batch["completions"], batch["kl"], batch["desirable"]
    with common.autocast(device, model_dtype):
        ref, ref_mismatched = reference_logprobs(model, completions), reference_logprobs(model, mismatched)
        with torch.no_grad():
            policy_mismatched = sequence_logprobs(model, mismatched)
        policy = sequence_logprobs(model, completions)
    kl = kto_kl_estimate(policy_mismatched, ref_mismatched)
    losses, rewards = kto_loss(policy, ref, desirable, kl, dpo.beta, dpo.kto_desirable_weight,
                               dpo.kto_undesirable_weight)
    return ScoredBatch(losses, rewards[desirable], rewards[~desirable], torch.where(desirable, rewards, -rewards),
                       float(kl))


def score_batch(model, batch: dict, split: str, dpo: DPOSection, reference, device, model_dtype=None) -> ScoredBatch:
    """The losses and rewards of a micro-batch already on `device`; model_dtype None keeps autocast off."""
    if dpo.loss == "kto":
        return score_kto(model, batch, dpo, device, model_dtype)
    with common.autocast(device, model_dtype):
        ref = batch_reference(model, batch, split, dpo, reference)
        policy = sequence_logprobs(model, batch)
    losses, chosen, rejected = pair_losses(policy, ref, batch, dpo)
    return ScoredBatch(losses, chosen, rejected, chosen - rejected)


def batch_tokens(batch: dict) -> int:
    """Real tokens a micro-batch puts through the model (KTO's: its completions and its mismatched pairs)."""
    if "kl" in batch:
        return common.count_tokens(batch["completions"]) + common.count_tokens(batch["kl"])
    return common.count_tokens(batch)


def _mean(values: torch.Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None  # a KTO step may hold no completion of one label


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
        try:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no partial file

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
def evaluate_dpo(model, batches, device, dpo: DPOSection, reference: ReferenceLogprobs | None = None,
                 max_batches: int = 0) -> dict:
    """Reward accuracy on held-out pairs, in eval mode, with the rewards of `dpo.loss`: r = β (log π − log π_ref)
    for the DPO family, β ℓ(y) for SimPO, β log π(y|x) for CPO, λ ℓ(y) for ORPO. KTO's held-out records are
    unpaired: each counts as right when its reward β (log π − log π_ref) has the sign of its label.

    Returns accuracy (ties count 1/2), mean_margin (mean r⁺ − r⁻; KTO: of the label-signed rewards), n (pairs;
    KTO: records) and loss (mean loss).
    """
    was_training = model.training
    model.eval()
    margins, losses = [], []
    try:
        for k, batch in enumerate(batches):
            if max_batches and k >= max_batches:
                break
            scored = score_batch(model, common.to_device(batch, device), "val", dpo, reference, device)
            margins.append(scored.margins)
            losses.append(scored.losses)
    finally:
        model.train(was_training)
    return {**pair_summary(torch.cat(margins)), "loss": float(torch.cat(losses).mean())}


def validation(model, data, recipe: DPORecipe, device, reference) -> dict:
    result = evaluate_dpo(model, data.val_batches(recipe.train.micro_batch_size), device, recipe.dpo, reference,
                          recipe.eval.max_batches)
    return {"val_accuracy": result["accuracy"], "val_margin": result["mean_margin"], "val_loss": result["loss"]}


# ----------------------------------------------------------------------------- training

def train_step(model, micro: list[dict], params, optimizer, scheduler, recipe: DPORecipe, device, model_dtype,
               reference: ReferenceLogprobs | None, scaler=None) -> dict:
    """One optimizer step over the micro-batches `micro`: loss, implicit rewards, accuracy, margin, lr, grad norm.

    loss = Σ over micro-batches and pairs p of loss(p) / P, P = the pairs (KTO: records) of the whole step, so
    accumulation equals one large batch. KTO estimates z₀ per micro-batch.
    """
    d = recipe.dpo
    n_items = sum(len(b["desirable"]) if d.loss == "kto" else len(b["better"]) for b in micro)
    loss_total, scored = 0.0, []
    for batch in micro:
        out = score_batch(model, common.to_device(batch, device), "train", d, reference, device, model_dtype)
        common.backward(out.losses.sum() / n_items, scaler)
        loss_total += out.losses.sum().item()
        scored.append(out)
    loss = loss_total / n_items
    grad_norm, lr = common.optimizer_step(params, optimizer, scheduler, recipe.train.max_grad_norm, loss, scaler)
    chosen, rejected = torch.cat([s.chosen for s in scored]), torch.cat([s.rejected for s in scored])
    margins = torch.cat([s.margins for s in scored])
    record = {"loss": loss, "chosen_reward": _mean(chosen), "rejected_reward": _mean(rejected),
              "accuracy": float(preference_accuracy(margins).mean()), "margin": float(margins.mean()),
              "lr": lr, "grad_norm": grad_norm, "real_tokens": sum(batch_tokens(b) for b in micro)}
    if d.loss == "kto":
        record["kl"] = sum(s.kl for s in scored) / len(scored)
    return record


def run_dpo(recipe: DPORecipe, resume: bool = False, console=None) -> dict:
    """Train the recipe's adapter with DPO; returns the run summary (also written to `output.dir/summary.json`).

    The summary holds the held-out implicit-reward accuracy after training (`val_accuracy_after`); before
    training it is 0.5 by construction, since a fresh adapter makes every implicit reward 0.
    """
    t, e = recipe.train, recipe.eval
    run, model, tokenizer, device = start_run(recipe, resume, console)
    attach_adapter(model, recipe, t.seed)
    kto = recipe.dpo.loss == "kto"
    data = build_kto_data(recipe.data, tokenizer, t.seed) if kto else build_preference_data(recipe.data, tokenizer, t.seed)
    run.console.print(data.describe())
    params, model_dtype = adapter_parameters(model, ADAPTER), model.model.embed_tokens.weight.dtype
    scaler = common.grad_scaler(device, model_dtype)
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
                             model_dtype, reference, scaler)
            run.check_finite(step, loss=out["loss"], grad_norm=out["grad_norm"])
            run.check_collapse(step, out["grad_norm"])
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
    s = data.stats
    counts = {"records": s["train_examples"], "val_records": s["val_examples"]} if kto else \
        {"pairs": s["train_pairs"], "val_pairs": s["val_pairs"]}
    return run.finish({"steps": steps, **counts, "val_accuracy_after": after.get("val_accuracy"),
                       "val_margin_after": after.get("val_margin")})
