"""What the verb modules share: the progress console, loading a recipe, running a job and explaining its failure.

Imports of qtune's library modules stay inside the functions so that `qtune --help` does not load torch.
"""

import functools

import click
from rich.console import Console

err = Console(stderr=True)


def load_checked(recipe: str, overrides: tuple[str, ...], schema=None):
    """The recipe RECIPE (file or shipped name) with OVERRIDES applied; a bad recipe becomes `Error: ...`, exit 1.

    `schema` defaults to the one the file's `kind` names.
    """
    from qtune.recipe.load import load_recipe
    from qtune.recipe.schema import RecipeError

    try:
        return load_recipe(recipe, overrides, schema=schema)
    except RecipeError as e:
        raise click.ClickException(str(e)) from None


def run_or_explain(fn, *args, **kwargs) -> dict:
    """Run a training entry point; known user errors become a one-line message and exit code 1.

    On CPU the process uses one torch thread per idle core (see `use_idle_cpu_cores`); Ctrl-C exits with 130.
    """
    from qtune.train.common import training_device, use_idle_cpu_cores
    from qtune.train.lock import release_all

    threads = use_idle_cpu_cores(training_device())
    if threads is not None:
        err.print(f"cpu: {threads} torch thread(s), one per idle core (set OMP_NUM_THREADS to choose)")
    try:
        return explained(fn)(*args, **kwargs)
    finally:
        release_all()  # a failed run leaves its directory as it found it, lock included


def explained(fn):
    """`fn` with the user errors qtune knows (bad model, adapter, data, checkpoint, file) turned into one
    `Error:` line and exit code 1 instead of a traceback; Ctrl-C exits with 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from qtune.config import ConfigError
        from qtune.data.records import DataError
        from qtune.lora import AdapterError
        from qtune.train.common import TrainingError
        from qtune.weights.checkpoint import CheckpointError

        try:
            return fn(*args, **kwargs)
        except (CheckpointError, ConfigError, DataError, AdapterError, TrainingError, FileNotFoundError,
                ValueError) as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise SystemExit(130) from None

    return wrapper
