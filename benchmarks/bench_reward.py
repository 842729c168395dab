"""Does the reward model learn? SmolLM2-135M + LoRA + scalar head on part of a shared preference file,
scored on held-out pairs before and after training.

The run is `recipes/reward.toml` through the real training loop, with overrides that size it for the machine:
the defaults fit a shared CPU in about half an hour (a short max_seq_len, 512 training pairs, 400 held out, fp32
weights because CPU NF4 dequantization only costs time there); on a GPU use the recipe as it is.

    python benchmarks/bench_reward.py                                   # HH-RLHF harmless, CPU-sized
    python benchmarks/bench_reward.py --data ../shared/data/llamafactory/dpo_en_demo.json --format sharegpt \
        --val-size 200 --micro-batch-size 4 --steps 50                  # 300 records: 100 train, 200 held out
    python benchmarks/bench_reward.py --steps 250 --max-seq-len 256 --val-size 200 --quantize nf4   # GPU

The head starts at zero (every pair tied, accuracy 0.5 before training, no evaluation pass needed); with
--head-init normal the random head's own preferences are about as strong as what a few hundred pairs teach.

Chance is 0.5. The held-out accuracy comes with a 95% Wilson interval and the one-sided binomial p-value of
"no better than chance". Rows go to results.csv; the last stdout line is JSON with every number.
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import append_rows, print_json  # noqa: E402

HH = ROOT.parent / "shared" / "data" / "hh_rlhf" / "harmless-base_test.jsonl.gz"


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def p_not_above_chance(p: float, n: int) -> float:
    """One-sided binomial p-value P(X >= k | n, 1/2) for k = round(p n) correct pairs out of n."""
    k = round(p * n)
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n


def accuracy_stats(prefix: str, accuracy: float | None, n: int) -> dict:
    if accuracy is None:
        return {}
    low, high = wilson_interval(accuracy, n)
    return {f"{prefix}accuracy": accuracy, f"{prefix}ci95": [round(low, 4), round(high, 4)],
            f"{prefix}p_chance": p_not_above_chance(accuracy, n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "reward.toml"))
    parser.add_argument("--data", default=str(HH))
    parser.add_argument("--format", default="hh")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-seq-len", type=int, default=96)
    parser.add_argument("--val-size", type=int, default=400)
    parser.add_argument("--head-init", default="zero", choices=["zero", "normal"],
                        help="zero: rewards start indifferent; normal: N(0, 1/(D+1)) starts with random preferences "
                             "that a few short steps do not undo")
    parser.add_argument("--quantize", default="none", choices=["none", "nf4"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="", help="run directory (default: a fresh temporary one)")
    parser.add_argument("overrides", nargs="*", help="further recipe overrides, key.sub=value")
    args = parser.parse_args()

    from qtune.recipe.load import load_recipe
    from qtune.train.common import training_device, use_idle_cpu_cores
    from qtune.train.reward import run_reward

    use_idle_cpu_cores(training_device())  # as the CLI does: on a loaded CPU, extra threads only wait

    out = args.output or tempfile.mkdtemp(prefix="bench_reward_")
    overrides = [f"data.path={args.data}", f"data.format={args.format}", f"data.max_seq_len={args.max_seq_len}",
                 f"data.val_size={args.val_size}", "data.bad_records=skip", f"train.max_steps={args.steps}",
                 f"train.micro_batch_size={args.micro_batch_size}", f"train.grad_accum_steps={args.grad_accum}",
                 f"train.lr={args.lr}", "train.schedule=constant", "train.warmup_steps=2", f"train.seed={args.seed}",
                 "train.optimizer=adamw", "train.log_every=1", "train.save_every=0", "eval.every=0",
                 f"reward.head_init={args.head_init}",
                 f"model.quantize={args.quantize}", "model.gradient_checkpointing=false", f"output.dir={out}",
                 *args.overrides]
    recipe = load_recipe(args.recipe, overrides)
    summary = run_reward(recipe)
    n = summary["val_pairs"]
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    result = {"data": Path(args.data).name, "max_seq_len": args.max_seq_len, "train_pairs_seen":
              args.steps * args.micro_batch_size * args.grad_accum, "val_pairs": n, "steps": args.steps,
              "train_records": summary["pairs"], "head_init": args.head_init, "lr": args.lr,
              "quantize": args.quantize, "seconds": summary["seconds"], "first_loss": losses[0], "last_loss": losses[-1],
              "val_margin_after": summary["val_margin_after"],
              **accuracy_stats("before_", summary["val_accuracy_before"], n),
              **accuracy_stats("after_", summary["val_accuracy_after"], n)}
    case = (f"{result['data']},L={args.max_seq_len},train_pairs={result['train_pairs_seen']},val_pairs={n},"
            f"{args.quantize},head={args.head_init},lr={args.lr:g}")
    rows = [{"case": case, "impl": "qtune", "metric": metric, "value": result[metric], "unit": unit}
            for metric, unit in (("before_accuracy", "fraction"), ("after_accuracy", "fraction"),
                                 ("after_p_chance", "p"), ("seconds", "s")) if metric in result]
    append_rows("reward_learning", training_device(), rows)
    print_json(result)


if __name__ == "__main__":
    main()
