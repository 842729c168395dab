"""Data-generation verbs: `qtune self-instruct` (Self-Instruct or Alpaca-style) and `qtune evol-instruct`.

RECIPE is a TOML file or a shipped recipe name; `key.sub=value` arguments override it. Re-running with the
same output.dir resumes the run. Progress goes to stderr; the last stdout line is the report as JSON.
"""

import json

import click

from qtune.cli.common import command, load_checked


def pipeline_command(name: str, default_recipe: str):
    """A generation verb: RECIPE (default: the shipped `default_recipe`), OVERRIDES and --no-progress."""
    def decorate(fn):
        fn = click.option("--no-progress", is_flag=True, help="Do not draw the progress bar.")(fn)
        fn = click.argument("overrides", nargs=-1)(fn)
        fn = click.argument("recipe", required=False, default=default_recipe)(fn)
        return command(name)(fn)
    return decorate


def _run(fn, recipe, progress: bool) -> None:
    """Run a pipeline; Ctrl-C leaves a resumable run behind (user errors are explained by `QtuneGroup`)."""
    try:
        report = fn(recipe, progress=progress)
    except KeyboardInterrupt:
        click.echo(f"Interrupted. Re-run the same command to resume from {recipe.output.dir}.", err=True)
        raise SystemExit(130) from None
    click.echo(f"Wrote {recipe.output.dir}: {report['kept_instructions']} instructions, "
               f"{report['alpaca_examples']} Alpaca examples.", err=True)
    click.echo(json.dumps(report))


@pipeline_command("self-instruct", default_recipe="self_instruct")
def self_instruct_cmd(recipe, overrides, no_progress):
    """Generate instruction data with Self-Instruct (or Alpaca-style with generate.method=alpaca).

    Writes output.dir/instructions.jsonl, alpaca.json (ready for `qtune sft`) and report.json.
    Overrides look like `generate.num_instructions=200 output.dir=runs/si`.
    """
    from qtune.datagen.config import SelfInstructRecipe
    from qtune.datagen.self_instruct import run_self_instruct

    _run(run_self_instruct, load_checked(recipe, overrides, SelfInstructRecipe), not no_progress)


@pipeline_command("evol-instruct", default_recipe="evol_instruct")
def evol_instruct_cmd(recipe, overrides, no_progress):
    """Evolve instructions into harder and rarer ones with Evol-Instruct, and answer them.

    Writes output.dir/instructions.jsonl, alpaca.json (ready for `qtune sft`) and report.json.
    """
    from qtune.datagen.config import EvolInstructRecipe
    from qtune.datagen.evol_instruct import run_evol_instruct

    _run(run_evol_instruct, load_checked(recipe, overrides, EvolInstructRecipe), not no_progress)


COMMANDS = [self_instruct_cmd, evol_instruct_cmd]
