"""Supervised fine-tuning: QLoRA on instruction data, read top to bottom like nanoGPT's loop.

    recipe -> 4-bit base + LoRA adapter -> tokenized batches -> (accumulate, clip, step) x max_steps
           -> metrics.jsonl, checkpoints/, adapter/ (PEFT format), recipe.toml, loss_curve.png

One optimizer step takes `grad_accum_steps` micro-batches. Their summed token losses are divided by the
number of trained tokens of the *whole step*, so the gradient is that of the mean over every trained
token of the step, whatever the split into micro-batches (batch 1 x accumulation 4 = batch 4 x 1).
"""

import math
import time

from qtune.data.sft import build_sft_data
from qtune.lora import adapter_parameters
from qtune.recipe.schema import RecipeError
from qtune.recipe.sections import SFTRecipe
from qtune.train import common
from qtune.train.common import ADAPTER, attach_adapter
from qtune.train.evaluate import exact_match, response_loss
from qtune.train.router_loss import load_balancing_loss, recorded_router_logits
from qtune.train.run import Run, start_run, step_record, total_steps

SHOWN_EXAMPLES = 4  # held-out examples printed before / after next to their answers


def validation_loss(model, data, micro_batch_size: int, max_batches: int = 0) -> float | None:
    """Mean per-token loss over the held-out split (dropout off); None without a held-out split."""
    if not data.val:
        return None
    examples = data.val[: max_batches * micro_batch_size] if max_batches else data.val
    return response_loss(model, examples, data.pad_id, micro_batch_size)["loss"]


def held_out_metrics(model, tokenizer, data, recipe: SFTRecipe) -> dict:
    """The held-out loss and, when eval.exact_match > 0, the exact match of greedy completions."""
    t, e = recipe.train, recipe.eval
    result = {"val_loss": validation_loss(model, data, t.micro_batch_size, e.max_batches)}
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


def train_step(model, micro: list[dict], params, optimizer, scheduler, max_grad_norm: float, device,
               model_dtype, scaler=None, router_aux_loss_coef: float = 0.0) -> dict:
    """One optimizer step over the micro-batches `micro`; returns loss, the step's learning rate, grad norm, tokens.

    loss = sum over micro-batches m and trained tokens i of CE(m, i) / N, N = trained tokens of the step.
    With router_aux_loss_coef = c > 0 (a mixture of experts), c · aux(m) / M is added for each of the M
    micro-batches (the step's mean load-balancing loss, qtune/train/router_loss.py); `loss` stays the
    cross-entropy and `router_aux_loss` reports the mean aux.
    """
    n_tokens = sum(common.count_targets(b) for b in micro)
    loss_total, aux_total = 0.0, 0.0
    for batch in micro:
        batch = common.to_device(batch, device)
        with common.autocast(device, model_dtype), recorded_router_logits(model, router_aux_loss_coef > 0) as logits:
            loss_sum, _ = common.lm_loss_sum(model, batch)
        loss = loss_sum / max(n_tokens, 1)
        if router_aux_loss_coef > 0:
            aux = load_balancing_loss(logits, model.config.num_experts_per_tok, batch.get("attention_mask"))
            loss = loss + router_aux_loss_coef * aux / len(micro)
            aux_total += aux.item()
        common.backward(loss, scaler)
        loss_total += loss_sum.item()
    loss = loss_total / max(n_tokens, 1)
    grad_norm, lr = common.optimizer_step(params, optimizer, scheduler, max_grad_norm, loss, scaler)
    out = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
           "real_tokens": sum(common.count_tokens(b) for b in micro)}
    if router_aux_loss_coef > 0:
        out["router_aux_loss"] = aux_total / len(micro)
    return out


def check_router_aux_loss(model, coef: float, console) -> None:
    """train.router_aux_loss_coef needs a mixture of experts; a checkpoint that asks for the loss
    (config.json output_router_logits) without it gets a notice, not silence."""
    cfg = model.config
    if coef > 0 and not cfg.num_experts:
        raise RecipeError(f"train.router_aux_loss_coef = {coef}, but the model ({cfg.model_type}) is not a mixture "
                          "of experts and has no router; set it to 0")
    if coef == 0 and cfg.num_experts and cfg.extra.get("output_router_logits"):
        console.print(f"notice: config.json sets output_router_logits = true (router_aux_loss_coef = "
                      f"{cfg.extra.get('router_aux_loss_coef')}); qtune adds the router's load-balancing loss only "
                      "when the recipe sets train.router_aux_loss_coef > 0")


