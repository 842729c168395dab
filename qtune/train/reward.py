"""Reward-model training: base + LoRA adapter + scalar head on preference pairs and rankings.

    recipe -> 4-bit base + LoRA adapter + ScalarHead -> preference batches (K sequences per record)
           -> r = head(h at the last token) -> pairwise / listwise / MSE loss (+ LM loss on the chosen reply)
           -> (accumulate, clip, step) x max_steps -> held-out accuracy -> output.dir/adapter/ (adapter + head)
"""

import math
import time
from pathlib import Path

import torch

from qtune.data.batching import DataPosition
from qtune.data.prefs import build_preference_data
from qtune.data.render import IGNORE
from qtune.lora import LoraConfig, add_lora, lora_parameters, mark_trainable, save_adapter
from qtune.losses import listwise_loss, pairwise_loss, pointwise_mse, preference_accuracy
from qtune.recipe import RewardRecipe, recipe_to_toml
from qtune.reward import RewardModel, ScalarHead, evaluate_reward
from qtune.train import common
from qtune.train.run import Run, load_base_model
from qtune.train.sft import total_steps

ADAPTER = "default"
# The head rides on the base model as a submodule while training, so checkpoints save and restore it with
# the adapter's tensors (they hold every parameter that requires grad).
HEAD_MODULE = "reward_head"


def attach_adapter(model, lora, seed: int) -> list:
    """A fresh trainable adapter `ADAPTER` as the recipe's [lora] section describes; returns its parameters."""
    add_lora(model, LoraConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                               rslora=lora.rslora), name=ADAPTER, seed=seed)
    mark_trainable(model, ADAPTER)
    return lora_parameters(model, ADAPTER)


def loss_units(batch: dict, loss: str) -> tuple[int, int]:
    """(elements the reward loss averages over, chosen-response tokens the LM loss averages over)."""
    n = {"pairwise": len(batch["better"]), "listwise": len(batch["n_responses"]), "mse": len(batch["rank"])}[loss]
    return n, int((chosen_targets(batch) != IGNORE).sum())


def chosen_targets(batch: dict) -> torch.Tensor:
    """Next-token targets (S, T) of the best response of each record only (the LM regulariser's tokens)."""
    labels = batch["labels"].masked_fill(batch["rank"][:, None] != 0, IGNORE)
    return common.shifted_targets(labels)


def reward_loss_sums(model, head, batch: dict, loss: str, lm: bool, kernels: str):
    """Summed reward loss, summed LM loss on the chosen replies (None unless `lm`), and the rewards (S,)."""
    hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])  # (S, T, D)
    rewards = head(hidden, batch["attention_mask"])  # (S,)
    if loss == "pairwise":
        margin = batch["margin"][batch["pair_ranking"]]
        main = pairwise_loss(rewards[batch["better"]], rewards[batch["worse"]], margin).sum()
    elif loss == "listwise":
        G, K = len(batch["n_responses"]), int(batch["n_responses"].max())
        by_ranking = rewards.new_zeros(G, K).index_put((batch["ranking"], batch["rank"]), rewards)  # (G, K)
        main = listwise_loss(by_ranking, batch["n_responses"], batch["margin"]).sum()
    else:
        main = pointwise_mse(rewards, batch["score"]).sum()
    lm_sum = None
    if lm:
        from qtune.kernels.logprobs import cross_entropy_sum

        targets = chosen_targets(batch)
        keep = targets != IGNORE  # only the chosen replies' tokens enter the vocabulary projection
        lm_sum, _ = cross_entropy_sum(hidden[keep], model.output_weight(), targets[keep], kernels=kernels)
    return main, lm_sum, rewards


