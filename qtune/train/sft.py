"""Supervised fine-tuning: QLoRA on instruction data, read top to bottom like nanoGPT's loop.

    recipe -> 4-bit base + LoRA adapter -> tokenized batches -> (accumulate, clip, step) x max_steps
           -> metrics.jsonl, checkpoints/, adapter/ (PEFT format), recipe.toml, loss_curve.png

One optimizer step takes `grad_accum_steps` micro-batches. Their summed token losses are divided by the
number of trained tokens of the *whole step*, so the gradient is that of the mean over every trained
token of the step, whatever the split into micro-batches (batch 1 x accumulation 4 = batch 4 x 1).
"""

import math
import time
from pathlib import Path

from qtune.data.batching import DataPosition
from qtune.data.sft import build_sft_data
from qtune.train.evaluate import exact_match, response_loss
from qtune.lora import LoraConfig, add_lora, lora_parameters, mark_trainable
from qtune.recipe.schema import recipe_to_toml
from qtune.recipe.sections import SFTRecipe
from qtune.train import common
from qtune.train.run import Run, load_base_model

ADAPTER = "default"
SHOWN_EXAMPLES = 4  # held-out examples printed before / after next to their answers


def total_steps(recipe, batches_per_epoch: int) -> int:
    """train.max_steps, or the optimizer steps of train.epochs passes over the data when it is 0."""
    t = recipe.train
    return t.max_steps if t.max_steps > 0 else max(1, t.epochs * math.ceil(batches_per_epoch / t.grad_accum_steps))


def validation_loss(model, data, micro_batch_size: int, device, kernels: str, max_batches: int = 0) -> float | None:
    """Mean per-token loss over the held-out split (dropout off); None without a held-out split."""
    if not data.val:
        return None
    examples = data.val[: max_batches * micro_batch_size] if max_batches else data.val
    return response_loss(model, examples, data.pad_id, micro_batch_size, kernels)["loss"]


def held_out_metrics(model, tokenizer, data, recipe: SFTRecipe, device) -> dict:
    """The held-out loss and, when eval.exact_match > 0, the exact match of greedy completions."""
    t, e = recipe.train, recipe.eval
    result = {"val_loss": validation_loss(model, data, t.micro_batch_size, device, recipe.model.kernels,
                                          e.max_batches)}
    if e.exact_match and data.val:
        scored = exact_match(model, tokenizer, data.val[: e.exact_match], e.max_new_tokens)
        result["exact_match"] = scored["exact_match"]
        result["samples"] = scored["samples"][:SHOWN_EXAMPLES]
    return result


def headline(result: dict) -> str | None:
    """The held-out metric a run reports before / after: exact match when scored, else the held-out loss."""
    if "exact_match" in result:
        return "exact_match"
    return "val_loss" if result.get("val_loss") is not None else None


def train_step(model, micro: list[dict], params, optimizer, scheduler, max_grad_norm: float, device, kernels,
               model_dtype) -> dict:
    """One optimizer step over the micro-batches `micro`; returns loss, the step's learning rate, grad norm, tokens.

    loss = sum over micro-batches m and trained tokens i of CE(m, i) / N, N = trained tokens of the step.
    """
    n_tokens = sum(common.count_targets(b) for b in micro)
    loss_total = 0.0
    for batch in micro:
        with common.autocast(device, model_dtype):
            loss_sum, _ = common.lm_loss_sum(model, common.to_device(batch, device), kernels)
        (loss_sum / max(n_tokens, 1)).backward()
        loss_total += loss_sum.item()
    loss = loss_total / max(n_tokens, 1)
    grad_norm = common.clip_gradients(params, max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    if math.isfinite(loss) and math.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
            "real_tokens": sum(common.count_tokens(b) for b in micro)}


def prepare(recipe: SFTRecipe, run: Run, device):
    """Base model + seeded adapter, tokenizer and data, as the recipe says."""
    t = recipe.train
    common.seed_everything(t.seed)
    model, tokenizer = load_base_model(recipe.model, device)
    add_lora(model, LoraConfig(r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                               target_modules=recipe.lora.target_modules, rslora=recipe.lora.rslora),
             name=ADAPTER, seed=t.seed)
    mark_trainable(model, ADAPTER)
    data = build_sft_data(recipe.data, tokenizer, seed=t.seed)
    run.show_data_stats(data.stats)
    return model, tokenizer, data