def run_sft(recipe: SFTRecipe, resume: bool = False, console=None) -> dict:
    """Train the recipe's adapter; returns the run summary (also written to `output.dir/summary.json`).

    The summary names the held-out metric (`metric`) with its `before` and `after` values.
    """
    t, e = recipe.train, recipe.eval
    run, model, tokenizer, device = start_run(recipe, resume, console)
    attach_adapter(model, recipe, t.seed)
    check_router_aux_loss(model, t.router_aux_loss_coef, run.console)
    data = build_sft_data(recipe.data, tokenizer, seed=t.seed)
    run.show_data_stats(data.stats)
    params, model_dtype = adapter_parameters(model, ADAPTER), model.model.embed_tokens.weight.dtype
    scaler = common.grad_scaler(device, model_dtype)
    steps = total_steps(recipe, data.batches_per_epoch(t.micro_batch_size))
    uniform_loss = math.log(model.config.vocab_size)  # cross-entropy of a uniform guess: a collapsed model's loss
    optimizer, scheduler, start_step, position = run.begin(recipe, model, ADAPTER, params, steps)
    if start_step == 0:
        with run.console.status("held-out evaluation before training"):
            run.save_before(held_out_metrics(model, tokenizer, data, recipe))
    batches = data.batches(t.micro_batch_size, t.seed, start=position)
    after = None
    with run.training(steps, start_step) as stop:
        for step in range(start_step + 1, steps + 1):
            t0, micro = time.perf_counter(), [next(batches) for _ in range(t.grad_accum_steps)]
            out = train_step(model, [b for _, b in micro], params, optimizer, scheduler, t.max_grad_norm, device,
                             model_dtype, scaler, t.router_aux_loss_coef)
            run.check_finite(step, loss=out["loss"], grad_norm=out["grad_norm"])
            run.check_collapse(step, out["grad_norm"], out["loss"], uniform_loss)
            position = micro[-1][0]
            record = step_record(step, out, t0, position, device)
            if step == steps:  # the last step's record carries the held-out evaluation after training
                with run.last_step(record):
                    after = held_out_metrics(model, tokenizer, data, recipe)
                run.log({**record, **{k: v for k, v in after.items() if k != "samples"}})
                break
            if e.every and step % e.every == 0:
                record["val_loss"] = validation_loss(model, data, t.micro_batch_size, e.max_batches)
            run.step_done(record, log=step % t.log_every == 0 or "val_loss" in record)
            run.step_end(step, position, stop)
    run.save_checkpoint(steps, position)
    if after is None:  # resumed from the final checkpoint: nothing left to train
        after = held_out_metrics(model, tokenizer, data, recipe)
    return finish(run, steps, run.load_before(), after)


def finish(run: Run, steps: int, before: dict, after: dict) -> dict:
    """Show the held-out metric before / after, write the adapter and the summary."""
    metric = headline(after)
    if metric is not None and before.get(metric) is not None:
        samples = [(_instruction(b["prompt"]), b["completion"], a["completion"], a["reference"])
                   for b, a in zip(before.get("samples", []), after.get("samples", []))]
        run.show_comparison(metric, before[metric], after[metric], samples)
    summary = {"steps": steps, "metric": metric, "before": before.get(metric), "after": after.get(metric),
               "val_loss_before": before.get("val_loss"), "val_loss_after": after.get("val_loss")}
    return run.finish(summary)


def _instruction(prompt: str) -> str:
    """The last line of a rendered prompt that is not a role name or a heading ("assistant", "### Response:")."""
    lines = [line.strip() for line in prompt.splitlines() if line.strip()]
    content = [line for line in lines if not line.endswith(":") and line not in ("assistant", "user", "system")]
    return (content or lines or [""])[-1]
