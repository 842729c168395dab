"""`qtune eval-harness`: lm-evaluation-harness tasks on a qtune model (+ adapter), through qtune's own backend.

The results JSON goes to stdout; progress goes to stderr.
"""

import json
from pathlib import Path

import click

from qtune.cli.common import command, err, load_checked


def _model_and_adapter(recipe_or_model: str, adapter: str | None) -> tuple[str, str | None]:
    """A recipe (a .toml file) names its base model and, once trained, its output.dir/adapter; else a model."""
    if not recipe_or_model.endswith(".toml"):
        return recipe_or_model, adapter
    recipe = load_checked(recipe_or_model, ())
    trained = Path(recipe.output.dir) / "adapter"
    return recipe.model.path, adapter or (str(trained) if trained.is_dir() else None)


@command("eval-harness")
@click.argument("recipe_or_model")
@click.option("--tasks", required=True, help="Comma-separated lm-eval task names (or YAML tasks under --include-path).")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), default=None,
              help="A PEFT LoRA directory (default for a recipe: its output.dir/adapter when present).")
@click.option("--quantize", type=click.Choice(["nf4", "none"]), default="nf4", show_default=True)
@click.option("--dtype", default=None, help="Compute dtype (default: bfloat16 on CUDA, float32 on CPU).")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False), default=None,
              help="A directory of your own YAML task files.")
@click.option("--num-fewshot", type=int, default=None)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N documents of each task.")
def eval_harness(recipe_or_model, tasks, adapter, quantize, dtype, include_path, num_fewshot, batch_size, limit):
    """Run lm-evaluation-harness TASKS on RECIPE_OR_MODEL (a recipe file, a model directory or an alias)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise click.ClickException("lm-evaluation-harness is not installed; install it with: pip install 'qtune[eval]'")
    import qtune.train.harness  # noqa: F401  (registers the "qtune" model with lm-eval)

    model, adapter = _model_and_adapter(recipe_or_model, adapter)
    args = {"pretrained": model, "adapter": adapter, "quantize": quantize, "dtype": dtype}
    model_args = ",".join(f"{k}={v}" for k, v in args.items() if v is not None)
    err.print(f"lm-eval: --model qtune --model_args {model_args} --tasks {tasks}")
    try:
        results = lm_eval.simple_evaluate(
            model="qtune", model_args=model_args, tasks=tasks.split(","), num_fewshot=num_fewshot, limit=limit,
            task_manager=TaskManager(include_path=include_path), batch_size=batch_size)
    except KeyError as e:  # lm-eval's answer to a task name it does not know
        raise click.ClickException(f"--tasks {tasks}: {e.args[0] if e.args else e}") from None
    click.echo(json.dumps(results["results"], default=str))


COMMANDS = [eval_harness]
