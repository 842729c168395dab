"""End-to-end data generation on the CPU: `qtune self-instruct` (or evol-instruct) with SmolLM2-135M, then a
few `qtune sft` steps on the produced alpaca.json.

Measures kept instructions and instances, rejections by reason, generation tokens/s and wall time; rows go
to benchmarks/results.csv and the last stdout line is one JSON object.

    python benchmarks/bench_datagen.py                                   # 50 instructions from the 175 seeds
    python benchmarks/bench_datagen.py --recipe evol_instruct --extra generate.num_instructions=16
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import append_rows, print_json  # noqa: E402

SEEDS_175 = REPO.parent / "shared" / "data" / "self_instruct" / "seed_tasks.jsonl"


def run_cli(module: str, command: str, args: list[str], threads: int) -> tuple[dict, float]:
    """Run a qtune verb in a child process; returns its JSON summary (last stdout line) and the wall time."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", f"from {module} import {command}; {command}()", *args],
                          env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{command} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="self_instruct", choices=["self_instruct", "evol_instruct"])
    ap.add_argument("--num-instructions", type=int, default=50)
    ap.add_argument("--seeds", default=str(SEEDS_175), help='seed tasks ("builtin" for qtune\'s own set)')
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_datagen"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (decoding a 135M model is latency-bound)")
    ap.add_argument("--sft-steps", type=int, default=4, help="qtune sft steps on the result (0 = skip)")
    ap.add_argument("--extra", nargs="*", default=[], help="more recipe overrides (key.sub=value)")
    args = ap.parse_args()

    out = Path(args.out) / args.recipe
    command = "self_instruct_cmd" if args.recipe == "self_instruct" else "evol_instruct_cmd"
    overrides = [f"output.dir={out}", f"data.seed_tasks={args.seeds}"]
    if args.recipe == "self_instruct":
        overrides.append(f"generate.num_instructions={args.num_instructions}")
    report, gen_wall = run_cli("qtune.cli.datagen_cmds", command, [args.recipe, *overrides, *args.extra], args.threads)
    result = {"recipe": args.recipe, "kept_instructions": report["kept_instructions"],
              "kept_instances": report["kept_instances"], "alpaca_examples": report["alpaca_examples"],
              "candidates": report["candidates"], "rejected": report["rejected"],
              "tokens_per_second": report["tokens_per_second"], "generation_wall_s": round(gen_wall, 1),
              "rounds": report["rounds"], "threads": args.threads}
    if args.sft_steps:
        sft, sft_wall = run_cli("qtune.cli.train_cmds", "sft", [
            "quickstart", f"data.path={out / 'alpaca.json'}", "data.format=alpaca", "data.val_size=0",
            "data.max_seq_len=256", "eval.exact_match=0", f"train.max_steps={args.sft_steps}",
            "train.save_every=0", f"output.dir={out / 'sft'}"], args.threads)
        result["sft"] = {"steps": args.sft_steps, "wall_s": round(sft_wall, 1),
                         **{k: v for k, v in sft.items() if isinstance(v, (int, float, str))}}
    rows = [{"case": args.recipe, "impl": "qtune", "metric": m, "value": result[m], "unit": u}
            for m, u in (("kept_instructions", "count"), ("alpaca_examples", "count"),
                         ("tokens_per_second", "tok/s"), ("generation_wall_s", "s"))]
    append_rows("datagen", "cpu", rows)
    print_json(result)


if __name__ == "__main__":
    main()
