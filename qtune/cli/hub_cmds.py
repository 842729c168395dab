"""`qtune pull` and `qtune convert`: get a model onto disk as a Hugging Face directory."""

from pathlib import Path

import click
from rich.console import Console

from qtune.cli.common import command
from qtune.weights import hub
from qtune.weights.gguf import DTYPES, convert_gguf

_console = Console(stderr=True)


@command()
@click.argument("alias", type=click.Choice(sorted(hub.ALIASES)))
def pull(alias: str) -> None:
    """Fetch model ALIAS into the local cache ($QTUNE_HOME or ~/.cache/qtune).

    The last line printed on stdout is the model directory, so `dir=$(qtune pull smollm2-135m | tail -1)` works.
    """
    try:
        path = hub.pull(alias)
    except RuntimeError as err:  # the package manager failed; bad input and file errors are QtuneGroup's
        raise click.ClickException(str(err)) from None
    _console.print(f"[green]{alias}[/green] ready: {hub.ALIASES[alias].description}")
    click.echo(str(path))


@command()
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True,
              help="Precision of the written weights.")
def convert(gguf_file: Path, out_dir: Path, dtype: str) -> None:
    """Convert a Llama-architecture GGUF_FILE into a Hugging Face directory OUT_DIR."""
    try:
        path = convert_gguf(gguf_file, out_dir, dtype=DTYPES[dtype])
    except KeyError as err:  # a key the GGUF file lacks (str() of a KeyError would quote the message)
        raise click.ClickException(str(err.args[0] if err.args else err)) from None
    _console.print(f"[green]converted[/green] {gguf_file.name} ({dtype})")
    click.echo(str(path))


COMMANDS = [pull, convert]
