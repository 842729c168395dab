"""Recipe verbs: `qtune ls`, `qtune cp`, `qtune validate` and `qtune data preview`.

RECIPE is a path to a TOML file or the name of a shipped recipe; `key.sub=value` arguments override it.
"""

import shutil
import tomllib
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from qtune.recipe import RecipeError, find_recipe, iter_fields, load_recipe

console = Console()


def _load(recipe: str, overrides: tuple[str, ...]):
    try:
        return load_recipe(recipe, overrides)
    except RecipeError as e:
        raise click.ClickException(str(e)) from None


def _model_dir(path: str) -> Path:
    """The model directory a recipe's model.path names (an alias is pulled into the local cache)."""
    if Path(path).expanduser().is_dir():
        return Path(path).expanduser()
    from qtune.hub import resolve_model_path

    return Path(resolve_model_path(path))


@click.command("ls")
def ls_cmd() -> None:
    """List the shipped recipes."""
    from qtune.recipes import shipped_recipes

    table = Table(show_edge=False)
    table.add_column("recipe")
    table.add_column("kind")
    table.add_column("description")
    for name, path in shipped_recipes().items():
        top = tomllib.loads(path.read_text())
        table.add_row(name, top.get("kind", "sft"), top.get("description", ""))
    console.print(table)
    console.print("Copy one with `qtune cp NAME DEST`, check it with `qtune validate DEST`.")


@click.command("cp")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
def cp_cmd(name: str, dest: Path, force: bool) -> None:
    """Copy the shipped recipe NAME to DEST (a file, or a directory to put NAME.toml in)."""
    from qtune.recipes import shipped_recipes

    shipped = shipped_recipes()
    if name not in shipped:
        raise click.ClickException(f"no shipped recipe {name!r}; shipped: {', '.join(shipped)} (see `qtune ls`)")
    target = dest / f"{name}.toml" if dest.is_dir() else dest
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists; pass --force to overwrite it")
    shutil.copyfile(shipped[name], target)
    console.print(f"Wrote {target}. Edit model.path and data.path, then `qtune validate {target}`.")


def _data_paths(recipe) -> list[tuple[str, str]]:
    data = getattr(recipe, "data", None)
    if data is None:
        return []
    paths = [(f"data.{key}", getattr(data, key)) for key in ("path", "seed_tasks")
             if getattr(data, key, "") and getattr(data, key) != "builtin"]
    paths += [(f"data.sources[{i}].path", s.path) for i, s in enumerate(getattr(data, "sources", []))]
    if getattr(data, "pretrain_path", ""):
        paths.append(("data.pretrain_path", data.pretrain_path))
    return paths


def _checks(recipe) -> list[tuple[bool, str]]:
    """(passed, message) for the model and every data path, without loading either."""
    results = []
    try:
        results.append((True, f"model.path: {_model_dir(recipe.model.path)}"))
    except ImportError:
        results.append((True, f"model.path: {recipe.model.path!r} is not a directory; alias not checked"))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        results.append((False, f"model.path: {e}"))
    for key, path in _data_paths(recipe):
        local = Path(path).expanduser()
        if local.exists():
            results.append((True, f"{key}: {local}"))
        elif path.startswith((".", "/", "~")) or local.suffix in (".json", ".jsonl", ".parquet", ".gz"):
            results.append((False, f"{key}: {path}: no such file"))
        else:
            results.append((True, f"{key}: {path!r} will be loaded with datasets.load_dataset"))
    return results


@click.command("validate")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
def validate_cmd(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE (schema, files, model) without training, and show every setting with its meaning."""
    resolved = _load(recipe, overrides)
    table = Table(title=str(find_recipe(recipe)), show_edge=False)
    for column in ("key", "value", "meaning"):
        table.add_column(column)
    for key, value, doc in iter_fields(resolved):
        table.add_row(key, repr(value), doc)
    console.print(table)
    results = _checks(resolved)
    for ok, message in results:
        console.print(f"[green]ok[/green]   {message}" if ok else f"[red]FAIL[/red] {message}", highlight=False)
    if not all(ok for ok, _ in results):
        raise click.ClickException("the recipe has problems (see FAIL above)")
    console.print("[green]Recipe is valid.")


@click.group("data")
def data_group() -> None:
    """Inspect training data as a recipe prepares it."""


@data_group.command("preview")
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("-n", "count", default=3, show_default=True, help="Examples to show.")
def preview_cmd(recipe: str, overrides: tuple[str, ...], count: int) -> None:
    """Show a few training examples of RECIPE with the trained tokens highlighted, plus statistics."""
    from qtune.data import DataError, build_sft_data
    from qtune.data.preview import show_preview
    from qtune.tokenizer import load_tokenizer

    resolved = _load(recipe, overrides)
    try:
        tokenizer = load_tokenizer(_model_dir(resolved.model.path))
        data = build_sft_data(resolved.data, tokenizer, seed=resolved.train.seed)
    except (DataError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    show_preview(data, tokenizer, count, console)


COMMANDS = [ls_cmd, cp_cmd, validate_cmd, data_group]
