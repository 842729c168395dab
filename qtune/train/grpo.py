"""GRPO (Shao et al. 2024) and its fixes (Dr. GRPO, DAPO, RLOO) on a LoRA policy: RL without a critic, on ONE
frozen 4-bit base.

    base model (NF4, frozen, loaded once)
      ├── adapter "policy"                    trainable   π_θ: samples the groups, trained by the clipped objective
      ├── adapters "reward<i>" + heads        frozen      reward models trained by `qtune reward` (if any)
      └── adapters switched off               frozen      π_ref of the KL term (not run at all when β = 0)

    per step (train.max_steps of them):
      rollout_batch_size / G prompts -> G responses each (KV cache, policy adapter, one batched generate call)
              -> rewards: Σ_i w_i r_i (+ DAPO's overlong shaping), each r_i logged on its own
              -> group advantages (grpo | dr_grpo | rloo); groups whose rewards are all equal dropped (DAPO)
              -> log π_old (only when the policy moves before a response is used) and log π_ref (β > 0)
              -> num_iterations passes in minibatches: clipped ratio (ε_low, ε_high) + β · k3 KL -> AdamW

Losses and advantages live in `qtune.align.grpo_losses`; rewards, sampling and batching in `qtune.train.rollout`.
"""

import contextlib
import math
import time

import numpy as np
import torch

from qtune.align.grpo_losses import (clipped_surrogate, group_advantages, informative_groups, k3_kl, loss_weights,
                                     overlong_penalty)
from qtune.data.prompts import prompt_batches
from qtune.generate import generate
from qtune.lora import adapters_disabled, add_lora, adapter_parameters, set_active_adapter, use_adapter
from qtune.peft import lora_config
from qtune.recipe.grpo import GRPORecipe
from qtune.train import common
from qtune.train.rollout import (RewardError, build_reward_scorers, collate_responses, load_run_prompts, micro_batches,
                                 plot_reward_curve, response_logprobs, scatter_rows)
from qtune.train.run import Run, start_run

POLICY = "policy"


# ----------------------------------------------------------------------------- the policy and its rewards

def attach_policy(model, recipe: GRPORecipe, pad_id: int, device) -> tuple[list, list]:
    """The reward scorers (reward adapters join `model`) and the trainable policy adapter; returns (scorers, params).

    The policy adapter starts at B = 0, so the first policy is the reference.
    """
    g, t = recipe.grpo, recipe.train
    scorers = build_reward_scorers(g.rewards, model, pad_id, t.micro_batch_size, g.max_new_tokens, device)
    add_lora(model, lora_config(recipe.lora), name=POLICY, seed=t.seed)
    model.requires_grad_(False)  # reward adapters and heads stay frozen
    params = adapter_parameters(model, POLICY)
    for p in params:
        p.requires_grad_(True)
    set_active_adapter(model, POLICY)
    return scorers, params


def reward_names(recipe: GRPORecipe) -> list[str]:
    """The metrics name of each reward: reward_<i>_<fn> (the function's name, or "model")."""
    return [f"reward_{i}_{(s.fn.rpartition(':')[2] or 'model')}" for i, s in enumerate(recipe.grpo.rewards)]


def sample_groups(model, prompts, tokenizer, recipe: GRPORecipe, seed: int | None, greedy: bool = False):
    """Each prompt G times (once when greedy), completed by the policy adapter; returns (prompts, generations)."""
    g = recipe.grpo
    repeated = prompts if greedy else [p for p in prompts for _ in range(g.group_size)]
    with use_adapter(model, POLICY):
        generations = generate(model, [p.ids for p in repeated], tokenizer=tokenizer, max_new_tokens=g.max_new_tokens,
                               greedy=greedy, temperature=g.temperature, top_p=g.top_p, stop_strings=g.stop_strings,
                               seed=seed, batch_size=g.generation_batch_size,
                               nf4_cpu_kernel=g.nf4_cpu_kernel)
    return repeated, generations


# ----------------------------------------------------------------------------- rollouts

