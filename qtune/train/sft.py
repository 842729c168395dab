"""Supervised fine-tuning: QLoRA on instruction data, read top to bottom like nanoGPT's loop.

    recipe -> 4-bit base + LoRA adapter -> tokenized batches -> (accumulate, clip, step) x max_steps
           -> metrics.jsonl, checkpoints/, adapter/ (PEFT format), recipe.toml, loss_curve.png
"""

import math
import time
from pathlib import Path

import torch

from qtune.data.batching import DataPosition
from qtune.data.sft import build_sft_data
from qtune.lora import LoraConfig, add_lora, lora_parameters, mark_trainable
from qtune.recipe import SFTRecipe, recipe_to_toml
from qtune.train import common
from qtune.train.run import Run, load_base_model

ADAPTER = "default"


def total_steps(recipe: SFTRecipe, batches_per_epoch: int) -> int:
    t = recipe.train
    return t.max_steps if t.max_steps > 0 else max(1, t.epochs * math.ceil(batches_per_epoch / t.grad_accum_steps))


@torch.no_grad()
def validation_loss(model, data, micro_batch_size: int, device, kernels: str, max_batches: int = 0) -> float | None:
    """Mean per-token loss over the held-out split (dropout off)."""
    if not data.val:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for k, batch in enumerate(data.val_batches(micro_batch_size)):
        if max_batches and k >= max_batches:
            break
        loss_sum, n = common.lm_loss_sum(model, common.to_device(batch, device), kernels)
        total, count = total + loss_sum.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def run_sft(recipe: SFTRecipe, resume: bool = False, console=None) -> dict:
    """Train the recipe's adapter; returns the run summary (also written to `output.dir/summary.json`)."""
    t, device = recipe.train, common.training_device()
    run = Run(Path(recipe.output.dir), console, resume)
    run.base_model = recipe.model.path
    common.seed_everything(t.seed)
    model, tokenizer = load_base_model(recipe.model, device)
    add_lora(model, LoraConfig(r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                               target_modules=recipe.lora.target_modules, rslora=recipe.lora.rslora),
             name=ADAPTER, seed=t.seed)
    mark_trainable(model, ADAPTER)
    params = lora_parameters(model, ADAPTER)
    data = build_sft_data(recipe.data, tokenizer, seed=t.seed)
    run.show_data_stats(data.stats)
    steps = total_steps(recipe, data.batches_per_epoch(t.micro_batch_size))
    warmup = t.warmup_steps or round(t.warmup_ratio * steps)
    optimizer = common.build_optimizer(params, t.optimizer, t.lr, t.weight_decay)
    scheduler = common.build_scheduler(optimizer, t.schedule, warmup, steps)
    start_step, position = 0, DataPosition()
    if resume:
        start_step, position = run.restore(model, ADAPTER, optimizer, scheduler)
    run.write_recipe(recipe_to_toml(recipe))
    kernels = recipe.model.kernels
    val_before = validation_loss(model, data, t.micro_batch_size, device, kernels, recipe.eval.max_batches) \
        if start_step == 0 else None
    if val_before is not None:
        run.log({"step": 0, "val_loss": val_before})
    batches = data.batches(t.micro_batch_size, t.seed, start=position)
    model.train()
    run.start_progress(steps, start_step)
    done_step, rng_at_done = start_step, common.rng_state()
    try:
        for step in range(start_step + 1, steps + 1):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(t.grad_accum_steps)]
            # Normalise by the trained tokens of the whole step, so accumulation equals one big batch.
            n_tokens = sum(common.count_targets(b) for _, b in micro)
            loss_total = 0.0
            for _, batch in micro:
                loss_sum, _ = common.lm_loss_sum(model, common.to_device(batch, device), kernels)
                (loss_sum / max(n_tokens, 1)).backward()
                loss_total += loss_sum.item()
            loss = loss_total / max(n_tokens, 1)
            if not math.isfinite(loss):
                raise common.TrainingError(
                    f"loss is {loss} at step {step}; stopping without saving. The last good checkpoint is "
                    f"{run.checkpointer.latest() or 'none'}; lower train.lr or check the data, then run again with --resume")
            grad_norm = common.clip_gradients(params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            position, done_step, rng_at_done = micro[-1][0], step, common.rng_state()
            record = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens": n_tokens, "tokens_per_s": sum(b["input_ids"].numel() for _, b in micro)
                      / (time.perf_counter() - t0), "epoch": position.epoch,
                      "peak_memory_bytes": common.peak_memory_bytes(device)}
            if recipe.eval.every and step % recipe.eval.every == 0:
                record["val_loss"] = validation_loss(model, data, t.micro_batch_size, device, kernels,
                                                     recipe.eval.max_batches)
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
    val_after = validation_loss(model, data, t.micro_batch_size, device, kernels, recipe.eval.max_batches)
    return run.finish(model, ADAPTER, recipe.model.path, {"steps": steps, "val_loss_before": val_before,
                                                          "val_loss_after": val_after})
