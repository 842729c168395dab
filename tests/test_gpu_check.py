"""benchmarks/gpu_check.py's smoke mode (`--device cpu --interpret`) runs every stage at tiny shapes in CI.

On this CPU lane the test stage finds the gpu-marked tests skipped, the kernel checks run the interpreted
Triton kernels against their references, and the QLoRA step and decoding run a tiny random model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_mode_runs_every_stage_and_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--interpret"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and report["ok"], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["smoke"] and report["tests"]["skipped"] > 0 and "failed" not in report["tests"]
    kernels = report["kernels"]
    assert all(row["ok"] for row in kernels["nf4_matmul"].values()) and len(kernels["nf4_matmul"]) == 2
    assert kernels["lora_mlp"]["ok"] and kernels["cross_entropy"]["ok"]
    assert report["train"]["loss_finite"] and report["train"]["tokens_per_s"] > 0
    assert report["train"]["estimate_bytes"] > 0 and report["train"]["mfu"] is None  # no bf16 peak on a CPU
    assert set(report["decode"]) == {"batch1_tokens_per_s", "batch2_tokens_per_s"}
    assert report["context"]["tiny"]["ran"] and report["context"]["tiny"]["loss_finite"]  # offload + tiling switches
