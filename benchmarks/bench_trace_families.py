"""The tracer's GPU-semantics replay of one QLoRA step per dense model family, against `qtune estimate`.

    python benchmarks/bench_trace_families.py [--shapes qwen3-8b,gemma-2-9b] [--seq 2048]

Each shape's step (random NF4 weights with double quantization, r=16 on every linear, batch 1, gradient
checkpointing, AdamW state present, bf16 compute) runs on fake tensors under the live-bytes tracer
(qtune/memory/tracer.py): the peak of live tensor bytes a GPU would hold, replayed on the CPU without the
memory, through qtune's own model code of that family. The estimator predicts the same step: with the
plain-torch loss the tracer runs, and with the Triton loss a CUDA run uses (the README's table). Neither is
a GPU measurement. The last stdout line is JSON with each shape's figures.
"""

import argparse
import time

import torch
from common import append_rows, print_json

from qtune.config import shape_config
from qtune.memory.estimate import StepShape, estimate
from qtune.memory.step import trace_step
from qtune.memory.tracer import fmt_bytes

DENSE_SHAPES = ("llama3.1-8b", "qwen3-8b", "gemma-2-9b", "gemma-3-12b", "mistral-nemo-12b", "phi-4")


def replay(name: str, seq: int) -> dict:
    """Tracer peak and the two estimates of one shape's step."""
    cfg = shape_config(name)
    t0 = time.perf_counter()
    rep = trace_step(cfg, 1, seq, torch.bfloat16, r=16)
    shape = StepShape(cfg, micro_batch_size=1, seq_len=seq, dtype="bfloat16", r=16)
    torch_loss = estimate(shape).peak_bytes
    triton_loss = estimate(StepShape(**{**shape.__dict__, "triton_loss": True})).peak_bytes
    return {"shape": name, "seq": seq, "trace_peak": rep.peak_bytes, "estimate_peak": torch_loss,
            "estimate_triton_loss_peak": triton_loss, "estimate_over_trace": round(torch_loss / rep.peak_bytes, 4),
            "peak_phase": rep.peak_phase, "trace_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(DENSE_SHAPES))
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()
    results, rows = [], []
    for name in args.shapes.split(","):
        r = replay(name, args.seq)
        results.append(r)
        print(f"{name}, seq {args.seq}: tracer {fmt_bytes(r['trace_peak'])} (peak in {r['peak_phase']}), estimate "
              f"{fmt_bytes(r['estimate_peak'])} ({r['estimate_over_trace']:.3f} of the tracer), with the Triton "
              f"loss {fmt_bytes(r['estimate_triton_loss_peak'])}; replay {r['trace_s']} s", flush=True)
        case = f"{name},b=1,T={args.seq},r=16,bf16"
        rows += [{"case": case, "impl": "tracer", "metric": "peak", "value": r["trace_peak"], "unit": "B"},
                 {"case": case, "impl": "estimate", "metric": "peak", "value": r["estimate_peak"], "unit": "B"}]
    if not args.no_csv:
        append_rows("trace_families", "cpu", rows)
    print_json({"traces": results,
                "max_deviation": round(max(abs(r["estimate_over_trace"] - 1) for r in results), 4)})


if __name__ == "__main__":
    main()
