"""Rewrite the committed recipe regression values: the only script that changes tests/regression/*.json.

    python tests/regression/regenerate.py sft|reward|dpo|ppo|grpo|sft-qwen3|...|all

Each named case (see cases.py) runs once through the CLI and its file is rewritten with the values, the
command and the torch / transformers versions. Run it only when a change is meant to change the numbers
(a new tokenizer rule, a different loss normalisation, sampling ...), and say in the commit why they changed.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES, run_case  # noqa: E402


def regenerate(name: str) -> None:
    case = CASES[name]
    with tempfile.TemporaryDirectory() as work:
        values = run_case(name, Path(work))
    record = {"case": case.command(), "torch": torch.__version__, "transformers": transformers.__version__, **values}
    case.reference.write_text(json.dumps(record, indent=2) + "\n")
    first = case.step_keys[0]
    print(f"wrote {case.reference}: {first} {values[first]}")


def main(args: list[str]) -> None:
    if len(args) != 1 or args[0] not in (*CASES, "all"):
        sys.exit(f"usage: python {sys.argv[0]} {'|'.join(CASES)}|all   (rewrites tests/regression/<case>.json)")
    for name in CASES if args[0] == "all" else args:
        regenerate(name)


if __name__ == "__main__":
    main(sys.argv[1:])
