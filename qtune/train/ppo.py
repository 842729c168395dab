"""PPO (Schulman et al. 2017) on a LoRA policy, the InstructGPT way, with every role on ONE frozen 4-bit base.

    base model (NF4, frozen, loaded once)
      ├── adapter "policy"              trainable   π_θ: samples the responses, trained by the clipped objective
      ├── adapter "value" + value head  trainable   V: a value per response token; starts as the reward model
      ├── adapter "reward" + its head   frozen      the score of a whole response (or a Python function)
      └── adapters switched off         frozen      π_ref, which the KL penalty pulls the policy towards

    per iteration (train.max_steps of them):
      prompts -> sample one response each (KV cache, policy adapter)
              -> score; log π_old, log π_ref, V at every response token
              -> r_t = −β (log π_old − log π_ref) + score · [t = last]  -> GAE -> advantages (whitened), returns
              -> ppo_epochs passes over minibatches: clipped policy loss + vf_coef · clipped value loss
                 (+ ptx_coef · LM loss on plain text: PPO-ptx) -> AdamW
              -> move β towards the KL target (Ziegler et al. 2019)

Losses and advantages live in `qtune.align.ppo_losses`; prompt records in `qtune.data.prompts`; sampling
and scoring in `qtune.train.rollout`.
"""

import time

import numpy as np
import torch

from qtune.data.batching import collate
from qtune.data.prompts import prompt_batches
from qtune.data.records import load_records
from qtune.data.tokenized import tokenize_cached
from qtune.lora import adapters_disabled, add_lora, adapter_parameters, set_active_adapter, use_adapter
from qtune.peft import load_adapter, load_extra_tensors, lora_config, save_adapter
from qtune.align.ppo_losses import (AdaptiveKLController, FixedKLController, approx_kl, clipped_policy_loss,
                                    clipped_value_loss, gae, kl_penalized_rewards, masked_mean, whiten)
from qtune.recipe.align import PPORecipe
from qtune.align.reward_model import ScalarHead
from qtune.train import common
from qtune.train.rollout import (build_scorer, collate_responses, load_run_prompts, micro_batches, plot_reward_curve,
                                 response_hidden, response_logprobs, sample, scatter_rows)
from qtune.train.run import Run, start_run

POLICY, VALUE = "policy", "value"
VALUE_HEAD = "value_head"  # the value head rides on the base as a submodule, so checkpoints hold it


# ----------------------------------------------------------------------------- the roles on one base

def attach_roles(model, recipe: PPORecipe, pad_id: int, device):
    """Put the reward, policy and value roles on `model`; returns (scorer, trainable parameters).

    The policy adapter starts at B = 0, so the first policy is the reference. With a reward model and
    ppo.init_value_from_reward, the value adapter and head start as copies of the reward model's.
    """
    p, lora, seed = recipe.ppo, recipe.lora, recipe.train.seed
    scorer = build_scorer(p, model, pad_id, recipe.train.micro_batch_size, device)
    if p.reward_model:
        scorer.reward_model.head.requires_grad_(False)
    cfg = lora_config(lora)
    add_lora(model, cfg, name=POLICY, seed=seed)
    if p.reward_model and p.init_value_from_reward:
        load_adapter(model, p.reward_model, name=VALUE)
        head = ScalarHead.from_tensors(load_extra_tensors(p.reward_model), where=p.reward_model)
    else:
        add_lora(model, cfg, name=VALUE, seed=seed + 1)
        head = ScalarHead(model.config.hidden_size, seed=seed)
    model.add_module(VALUE_HEAD, head.to(device))
    model.requires_grad_(False)
    params = adapter_parameters(model, POLICY) + adapter_parameters(model, VALUE) + list(head.parameters())
    for q in params:
        q.requires_grad_(True)
    set_active_adapter(model, POLICY)
    return scorer, params


def response_values(model, batch: dict) -> torch.Tensor:
    """V(x, y_<t) of the active (value) adapter through the value head, (S, R) fp32, 0 off the mask."""
    head = model.get_submodule(VALUE_HEAD)
    values = head.linear(response_hidden(model, batch).float()).squeeze(-1)
    return values * batch["response_mask"]


# ----------------------------------------------------------------------------- rollouts

