"""`qtune estimate` against measured peaks: shipped SFT recipes at several model sizes, one real step each.

    python benchmarks/bench_estimate.py

For every case the recipe goes through the same path as `qtune estimate RECIPE --device cpu` (fp32 compute,
the recipe's micro-batch, sequence length, rank, targets and checkpointing), and the same step runs for
real on a random-weight model of that shape in its own process (`python -m qtune.memory.measure`, with
MALLOC_MMAP_THRESHOLD_=65536 so freed buffers leave the resident set at once). The measured figure is the
kernel's peak resident set of the step minus the process's non-tensor memory. The last stdout line is JSON
with each case's estimate, measurement and ratio, and the largest deviation.
"""

import argparse
import json
import os
import subprocess
import sys

from common import append_rows, print_json

from qtune.memory.estimate import estimate, step_shape_from_recipe
from qtune.memory.tracer import fmt_bytes
from qtune.recipe.load import load_recipe

# (recipe, overrides, model shape when model.path is not a local directory)
CASES = [
    ("quickstart", [], None),  # SmolLM2-135M, 8 x 96 tokens, r=16, no checkpointing
    ("alpaca", [], "smollm2-135m"),  # the QLoRA paper's settings (r=64, 4 x 512, checkpointing) on SmolLM2-135M
    ("alpaca", ["train.micro_batch_size=1", "data.max_seq_len=1024", "lora.r=16"], "smollm2-360m"),
    ("alpaca", ["train.micro_batch_size=2", "data.max_seq_len=256", "model.gradient_checkpointing=false"],
     "smollm2-360m"),
]


def measure(s) -> dict:
    """One real step of StepShape `s` in a fresh process."""
    targets = s.targets if isinstance(s.targets, str) else list(s.targets)
    spec = {"config": s.cfg.to_dict(), "micro_batch_size": s.micro_batch_size, "seq_len": s.seq_len, "r": s.r, "targets": targets,
            "gradient_checkpointing": s.gradient_checkpointing, "dtype": s.dtype, "warmup_step": True}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-m", "qtune.memory.measure", json.dumps(spec)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()
    results, rows = [], []
    for recipe, overrides, shape in CASES:
        loaded = load_recipe(recipe, overrides)
        s = step_shape_from_recipe(loaded, device="cpu", shape=shape)
        predicted = estimate(s).peak_bytes
        m = measure(s)
        ratio = predicted / m["step_peak_tensors"]
        model = shape or loaded.model.path
        name = f"{recipe}{' ' + ' '.join(overrides) if overrides else ''} on {model}"
        case = (f"{recipe},{model},b={s.micro_batch_size},T={s.seq_len},r={s.r},"
                f"ckpt={int(s.gradient_checkpointing)}")
        results.append({"case": case, "estimate_bytes": predicted, "measured_bytes": m["step_peak_tensors"],
                        "ratio": round(ratio, 4), "step_s": m["step_s"]})
        print(f"{name}: {s.micro_batch_size} x {s.seq_len} tokens, r={s.r}, checkpointing "
              f"{'on' if s.gradient_checkpointing else 'off'}: estimate {fmt_bytes(predicted)}, measured "
              f"{fmt_bytes(m['step_peak_tensors'])}, ratio {ratio:.3f}", flush=True)
        rows += [{"case": case, "impl": "estimate", "metric": "peak", "value": predicted, "unit": "B"},
                 {"case": case, "impl": "measured", "metric": "peak", "value": m["step_peak_tensors"], "unit": "B"}]
    if not args.no_csv:
        append_rows("estimate", "cpu", rows)
    print_json({"cases": results, "max_deviation": round(max(abs(r["ratio"] - 1) for r in results), 4)})


if __name__ == "__main__":
    main()
