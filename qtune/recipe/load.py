"""Finding and loading a recipe: the one table of recipe kinds."""

import tomllib
import typing
from pathlib import Path

from qtune.recipe.schema import RecipeError, _build, _check_values, _Invalid, _set_dotted, parse_override
from qtune.datagen.config import EvolInstructRecipe, SelfInstructRecipe
from qtune.recipe.align import BestOfNRecipe, DPORecipe, PPORecipe, RewardRecipe
from qtune.recipe.grpo import GRPORecipe
from qtune.recipe.sections import Recipe, SFTRecipe
from qtune.recipes import shipped_recipes

# Every recipe kind: the value of a recipe file's top-level `kind` -> its schema.
RECIPE_KINDS: dict[str, type[Recipe]] = {
    schema.KIND: schema for schema in (SFTRecipe, RewardRecipe, DPORecipe, PPORecipe, GRPORecipe, BestOfNRecipe,
                                       SelfInstructRecipe, EvolInstructRecipe)
}


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path, or the shipped recipe of that name (see `qtune ls`)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise RecipeError(f"{name_or_path}: no such recipe file, and no shipped recipe has that name "
                      f"(shipped: {', '.join(shipped) or 'none'})")


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = (), schema: type[Recipe] | None = None):
    """Read a recipe file (or shipped recipe name), apply `key.sub=value` overrides, check everything.

    `schema` defaults to the one named by the file's top-level `kind` (an absent kind means "sft").
    """
    path = find_recipe(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                          "TOML files are UTF-8: save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    if schema is None:
        kind = table.get("kind", "sft")
        if not isinstance(kind, str) or kind not in RECIPE_KINDS:
            raise RecipeError(f"{path}: kind = {kind!r} is not a recipe kind; choose one of: "
                              f"{', '.join(RECIPE_KINDS)}")
        schema = RECIPE_KINDS[kind]
    table.setdefault("kind", schema.KIND)
    overridden = {}
    for text in overrides:
        key, value = parse_override(text, schema)
        _set_dotted(table, key, value)
        overridden[key] = text
    try:
        recipe = _build(schema, table)
        _check_values(recipe)
        return recipe
    except _Invalid as e:
        source = next((f"override {t!r}" for k, t in overridden.items()
                       if e.key == k or e.key.startswith(k + ".") or e.key.startswith(k + "[")), str(path))
        raise RecipeError(f"{source}: {e.key}: {e.message}") from None
