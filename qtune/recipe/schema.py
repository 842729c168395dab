"""TOML recipes: a file of sections read with `tomllib` into nested dataclasses.

Every field has a default and a one-line docstring written right under it (the attribute-docstring
convention litgpt uses); `field_docs()` reads those strings back from the source so that
`qtune validate` can show them and `recipe_to_toml()` can write them as comments.

Recipes share a base set of sections (`[model]`, `[lora]`, `[train]`, `[eval]`, `[output]`); each
algorithm subclasses `TrainRecipe` and adds or specialises sections (SFT uses `SFTDataSection` for
`[data]`). A recipe's top-level `kind` names its schema in `RECIPE_KINDS` (qtune/recipe/load.py).

Loading checks everything a typo could break: unknown keys, wrong types and impossible values are
`RecipeError`s naming the file (or the command-line override), the dotted key and what is allowed.
"""

import ast
import difflib
import functools
import inspect
import json
import math
import tomllib
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Iterator, Literal


class RecipeError(ValueError):
    """A recipe qtune cannot use; the message names the file or override, the key and the fix."""


class _Invalid(Exception):
    """Raised while building: `key` (dotted) holds a bad value; `load_recipe` adds where it came from."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


# ----------------------------------------------------------------------------- value checks
# What sections' `check()` methods yield for the common ranges, one (field, problem) pair per bad field.

def nonnegative(section, *names: str) -> Iterator[tuple[str, str]]:
    for name in names:
        if getattr(section, name) < 0:
            yield name, f"must be >= 0, got {getattr(section, name)}"


def positive_ints(section, *names: str) -> Iterator[tuple[str, str]]:
    for name in names:
        if getattr(section, name) < 1:
            yield name, f"must be a positive integer, got {getattr(section, name)}"


def positive(section, *names: str) -> Iterator[tuple[str, str]]:
    for name in names:
        if getattr(section, name) <= 0:
            yield name, f"must be positive, got {getattr(section, name)}"


# ----------------------------------------------------------------------------- docs

@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it, for `cls` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not is_dataclass(klass):
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for stmt, after in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[stmt.target.id] = after.value.value
    return docs


def _public_fields(obj_or_cls):
    return [f for f in fields(obj_or_cls) if f.init]


def iter_fields(recipe, prefix: str = "") -> Iterator[tuple[str, object, str]]:
    """(dotted key, value, doc) for every leaf field of a recipe, in file order."""
    docs = field_docs(type(recipe))
    for f in _public_fields(recipe):
        value = getattr(recipe, f.name)
        if is_dataclass(value):
            yield from iter_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, docs.get(f.name, "")


# ----------------------------------------------------------------------------- building

def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of ({_type_name(args[0])})"
    if is_dataclass(tp):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[tp]


def _convert(value, tp, key: str):
    """`value` as type `tp`, or _Invalid naming `key` and the allowed values."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Invalid(key, f"expected a table, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in args:
            raise _Invalid(key, f"{value!r} is not allowed; choose one of: {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            try:
                return _convert(value, arm, key)
            except _Invalid:
                continue
        raise _Invalid(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise _Invalid(key, f"expected {_type_name(tp)}, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[tp]
    if not ok(value):
        raise _Invalid(key, f"expected {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _unknown_key(cls, name: str, prefix: str) -> _Invalid:
    known = [f.name for f in _public_fields(cls)]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"[{prefix[:-1]}]" if prefix else "the top level"
    return _Invalid(prefix + name, f"unknown key{hint}; keys allowed at {where}: {', '.join(known)}")


def _build(cls, table: dict, prefix: str = ""):
    """Instantiate dataclass `cls` from a TOML table, checking keys and types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in _public_fields(cls)}
    for name in table:
        if name not in known:
            raise _unknown_key(cls, name, prefix)
    return cls(**{name: _convert(value, hints[name], prefix + name) for name, value in table.items()})


INT64_MAX = 2**63 - 1  # seeds and counts go to torch and numpy as 64-bit integers


def _number_problem(value, default) -> str | None:
    """What is wrong with a number no field can use: NaN, an infinity (unless the field's default is that very
    infinity, a "no limit" setting), an integer beyond 64 bits."""
    if isinstance(value, float) and math.isnan(value):
        return "must be a number, got nan"
    if isinstance(value, float) and math.isinf(value) and value != default:
        return f"must be finite, got {value}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        return f"must fit in 64 bits (at most {INT64_MAX}), got {value}"
    return None


def _check_values(obj, prefix: str = "") -> None:
    """Refuse unusable numbers, then run every section's `check()` (sections left at their defaults too);
    raise the first problem."""
    for f in _public_fields(obj):
        values = getattr(obj, f.name)
        for i, value in enumerate(values if isinstance(values, list) else [values]):
            problem = _number_problem(value, f.default)
            if problem is not None:
                raise _Invalid(prefix + f.name + (f"[{i}]" if isinstance(values, list) else ""), problem)
    for name, problem in obj.check():
        raise _Invalid(prefix + name, problem)
    for f in _public_fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            _check_values(value, f"{prefix}{f.name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if is_dataclass(item):
                    _check_values(item, f"{prefix}{f.name}[{i}].")


# ----------------------------------------------------------------------------- loading

def _field_type(schema: type, key: str):
    """The declared type of dotted `key` in `schema` (raises _Invalid for keys that do not exist)."""
    cls, tp, prefix = schema, None, ""
    for part in key.split("."):
        if cls is None:
            raise _Invalid(key, f"{prefix[:-1]} is not a table")
        if part not in {f.name for f in _public_fields(cls)}:
            raise _unknown_key(cls, part, prefix)
        tp = typing.get_type_hints(cls)[part]
        cls = tp if is_dataclass(tp) else None
        prefix += part + "."
    return tp


def parse_override(text: str, schema: type) -> tuple[str, object]:
    """"key.sub=value" -> (key, value). Values are TOML literals; string fields take the text as is."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"override {text!r}: expected key.sub=value (e.g. train.lr=1e-4)")
    try:
        tp = _field_type(schema, key)
    except _Invalid as e:
        raise RecipeError(f"override {text!r}: {e}") from None
    raw = raw.strip()
    if tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp))):
        return key, raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'" else raw
    try:
        return key, tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return key, raw


def _set_dotted(table: dict, key: str, value) -> None:
    """table[key] = value for a dotted key; an inline table (`train={max_steps=2}`) merges into the section
    the file wrote instead of replacing it, so the file's other keys keep their values."""
    *parents, last = key.split(".")
    for part in parents:
        table = table.setdefault(part, {})
    _merge(table, last, value)


def _merge(table: dict, name: str, value) -> None:
    if isinstance(value, dict) and isinstance(table.get(name), dict):
        for key, item in value.items():
            _merge(table[name], key, item)
    else:
        table[name] = value


# ----------------------------------------------------------------------------- writing

def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _emit_table(obj, dotted: str, lines: list[str]) -> None:
    """Append `obj`'s scalar keys, then its sub-tables and arrays of tables, each under its dotted header."""
    docs = field_docs(type(obj))
    subtables, arrays = [], []
    for f in _public_fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            subtables.append((f.name, value))
        elif isinstance(value, list) and value and is_dataclass(value[0]):
            arrays.append((f.name, value))
        else:
            # the field's doc as comments, line by line (a doc may span lines)
            lines += [f"# {line}".rstrip() for line in docs.get(f.name, "").splitlines()]
            lines.append(f"{f.name} = {_toml_value(value)}")
    for name, value in subtables:
        child = f"{dotted}.{name}" if dotted else name
        lines += ["", f"[{child}]"]
        _emit_table(value, child, lines)
    for name, items in arrays:
        child = f"{dotted}.{name}" if dotted else name
        for item in items:
            lines += ["", f"[[{child}]]"]
            _emit_table(item, child, lines)


def recipe_to_toml(recipe) -> str:
    """The resolved recipe as TOML, every key present and documented; `load_recipe` reads it back equal."""
    lines: list[str] = []
    _emit_table(recipe, "", lines)
    return "\n".join(lines) + "\n"