def run_reward(recipe: RewardRecipe, resume: bool = False, console=None) -> dict:
    """Train the recipe's reward model; returns the run summary (also written to `output.dir/summary.json`)."""
    t, device, r = recipe.train, common.training_device(), recipe.reward
    run = Run(Path(recipe.output.dir), console, resume)
    run.base_model = recipe.model.path
    common.seed_everything(t.seed)
    model, tokenizer = load_base_model(recipe.model, device)
    params = attach_adapter(model, recipe.lora, t.seed)
    head = ScalarHead(model.config.hidden_size, seed=t.seed, device=device)
    model.add_module(HEAD_MODULE, head)
    params += list(head.parameters())
    data = build_preference_data(recipe.data, tokenizer, t.seed, need_scores=r.loss == "mse")
    run.console.print(data.describe())
    steps = total_steps(recipe, data.batches_per_epoch(t.micro_batch_size))
    optimizer = common.build_optimizer(params, t.optimizer, t.lr, t.weight_decay)
    scheduler = common.build_scheduler(optimizer, t.schedule, t.warmup_steps or round(t.warmup_ratio * steps), steps)
    start_step, position = 0, DataPosition()
    if resume:
        start_step, position = run.restore(model, ADAPTER, optimizer, scheduler)
    run.write_recipe(recipe_to_toml(recipe))
    kernels, lm = recipe.model.kernels, r.lm_loss_coef > 0
    val_args = (RewardModel(model, ADAPTER, head), data, t.micro_batch_size, device, recipe.eval.max_batches)
    val_before = validation(*val_args) if start_step == 0 and data.val else None
    if val_before is not None:
        run.log({"step": 0, **val_before})
    batches = data.batches(t.micro_batch_size, t.seed, start=position)
    model.train()
    run.start_progress(steps, start_step)
    done_step, rng_at_done, val_after = start_step, common.rng_state(), None
    try:
        for step in range(start_step + 1, steps + 1):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(t.grad_accum_steps)]
            units = [loss_units(b, r.loss) for _, b in micro]
            n_main, n_lm = sum(u[0] for u in units), sum(u[1] for u in units)
            loss_total = lm_total = 0.0
            margins = []
            for _, batch in micro:
                batch = common.to_device(batch, device)
                main, lm_sum, rewards = reward_loss_sums(model, head, batch, r.loss, lm, kernels)
                step_loss = main / n_main + (r.lm_loss_coef * lm_sum / max(n_lm, 1) if lm else 0.0)
                step_loss.backward()
                loss_total += main.item()
                lm_total += lm_sum.item() if lm else 0.0
                margins.append((rewards[batch["better"]] - rewards[batch["worse"]]).detach())
            loss = loss_total / n_main
            if not math.isfinite(loss):
                raise common.TrainingError(
                    f"loss is {loss} at step {step}; stopping without saving. The last good checkpoint is "
                    f"{run.checkpointer.latest() or 'none'}; lower train.lr or check the data, then run again with --resume")
            grad_norm = common.clip_gradients(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position, done_step, rng_at_done = micro[-1][0], step, common.rng_state()
            margins = torch.cat(margins)
            record = {"step": step, "loss": loss, "accuracy": float(preference_accuracy(margins).mean()),
                      "margin": float(margins.mean()), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_per_s": sum(b["input_ids"].numel() for _, b in micro) / (time.perf_counter() - t0),
                      "epoch": position.epoch, "peak_memory_bytes": common.peak_memory_bytes(device)}
            if lm:
                record["lm_loss"] = lm_total / max(n_lm, 1)
            val_after = None
            if recipe.eval.every and step % recipe.eval.every == 0 and data.val:
                val_after = validation(*val_args)
                record.update(val_after)
            run.step_done(record, log=step % t.log_every == 0 or step == steps or "val_loss" in record)
            if t.save_every and step % t.save_every == 0 and step < steps:
                run.save_checkpoint(step, model, ADAPTER, optimizer, scheduler, position)
    except KeyboardInterrupt:
        # Save the state after the last completed step: an unfinished step is redone on --resume.
        run.save_checkpoint(done_step, model, ADAPTER, optimizer, scheduler, position, rng_at_done)
        run.console.print(f"[yellow]interrupted: saved step {done_step}; continue with --resume[/yellow]")
        raise
    finally:
        run.stop_progress()
    run.save_checkpoint(steps, model, ADAPTER, optimizer, scheduler, position)
    if val_after is None and data.val:
        val_after = validation(*val_args)
        run.log({"step": steps, **val_after})
    before, after = val_before or {}, val_after or {}
    summary = run.finish(model, ADAPTER, recipe.model.path, {
        "steps": steps, "pairs": data.stats["train_pairs"], "val_pairs": data.stats["val_pairs"],
        "val_accuracy_before": before.get("val_accuracy"), "val_accuracy_after": after.get("val_accuracy"),
        "val_margin_after": after.get("val_margin")})
    # The head travels with the adapter (extra_tensors.safetensors), so `load_reward_model` finds both.
    save_adapter(model, run.dir / "adapter", name=ADAPTER, base_model_name_or_path=str(recipe.model.path),
                 extra_tensors=head.tensors())
    return summary


def validation(scorer: RewardModel, data, micro_batch_size: int, device, max_batches: int) -> dict:
    """Held-out accuracy, mean margin and pairwise loss, under the metric names the run log uses."""
    result = evaluate_reward(scorer, data.val_batches(micro_batch_size), device, max_batches)
    return {"val_accuracy": result["accuracy"], "val_margin": result["mean_margin"], "val_loss": result["loss"]}
