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
from qtune.align.preference_losses import listwise_loss, pairwise_loss, pointwise_mse, preference_accuracy
from qtune.recipe.align import RewardRecipe
from qtune.recipe.schema import recipe_to_toml
from qtune.align.reward_model import RewardModel, ScalarHead, evaluate_reward
from qtune.train import common
from qtune.train.run import Run, load_base_model
from qtune.train.sft import total_steps

ADAPTER = "default"
# The head rides on the base model as a submodule while training, so checkpoints save and restore it with
# the adapter's tensors (they hold every parameter that requires grad).
HEAD_MODULE = "reward_head"


def attach_adapter(model, lora, seed: int) -> None:
    """A fresh adapter `ADAPTER`, the only trainable parameters, as the recipe's [lora] section describes."""
    add_lora(model, LoraConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                               rslora=lora.rslora), name=ADAPTER, seed=seed)
    mark_trainable(model, ADAPTER)


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


def train_step(model, head, micro: list[dict], params, optimizer, scheduler, recipe: RewardRecipe, device,
               model_dtype) -> dict:
    """One optimizer step over the micro-batches `micro`; returns loss, accuracy and margin of its pairs, lr, grad norm.

    loss = Σ over micro-batches and elements e of loss(e) / N, N = the elements (pairs, rankings or responses)
    of the whole step, so accumulation equals one large batch; the LM regulariser is normalised likewise by
    the chosen replies' tokens of the step.
    """
    r, kernels, lm = recipe.reward, recipe.model.kernels, recipe.reward.lm_loss_coef > 0
    units = [loss_units(b, r.loss) for b in micro]
    n_main, n_lm = sum(u[0] for u in units), max(1, sum(u[1] for u in units))
    loss_total = lm_total = 0.0
    margins = []
    for batch in micro:
        batch = common.to_device(batch, device)
        with common.autocast(device, model_dtype):
            main, lm_sum, rewards = reward_loss_sums(model, head, batch, r.loss, lm, kernels)
        (main / n_main + (r.lm_loss_coef * lm_sum / n_lm if lm else 0.0)).backward()
        loss_total += main.item()
        lm_total += lm_sum.item() if lm else 0.0
        margins.append((rewards[batch["better"]] - rewards[batch["worse"]]).detach().float())
    loss = loss_total / n_main
    grad_norm = common.clip_gradients(params, recipe.train.max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    margins = torch.cat(margins)
    out = {"loss": loss, "accuracy": float(preference_accuracy(margins).mean()), "margin": float(margins.mean()),
           "lr": lr, "grad_norm": grad_norm, "real_tokens": sum(common.count_tokens(b) for b in micro)}
    if lm:
        out["lm_loss"] = lm_total / n_lm
    return out


def prepare(recipe: RewardRecipe, run: Run, device):
    """Base model + seeded adapter + reward head (riding on the model), and the preference data."""
    t = recipe.train
    common.seed_everything(t.seed)
    model, tokenizer = load_base_model(recipe.model, device)
    attach_adapter(model, recipe.lora, t.seed)
    head = ScalarHead(model.config.hidden_size, seed=t.seed, device=device, init=recipe.reward.head_init)
    model.add_module(HEAD_MODULE, head)
    data = build_preference_data(recipe.data, tokenizer, t.seed, need_scores=recipe.reward.loss == "mse")
    run.console.print(data.describe())
    return model, head, data


def run_reward(recipe: RewardRecipe, resume: bool = False, console=None) -> dict:
    """Train the recipe's reward model; returns the run summary (also written to `output.dir/summary.json`).

    The summary holds the held-out accuracy before and after training (`val_accuracy_before` / `_after`).
    """
    t, device = recipe.train, common.training_device()
    run = Run(Path(recipe.output.dir), console, resume)
    run.base_model = recipe.model.path
    model, head, data = prepare(recipe, run, device)
    params = lora_parameters(model, ADAPTER) + list(head.parameters())
    model_dtype = model.model.embed_tokens.weight.dtype
    steps = total_steps(recipe, data.batches_per_epoch(t.micro_batch_size))
    optimizer = common.build_optimizer(params, t.optimizer, t.lr, t.weight_decay)
    scheduler = common.build_scheduler(optimizer, t.schedule, t.warmup_steps or round(t.warmup_ratio * steps), steps)
    start_step, position = run.restore(model, ADAPTER, optimizer, scheduler) if resume else (0, DataPosition())
    run.write_recipe(recipe_to_toml(recipe))
    val_args = (RewardModel(model, ADAPTER, head), data, t.micro_batch_size, device, recipe.eval.max_batches)
    if start_step == 0 and data.val:
        with run.console.status("held-out evaluation before training"):
            # a zero head (reward.head_init = "zero") scores every pair 0: its result is known without a pass
            run.save_before(validation(*val_args) if head.linear.weight.any() else indifferent_validation())
    batches = data.batches(t.micro_batch_size, t.seed, start=position)
    after = None
    model.train()
    run.start_progress(steps, start_step)
    try:
        with common.GracefulStop(run.console) as stop:
            for step in range(start_step + 1, steps + 1):
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(t.grad_accum_steps)]
                out = train_step(model, head, [b for _, b in micro], params, optimizer, scheduler, recipe, device,
                                 model_dtype)
                if not (math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])):
                    raise common.TrainingError(
                        f"loss {out['loss']}, gradient norm {out['grad_norm']} at step {step}: the run stops and "
                        f"this step is not applied. The last good checkpoint is "
                        f"{run.checkpointer.latest() or 'none (no checkpoint was saved yet)'}; lower train.lr or "
                        "check the data, then continue with --resume")
                position = micro[-1][0]
                real_tokens = out.pop("real_tokens")
                record = {"step": step, **out, "tokens_per_s": real_tokens / (time.perf_counter() - t0),
                          "epoch": position.epoch, "peak_memory_bytes": common.peak_memory_bytes(device)}
                if step == steps and data.val:  # the last step's record carries the held-out evaluation
                    run.step_done(record, log=False)
                    run.stop_progress()
                    with run.console.status("held-out evaluation after training"):
                        after = validation(*val_args)
                    run.log({**record, **after})
                    break
                if recipe.eval.every and step % recipe.eval.every == 0 and data.val:
                    record.update(validation(*val_args))
                run.step_done(record, log=step % t.log_every == 0 or step == steps or "val_loss" in record)
                if stop.requested:
                    run.save_checkpoint(step, model, ADAPTER, optimizer, scheduler, position)
                    run.console.print(f"[yellow]stopped: saved step {step}; continue with --resume[/yellow]")
                    raise KeyboardInterrupt
                if t.save_every and step % t.save_every == 0:
                    run.save_checkpoint(step, model, ADAPTER, optimizer, scheduler, position)
    finally:
        run.stop_progress()
    run.save_checkpoint(steps, model, ADAPTER, optimizer, scheduler, position)
    if after is None and data.val:  # resumed from the final checkpoint: nothing left to train
        after = validation(*val_args)
    before, after = run.load_before(), after or {}
    summary = run.finish(model, ADAPTER, recipe.model.path, {
        "steps": steps, "pairs": data.stats["train_pairs"], "val_pairs": data.stats["val_pairs"],
        "val_accuracy_before": before.get("val_accuracy"), "val_accuracy_after": after.get("val_accuracy"),
        "val_margin_after": after.get("val_margin")})
    # The head travels with the adapter (extra_tensors.safetensors), so `load_reward_model` finds both.
    save_adapter(model, run.dir / "adapter", name=ADAPTER, base_model_name_or_path=str(recipe.model.path),
                 extra_tensors=head.tensors())
    return summary


def indifferent_validation() -> dict:
    """The held-out metrics of a zero head, known without a forward pass: every reward is 0, every pair ties."""
    return {"val_accuracy": 0.5, "val_margin": 0.0, "val_loss": math.log(2)}


def validation(scorer: RewardModel, data, micro_batch_size: int, device, max_batches: int) -> dict:
    """Held-out accuracy, mean margin and pairwise loss, under the metric names the run log uses."""
    result = evaluate_reward(scorer, data.val_batches(micro_batch_size), device, max_batches)
    return {"val_accuracy": result["accuracy"], "val_margin": result["mean_margin"], "val_loss": result["loss"]}
