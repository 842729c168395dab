"""SFT end to end: the shipped Alpaca recipe on real Alpaca-format data with the offline SmolLM2-135M model.

`qtune sft alpaca` with overrides (the offline model, LLaMA-Factory's alpaca_en_demo.json, a few steps,
shorter sequences) through the library entry point the CLI calls. Reports the held-out response loss before
and after training (it must fall), training tokens/s, wall and CPU time and peak memory; appends CSV rows and
ends with one JSON line.

    python benchmarks/bench_sft.py [--steps 12] [--max-seq-len 192] [--val-size 32] [--lr 5e-4]
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, print_json  # noqa: E402

SHARED_DATA = Path(os.environ.get("QTUNE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ALPACA_DEMO = SHARED_DATA / "llamafactory" / "alpaca_en_demo.json"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ALPACA_DEMO), help="Alpaca-format JSON file")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max-seq-len", type=int, default=192)
    ap.add_argument("--val-size", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-4, help="the recipe's 2e-4 moves too little in a few steps")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"{args.data}: not found; pass --data or set QTUNE_SHARED_DATA")

    from qtune.recipe.load import load_recipe
    from qtune.train.common import use_idle_cpu_cores
    from qtune.train.sft import run_sft

    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = use_idle_cpu_cores(device)  # as `qtune sft` does
    with tempfile.TemporaryDirectory() as out:
        overrides = [f"model.path={args.model}", f"data.path={args.data}", f"data.max_seq_len={args.max_seq_len}",
                     f"data.val_size={args.val_size}", "data.cache_dir=", f"train.max_steps={args.steps}",
                     f"train.micro_batch_size={args.micro_batch}", f"train.grad_accum_steps={args.accum}",
                     f"train.lr={args.lr}", "train.warmup_steps=2", "train.save_every=0", "train.log_every=1",
                     f"lora.r={args.rank}", f"lora.alpha={2 * args.rank}", "train.optimizer=adamw",
                     f"model.gradient_checkpointing={'true' if device == 'cuda' else 'false'}", f"output.dir={out}"]
        recipe = load_recipe("alpaca", overrides)
        wall, cpu = time.perf_counter(), cpu_seconds()
        summary = run_sft(recipe)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    tokens_per_s = sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2]
    before, after = summary["val_loss_before"], summary["val_loss_after"]
    print(f"\nheld-out response loss (nats/token) on {args.val_size} examples of {Path(args.data).name}: "
          f"before {before:.4f} -> after {after:.4f} ({after - before:+.4f})")
    print(f"{args.steps} steps x {args.micro_batch * args.accum} examples, median {tokens_per_s:.0f} tokens/s, "
          f"wall {wall:.0f} s, CPU {cpu:.0f} s, peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB")
    case = (f"{args.model} steps={args.steps} seq={args.max_seq_len} batch={args.micro_batch}x{args.accum} "
            f"threads={threads or torch.get_num_threads()}")
    append_rows("sft", device, [
        {"case": case, "impl": "qtune", "metric": "val_loss_before", "value": f"{before:.5f}", "unit": "nats/token"},
        {"case": case, "impl": "qtune", "metric": "val_loss_after", "value": f"{after:.5f}", "unit": "nats/token"},
        {"case": case, "impl": "qtune", "metric": "train_tokens_per_s", "value": f"{tokens_per_s:.1f}",
         "unit": "tok/s"},
        {"case": case, "impl": "qtune", "metric": "wall", "value": f"{wall:.1f}", "unit": "s"},
        {"case": case, "impl": "qtune", "metric": "cpu", "value": f"{cpu:.1f}", "unit": "s"},
    ])
    print_json({"benchmark": "sft", "case": case, "val_loss_before": before, "val_loss_after": after,
                "val_loss_fell": after < before, "train_tokens_per_s": tokens_per_s, "wall_s": round(wall, 1),
                "cpu_s": round(cpu, 1), "peak_memory_bytes": summary["peak_memory_bytes"]})


if __name__ == "__main__":
    main()
