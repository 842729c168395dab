"""What the verb modules share: the progress console, loading a recipe, running a job and explaining its failure.

Imports of qtune's library modules stay inside the functions so that `qtune --help` does not load torch.
"""

import contextlib
import errno
import functools
import os
import traceback

import click
from rich.console import Console

err = Console(stderr=True)

DEBUG_VARIABLE = "QTUNE_DEBUG"


def load_checked(recipe: str, overrides: tuple[str, ...], schema=None):
    """The recipe RECIPE (file or shipped name) with OVERRIDES applied; a bad recipe becomes `Error: ...`, exit 1.

    `schema` defaults to the one the file's `kind` names.
    """
    from qtune.recipe.load import load_recipe

    return load_recipe(recipe, overrides, schema=schema)


def run_or_explain(fn, *args, **kwargs) -> dict:
    """Run a training entry point; a failed run releases its output directory (lock included).

    On CPU the process uses one torch thread per idle core (see `use_idle_cpu_cores`). Known user errors are
    explained by `QtuneGroup`. On CUDA (or with $QTUNE_GPU_MEMORY) a data.max_seq_len the planner says cannot
    fit is refused before the model loads, and an out-of-memory error names what fits and the last checkpoint.
    """
    from qtune.train.common import training_device, use_idle_cpu_cores
    from qtune.train.lock import release_all

    import torch

    from qtune.memory.plan import check_fits, out_of_memory_message
    from qtune.train.common import TrainingError

    threads = use_idle_cpu_cores(training_device())
    if threads is not None:
        err.print(f"cpu: {threads} torch thread(s), one per idle core (set OMP_NUM_THREADS to choose)")
    recipe = args[0]
    try:
        check_fits(recipe)  # before the model loads: a sequence the card cannot hold is refused with advice
        return fn(*args, **kwargs)
    except torch.OutOfMemoryError as e:
        raise TrainingError(out_of_memory_message(recipe, e)) from None
    finally:
        release_all()  # a failed run leaves its directory as it found it, lock included


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input or file-system state, never a bug in qtune: qtune's own error types
    (every one a ValueError or a TrainingError), the ValueErrors of the libraries qtune hands user input to,
    OSErrors (a missing, unreadable or unwritable file, a full disk) and safetensors' errors (a damaged file, a
    write that failed)."""
    from safetensors import SafetensorError

    from qtune.train.common import TrainingError

    return ValueError, TrainingError, OSError, SafetensorError


def describe_os_error(e: OSError) -> str:
    """One line naming the file and the fix for an OSError (a full disk, a read-only or occupied location)."""
    where = e.filename if e.filename is not None else "a file"
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return f"{where}: no space left on the device; free space there (or choose another directory) and run again"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}: {reason}; fix its permissions or choose another location (for a run: output.dir)"
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{where}: exists and is not a directory ({reason}); choose another path (for a run: output.dir)"
    if e.errno == errno.ENOENT:
        return f"{where}: {reason}; check the path (the directory it names must exist)"
    if e.errno == errno.EISDIR:
        return f"{where}: is a directory, not a file ({reason}); name a file"
    return f"{where}: {reason}"


def explain(e: BaseException) -> click.ClickException:
    """The `Error:` line for a user error `e` (the message of qtune's own errors already names file and key)."""
    if isinstance(e, OSError) and e.errno is not None:  # raised by the system, not by qtune with its own message
        return click.ClickException(describe_os_error(e))
    return click.ClickException(str(e))


@contextlib.contextmanager
def usage_errors_exit_one():
    """Click exits with status 2 on a usage error (a bad option value, a missing argument, an unknown verb);
    qtune's error contract is status 1 for any bad input. `qtune` alone still shows the help with click's 2."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.UsageError as e:
        e.exit_code = 1
        raise


class QtuneCommand(click.Command):
    """A `qtune` verb: its user errors become one `Error:` line and exit status 1, Ctrl-C exits with 130.

    With QTUNE_DEBUG=1 the traceback of any error is printed first (the status stays the same).
    """

    def make_context(self, *args, **kwargs) -> click.Context:
        with usage_errors_exit_one():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        debug = os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
        try:
            with usage_errors_exit_one():
                return super().invoke(ctx)
        except click.ClickException:
            if debug:
                traceback.print_exc()
            raise
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        except user_error_types() as e:
            if debug:
                traceback.print_exc()
            raise explain(e) from None


class QtuneGroup(click.Group):
    """A group of `qtune` verbs (`qtune` itself, `qtune data`): the commands it declares are QtuneCommands."""

    command_class = QtuneCommand

    def make_context(self, *args, **kwargs) -> click.Context:
        with usage_errors_exit_one():
            return super().make_context(*args, **kwargs)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        with usage_errors_exit_one():  # an unknown verb
            return super().resolve_command(ctx, args)


command = functools.partial(click.command, cls=QtuneCommand)
