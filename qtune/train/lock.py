"""One run per output directory: a lock file held for the life of a run.

Two runs writing into one `output.dir` would interleave `metrics.jsonl`, overwrite each other's `recipe.toml`
and delete each other's checkpoints in progress. `RunLock` creates `.qtune.lock` (PID, host, start time)
with O_EXCL before the run writes anything, and removes it when the run finishes, when the command fails
(`release_all`, which the CLI calls) or when the process exits (atexit: a normal exit, an error, Ctrl-C).
A lock left by a killed process is taken over with a notice: its PID is not running, or runs a process
that started after the lock was written (a reused PID).
"""

import atexit
import json
import os
import socket
import time
from pathlib import Path

from qtune.train.common import TrainingError
from qtune.weights.integrity import process_running

LOCK_NAME = ".qtune.lock"
FRESH_SECONDS = 10.0  # an empty lock this young is another run between creating and writing it


_HELD: list["RunLock"] = []  # the locks this process holds


def release_all() -> None:
    """Release every run lock this process holds (a command that failed, or the process exiting)."""
    for lock in list(_HELD):
        lock.release()


class RunLockedError(TrainingError):
    """The directory is in use by another live run; the message names it and what to do."""


def _holder_alive(holder: dict) -> bool:
    """Whether the process that wrote `holder` still runs (on this host; another host's cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        return process_running(int(holder["pid"]), float(holder["started"]))
    except (KeyError, ValueError, TypeError):
        return False


class RunLock:
    """Held from `acquire` until `release` (or the process exits). `created`: directories the run made for
    itself (deepest first), removed on release when still empty, so a run that failed on bad input before
    writing anything leaves no empty `output.dir` behind."""

    def __init__(self, directory: Path, created: list[Path] = ()):
        self.path = Path(directory) / LOCK_NAME
        self.created = list(created)
        self.held = False

    def acquire(self, console) -> None:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        for _ in range(2):  # a second try after taking over a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                    self.path.unlink(missing_ok=True)  # an earlier run of this same process ended without releasing
                    continue
                if (holder and _holder_alive(holder)) or (not holder and self._fresh()):
                    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
                    raise RunLockedError(
                        f"{self.path.parent} is in use by another qtune run (PID {holder.get('pid')} on "
                        f"{holder.get('host')}, started {started}); wait for it to finish or set output.dir=NEW_DIR "
                        f"(if that process is gone, delete {self.path})") from None
                console.print(f"[yellow]note[/yellow] {self.path}: taking over the lock of a run that is no "
                              f"longer running (PID {holder.get('pid')})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record + "\n")
            self.held = True
            _HELD.append(self)
            atexit.unregister(release_all)  # registered once however many runs this process starts
            atexit.register(release_all)
            return
        raise RunLockedError(f"{self.path}: could not take the run lock; delete it if no run uses this directory")

    def release(self) -> None:
        if self.held:
            self.held = False
            self.path.unlink(missing_ok=True)
            _HELD.remove(self)
            for directory in self.created:
                try:
                    directory.rmdir()
                except OSError:  # not empty (the run wrote its record there) or gone
                    break

    def _fresh(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime < FRESH_SECONDS
        except OSError:
            return False

    def _read(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # half-written by a process killed while writing it: stale
        return holder if isinstance(holder, dict) else {}
