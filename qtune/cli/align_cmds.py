"""Alignment verbs: `qtune reward`, `qtune dpo` and `qtune eval-prefs`.

Each prints one JSON object as its last stdout line (the run summary, or the evaluation); progress goes to stderr.
"""

import json
import typing

import click

from qtune.cli.common import command, err, load_checked, run_or_explain
from qtune.recipe.align import DPOSection

# every dpo.loss of paired data; KTO's records are unpaired, so it has no pair accuracy to report
DPO_EVAL_LOSSES = [loss for loss in typing.get_args(typing.get_type_hints(DPOSection)["loss"]) if loss != "kto"]


@command()
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in output.dir.")
def reward(recipe, overrides, resume):
    """Train a reward model (base + LoRA adapter + scalar head) with a RECIPE (file or shipped name, e.g. `reward`).

    Overrides look like `train.max_steps=100 data.path=prefs.jsonl`. The adapter and head go to output.dir/adapter/.
    """
    from qtune.recipe.align import RewardRecipe
    from qtune.train.reward import run_reward

    r = load_checked(recipe, overrides, RewardRecipe)
    click.echo(json.dumps(run_or_explain(run_reward, r, resume=resume, console=err)))


@command()
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in output.dir.")
def dpo(recipe, overrides, resume):
    """Direct preference optimisation of a LoRA adapter with a RECIPE (file or shipped name, e.g. `dpo`).

    The reference model is the same base with adapters disabled. Overrides look like `dpo.beta=0.2`.
    """
    from qtune.recipe.align import DPORecipe
    from qtune.train.dpo import run_dpo

    r = load_checked(recipe, overrides, DPORecipe)
    click.echo(json.dumps(run_or_explain(run_dpo, r, resume=resume, console=err)))


def evaluate_preferences(model_path: str, adapters: list[str], weights: list[float], data: str, kind: str,
                         fmt: str = "auto", max_seq_len: int = 512, batch_size: int = 4, beta: float = 0.1,
                         bad_records: str = "error", limit: int = 0, quantize: str = "nf4", dtype: str = "auto",
                         kernels: str = "auto", loss: str = "sigmoid") -> dict:
    """Score every preference pair of `data` with a reward model (or a weighted sum of several) or a DPO adapter.

    For --kind dpo, `loss` picks the rewards compared (see `evaluate_dpo`); its other settings keep their defaults.
    """
    from qtune.weights.checkpoint import load_model, resolve
    from qtune.data.prefs import fixed_batches, load_preferences, tokenize_preferences
    from qtune.peft import load_adapter
    from qtune.align.reward_model import CombinedReward, evaluate_reward, load_reward_model
    from qtune.tokenizer import load_tokenizer
    from qtune.train.common import training_device
    from qtune.train.dpo import evaluate_dpo

    if kind == "dpo" and len(adapters) != 1:
        raise click.UsageError(f"--kind dpo evaluates one adapter against the base; got {len(adapters)} --adapter")
    if weights and len(weights) != len(adapters):
        raise click.UsageError(f"give one --weight per --adapter ({len(adapters)} adapters, {len(weights)} weights)")
    device = training_device()
    model_dir = resolve(model_path)
    model = load_model(model_dir, quantize=quantize, dtype=dtype, kernels=kernels, device=device)
    tokenizer = load_tokenizer(model_dir)
    prefs, skipped = load_preferences(data, fmt, bad_records=bad_records)
    items, stats = tokenize_preferences(prefs[:limit] if limit else prefs, tokenizer, max_seq_len, data)
    batches = fixed_batches(items, batch_size, tokenizer.pad_id)
    if kind == "reward":
        scorer = CombinedReward([load_reward_model(model, a, f"reward{i}") for i, a in enumerate(adapters)],
                                weights or [1.0] * len(adapters))
        result = evaluate_reward(scorer, batches, device)
    else:
        load_adapter(model, adapters[0], name="policy")
        result = {**evaluate_dpo(model, batches, device, DPOSection(beta=beta, loss=loss)), "loss_type": loss}
    return {**result, "kind": kind, "records": len(items), "truncated": stats["truncated"],
            "dropped": stats["dropped"], "skipped": len(skipped)}


@command("eval-prefs")
@click.argument("model")
@click.option("--adapter", "adapters", multiple=True, required=True,
              help="Adapter directory; for --kind reward repeat it to sum several reward models.")
@click.option("--weight", "weights", multiple=True, type=float, help="Weight of each --adapter's reward (default 1).")
@click.option("--data", required=True, help="Preference file in any layout `qtune reward` reads.")
@click.option("--kind", type=click.Choice(["reward", "dpo"]), required=True,
              help="reward: the reward head; dpo: the implicit reward against the adapters-disabled base.")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "pairs", "ranking", "sharegpt", "chat", "hh"]))
@click.option("--max-seq-len", default=512, show_default=True, help="Longest prompt + response in tokens.")
@click.option("--batch-size", default=4, show_default=True, help="Records per forward pass.")
@click.option("--beta", default=0.1, show_default=True, help="DPO's β: implicit reward = β (log π − log π_ref).")
@click.option("--loss", type=click.Choice(DPO_EVAL_LOSSES), default="sigmoid", show_default=True,
              help="For --kind dpo, the dpo.loss the adapter was trained with: its rewards are compared, and its loss "
                   "reported. A KTO adapter: sigmoid, whose implicit reward β (log π − log π_ref) is KTO's.")
@click.option("--bad-records", type=click.Choice(["error", "skip"]), default="error", show_default=True)
@click.option("--limit", default=0, show_default=True, help="Score only the first N usable records (0 = all).")
@click.option("--quantize", type=click.Choice(["nf4", "none"]), default="nf4", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--kernels", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True)
def eval_prefs(model, adapters, weights, data, kind, fmt, max_seq_len, batch_size, beta, loss, bad_records, limit,
               quantize, dtype, kernels):
    """Score held-out preference pairs with MODEL + adapter(s); the last line is JSON with accuracy, mean_margin, n."""
    result = run_or_explain(evaluate_preferences, model, list(adapters), list(weights), data, kind, fmt, max_seq_len,
                            batch_size, beta, bad_records, limit, quantize, dtype, kernels, loss)
    click.echo(json.dumps(result))


COMMANDS = [reward, dpo, eval_prefs]