@torch.no_grad()
def make_experience(model, scorer, prompts, generations, recipe: PPORecipe, beta: float, device) -> tuple[dict, dict]:
    """Score the responses and run the policy, the reference and the value model over them (eval mode).

    Returns the rollout batch (the `collate_responses` tensors plus old_logp, ref_logp, values, advantages,
    returns (S, R) and scores (S,)) on the CPU, and its statistics.
    """
    p = recipe.ppo
    # Padding is masked out of attention and of every loss, so its token id does not matter.
    batch = collate_responses([q.ids for q in prompts], [g.token_ids for g in generations], pad_id=0)
    scores = scorer.score(prompts, generations)
    if p.score_clip > 0:
        scores = scores.clamp(-p.score_clip, p.score_clip)
    was_training = model.training
    model.eval()
    old, ref, values = [], [], []
    for piece in micro_batches(batch, recipe.train.micro_batch_size):
        piece = common.to_device(piece, device)
        with use_adapter(model, POLICY):
            old.append(response_logprobs(model, piece, p.temperature)[0])
        with adapters_disabled(model):
            ref.append(response_logprobs(model, piece, p.temperature)[0])
        with use_adapter(model, VALUE):
            values.append(response_values(model, piece))
    model.train(was_training)
    S, R = batch["targets"].shape
    mask = batch["response_mask"].float()
    old_logp, ref_logp, values = (scatter_rows(x, S, R) for x in (old, ref, values))
    rewards = kl_penalized_rewards(scores, old_logp, ref_logp, mask, beta)
    advantages, returns = gae(rewards, values, mask, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = whiten(advantages, mask)
    batch.update(old_logp=old_logp, ref_logp=ref_logp, values=values, advantages=advantages, returns=returns,
                 scores=scores)
    kl = ((old_logp - ref_logp) * mask).sum(1)  # (S,) each response's Σ_t log π/π_ref, an estimate of its KL
    lengths = mask.sum(1)
    stats = {"reward": float(scores.mean()), "reward_std": float(scores.std()) if S > 1 else 0.0,
             "kl": float(kl.mean()), "response_length": float(lengths.mean()),
             "eos_fraction": sum(g.finish_reason == "eos" for g in generations) / S,
             "value": float(masked_mean(values, mask)), "return": float(masked_mean(returns, mask)),
             "tokens": int(batch["attention_mask"].sum())}
    return batch, stats


# ----------------------------------------------------------------------------- the PPO update

class PretrainText:
    """Plain text for PPO-ptx: random micro-batches of data.max_seq_len-token rows, fixed by (seed, step)."""

    def __init__(self, data, tokenizer, seed: int):
        records = load_records(data.pretrain_path, data.split)
        self.store = tokenize_cached(records, "text", tokenizer, data.max_seq_len, True, data.cache_dir, chunk=True)
        self.pad_id, self.seed = tokenizer.pad_id, seed

    def batch(self, size: int, *key: int) -> dict:
        rng = np.random.default_rng([self.seed, *key])
        picks = rng.choice(len(self.store), size=min(size, len(self.store)), replace=False)
        return collate([[self.store.example(int(i))] for i in picks], self.pad_id)


def ppo_minibatch(model, batch: dict, rows: torch.Tensor, recipe: PPORecipe, ptx: PretrainText | None, key: tuple,
                  device, scaler=None) -> dict:
    """Accumulate the gradients of one minibatch (rows of the rollout batch); returns summed statistics.

    Each role runs its backward while its own adapter is active: gradient checkpointing re-runs a layer's
    forward during the backward pass, and would otherwise re-run it with whichever adapter is active then.
    Losses are divided by the minibatch's response tokens, so accumulation equals one large batch. An fp16 model
    on CUDA scales every backward by the `scaler`'s loss scale (common.grad_scaler).
    """
    p, t = recipe.ppo, recipe.train
    n_tokens = float(batch["response_mask"][rows].sum())
    sums = dict.fromkeys(("policy_loss", "value_loss", "clip_frac", "value_clip_frac", "entropy", "approx_kl",
                          "ptx_loss"), 0.0)
    for k, piece in enumerate(micro_batches(batch, t.micro_batch_size, rows)):
        piece = common.to_device(piece, device)
        mask = piece["response_mask"].float()
        with use_adapter(model, POLICY):
            logp, entropy = response_logprobs(model, piece, p.temperature)
            pg, clipped = clipped_policy_loss(logp, piece["old_logp"], piece["advantages"], p.clip_range)
            common.backward((pg * mask).sum() / n_tokens, scaler)
            if ptx is not None:
                # PPO-ptx (InstructGPT eq. 2): + γ E_pretrain[log π(x)], i.e. γ times the mean token cross-entropy
                loss_sum, count = common.lm_loss_sum(model, common.to_device(ptx.batch(t.micro_batch_size, *key, k),
                                                                             device))
                common.backward(p.ptx_coef * loss_sum / max(count, 1) / t.grad_accum_steps, scaler)
                sums["ptx_loss"] += loss_sum.item() / max(count, 1) / t.grad_accum_steps
        with use_adapter(model, VALUE):
            vf, vf_clipped = clipped_value_loss(response_values(model, piece), piece["values"], piece["returns"],
                                                p.clip_range_value)
            common.backward(p.vf_coef * (vf * mask).sum() / n_tokens, scaler)
        for name, x in (("policy_loss", pg), ("value_loss", vf), ("clip_frac", clipped),
                        ("value_clip_frac", vf_clipped), ("entropy", entropy),
                        ("approx_kl", approx_kl(logp, piece["old_logp"]))):
            sums[name] += float((x.detach() * mask).sum()) / n_tokens
    return sums


def ppo_epochs(model, batch: dict, recipe: PPORecipe, ptx, params, optimizer, scheduler, step: int, device,
               scaler=None) -> dict:
    """ppo_epochs passes over the rollout batch in shuffled minibatches, one optimizer step each; mean statistics."""
    p, t = recipe.ppo, recipe.train
    S, minibatch = len(batch["input_ids"]), t.micro_batch_size * t.grad_accum_steps
    generator = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
    totals, updates = {}, 0
    for epoch in range(p.ppo_epochs):
        order = torch.randperm(S, generator=generator)
        for start in range(0, S, minibatch):
            sums = ppo_minibatch(model, batch, order[start:start + minibatch], recipe, ptx, (step, epoch, start), device,
                                 scaler)
            loss = sums["policy_loss"] + sums["value_loss"]
            sums["grad_norm"], _ = common.optimizer_step(params, optimizer, scheduler, t.max_grad_norm, loss, scaler)
            totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
            updates += 1
    return {k: v / updates for k, v in totals.items()}


# ----------------------------------------------------------------------------- evaluation, checkpoints, output

@torch.no_grad()
def evaluate_policy(model, scorer, prompts, tokenizer, max_new_tokens: int, batch_size: int) -> dict:
    """Mean score and length of the policy's greedy responses to held-out prompts ({} without any)."""
    if not prompts:
        return {}
    with use_adapter(model, POLICY):
        generations = sample(model, prompts, tokenizer, max_new_tokens, greedy=True, batch_size=batch_size)
    scores = scorer.score(prompts, generations)
    return {"val_reward": float(scores.mean()),
            "val_response_length": float(np.mean([len(g.token_ids) for g in generations]))}


def kl_controller(p, state: dict | None = None):
    """The KL coefficient's controller (adaptive or fixed), continuing from a checkpoint's `state`."""
    controller = AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl \
        else FixedKLController(p.kl_coef)
    if state is not None:
        controller.load_state_dict(state)
    return controller


def iteration_record(step: int, rollout: dict, update: dict, beta: float, kl_ctl, recipe: PPORecipe, scheduler,
                     started: float, device) -> dict:
    """An iteration's metrics.jsonl record: rollout and update statistics, β before and after, loss, lr, speed."""
    return {"step": step, **rollout, **update, "beta": beta, "next_beta": kl_ctl.beta,
            "loss": update["policy_loss"] + recipe.ppo.vf_coef * update["value_loss"],
            "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - started,
            "tokens_per_s": rollout["tokens"] / (time.perf_counter() - started),
            "peak_memory_bytes": common.peak_memory_bytes(device)}


# ----------------------------------------------------------------------------- the loop

def run_ppo(recipe: PPORecipe, resume: bool = False, console=None) -> dict:
    """Train the recipe's policy adapter with PPO; returns the run summary (also in output.dir/summary.json)."""
    t, p = recipe.train, recipe.ppo
    run, model, tokenizer, device = start_run(recipe, resume, console)
    scorer, params = attach_roles(model, recipe, tokenizer.pad_id, device)
    train_prompts, val_prompts = load_run_prompts(run.console, recipe.data, tokenizer, t.seed)
    ptx = PretrainText(recipe.data, tokenizer, t.seed) if p.ptx_coef > 0 else None
    iterations = t.max_steps or max(1, t.epochs * (len(train_prompts) // p.rollout_batch_size))
    updates = iterations * p.ppo_epochs * (p.rollout_batch_size // (t.micro_batch_size * t.grad_accum_steps))
    optimizer, scheduler, start_step, position = run.begin(recipe, model, POLICY, params, updates)
    kl_ctl = kl_controller(p, run.restored.get("kl_controller"))
    scaler = common.grad_scaler(device, model.model.embed_tokens.weight.dtype)
    held_out = (model, scorer, val_prompts, tokenizer, p.max_new_tokens, p.rollout_batch_size)
    before = evaluate_policy(*held_out) if start_step == 0 else {}
    if before:
        run.log({"step": 0, **before})
    batches = prompt_batches(len(train_prompts), p.rollout_batch_size, t.seed, recipe.data.shuffle, position)
    after = {}
    with run.training(iterations, start_step) as stop:
        for step in range(start_step + 1, iterations + 1):
            t0 = time.perf_counter()
            position, indices = next(batches)
            prompts, beta = [train_prompts[i] for i in indices], kl_ctl.beta
            with use_adapter(model, POLICY):
                generations = sample(model, prompts, tokenizer, p.max_new_tokens, p.temperature,
                                     seed=t.seed * 1_000_003 + step, batch_size=p.rollout_batch_size)
            batch, rollout = make_experience(model, scorer, prompts, generations, recipe, beta, device)
            update = ppo_epochs(model, batch, recipe, ptx, params, optimizer, scheduler, step, device, scaler)
            run.check_finite(step, **update)
            run.check_collapse(step, update["grad_norm"])
            kl_ctl.update(rollout["kl"], len(prompts))
            record = iteration_record(step, rollout, update, beta, kl_ctl, recipe, scheduler, t0, device)
            after = evaluate_policy(*held_out) if recipe.eval.every and step % recipe.eval.every == 0 else {}
            record.update(after)
            log = step % t.log_every == 0 or step == iterations or bool(after)
            run.step_done(record, log=log)
            if log:
                run.console.print(describe_iteration(record))
            run.step_end(step, position, stop, kl_controller=kl_ctl.state_dict())
    run.save_checkpoint(iterations, position, kl_controller=kl_ctl.state_dict())
    if not after and val_prompts:
        after = evaluate_policy(*held_out)
        run.log({"step": iterations, **after})
    return finish(run, recipe, iterations, kl_ctl, before, after)


def describe_iteration(record: dict) -> str:
    """One console line per logged iteration."""
    held_out = f", held-out reward {record['val_reward']:.3f}" if "val_reward" in record else ""
    return (f"iteration {record['step']}: reward {record['reward']:.3f}, KL {record['kl']:.3f} nats "
            f"(β {record['beta']:.4f}), clip {record['clip_frac']:.3f}, entropy {record['entropy']:.3f}, "
            f"length {record['response_length']:.1f}{held_out}")


def finish(run: Run, recipe: PPORecipe, iterations: int, kl_ctl, before: dict, after: dict) -> dict:
    """Save the policy adapter (output.dir/adapter) and the value adapter + head (output.dir/value), plot, summarise."""
    save_adapter(run.model, run.dir / "value", name=VALUE, base_model_name_or_path=recipe.model.path,
                 extra_tensors=run.model.get_submodule(VALUE_HEAD).tensors())
    records = run.metrics.read()
    plot_reward_curve(records, run.dir / "reward_curve.png", [("reward", "rollout reward")],
                      ("val_reward", "held-out reward (greedy)"), "iteration", "KL to the reference (nats / response)")
    rewards = [r["reward"] for r in records if "reward" in r]
    return run.finish({
        "iterations": iterations, "value_adapter": str(run.dir / "value"),
        "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
        "kl_last": next((r["kl"] for r in reversed(records) if "kl" in r), None), "beta_last": kl_ctl.beta,
        "val_reward_before": before.get("val_reward"), "val_reward_after": after.get("val_reward")})