def run_sft(recipe: SFTRecipe, resume: bool = False, console=None) -> dict:
    """Train the recipe's adapter; returns the run summary (also written to `output.dir/summary.json`).

    The summary names the held-out metric (`metric`) with its `before` and `after` values.
    """
    t, device, kernels = recipe.train, common.training_device(), recipe.model.kernels
    run = Run(Path(recipe.output.dir), console, resume)
    run.base_model = recipe.model.path
    model, tokenizer, data = prepare(recipe, run, device)
    params = lora_parameters(model, ADAPTER)
    model_dtype = model.model.embed_tokens.weight.dtype
    steps = total_steps(recipe, data.batches_per_epoch(t.micro_batch_size))
    optimizer = common.build_optimizer(params, t.optimizer, t.lr, t.weight_decay)
    scheduler = common.build_scheduler(optimizer, t.schedule, t.warmup_steps or round(t.warmup_ratio * steps), steps)
    start_step, position = run.restore(model, ADAPTER, optimizer, scheduler) if resume else (0, DataPosition())
    run.write_recipe(recipe_to_toml(recipe))
    if start_step == 0:
        with run.console.status("held-out evaluation before training"):
            run.save_before(held_out_metrics(model, tokenizer, data, recipe, device))
    batches = data.batches(t.micro_batch_size, t.seed, start=position)
    after = None
    model.train()
    run.start_progress(steps, start_step)
    try:
        with common.GracefulStop(run.console) as stop:
            for step in range(start_step + 1, steps + 1):
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(t.grad_accum_steps)]
                out = train_step(model, [b for _, b in micro], params, optimizer, scheduler, t.max_grad_norm,
                                 device, kernels, model_dtype)
                if not (math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"])):
                    raise common.TrainingError(
                        f"loss {out['loss']}, gradient norm {out['grad_norm']} at step {step}: the run stops and "
                        f"this step is not applied. The last good checkpoint is "
                        f"{run.checkpointer.latest() or 'none (no checkpoint was saved yet)'}; lower train.lr or "
                        "check the data, then continue with --resume")
                position = micro[-1][0]
                record = {"step": step, "loss": out["loss"], "lr": out["lr"],
                          "grad_norm": out["grad_norm"], "tokens": out["tokens"],
                          "tokens_per_s": out["real_tokens"] / (time.perf_counter() - t0), "epoch": position.epoch,
                          "peak_memory_bytes": common.peak_memory_bytes(device)}
                if step == steps:  # the last step's record carries the held-out evaluation after training
                    run.step_done(record, log=False)
                    run.stop_progress()
                    with run.console.status("held-out evaluation after training"):
                        after = held_out_metrics(model, tokenizer, data, recipe, device)
                    run.log({**record, **{k: v for k, v in after.items() if k != "samples"}})
                    break
                if recipe.eval.every and step % recipe.eval.every == 0:
                    record["val_loss"] = validation_loss(model, data, t.micro_batch_size, device, kernels,
                                                         recipe.eval.max_batches)
                run.step_done(record, log=step % t.log_every == 0 or "val_loss" in record)
                if stop.requested:
                    run.save_checkpoint(step, model, ADAPTER, optimizer, scheduler, position)
                    run.console.print(f"[yellow]stopped: saved step {step}; continue with --resume[/yellow]")
                    raise KeyboardInterrupt
                if t.save_every and step % t.save_every == 0:
                    run.save_checkpoint(step, model, ADAPTER, optimizer, scheduler, position)
    finally:
        run.stop_progress()
    run.save_checkpoint(steps, model, ADAPTER, optimizer, scheduler, position)
    if after is None:  # resumed from the final checkpoint: nothing left to train
        after = held_out_metrics(model, tokenizer, data, recipe, device)
    return finish(run, model, recipe, steps, run.load_before(), after)


def finish(run: Run, model, recipe: SFTRecipe, steps: int, before: dict, after: dict) -> dict:
    """Show the held-out metric before / after, write the adapter and the summary."""
    metric = headline(after)
    if metric is not None and before.get(metric) is not None:
        samples = [(_instruction(b["prompt"]), b["completion"], a["completion"], a["reference"])
                   for b, a in zip(before.get("samples", []), after.get("samples", []))]
        run.show_comparison(metric, before[metric], after[metric], samples)
    summary = {"steps": steps, "metric": metric, "before": before.get(metric), "after": after.get(metric),
               "val_loss_before": before.get("val_loss"), "val_loss_after": after.get("val_loss")}
    return run.finish(model, ADAPTER, recipe.model.path, summary)


def _instruction(prompt: str) -> str:
    """The last line of a rendered prompt that is not a role name or a heading ("assistant", "### Response:")."""
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    content = [line for line in lines if not line.endswith(":") and line not in ("assistant", "user", "system")]
    return (content or lines or [""])[-1]
