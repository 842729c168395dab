"""The measured peak of one real QLoRA step on the CPU, in a process of its own.

    python -m qtune.memory.measure '{"shape": "llama2-7b", "seq_len": 512, "r": 16}'
    python -m qtune.memory.measure '{"config": {...config.json fields...}, "micro_batch_size": 2, ...}'

prints one JSON object ("tile_tokens" sets the tiled MLP's chunk, qtune.tiled_mlp.CHUNK_TOKENS, for the step).
Memory is the kernel's count for this process (/proc/self/status): VmHWM, the peak resident set, is reset
through /proc/self/clear_refs once the model is built and the optimizer state exists (made by a zero-gradient
step, or by a full warm-up step with "warmup_step": true), so `step_peak` is the step's own peak.
`step_peak_tensors` subtracts what the process holds besides tensors (interpreter, libraries: resident size
before the step minus the bytes of the tensors alive then), which is what the estimator and the tracer predict.
"""

import json
import sys
import time
from pathlib import Path

import torch

from qtune.config import ModelConfig, shape_config
from qtune.memory.step import build_step, optimizer_tensors, prime_optimizer, train_step
from qtune.memory.tracer import nbytes_of


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> None:
    """Set VmHWM back to the current resident size (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure_step(spec: dict) -> dict:
    """Build the spec's random model, create the optimizer state, run one step; report memory and time."""
    cfg = shape_config(spec["shape"]) if "shape" in spec else ModelConfig.from_dict(spec["config"])
    if "tile_tokens" in spec:
        import qtune.tiled_mlp

        qtune.tiled_mlp.CHUNK_TOKENS = spec["tile_tokens"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    runtime = proc_status()
    t0 = time.perf_counter()
    setup = build_step(cfg, spec.get("micro_batch_size", 1), spec["seq_len"], dtype, "cpu", r=spec.get("r", 16),
                       targets=spec.get("targets", "all-linear"),
                       gradient_checkpointing=spec.get("gradient_checkpointing", True),
                       offload_checkpoints=spec.get("offload_checkpoints", False),
                       tiled_mlp=spec.get("tiled_mlp", "off"))
    setup.model.set_kernels("torch")
    if spec.get("warmup_step"):
        train_step(setup)  # also creates the runtime's lazily built buffers and thread state
    else:
        prime_optimizer(setup)
    build_s = time.perf_counter() - t0
    resident = nbytes_of([*setup.model.parameters(), *setup.model.buffers(), *optimizer_tensors(setup.optimizer),
                          *setup.batch.values()])
    loaded = proc_status()
    reset_peak_rss()
    t0 = time.perf_counter()
    loss = train_step(setup)
    step_s = time.perf_counter() - t0
    after = proc_status()
    return {"runtime_rss": runtime["VmRSS"], "build_peak": loaded["VmHWM"], "loaded_rss": loaded["VmRSS"],
            "resident_tensors": resident, "step_peak": after["VmHWM"],
            "step_peak_tensors": after["VmHWM"] - (loaded["VmRSS"] - resident), "after_step_rss": after["VmRSS"],
            "build_s": round(build_s, 2), "step_s": round(step_s, 2), "loss_sum": loss.item()}


if __name__ == "__main__":
    print(json.dumps(measure_step(json.loads(sys.argv[1]))), flush=True)
