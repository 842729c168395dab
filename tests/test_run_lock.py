"""One run per output directory: a second run refuses at once naming the holder, the first run's record
stays intact, and a lock left by a killed process is taken over with a notice."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console
from tiny import save_tiny_with_tokenizer

from qtune.train.lock import LOCK_NAME, RunLock, RunLockedError

REPO = Path(__file__).resolve().parents[1]


def write_lock(directory: Path, pid: int, started: float) -> Path:
    path = directory / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": started}))
    return path


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def test_a_live_holder_is_refused_by_name(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, holder.pid, time.time())
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path).acquire(quiet())
        assert f"PID {holder.pid}" in str(e.value) and str(tmp_path) in str(e.value)
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_with_a_notice(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_lock(tmp_path, gone.pid, time.time() - 5)
    console = Console(record=True, file=open(os.devnull, "w"))
    lock = RunLock(tmp_path)
    lock.acquire(console)
    notice = " ".join(console.export_text().split())
    assert f"taking over the lock of a run that is no longer running (PID {gone.pid})" in notice, notice
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_reused_pid_does_not_hold_the_lock(tmp_path):
    """The lock names a PID that now belongs to a process started after the lock was written."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        write_lock(tmp_path, other.pid, time.time() - 3600)
        lock = RunLock(tmp_path)
        lock.acquire(quiet())
        lock.release()
    finally:
        other.kill()
        other.wait()


def test_a_second_concurrent_run_refuses_and_the_first_record_is_intact(tmp_path):
    tiny_dir = save_tiny_with_tokenizer("llama", tmp_path / "tiny", seed=0)
    out = tmp_path / "run"
    args = [sys.executable, "-c", "from qtune.cli import main; main()", "sft", "quickstart", f"model.path={tiny_dir}", f"output.dir={out}",
            "data.cache_dir=", "data.path=qtune:checkable-tasks?count=48&seed=0", "data.val_size=8",
            "eval.exact_match=0", "train.max_steps=16", "train.save_every=4", "train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / LOCK_NAME).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert second.returncode == 1, second.stderr[-3000:]
    message = " ".join(second.stderr.split())
    assert f"is in use by another qtune run (PID {first.pid}" in message and "Traceback" not in second.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 16 and len(steps) == len(set(steps))
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == 16
    assert not (out / LOCK_NAME).exists()  # released when the run finished
