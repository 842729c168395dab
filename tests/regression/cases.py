"""The SFT recipe regression case: the shipped quickstart recipe on a tiny model, through the real CLI.

`tests/test_sft_regression.py` runs it and compares with `sft_quickstart.json`; `regenerate.py` beside this
file is the only writer of that file. The tiny model (random weights, seeded) and the small BPE tokenizer
come from tests/tiny.py, the data from the quickstart's own generator, so nothing is downloaded.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REFERENCE = Path(__file__).with_name("sft_quickstart.json")
TINY_KIND, TINY_SEED = "llama", 0
# The quickstart's settings stay as shipped except what a tiny model and a short test need.
OVERRIDES = ["train.max_steps=6", "train.save_every=3", "data.val_size=8", "data.cache_dir=",
             "eval.exact_match=4", "eval.max_new_tokens=4"]


def run_case(work_dir: Path) -> dict:
    """Run `qtune sft quickstart` with OVERRIDES on the tiny model; the values the reference pins down."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny import save_tiny_with_tokenizer

    tiny_dir = save_tiny_with_tokenizer(TINY_KIND, work_dir / "tiny", seed=TINY_SEED)
    out = work_dir / "run"
    command = [sys.executable, "-c", "from qtune.cli import main; main()", "sft", "quickstart",
               f"model.path={tiny_dir}", f"output.dir={out}", *OVERRIDES]
    # One thread: a tiny model gains nothing from more, and the sums then run in one fixed order.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"qtune sft quickstart failed:\n{proc.stderr}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "loss": [r["loss"] for r in steps],
        "lr": [r["lr"] for r in steps],
        "grad_norm": [r["grad_norm"] for r in steps],
        "tokens": [r["tokens"] for r in steps],
        **{k: summary[k] for k in ("metric", "before", "after", "val_loss_before", "val_loss_after")},
    }
