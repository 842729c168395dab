"""Training verbs: `qtune sft` (and, as they land, the alignment loops).

Each prints its run summary as one JSON object on the last stdout line; progress goes to stderr.
"""

import json
from pathlib import Path

import click
from rich.console import Console

err = Console(stderr=True)


def load_checked(recipe: str, overrides: tuple[str, ...], schema):
    from qtune.recipe.load import load_recipe
    from qtune.recipe.schema import RecipeError

    try:
        return load_recipe(recipe, overrides, schema=schema)
    except RecipeError as e:
        raise click.ClickException(str(e)) from None


def recipe_and_overrides(recipe: str, overrides: tuple[str, ...], default: str) -> tuple[str, tuple[str, ...]]:
    """`qtune sft train.max_steps=5` means the default recipe with that override, not a recipe file of that name."""
    if "=" in recipe and not Path(recipe).exists():
        return default, (recipe, *overrides)
    return recipe, overrides


def run_or_explain(fn, *args, **kwargs) -> dict:
    """Run a training entry point; known user errors become a one-line message and exit code 1.

    On CPU the process uses one torch thread per idle core (see `use_idle_cpu_cores`); Ctrl-C exits with 130.
    """
    from qtune.weights.checkpoint import CheckpointError
    from qtune.config import ConfigError
    from qtune.data.records import DataError
    from qtune.lora import AdapterError
    from qtune.train.common import TrainingError, training_device, use_idle_cpu_cores

    threads = use_idle_cpu_cores(training_device())
    if threads is not None:
        err.print(f"cpu: {threads} torch thread(s), one per idle core (set OMP_NUM_THREADS to choose)")
    try:
        return fn(*args, **kwargs)
    except (CheckpointError, ConfigError, DataError, AdapterError, TrainingError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("recipe", required=False, default="quickstart")
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in output.dir.")
def sft(recipe, overrides, resume):
    """Supervised fine-tuning with a RECIPE (file or shipped name; default: the CPU quickstart).

    Overrides look like `train.max_steps=100 model.path=/models/llama-2-7b`; with overrides alone
    (`qtune sft train.max_steps=10`) they apply to the quickstart.
    """
    from qtune.recipe.sections import SFTRecipe
    from qtune.train.sft import run_sft

    recipe, overrides = recipe_and_overrides(recipe, overrides, default="quickstart")
    r = load_checked(recipe, overrides, SFTRecipe)
    summary = run_or_explain(run_sft, r, resume=resume, console=err)
    click.echo(json.dumps(summary))


COMMANDS = [sft]
