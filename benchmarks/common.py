"""Shared helpers for the benchmark scripts: timing, peak memory, CSV rows, the final JSON line."""

import csv
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent
RESULTS_CSV = RESULTS_DIR / "results.csv"
CSV_FIELDS = ["date", "commit", "device", "benchmark", "case", "impl", "metric", "value", "unit"]


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu:{platform.processor() or platform.machine()}x{os.cpu_count()}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS_DIR, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, warmup: int = 2, repeat: int = 5) -> dict:
    """Median and spread (min, max) of `fn()` wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def append_rows(benchmark: str, device: str, rows: list[dict], path: Path = RESULTS_CSV) -> None:
    """Append result rows (each with case, impl, metric, value, unit) to the shared CSV."""
    new = not path.exists()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({"date": stamp, "commit": git_commit(), "device": device_name(device),
                             "benchmark": benchmark, **row})


def print_json(obj: dict) -> None:
    """The last stdout line of every benchmark: one JSON object that scripts can read."""
    print(json.dumps(obj, sort_keys=True), flush=True)
