"""The parameter-efficient methods side by side (issue #18's "Measured" table): every method in
qtune.peft.METHODS at its usual size, trained for the same number of steps with the same learning rate on

    quickstart  the quickstart's generated tasks (exact match of greedy answers + held-out loss)
    alpaca      LLaMA-Factory's Alpaca-format demo data from the shared data folder (held-out loss)

with SmolLM2-135M on its NF4 base. Per run: trainable parameters (the tensors the run's last checkpoint holds),
peak memory (CUDA: allocated; CPU: the process's peak RSS), training tokens/s (median over the steps after the
first), held-out loss before / after and, on the quickstart, exact match before / after. Each run is its own
`qtune sft` process so that peak memory is its own. Appends CSV rows and ends with one JSON line.

    python benchmarks/bench_peft.py [--steps 12] [--methods lora,adalora,adapter] [--tasks quickstart,alpaca]
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, device_name, print_json  # noqa: E402

from qtune.peft import METHODS  # noqa: E402

SHARED_DATA = Path(os.environ.get("QTUNE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ALPACA_DEMO = SHARED_DATA / "llamafactory" / "alpaca_en_demo.json"


def usual_size(method: str, steps: int) -> list[str]:
    """Each method's usual size as recipe overrides (a method not named here runs with its recipe defaults,
    which follow its paper): LoRA and DoRA r = 16; AdaLoRA from rank 12 to 8 on average, pruning over the middle
    half of the run; bottleneck adapters of width 64 after both sub-blocks (Houlsby)."""
    return {
        "lora": ["lora.r=16", "lora.alpha=32"],
        "dora": ["lora.r=16", "lora.alpha=32"],  # the recipes' own r differs (alpaca: 64); DoRA compares with LoRA
        "adalora": ["peft.adalora.init_r=12", "peft.adalora.target_r=8", f"peft.adalora.tinit={steps // 4}",
                    f"peft.adalora.tfinal={steps // 4}"],
        "adapter": ["peft.adapter.size=64", "peft.adapter.after=both"],
    }.get(method, [])


VARIANTS = {  # a method with one setting changed, run only when --methods names it
    "p_tuning@response": ("p_tuning", ['peft.p_tuning.placement=["response"]']),
    "p_tuning@split": ("p_tuning", ['peft.p_tuning.placement=["start:10","response:10"]']),
}
"""P-tuning's virtual tokens before the reply, or half before everything and half before the reply (the
default, "p_tuning", puts all 20 first, as PEFT does)."""


def task_overrides(task: str, args) -> list[str]:
    """The recipe and overrides of a task, the same for every method."""
    if task == "quickstart":
        return ["quickstart", f"data.val_size={args.eval_size}", f"eval.exact_match={args.eval_size}"]
    return ["alpaca", f"data.path={args.data}", "data.max_seq_len=192", f"data.val_size={args.eval_size}",
            "train.micro_batch_size=4", "train.grad_accum_steps=1", "train.lr=5e-4", "train.optimizer=adamw",
            "train.schedule=cosine", "train.warmup_steps=2", "train.max_grad_norm=1.0", "lora.dropout=0.0",
            "eval.every=0", "eval.max_batches=0", "model.gradient_checkpointing=false"]


def trainable_params(run_dir: Path, steps: int) -> int:
    """Elements of every tensor the run trained (its final checkpoint's trainable.safetensors)."""
    path = run_dir / "checkpoints" / f"step-{steps:06d}" / "trainable.safetensors"
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def run_one(task: str, method: str, args, out: Path) -> dict:
    run_dir = out / f"{task}-{method}"
    recipe, *overrides = task_overrides(task, args)
    base, changed = VARIANTS.get(method, (method, []))
    size = usual_size(base, args.steps) + changed
    cmd = [sys.executable, "-c", "from qtune.cli import main; main()", "sft", recipe, f"model.path={args.model}",
           f"output.dir={run_dir}", "data.cache_dir=", f"train.max_steps={args.steps}", "train.save_every=0",
           "train.log_every=1", f"peft.method={base}", *overrides, *size]
    # outside the repository: its kernels/ folder would shadow the `kernels` package bitsandbytes imports
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    if proc.returncode != 0:
        return {"task": task, "method": method, "error": proc.stderr.strip().splitlines()[-1:]}
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 1]
    row = {"task": task, "method": method, "size": " ".join(size) or "defaults",
           "trainable_params": trainable_params(run_dir, args.steps), "peak_memory_bytes": summary["peak_memory_bytes"],
           "tokens_per_s": statistics.median(speeds) if speeds else None,
           "val_loss_before": summary["val_loss_before"], "val_loss_after": summary["val_loss_after"],
           "seconds": summary["seconds"]}
    if summary["metric"] == "exact_match":
        row["exact_match_before"], row["exact_match_after"] = summary["before"], summary["after"]
    if "adalora_total_rank" in summary:
        row["adalora_total_rank"] = summary["adalora_total_rank"]
    return row


