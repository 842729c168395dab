"""Directories qtune writes stay checkable, and what a killed writer left behind is cleaned up.

Manifest: `qtune-manifest.json` lists every file of a checkpoint or adapter directory qtune wrote (files in
sub-directories too) with its size and SHA-256. It is written last and atomically, inside the temporary
directory that is renamed into place, and readers check each file they read against it, so a flipped byte
is an error naming the file instead of a silently different model. A directory without a manifest (a PEFT
adapter saved by peft, a checkpoint of an older qtune) is read as it is.

Leftovers: qtune assembles a directory NAME beside it as `.NAME.tmp-PID`, keeps an older NAME it replaces as
`.NAME.old-PID` until the new one is in place, and renames one it deletes to `.NAME.del-PID` first. A
process killed in between leaves them behind; `remove_dead_leftovers` deletes those whose PID no longer runs
(an `.old` whose NAME is missing is put back instead: it is the last complete version). A live process's
files are never touched.
"""

import hashlib
import json
import os
import re
import shutil
import signal
from pathlib import Path

import psutil

MANIFEST = "qtune-manifest.json"
MANIFEST_FORMAT = "qtune-manifest/1"
LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)")
FAULT_ENV = "QTUNE_FAULT"  # test-only: see `fault_point`


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> Path:
    """List every file under `directory` (but the manifest) with its size and SHA-256, atomically."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name != MANIFEST:
            files[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    target = directory / MANIFEST
    tmp = directory / f".{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fault_point("manifest-tmp")
    os.replace(tmp, target)
    return target


def read_manifest(directory: Path, error: type[Exception]) -> dict | None:
    """{relative name: {"bytes", "sha256"}} of the directory's manifest; None when it has none."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"] if manifest.get("format") == MANIFEST_FORMAT else None
        if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                                                  for v in files.values()):
            raise ValueError(f"not a {MANIFEST_FORMAT} manifest")
    except (OSError, ValueError, AttributeError, KeyError, UnicodeDecodeError) as e:
        raise error(f"{path}: unreadable ({e}); the directory's record of what qtune wrote is damaged: restore it, "
                    f"or delete {path.name} to read the directory unchecked") from None
    return files


def verify_files(directory: Path, error: type[Exception], names=None, fix: str = "") -> None:
    """Check the files `names` (default: every listed file) against the directory's manifest, if it has one.

    Raises `error` naming the file when one differs from what qtune wrote, is missing although listed, or
    exists unlisted (added to the directory afterwards). `fix` ends the message (what the user can do).
    """
    directory = Path(directory)
    files = read_manifest(directory, error)
    if files is None:
        return
    manifest = directory / MANIFEST
    fix = fix or f"copy the directory again, or delete {manifest} to read it unchecked"
    for name in files if names is None else names:
        path = directory / name
        if name not in files:
            if path.exists():
                raise error(f"{path}: not listed in {manifest}, so it was added after qtune wrote the directory; "
                            f"remove it, or {fix}")
            continue
        if not path.is_file():
            raise error(f"{path}: missing, although {manifest} lists it; {fix}")
        if sha256_file(path) != files[name]["sha256"]:
            raise error(f"{path}: its contents differ from what qtune wrote (SHA-256 mismatch with {manifest}): "
                        f"the file is damaged or was edited; {fix}")


def process_running(pid: int, since: float) -> bool:
    """Whether process `pid` runs and could have been running at time `since` (not a later one reusing the PID)."""
    try:
        return psutil.Process(pid).create_time() <= since + 1.0
    except psutil.AccessDenied:
        return True  # it exists; whose it is cannot be told, so it is left alone
    except (psutil.NoSuchProcess, ValueError):
        return False


def remove_dead_leftovers(parent: Path, name: str = "*") -> list[Path]:
    """Delete `.NAME.tmp-PID` / `.old-PID` / `.del-PID` entries of `parent` whose writer no longer runs; an
    `.old` whose NAME is missing is renamed back to NAME. `name` is a glob (default: any). Returns what was removed."""
    parent = Path(parent)
    removed = []
    for path in sorted(parent.glob(f".{name}.*-*")) if parent.is_dir() else []:
        m = LEFTOVER.fullmatch(path.name)
        if m is None or int(m["pid"]) == os.getpid():
            continue
        try:
            if process_running(int(m["pid"]), path.lstat().st_mtime):
                continue
            target = parent / m["name"]
            if m["kind"] == "old" and not target.exists():
                path.rename(target)  # killed between moving the old version aside and the new one in
                continue
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue  # another process cleaned it first
    return removed


_FAULT_COUNTS: dict[str, int] = {}


def fault_point(phase: str) -> None:
    """Test-only fault injection: with QTUNE_FAULT=PHASE[:N] set, the N-th (default first) arrival at PHASE
    kills this process with SIGKILL, as a power cut or the OOM killer would. Does nothing otherwise.

    Called only between the steps of writing checkpoints and adapters, never in the training step.
    """
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or wanted.split(":")[0] != phase:
        return
    _FAULT_COUNTS[phase] = _FAULT_COUNTS.get(phase, 0) + 1
    if _FAULT_COUNTS[phase] == int(wanted.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)
