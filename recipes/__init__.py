"""The recipes shipped with qtune (TOML files beside this module, installed as `qtune.recipes`)."""

from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parent


def shipped_recipes() -> dict[str, Path]:
    """Name (file stem) -> path of every shipped recipe."""
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.toml"))}
