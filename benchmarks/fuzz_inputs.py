"""Fuzz qtune's readers of user input with the generators of tests/fuzzing.py: 10,000 cases by default (#21).

    python benchmarks/fuzz_inputs.py [--cases 10000] [--seed 0] [--only NAME ...]

The cases are shared equally by the targets run (1,111 or 1,112 each for all nine).

For each target (recipe, override, config.json, adapter_config.json, tokenizer_config.json, sft / preference /
kto / prompt data) it prints how many cases were read fine, stopped with one of qtune's own errors, or escaped as
another exception (by type, with the first message of each); the last line is one JSON object with every count.
The target is 0 escapes; the CI test (tests/test_fuzz_inputs.py) runs the same generators with fewer cases.
"""

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzzing import QTUNE_ERRORS, TARGETS, Workspace  # noqa: E402
from test_data_tokenizer import make_tokenizer_dir  # noqa: E402

from qtune.tokenizer import load_tokenizer  # noqa: E402


def fuzz(name: str, workspace: Workspace, cases: int, random_seed: int) -> dict:
    """Outcome counts of `cases` drawn inputs for one target; escapes keep their first message."""
    strategy, target = TARGETS[name]
    counts: collections.Counter = collections.Counter()
    first: dict[str, str] = {}

    @seed(random_seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(drawn):
        try:
            target(workspace, drawn)
            counts["ok"] += 1
        except QTUNE_ERRORS:
            counts["qtune error"] += 1
        except Exception as e:  # noqa: BLE001 - counting what escapes is the point
            kind = f"escaped {type(e).__name__}"
            counts[kind] += 1
            first.setdefault(kind, f"{str(e)[:200]} <- {drawn!r:.200}")

    run()
    return {"counts": dict(counts), "first_escapes": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases in all, shared equally by the targets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=sorted(TARGETS), default=None)
    args = parser.parse_args()
    results = {}
    names = args.only or list(TARGETS)
    shares = [args.cases // len(names) + (k < args.cases % len(names)) for k in range(len(names))]
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace(Path(tmp), load_tokenizer(make_tokenizer_dir(Path(tmp) / "tokenizer")))
        for name, share in zip(names, shares):
            t0 = time.perf_counter()
            results[name] = fuzz(name, workspace, share, args.seed)
            counts = results[name]["counts"]
            print(f"{name:20s} {sum(counts.values()):6d} cases in {time.perf_counter() - t0:6.1f}s: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
            for kind, example in results[name]["first_escapes"].items():
                print(f"    {kind}: {example}", flush=True)
    escaped = sum(v for r in results.values() for k, v in r["counts"].items() if k.startswith("escaped"))
    cases = sum(sum(r["counts"].values()) for r in results.values())
    print(json.dumps({"cases": cases, "seed": args.seed, "escaped": escaped,
                      "targets": {name: r["counts"] for name, r in results.items()}}))


if __name__ == "__main__":
    main()