def report(rows: list[dict], args, device: str) -> None:
    print(f"{args.model}, NF4 base, {args.steps} steps each, {device}")
    print(f"{'task':10s} {'method':17s} {'trainable':>10s} {'peak MB':>8s} {'tok/s':>7s} {'loss before':>11s} "
          f"{'loss after':>10s} {'EM before':>9s} {'EM after':>8s}")
    for r in rows:
        if "error" in r:
            print(f"{r['task']:10s} {r['method']:17s} failed: {r['error']}")
            continue
        em = (f"{r['exact_match_before']:9.3f} {r['exact_match_after']:8.3f}" if "exact_match_after" in r
              else f"{'-':>9s} {'-':>8s}")
        print(f"{r['task']:10s} {r['method']:17s} {r['trainable_params']:>10,} {r['peak_memory_bytes'] / 2**20:8.0f} "
              f"{r['tokens_per_s']:7.0f} {r['val_loss_before']:11.4f} {r['val_loss_after']:10.4f} {em}")


def csv_rows(rows: list[dict], steps: int) -> list[dict]:
    out = []
    units = {"trainable_params": "params", "peak_memory_bytes": "B", "tokens_per_s": "tok/s", "val_loss_after": "nats",
             "exact_match_after": "fraction"}
    for r in rows:
        for metric, unit in units.items():
            if r.get(metric) is not None:
                out.append({"case": f"{r['task']},steps={steps}", "impl": r["method"], "metric": metric,
                            "value": r[metric], "unit": unit})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps of every run (the same for all)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated [peft] methods (default: all) or variants: {', '.join(VARIANTS)}")
    ap.add_argument("--tasks", default="quickstart,alpaca")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(ALPACA_DEMO), help="Alpaca-format JSON file for the alpaca task")
    ap.add_argument("--eval-size", type=int, default=24, help="held-out examples (and exact-match answers)")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()
    methods, tasks = args.methods.split(","), args.tasks.split(",")
    unknown = [m for m in methods if m not in METHODS and m not in VARIANTS]
    unknown += [t for t in tasks if t not in ("quickstart", "alpaca")]
    if unknown:
        sys.exit(f"unknown method or task {unknown}; methods: {', '.join(METHODS)}; tasks: quickstart, alpaca")
    if "alpaca" in tasks and not Path(args.data).is_file():
        sys.exit(f"{args.data}: not found; pass --data or set QTUNE_SHARED_DATA")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as out:
        rows = [run_one(task, method, args, Path(out)) for task in tasks for method in methods]
    report(rows, args, device_name(device))
    if not args.no_csv:
        append_rows("peft", device, csv_rows(rows, args.steps))
    print_json({"model": args.model, "steps": args.steps, "device": device_name(device), "runs": rows})


if __name__ == "__main__":
    main()