@torch.no_grad()
def rollout(model, scorers, prompts, tokenizer, recipe: GRPORecipe, step: int, device) -> tuple[dict | None, dict]:
    """Sample and score the groups of `prompts`; returns (the batch to train on, or None when every group was
    dropped, and the rollout statistics). The batch holds `collate_responses`' tensors, advantages (S,), and
    old_logp / ref_logp (S, R) where the update needs them."""
    g, t = recipe.grpo, recipe.train
    started = time.perf_counter()
    group, generations = sample_groups(model, prompts, tokenizer, recipe, seed=t.seed * 1_000_003 + step)
    per_fn = torch.stack([s.score(group, generations) for s in scorers], 1)  # (S, K)
    lengths = torch.tensor([len(x.token_ids) for x in generations])
    shaping = g.overlong_penalty * overlong_penalty(lengths, g.max_new_tokens, g.overlong_buffer)
    rewards = per_fn @ torch.tensor([s.weight for s in g.rewards]) + shaping  # (S,)
    grouped = rewards.view(len(prompts), g.group_size)
    keep = informative_groups(grouped) if g.dynamic_sampling else torch.ones(len(prompts), dtype=torch.bool)
    stats = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
             **{k: v for name, col in zip(reward_names(recipe), per_fn.T)
                for k, v in ((name, float(col.mean())), (f"{name}_std", float(col.std())))},
             "overlong_shaping": float(shaping.mean()), "completion_length": float(lengths.float().mean()),
             "eos_fraction": sum(x.finish_reason == "eos" for x in generations) / len(generations),
             "dropped_groups": int((~keep).sum()), "tokens": int(lengths.sum())}
    rows = keep.repeat_interleave(g.group_size).nonzero().squeeze(1).tolist()
    batch = None
    if rows:
        batch = collate_responses([group[i].ids for i in rows], [generations[i].token_ids for i in rows], pad_id=0)
        batch["advantages"] = group_advantages(grouped, g.advantage).flatten()[rows]
        minibatch = t.micro_batch_size * t.grad_accum_steps
        # The first minibatch of the first pass sees the sampling policy itself (ratio 1, old = logp.detach()); only
        # a policy that moves before a response is used needs log π_old computed here.
        needs_old = g.num_iterations > 1 or len(rows) > minibatch
        batch.update(reference_passes(model, batch, recipe, needs_old, device))
    stats["rollout_seconds"] = time.perf_counter() - started
    return batch, stats


def reference_passes(model, batch: dict, recipe: GRPORecipe, needs_old: bool, device) -> dict:
    """log π_old (policy adapter, if `needs_old`) and log π_ref (adapters off, if β > 0) of the responses, in eval
    mode."""
    g, S, R = recipe.grpo, *batch["targets"].shape
    out = {}
    was_training = model.training
    model.eval()
    for key, wanted, adapters in (("old_logp", needs_old, lambda: use_adapter(model, POLICY)),
                                  ("ref_logp", g.beta > 0, lambda: adapters_disabled(model))):
        if wanted:
            pieces = []
            for piece in micro_batches(batch, recipe.train.micro_batch_size):
                with adapters():
                    pieces.append(response_logprobs(model, common.to_device(piece, device), g.temperature)[0])
            out[key] = scatter_rows(pieces, S, R)
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- the update

def grpo_minibatch(model, batch: dict, rows: torch.Tensor, recipe: GRPORecipe, device, scaler=None) -> dict:
    """Accumulate the gradients of one minibatch (rows of the rollout batch); returns its token-mean statistics.
    An fp16 model on CUDA scales the backward by the `scaler`'s loss scale (common.grad_scaler)."""
    g = recipe.grpo
    normalization = "constant" if g.advantage == "dr_grpo" else g.loss_normalization
    n_tokens = int(batch["response_mask"][rows].sum())
    sums = dict.fromkeys(("loss", "kl", "clip_low_frac", "clip_high_frac", "entropy", "ratio"), 0.0)
    for piece in micro_batches(batch, recipe.train.micro_batch_size, rows):
        piece = common.to_device(piece, device)
        mask = piece["response_mask"].float()
        logp, entropy = response_logprobs(model, piece, g.temperature)
        old = piece["old_logp"] if "old_logp" in piece else logp.detach()
        loss, low, high = clipped_surrogate(logp, old, piece["advantages"], g.clip_low, g.clip_high)
        kl = k3_kl(logp, piece["ref_logp"]) if g.beta > 0 else torch.zeros_like(logp)
        loss = loss + g.beta * kl
        common.backward((loss * loss_weights(mask, normalization, n_tokens, len(rows), g.max_new_tokens)).sum(), scaler)
        for name, x in (("loss", loss), ("kl", kl), ("clip_low_frac", low), ("clip_high_frac", high),
                        ("entropy", entropy), ("ratio", torch.exp(logp - old))):
            sums[name] += float((x.detach() * mask).sum()) / n_tokens
    return sums


