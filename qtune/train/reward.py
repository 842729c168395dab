"""Reward-model training: base + LoRA adapter + scalar head on preference pairs and rankings.

    recipe -> 4-bit base + LoRA adapter + ScalarHead -> preference batches (K sequences per record)
           -> r = head(h at the last token) -> pairwise / listwise / MSE loss (+ LM loss on the chosen reply)
           -> (accumulate, clip, step) x max_steps -> held-out accuracy -> output.dir/adapter/ (adapter + head)
"""

import math
import time

import torch

from qtune.align.preference_losses import listwise_loss, pairwise_loss, pointwise_mse, preference_accuracy
from qtune.align.reward_model import RewardModel, ScalarHead, evaluate_reward
from qtune.data.prefs import build_preference_data
from qtune.data.render import IGNORE
from qtune.kernels.logprobs import cross_entropy_sum
from qtune.lora import adapter_parameters
from qtune.peft.placement import place_in_batch
from qtune.recipe.align import RewardRecipe
from qtune.train import common
from qtune.train.common import ADAPTER, attach_adapter
from qtune.train.run import start_run, step_record, total_steps

# The head rides on the base model as a submodule while training, so checkpoints save and restore it with
# the adapter's tensors (they hold every parameter that requires grad).
HEAD_MODULE = "reward_head"


def loss_units(batch: dict, loss: str) -> tuple[int, int]:
    """(elements the reward loss averages over, chosen-response tokens the LM loss averages over)."""
    n = {"pairwise": len(batch["better"]), "listwise": len(batch["n_responses"]), "mse": len(batch["rank"])}[loss]
    return n, int((chosen_targets(batch) != IGNORE).sum())


def chosen_targets(batch: dict) -> torch.Tensor:
    """Next-token targets (S, T) of the best response of each record only (the LM regulariser's tokens)."""
    labels = batch["labels"].masked_fill(batch["rank"][:, None] != 0, IGNORE)
    return common.shifted_targets(labels)


def reward_loss_sums(model, head, batch: dict, loss: str, lm: bool):
    """Summed reward loss, summed LM loss on the chosen replies (None unless `lm`), and the rewards (S,)."""
    batch = place_in_batch(model, batch)  # P-tuning's virtual tokens placed inside the example, if any
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
        targets = chosen_targets(batch)
        keep = targets != IGNORE  # only the chosen replies' tokens enter the vocabulary projection
        lm_sum, _ = cross_entropy_sum(hidden[keep], model.output_weight(), targets[keep], kernels=model.kernels,
                                      softcap=model.logit_softcap)
    return main, lm_sum, rewards


def train_step(model, head, micro: list[dict], params, optimizer, scheduler, recipe: RewardRecipe, device,
               model_dtype, scaler=None) -> dict:
    """One optimizer step over the micro-batches `micro`; returns loss, accuracy and margin of its pairs, lr, grad norm.

    loss = Σ over micro-batches and elements e of loss(e) / N, N = the elements (pairs, rankings or responses)
    of the whole step, so accumulation equals one large batch; the LM regulariser is normalised likewise by
    the chosen replies' tokens of the step.
    """
    r, lm = recipe.reward, recipe.reward.lm_loss_coef > 0
    units = [loss_units(b, r.loss) for b in micro]
    n_main, n_lm = sum(u[0] for u in units), max(1, sum(u[1] for u in units))
    loss_total = lm_total = 0.0
    margins = []
    for batch in micro:
        batch = common.to_device(batch, device)
        with common.autocast(device, model_dtype):
            main, lm_sum, rewards = reward_loss_sums(model, head, batch, r.loss, lm)
        common.backward(main / n_main + (r.lm_loss_coef * lm_sum / n_lm if lm else 0.0), scaler)
        loss_total += main.item()
        lm_total += lm_sum.item() if lm else 0.0
        margins.append((rewards[batch["better"]] - rewards[batch["worse"]]).detach().float())
    loss = loss_total / n_main
    grad_norm, lr = common.optimizer_step(params, optimizer, scheduler, recipe.train.max_grad_norm, loss, scaler)
    margins = torch.cat(margins)
    out = {"loss": loss, "accuracy": float(preference_accuracy(margins).mean()), "margin": float(margins.mean()),
           "lr": lr, "grad_norm": grad_norm, "real_tokens": sum(common.count_tokens(b) for b in micro)}
    if lm:
        out["lm_loss"] = lm_total / n_lm
    return out


