"""Does a preference loss raise the held-out preference accuracy of its implicit reward? SmolLM2-135M + LoRA on
part of a shared preference file, every held-out pair scored before and after training.

The held-out pairs are drawn from the file first (the seed's permutation, as the recipes split); training sees the
rest. Rewards are those `qtune eval-prefs --kind dpo --loss L` compares: r = β (log π − log π_ref) for DPO, IPO,
robust DPO and KTO (π_ref being the same base with the adapter switched off), β ℓ(y) for SimPO (ℓ the mean token
log-prob), β log π(y|x) for CPO and λ ℓ(y) for ORPO. Before training the adapter is fresh (B = 0), so π = π_ref:
for the reference-based losses every r is 0, every pair ties and the accuracy is exactly 0.5 (ties count one
half); for the reference-free ones it is the base model's own log-prob ranking, measured. KTO trains on unpaired
records: each training pair gives its chosen reply as desirable and its rejected one as undesirable.
The run is `recipes/dpo.toml` through the real training loop, with overrides that size it for the machine
(short max_seq_len, a few dozen training pairs, fp32 weights on a CPU); on a GPU use the recipe as it is.

    python benchmarks/bench_dpo.py                                      # LLaMA-Factory DPO demo, CPU-sized
    python benchmarks/bench_dpo.py --loss simpo --beta 2.0              # also kto, orpo, cpo, ipo, robust
    python benchmarks/bench_dpo.py --data ../shared/data/hh_rlhf/harmless-base_test.jsonl.gz --format hh
    python benchmarks/bench_dpo.py --steps 120 --max-seq-len 512 --val-size 60 --quantize nf4   # GPU

Rows go to results.csv; the last stdout line is JSON with every number (95% Wilson interval and the one-sided
binomial p-value of "no better than chance" for the accuracy after training, and the exact one-sided sign test
of "no better than before" over the pairs whose ranking changed).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_reward import accuracy_stats, p_not_above_chance  # noqa: E402
from common import append_rows, print_json  # noqa: E402

DPO_DEMO = ROOT.parent / "shared" / "data" / "llamafactory" / "dpo_en_demo.json"
LOSSES = ["sigmoid", "ipo", "robust", "kto", "orpo", "simpo", "cpo"]


def split_files(args, work: Path) -> tuple[Path, Path, int]:
    """Write the training records (pairs; KTO: two unpaired records per pair) and the held-out pairs to `work`."""
    from qtune.data.prefs import load_preferences

    prefs, _ = load_preferences(args.data, args.format, bad_records="skip")
    perm = np.random.default_rng([args.seed, 0]).permutation(len(prefs))
    val = [prefs[i] for i in np.sort(perm[:args.val_size])]
    train = [prefs[i] for i in np.sort(perm[args.val_size:])]
    if args.loss == "kto":
        rows = [{"prompt": p.prompt, "completion": reply, "label": good}
                for p in train for reply, good in ((p.responses[0], True), (p.responses[1], False))]
    else:
        rows = [{"prompt": p.prompt, "chosen": p.responses[0], "rejected": p.responses[1]} for p in train]
    train_path, val_path = work / "train.jsonl", work / "val.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val_path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.responses[0],
                                            "rejected": p.responses[1]}) + "\n" for p in val))
    return train_path, val_path, len(val)


def held_out_margins(args, val_path: Path, adapter: Path | None):
    """(accuracy, mean margin, per-pair margins) of the held-out pairs, scored as `qtune eval-prefs` scores them;
    adapter None scores the starting point (the base: a fresh adapter changes nothing)."""
    import torch

    from qtune.align.preference_losses import preference_accuracy
    from qtune.data.prefs import fixed_batches, load_preferences, tokenize_preferences
    from qtune.peft import load_adapter
    from qtune.recipe.align import DPOSection
    from qtune.tokenizer import load_tokenizer
    from qtune.train import common
    from qtune.train.dpo import score_batch
    from qtune.weights.checkpoint import load_model, resolve

    device = common.training_device()
    model_dir = resolve("smollm2-135m")
    model = load_model(model_dir, quantize=args.quantize, device=device)
    if adapter is not None:
        load_adapter(model, adapter, name="policy")
    tokenizer = load_tokenizer(model_dir)
    prefs, _ = load_preferences(str(val_path), "pairs")
    items, _ = tokenize_preferences(prefs, tokenizer, args.max_seq_len, str(val_path))
    # a KTO adapter is scored by its implicit reward β (log π − log π_ref), DPO's
    dpo = DPOSection(beta=args.beta, loss="sigmoid" if args.loss == "kto" else args.loss)
    margins = []
    with torch.no_grad():
        for batch in fixed_batches(items, args.micro_batch_size, tokenizer.pad_id):
            margins.append(score_batch(model, common.to_device(batch, device), "val", dpo, None, device).margins)
    m = torch.cat(margins)
    return float(preference_accuracy(m).mean()), float(m.mean()), m


def sign_test_p(before, after) -> tuple[float, int, int]:
    """Exact one-sided sign (McNemar) test of "after ranks no more held-out pairs right than before": P(X ≥ wins),
    X ~ Binomial(wins + losses, 1/2) over the pairs whose ranking changed; a tie counts as half right."""
    from qtune.align.preference_losses import preference_accuracy

    right_before, right_after = preference_accuracy(before), preference_accuracy(after)
    wins, losses = int((right_after > right_before).sum()), int((right_after < right_before).sum())
    changed = wins + losses
    return (p_not_above_chance(wins / changed, changed) if changed else 1.0), wins, losses


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
    parser.add_argument("--loss", default="sigmoid", choices=LOSSES)
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

    out = Path(args.output or tempfile.mkdtemp(prefix="bench_dpo_"))
    out.mkdir(parents=True, exist_ok=True)
    train_path, val_path, n = split_files(args, out)
    before_acc, before_margin, before = held_out_margins(args, val_path, None)
    run_dir = out / "run"
    overrides = [f"data.path={train_path}", f"data.format={'kto' if args.loss == 'kto' else 'pairs'}",
                 f"data.max_seq_len={args.max_seq_len}", "data.val_size=0", "data.bad_records=skip",
                 f"dpo.beta={args.beta}", f"dpo.loss={args.loss}", f"train.max_steps={args.steps}",
                 f"train.micro_batch_size={args.micro_batch_size}", f"train.grad_accum_steps={args.grad_accum}",
                 f"train.lr={args.lr}", "train.schedule=constant", "train.warmup_steps=2", f"train.seed={args.seed}",
                 "train.optimizer=adamw", "train.log_every=1", "train.save_every=0", "eval.every=0",
                 f"model.quantize={args.quantize}", "model.gradient_checkpointing=false", f"output.dir={run_dir}",
                 *args.overrides]
    summary = run_dpo(load_recipe(args.recipe, overrides))
    after_acc, after_margin, after = held_out_margins(args, val_path, run_dir / "adapter")
    p_change, wins, losses = sign_test_p(before, after)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    unit = "records" if args.loss == "kto" else "pairs"
    result = {"data": Path(args.data).name, "loss": args.loss, "beta": args.beta, "max_seq_len": args.max_seq_len,
              f"train_{unit}_seen": args.steps * args.micro_batch_size * args.grad_accum, "val_pairs": n,
              "steps": args.steps, "lr": args.lr, "quantize": args.quantize, "seconds": summary["seconds"],
              "first_loss": train[0]["loss"], "last_loss": train[-1]["loss"],
              "train_accuracy_last": train[-1]["accuracy"], "before_accuracy": before_acc,
              "before_margin": before_margin, "after_margin": after_margin,
              **accuracy_stats("after_", after_acc, n), "after_p_no_change": p_change,
              "pairs_better": wins, "pairs_worse": losses}
    case = (f"{result['data']},{args.loss},beta={args.beta},lr={args.lr},L={args.max_seq_len},"
            f"train_{unit}={result[f'train_{unit}_seen']},val_pairs={n},heldout_first,{args.quantize}")
    rows = [{"case": case, "impl": "qtune", "metric": metric, "value": result[metric], "unit": u}
            for metric, u in (("first_loss", "nats"), ("before_accuracy", "fraction"), ("after_accuracy", "fraction"),
                              ("after_p_chance", "p"), ("after_p_no_change", "p"), ("seconds", "s"))]
    append_rows("dpo_learning", training_device(), rows)
    print_json(result)


if __name__ == "__main__":
    main()