def grpo_update(model, batch: dict, recipe: GRPORecipe, params, optimizer, scheduler, device, scaler=None) -> dict:
    """num_iterations passes over the rollout batch in order, one optimizer step per minibatch; mean statistics
    (ratio_first: the token-mean ratio of the first minibatch, 1 by construction)."""
    t = recipe.train
    started, S = time.perf_counter(), len(batch["input_ids"])
    minibatch = t.micro_batch_size * t.grad_accum_steps
    totals, updates, first = {}, 0, None
    for _ in range(recipe.grpo.num_iterations):
        for start in range(0, S, minibatch):
            sums = grpo_minibatch(model, batch, torch.arange(start, min(start + minibatch, S)), recipe, device, scaler)
            first = sums["ratio"] if first is None else first
            sums["grad_norm"], _ = common.optimizer_step(params, optimizer, scheduler, t.max_grad_norm, sums["loss"],
                                                         scaler)
            totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
            updates += 1
    return {**{k: v / updates for k, v in totals.items()}, "ratio_first": first, "updates": updates,
            "update_seconds": time.perf_counter() - started}


def no_update() -> dict:
    """The update statistics of a step whose groups were all dropped: nothing to learn from, no optimizer step."""
    return {"loss": 0.0, "kl": 0.0, "clip_low_frac": 0.0, "clip_high_frac": 0.0, "entropy": 0.0, "ratio": 1.0,
            "ratio_first": 1.0, "grad_norm": 0.0, "updates": 0, "update_seconds": 0.0}


# ----------------------------------------------------------------------------- evaluation, errors, output

@torch.no_grad()
def held_out_accuracy(model, scorers, prompts, tokenizer, recipe: GRPORecipe) -> dict:
    """The mean of the accuracy reward (grpo.accuracy_reward) over greedy responses to held-out prompts ({} without),
    and each prompt's reward (`val_scores`, kept in held_out_before.json for the paired test, not logged)."""
    if not prompts:
        return {}
    prompts, generations = sample_groups(model, prompts, tokenizer, recipe, seed=None, greedy=True)
    scores = scorers[recipe.grpo.accuracy_reward].score(prompts, generations)
    return {"val_accuracy": float(scores.mean()),
            "val_completion_length": float(np.mean([len(x.token_ids) for x in generations])),
            "val_scores": [float(x) for x in scores]}


def logged(held_out: dict) -> dict:
    """A held-out result as metrics.jsonl records it: without the per-prompt scores."""
    return {k: v for k, v in held_out.items() if k != "val_scores"}


def sign_test_p(improved: int, worsened: int) -> float:
    """One-sided exact McNemar (sign) test of "no better": P(X >= improved) for X ~ Binomial(improved + worsened,
    1/2), over the held-out prompts whose reward changed (those that did not carry no evidence either way)."""
    n = improved + worsened
    return sum(math.comb(n, i) for i in range(improved, n + 1)) / 2 ** n


def paired_change(before: dict, after: dict) -> dict:
    """Prompts whose greedy reward rose / fell between the two evaluations of the same held-out prompts, and
    `sign_test_p` of them ({} unless both evaluations kept their per-prompt scores)."""
    a, b = before.get("val_scores"), after.get("val_scores")
    if not a or not b or len(a) != len(b):
        return {}
    improved, worsened = sum(y > x for x, y in zip(a, b)), sum(y < x for x, y in zip(a, b))
    return {"val_improved": improved, "val_worsened": worsened, "val_p_one_sided": sign_test_p(improved, worsened)}


@contextlib.contextmanager
def reward_errors_stop(run: Run):
    """A failing reward function stops the run with one message naming it and the last good checkpoint."""
    try:
        yield
    except RewardError as e:
        raise common.TrainingError(
            f"{e}. The run stops; the last good checkpoint is "
            f"{run.checkpointer.latest() or 'none (no checkpoint was saved yet)'}: fix the function, then continue "
            "with --resume") from None


def step_record(step: int, rollout_stats: dict, update: dict, scheduler, started: float, device) -> dict:
    """A step's metrics.jsonl record: rollout and update statistics, lr, speed and peak memory."""
    seconds = time.perf_counter() - started
    return {"step": step, **rollout_stats, **update, "lr": scheduler.get_last_lr()[0], "seconds": seconds,
            "tokens_per_s": rollout_stats["tokens"] / seconds, "peak_memory_bytes": common.peak_memory_bytes(device)}


