"""The supervised fine-tuning verb: `qtune sft` (the alignment verbs are in align_cmds and ppo_cmds).

Each prints its run summary as one JSON object on the last stdout line; progress goes to stderr.
"""

import json
from pathlib import Path

import click

from qtune.cli.common import command, err, load_checked, run_or_explain


def recipe_and_overrides(recipe: str, overrides: tuple[str, ...], default: str) -> tuple[str, tuple[str, ...]]:
    """`qtune sft train.max_steps=5` means the default recipe with that override, not a recipe file of that name."""
    if "=" in recipe and not Path(recipe).exists():
        return default, (recipe, *overrides)
    return recipe, overrides


@command(context_settings={"ignore_unknown_options": False})
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