def run_reward(recipe: RewardRecipe, resume: bool = False, console=None) -> dict:
    """Train the recipe's reward model; returns the run summary (also written to `output.dir/summary.json`).

    The summary holds the held-out accuracy before and after training (`val_accuracy_before` / `_after`).
    """
    t, e = recipe.train, recipe.eval
    run, model, tokenizer, device = start_run(recipe, resume, console)
    attach_adapter(model, recipe, t.seed)
    head = ScalarHead(model.config.hidden_size, seed=t.seed, device=device, init=recipe.reward.head_init)
    model.add_module(HEAD_MODULE, head)
    data = build_preference_data(recipe.data, tokenizer, t.seed, need_scores=recipe.reward.loss == "mse")
    run.console.print(data.describe())
    params, model_dtype = adapter_parameters(model, ADAPTER) + list(head.parameters()), model.model.embed_tokens.weight.dtype
    scaler = common.grad_scaler(device, model_dtype)
    steps = total_steps(recipe, data.batches_per_epoch(t.micro_batch_size))
    optimizer, scheduler, start_step, position = run.begin(recipe, model, ADAPTER, params, steps)
    val_args = (RewardModel(model, ADAPTER, head), data, t.micro_batch_size, device, e.max_batches)
    if start_step == 0 and data.val:
        with run.console.status("held-out evaluation before training"):
            # a zero head (reward.head_init = "zero") scores every pair 0: its result is known without a pass
            run.save_before(validation(*val_args) if head.linear.weight.any() else indifferent_validation())
    batches = data.batches(t.micro_batch_size, t.seed, start=position)
    after = None
    with run.training(steps, start_step) as stop:
        for step in range(start_step + 1, steps + 1):
            t0, micro = time.perf_counter(), [next(batches) for _ in range(t.grad_accum_steps)]
            out = train_step(model, head, [b for _, b in micro], params, optimizer, scheduler, recipe, device,
                             model_dtype, scaler)
            run.check_finite(step, loss=out["loss"], grad_norm=out["grad_norm"])
            run.check_collapse(step, out["grad_norm"])
            position = micro[-1][0]
            record = step_record(step, out, t0, position, device)
            if step == steps and data.val:  # the last step's record carries the held-out evaluation
                with run.last_step(record):
                    after = validation(*val_args)
                run.log({**record, **after})
                break
            if e.every and step % e.every == 0 and data.val:
                record.update(validation(*val_args))
            run.step_done(record, log=step % t.log_every == 0 or step == steps or "val_loss" in record)
            run.step_end(step, position, stop)
    run.save_checkpoint(steps, position)
    if after is None and data.val:  # resumed from the final checkpoint: nothing left to train
        after = validation(*val_args)
    before, after = run.load_before(), after or {}
    # The head travels with the adapter (extra_tensors.safetensors), so `load_reward_model` finds both.
    return run.finish({"steps": steps, "pairs": data.stats["train_pairs"], "val_pairs": data.stats["val_pairs"],
                       "val_accuracy_before": before.get("val_accuracy"),
                       "val_accuracy_after": after.get("val_accuracy"), "val_margin_after": after.get("val_margin")},
                      extra_tensors=head.tensors())


def indifferent_validation() -> dict:
    """The held-out metrics of a zero head, known without a forward pass: every reward is 0, every pair ties."""
    return {"val_accuracy": 0.5, "val_margin": 0.0, "val_loss": math.log(2)}


def validation(scorer: RewardModel, data, micro_batch_size: int, device, max_batches: int) -> dict:
    """Held-out accuracy, mean margin and pairwise loss, under the metric names the run log uses."""
    result = evaluate_reward(scorer, data.val_batches(micro_batch_size), device, max_batches)
    return {"val_accuracy": result["accuracy"], "val_margin": result["mean_margin"], "val_loss": result["loss"]}