def describe_step(record: dict) -> str:
    """One console line per logged step."""
    held_out = f", held-out accuracy {record['val_accuracy']:.3f}" if "val_accuracy" in record else ""
    return (f"step {record['step']}: reward {record['reward']:.3f} ± {record['reward_std']:.3f}, KL "
            f"{record['kl']:.4f}, clip {record['clip_low_frac']:.3f}/{record['clip_high_frac']:.3f}, entropy "
            f"{record['entropy']:.3f}, length {record['completion_length']:.1f}, dropped {record['dropped_groups']} "
            f"groups, rollout {record['rollout_seconds']:.1f} s / update {record['update_seconds']:.1f} s{held_out}")


def finish(run: Run, recipe: GRPORecipe, steps: int, before: dict, after: dict) -> dict:
    """Plot, summarise (metric, before, after, kl: the last step's mean KL, null with β = 0; the paired test of the
    held-out prompts, `paired_change`) and save the adapter."""
    records = run.metrics.read()
    names = reward_names(recipe)
    curves = [("reward", "reward (weighted sum)")] + ([(n, n) for n in names] if len(names) > 1 else [])
    plot_reward_curve(records, run.dir / "reward_curve.png", curves, ("val_accuracy", "held-out accuracy (greedy)"),
                      "step", "KL to the reference (k3, nats / token)")
    logged = [r for r in records if "reward" in r]
    kls = [r["kl"] for r in logged]
    return run.finish({
        "metric": "val_accuracy", "before": before.get("val_accuracy"), "after": after.get("val_accuracy"),
        **paired_change(before, after),
        "kl": kls[-1] if kls and recipe.grpo.beta > 0 else None,
        "kl_max": max(kls) if kls and recipe.grpo.beta > 0 else None, "steps": steps,
        "reward_first": logged[0]["reward"] if logged else None,
        "reward_last": logged[-1]["reward"] if logged else None,
        "dropped_groups": sum(r["dropped_groups"] for r in logged),
        "rollout_seconds": sum(r["rollout_seconds"] for r in logged),
        "update_seconds": sum(r["update_seconds"] for r in logged)})


# ----------------------------------------------------------------------------- the loop

def run_grpo(recipe: GRPORecipe, resume: bool = False, console=None) -> dict:
    """Train the recipe's policy adapter with GRPO; returns the run summary (also in output.dir/summary.json)."""
    t, g = recipe.train, recipe.grpo
    run, model, tokenizer, device = start_run(recipe, resume, console)
    scorers, params = attach_policy(model, recipe, tokenizer.pad_id, device)
    train_prompts, val_prompts = load_run_prompts(run.console, recipe.data, tokenizer, t.seed)
    per_step = g.rollout_batch_size // g.group_size
    steps = t.max_steps or max(1, t.epochs * (len(train_prompts) // per_step))
    updates = steps * g.num_iterations * (g.rollout_batch_size // (t.micro_batch_size * t.grad_accum_steps))
    optimizer, scheduler, start_step, position = run.begin(recipe, model, POLICY, params, updates)
    held_out = (model, scorers, val_prompts, tokenizer, recipe)
    scaler = common.grad_scaler(device, model.model.embed_tokens.weight.dtype)
    with reward_errors_stop(run):
        before = held_out_accuracy(*held_out) if start_step == 0 else run.load_before()
    if start_step == 0:
        run.save_before(before)
        run.log({"step": 0, **logged(before)})
    batches = prompt_batches(len(train_prompts), per_step, t.seed, recipe.data.shuffle, position)
    after = {}
    with run.training(steps, start_step) as stop, reward_errors_stop(run):
        for step in range(start_step + 1, steps + 1):
            t0 = time.perf_counter()
            position, indices = next(batches)
            batch, rollout_stats = rollout(model, scorers, [train_prompts[i] for i in indices], tokenizer, recipe,
                                           step, device)
            update = grpo_update(model, batch, recipe, params, optimizer, scheduler, device, scaler) if batch \
                else no_update()
            run.check_finite(step, loss=update["loss"], grad_norm=update["grad_norm"], kl=update["kl"])
            if batch:  # a step whose groups were all dropped made no update: its zero gradient is no collapse
                run.check_collapse(step, update["grad_norm"])
            record = step_record(step, rollout_stats, update, scheduler, t0, device)
            after = held_out_accuracy(*held_out) if recipe.eval.every and step % recipe.eval.every == 0 else {}
            record.update(logged(after))
            log = step % t.log_every == 0 or step == steps or bool(after)
            run.step_done(record, log=log)
            if log:
                run.console.print(describe_step(record))
            run.step_end(step, position, stop)
    run.save_checkpoint(steps, position)
    if not after and val_prompts:
        with reward_errors_stop(run):
            after = held_out_accuracy(*held_out)
        run.log({"step": steps, **logged(after)})
    return finish(run, recipe, steps, before, after)
