"""Fault matrix: kill `qtune sft` at every phase of a checkpoint or adapter write, resume, compare with the
uninterrupted run; run two runs on one directory at once; fill the disk in the middle of a checkpoint and of
the final adapter.

    python tests/fault_matrix.py            # a table of phases x outcome, then one JSON line of counts

Each run is `qtune sft` on a tiny random Llama (tests/tiny.py): six steps, a checkpoint every two, dropout on
(so the RNG state must be restored too). The process is killed with SIGKILL by the test-only hook
(QTUNE_FAULT=PHASE:N, see qtune/weights/integrity.py), then `--resume` runs without a fault. Outcomes:
  identical  the resumed run's losses equal the uninterrupted run's (max difference 0.0), its adapter is
             byte-identical, every manifest verifies and no leftover, lock or partial file remains
  differs    it finished, but a loss or the adapter differs (or a leftover remains)
  lost       the resume failed (no usable checkpoint, an error)
  mixed      metrics.jsonl holds a step twice or out of order
  not-hit    the faulted run was not killed: the phase was never reached (a broken matrix)
To stay fast, the driver imports qtune once and forks one child per run (each child is one CLI invocation).
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: no thread pool to break in the forked children
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# (phase, arrival that kills, whether the run first finishes normally). Six steps, a checkpoint every two:
# the 2nd checkpoint (step 4) is cut, step 2's must carry the resume; adapter saves arrive as checkpoint 2,
# 4, 6 then the final adapter; manifests as ckpt-2 adapter, ckpt-2, ckpt-4 adapter, ckpt-4, ... final (7th).
PHASES = [
    ("checkpoint-begin", 2, False),     # temporary directory made, nothing in it
    ("commit-ready", 2, False),         # the checkpoint's adapter complete, not yet renamed into it
    ("checkpoint-state", 2, False),     # trainable tensors written, optimizer not
    ("checkpoint-payload", 2, False),   # every file written, no COMPLETE marker, no manifest
    ("manifest-tmp", 4, False),         # the manifest written beside its final name
    ("checkpoint-complete", 2, False),  # marked and listed, not yet renamed into place
    ("checkpoint-renamed", 2, False),   # in place, older ones not yet pruned
    ("checkpoint-prune", 1, False),     # step 2 renamed for deletion (after step 6), not yet deleted
    ("manifest-tmp", 7, False),         # the final adapter's manifest, beside its final name
    ("commit-ready", 4, False),         # the final adapter complete, not yet renamed into place
    ("commit-swap", 1, True),           # a finished run resumed: old adapter moved aside, new one not yet in
]
LEFTOVER_GLOBS = (".*.tmp-*", ".*.old-*", ".*.del-*", ".*.tmp", ".qtune.lock")


def sft_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "quickstart", f"model.path={model_dir}", f"output.dir={out}", "data.cache_dir=",
            "data.path=qtune:checkable-tasks?count=48&seed=0", "data.val_size=8", "eval.exact_match=0",
            "lora.dropout=0.1", "train.max_steps=6", "train.save_every=2", "train.log_every=1", *extra]


def cli_child(args: list[str], log: Path, fault: str | None = None) -> int:
    """Fork a child that runs the qtune CLI once; returns its exit status (-9 when SIGKILLed)."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if fault:
                os.environ["QTUNE_FAULT"] = fault
            from qtune.cli import main

            main(args, standalone_mode=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def record(out: Path) -> dict:
    """What a run left: its training steps' (step, loss, lr, grad_norm) and the final adapter's bytes."""
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    steps = [json.loads(line) for line in lines if line.strip()]
    adapter = out / "adapter"
    return {"steps": [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in steps if "loss" in r],
            "files": {p.name: p.read_bytes() for p in adapter.iterdir()} if adapter.is_dir() else {}}


def leftovers(out: Path) -> list[str]:
    return [str(p) for d in (out, out / "checkpoints") for g in LEFTOVER_GLOBS for p in d.glob(g)]


def manifests_verify(out: Path) -> bool:
    from qtune.train.common import TrainingError
    from qtune.weights.integrity import MANIFEST, verify_files

    try:
        for manifest in out.rglob(MANIFEST):
            verify_files(manifest.parent, TrainingError)
        return True
    except TrainingError:
        return False


def judge(got: dict, want: dict, out: Path) -> tuple[str, float]:
    """(outcome, max loss difference) of a resumed run against the uninterrupted one."""
    numbers = [s for s, _, _, _ in got["steps"]]
    if numbers != sorted(set(numbers)):
        return "mixed", float("nan")
    if len(got["steps"]) != len(want["steps"]) or not got["files"]:
        return "lost", float("nan")
    diff = float(max(abs(a - b) for x, y in zip(got["steps"], want["steps"]) for a, b in zip(x, y)))
    same = diff == 0.0 and got["files"] == want["files"] and not leftovers(out) and manifests_verify(out)
    return ("identical" if same else "differs"), diff


def fault_row(model_dir: Path, root: Path, want: dict, phase: str, arrival: int, finished_first: bool) -> dict:
    out, log = root / f"{phase}-{arrival}", root / f"{phase}-{arrival}.log"
    if finished_first and cli_child(sft_args(model_dir, out), log) != 0:
        return {"phase": f"{phase}:{arrival}", "outcome": "lost", "detail": log.read_text()[-2000:]}
    extra = ("--resume",) if finished_first else ()
    killed = cli_child(sft_args(model_dir, out, *extra), log, fault=f"{phase}:{arrival}")
    if killed != -signal.SIGKILL:
        return {"phase": f"{phase}:{arrival}", "outcome": "not-hit", "status": killed}
    status = cli_child(sft_args(model_dir, out, "--resume"), log)
    if status != 0:
        return {"phase": f"{phase}:{arrival}", "outcome": "lost", "detail": log.read_text()[-2000:]}
    outcome, diff = judge(record(out), want, out)
    return {"phase": f"{phase}:{arrival}", "outcome": outcome, "max_loss_diff": diff}


def concurrent_row(model_dir: Path, root: Path, want: dict) -> dict:
    """A second run on the directory of a live one refuses at once; the first's record stays intact."""
    out = root / "concurrent"
    first = os.fork()
    if first == 0:
        os._exit(cli_child(sft_args(model_dir, out), root / "concurrent-first.log") & 0xFF)
    deadline = time.time() + 120
    while not (out / ".qtune.lock").exists() and time.time() < deadline:
        time.sleep(0.01)
    second = cli_child(sft_args(model_dir, out), root / "concurrent-second.log")
    _, status = os.waitpid(first, 0)
    refused = "is in use by another qtune run" in (root / "concurrent-second.log").read_text()
    outcome, diff = judge(record(out), want, out)
    if os.WEXITSTATUS(status) != 0 or second != 1 or not refused:
        outcome = "mixed" if outcome != "identical" else "differs"
    return {"phase": "concurrent-run", "outcome": outcome, "max_loss_diff": diff}


# (row, the fault that cuts the first run, room left on the disk for the resumed one): cut before step 4's
# checkpoint (~0.5 MB), which does not fit in 160 kB; cut after step 6's, so that the resumed run only writes
# the final adapter (~0.12 MB of weights), which does not fit in 60 kB. Metrics lines fit in both.
FULL_DISKS = [("disk-full-checkpoint", "checkpoint-begin:2", 160_000),
              ("disk-full-adapter", "checkpoint-renamed:3", 60_000)]


def full_disk_rows(model_dir: Path, root: Path, want: dict) -> list[dict]:
    """A small tmpfs filled up during a checkpoint, then during the final adapter: one clean Error, no partial
    files, and the run resumes once there is room. Needs root and a mountable tmpfs; otherwise each row says
    why it was skipped."""
    mount = root / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip()[:200]
        return [{"phase": row, "outcome": "skipped", "reason": reason} for row, _, _ in FULL_DISKS]
    try:
        return [full_disk(model_dir, mount / row, root / f"{row}.log", want, row, cut, room)
                for row, cut, room in FULL_DISKS]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def full_disk(model_dir: Path, out: Path, log: Path, want: dict, row: str, cut: str, room: int) -> dict:
    cli_child(sft_args(model_dir, out), log, fault=cut)
    filler = out.parent / "filler"
    stat = os.statvfs(out.parent)
    filler.write_bytes(b"\0" * max(0, stat.f_bavail * stat.f_frsize - room))
    status = cli_child(sft_args(model_dir, out, "--resume"), log)
    text = " ".join(log.read_text().split())
    clean = status == 1 and "No space left on device" in text and "Traceback" not in text
    partial = leftovers(out) + [str(p) for p in (out / "checkpoints").iterdir() if not p.name.startswith("step-")]
    filler.unlink()
    if not clean or partial:
        return {"phase": row, "outcome": "lost", "status": status, "partial": partial, "detail": text[-1500:]}
    status = cli_child(sft_args(model_dir, out, "--resume"), log)
    if status != 0:
        return {"phase": row, "outcome": "lost", "detail": log.read_text()[-2000:]}
    outcome, diff = judge(record(out), want, out)
    return {"phase": row, "outcome": outcome, "max_loss_diff": diff}


def run_matrix(root: Path, phases=PHASES) -> dict:
    from tiny import save_tiny_with_tokenizer

    from qtune.cli import main

    model_dir = save_tiny_with_tokenizer("llama", root / "tiny", seed=1)
    # The uninterrupted run in this process: every forked child then starts with qtune imported and warm.
    with open(root / "uninterrupted.log", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        main(sft_args(model_dir, root / "uninterrupted"), standalone_mode=False)
    want = record(root / "uninterrupted")
    rows = [fault_row(model_dir, root, want, *phase) for phase in phases]
    rows.append(concurrent_row(model_dir, root, want))
    rows += full_disk_rows(model_dir, root, want)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
    diffs = [r["max_loss_diff"] for r in rows if "max_loss_diff" in r]
    return {"rows": rows, "counts": counts, "max_loss_diff": max(diffs) if diffs else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it, with every row in "
                                                  "result.json (default: a temporary directory)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="qtune-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        result = run_matrix(root)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    for row in result["rows"]:
        extra = {k: v for k, v in row.items() if k not in ("phase", "outcome")}
        print(f"{row['phase']:<24} {row['outcome']:<10} {json.dumps(extra)[:300]}")
    result["seconds"] = round(time.perf_counter() - started, 1)
    if args.keep is not None:
        (root / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
