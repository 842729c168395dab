"""Does DPO raise the held-out preference accuracy of the implicit reward? SmolLM2-135M + LoRA on part of a
shared preference file, scored on held-out pairs after training.

The implicit reward of a response is r = β (log π(y|x) − log π_ref(y|x)), π_ref being the same base with the
adapter switched off. Before training the adapter is fresh (B = 0), so π = π_ref, every r is 0, every pair
ties and the accuracy is exactly 0.5 (ties count one half); the tests check that the first loss is then ln 2.
The run is `recipes/dpo.toml` through the real training loop, with overrides that size it for the machine
(short max_seq_len, a few dozen training pairs, fp32 weights on a CPU); on a GPU use the recipe as it is.

    python benchmarks/bench_dpo.py                                      # LLaMA-Factory DPO demo, CPU-sized
    python benchmarks/bench_dpo.py --data ../shared/data/hh_rlhf/harmless-base_test.jsonl.gz --format hh
    python benchmarks/bench_dpo.py --steps 120 --max-seq-len 512 --val-size 60 --quantize nf4   # GPU

Rows go to results.csv; the last stdout line is JSON with every number (95% Wilson interval and the one-sided
binomial p-value of "no better than chance" for the accuracy after training).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_reward import accuracy_stats  # noqa: E402
from common import append_rows, print_json  # noqa: E402

DPO_DEMO = ROOT.parent / "shared" / "data" / "llamafactory" / "dpo_en_demo.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "dpo.toml"))
    parser.add_argument("--data", default=str(DPO_DEMO))
    parser.add_argument("--format", default="sharegpt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo", "robust"])
    parser.add_argument("--max-seq-len", type=int, default=96)
    parser.add_argument("--val-size", type=int, default=100)
    parser.add_argument("--quantize", default="none", choices=["none", "nf4"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="", help="run directory (default: a fresh temporary one)")
    parser.add_argument("overrides", nargs="*", help="further recipe overrides, key.sub=value")
    args = parser.parse_args()

    from qtune.recipe.load import load_recipe
    from qtune.train.common import training_device, use_idle_cpu_cores
    from qtune.train.dpo import run_dpo

    use_idle_cpu_cores(training_device())  # as the CLI does: on a loaded CPU, extra threads only wait

    out = args.output or tempfile.mkdtemp(prefix="bench_dpo_")
    overrides = [f"data.path={args.data}", f"data.format={args.format}", f"data.max_seq_len={args.max_seq_len}",
                 f"data.val_size={args.val_size}", "data.bad_records=skip", f"dpo.beta={args.beta}",
                 f"dpo.loss={args.loss}", f"train.max_steps={args.steps}", f"train.micro_batch_size={args.micro_batch_size}",
                 f"train.grad_accum_steps={args.grad_accum}", f"train.lr={args.lr}", "train.schedule=constant",
                 "train.warmup_steps=2", f"train.seed={args.seed}", "train.optimizer=adamw", "train.log_every=1",
                 "train.save_every=0", "eval.every=0", f"model.quantize={args.quantize}",
                 "model.gradient_checkpointing=false", f"output.dir={out}", *args.overrides]
    summary = run_dpo(load_recipe(args.recipe, overrides))
    n = summary["val_pairs"]
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    result = {"data": Path(args.data).name, "loss": args.loss, "beta": args.beta, "max_seq_len": args.max_seq_len,
              "train_pairs_seen": args.steps * args.micro_batch_size * args.grad_accum, "val_pairs": n,
              "steps": args.steps, "quantize": args.quantize, "seconds": summary["seconds"],
              "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
              "train_accuracy_last": train[-1]["accuracy"], "val_margin_after": summary["val_margin_after"],
              "before_accuracy": 0.5, **accuracy_stats("after_", summary["val_accuracy_after"], n)}
    case = (f"{result['data']},{args.loss},beta={args.beta},L={args.max_seq_len},"
            f"train_pairs={result['train_pairs_seen']},val_pairs={n},{args.quantize}")
    rows = [{"case": case, "impl": "qtune", "metric": metric, "value": result[metric], "unit": unit}
            for metric, unit in (("first_loss", "nats"), ("after_accuracy", "fraction"), ("after_p_chance", "p"),
                                 ("seconds", "s"))]
    append_rows("dpo_learning", training_device(), rows)
    print_json(result)


if __name__ == "__main__":
    main()
