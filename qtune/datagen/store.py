"""Resumable output for generation runs: append-only JSONL files plus a committed checkpoint.

A run works in rounds. After each round it appends that round's records to its JSONL files, fsyncs them,
and only then replaces `state.json` (atomically) with the new round number, the byte size of every file and
the running counters. On restart the files are cut back to the sizes in `state.json`, so a round that was
interrupted half-written disappears and is generated again: nothing is duplicated and nothing committed is
lost. Each round's randomness is seeded from (seed, round), so the redone round equals the lost one.
"""

import json
import os
from pathlib import Path

STATE_FILE = "state.json"


class ResumeError(ValueError):
    """An output directory that cannot be resumed with these settings."""


def write_json_atomic(path: Path, obj, indent: int | None = 2) -> None:
    """Write JSON to a temporary file, fsync it and rename it over `path` (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Journal:
    """The JSONL files of one run directory and the checkpoint that says how much of them is committed.

    `fingerprint` holds the settings that decide what the run generates (seed, method, seed tasks, ...);
    resuming with a different fingerprint is refused instead of mixing two runs in one file.
    """

    def __init__(self, out_dir: str | Path, files: tuple[str, ...], fingerprint: dict):
        self.dir = Path(out_dir)
        self.files = files
        self.fingerprint = fingerprint
        self.round = 0
        self.counters: dict = {}

    def open(self) -> dict[str, list[dict]]:
        """Create the directory or resume it: returns the committed records of every file."""
        self.dir.mkdir(parents=True, exist_ok=True)
        state_path = self.dir / STATE_FILE
        if not state_path.exists():
            for name in self.files:
                if (self.dir / name).exists() and (self.dir / name).stat().st_size:
                    raise ResumeError(f"{self.dir / name} exists but {state_path} does not: this directory was not "
                                      f"written by a qtune generation run; choose an empty output.dir")
                (self.dir / name).write_bytes(b"")
            self.commit(0, {})  # from now on an interrupted first round is cut back like any other
            return {name: [] for name in self.files}
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if state.get("fingerprint") != self.fingerprint:
            changed = sorted(k for k in set(self.fingerprint) | set(state.get("fingerprint", {}))
                             if self.fingerprint.get(k) != state.get("fingerprint", {}).get(k))
            raise ResumeError(f"{self.dir} holds a run with different settings ({', '.join(changed)}); resume it "
                              f"with the same settings or choose a new output.dir")
        self.round, self.counters = state["round"], state["counters"]
        return {name: self._truncate_and_read(name, state["sizes"].get(name, 0)) for name in self.files}

    def _truncate_and_read(self, name: str, size: int) -> list[dict]:
        path = self.dir / name
        if not path.exists() or path.stat().st_size < size:
            raise ResumeError(f"{path} is shorter than its committed size ({size} bytes): the file was changed "
                              f"outside qtune; restore it or start a new output.dir")
        with path.open("r+b") as f:
            f.truncate(size)
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line]

    def append(self, name: str, records: list[dict]) -> None:
        """Append records (one JSON line each); they count only after the next `commit`."""
        if records:
            with (self.dir / name).open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    def commit(self, round_: int, counters: dict) -> None:
        """Make everything appended so far durable, then record it as round `round_`."""
        sizes = {}
        for name in self.files:
            with (self.dir / name).open("rb+") as f:
                os.fsync(f.fileno())
            sizes[name] = (self.dir / name).stat().st_size
        self.round, self.counters = round_, counters
        write_json_atomic(self.dir / STATE_FILE, {"round": round_, "sizes": sizes, "counters": counters,
                                                 "fingerprint": self.fingerprint})
