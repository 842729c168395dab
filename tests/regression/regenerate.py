"""Rewrite tests/regression/sft_quickstart.json: the only script that changes the committed SFT losses.

    python tests/regression/regenerate.py

Run it only when a change is meant to change the numbers (a new tokenizer rule, a different loss
normalisation ...), and say in the commit why they changed.
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import OVERRIDES, REFERENCE, run_case  # noqa: E402


def main() -> None:
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as work:
        values = run_case(Path(work))
    record = {"case": "qtune sft quickstart model.path=<tests/tiny.py llama, seed 0> " + " ".join(OVERRIDES),
              "torch": torch.__version__, "transformers": transformers.__version__, **values}
    REFERENCE.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {REFERENCE}: losses {[round(x, 6) for x in values['loss']]}")


if __name__ == "__main__":
    main()
