"""`qtune estimate`: a recipe's peak GPU memory, part by part, before training.

The last stdout line is a JSON object with `peak_bytes` and its parts (and, with --gpu-memory, what fits);
with --max-context, one with exactly `max_context`, `peak_bytes`, `switches` and `host_bytes`.
"""

import json

import click
from rich.console import Console
from rich.table import Table

from qtune.cli.common import command

console = Console()


@command("estimate")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("--gpu-memory", "gpu_memory", default=None, help="Memory budget, e.g. 8GB: propose what fits in it.")
@click.option("--shape", default=None, help="Model shape when model.path is not a local directory (e.g. llama2-7b).")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda",
              help="Where the recipe will run: cuda computes in bf16, cpu in fp32 (with model.dtype=auto).")
@click.option("--max-context", "max_context", is_flag=True,
              help="With --gpu-memory: the longest sequence that fits, and the switch each extra length needs.")
def estimate(recipe, overrides, gpu_memory, shape, device, max_context):
    """Predict the peak memory of training RECIPE (file or shipped name) with `key.sub=value` OVERRIDES."""
    from qtune.memory.estimate import estimate as predict
    from qtune.memory.estimate import fit_budget, parse_size, step_shape_from_recipe
    from qtune.memory.tracer import fmt_bytes
    from qtune.recipe.load import load_recipe

    r = load_recipe(recipe, overrides)
    s = step_shape_from_recipe(r, device, shape)
    budget = parse_size(gpu_memory) if gpu_memory else None
    if max_context:
        if budget is None:
            raise click.UsageError("--max-context needs --gpu-memory, e.g. --gpu-memory 24GB")
        show_max_context(recipe, s, budget)
        return
    est = predict(s)
    table = Table(title=f"{recipe}: micro-batch {s.micro_batch_size} x {s.seq_len} tokens, {s.dtype}, "
                        f"{f'r={s.r}' if s.method == 'lora' else s.method}, "
                        f"checkpointing {'on' if s.gradient_checkpointing else 'off'}", show_edge=False)
    table.add_column("part")
    table.add_column("bytes", justify="right")
    for name, n in est.parts.items():
        table.add_row(name.replace("_", " "), fmt_bytes(n))
    table.add_row(f"[bold]peak ({est.peak_at})", f"[bold]{fmt_bytes(est.peak_bytes)}")
    console.print(table)
    result = est.as_dict()
    if budget is not None:
        fit = fit_budget(s, budget)
        verdict = "fits" if fit["fits"] else "does NOT fit"
        console.print(f"{verdict} in {fmt_bytes(budget)}; at seq_len {s.seq_len} the largest micro-batch is "
                      f"{fit['max_micro_batch_size'] or 'none'}, at micro-batch {s.micro_batch_size} the longest "
                      f"sequence is {fit['max_seq_len'] or 'none'}; gradient checkpointing is "
                      f"{'needed' if fit['checkpointing_needed'] else 'not needed'} "
                      f"(without it: {fmt_bytes(fit['peak_without_checkpointing'])})")
        result["budget"] = fit
    click.echo(json.dumps(result))


def show_max_context(recipe: str, s, budget: int) -> None:
    """The ladder of switches as a table; the last stdout line is the longest length's JSON."""
    from qtune.memory.plan import ASSUMPTIONS, best_rung, ladder
    from qtune.memory.tracer import fmt_bytes
    from qtune.config import position_limit

    rungs = ladder(s, budget, position_limit(s.cfg))
    table = Table(title=f"{recipe}: longest micro-batch of {s.micro_batch_size} sequence(s) in {fmt_bytes(budget)}, "
                        f"r={s.r}, {s.dtype}", show_edge=False)
    for name, justify in (("switch added", "left"), ("max context", "right"), ("device peak", "right"),
                          ("host memory", "right")):
        table.add_column(name, justify=justify)
    for rung in rungs:
        table.add_row(rung.added, f"{rung.max_context:,}", fmt_bytes(rung.peak_bytes), fmt_bytes(rung.host_bytes))
    console.print(table)
    console.print(f"assumed: {ASSUMPTIONS}")
    best = best_rung(rungs)
    click.echo(json.dumps({"max_context": best.max_context, "peak_bytes": best.peak_bytes,
                           "switches": best.switches, "host_bytes": best.host_bytes}))


COMMANDS = [estimate]
