"""Recipe regression: the shipped PPO recipe, shaped down to a tiny model and the built-in addition task, runs
through the CLI and reproduces the committed per-iteration numbers (test_ppo_regression.json).

This file is also the only writer of those numbers:

    python tests/test_ppo_regression.py --regenerate

Run that only when a change is meant to change them (a different loss normalisation, sampling ...) and say
in the commit why they changed.
"""

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).with_suffix(".json")
TINY_KIND, TINY_SEED = "llama", 0
OVERRIDES = ["data.format=prompt", "data.chat=false", "data.val_size=4", "data.cache_dir=", "ppo.reward_model=",
             "ppo.reward_fn=qtune.align.reward_functions:arithmetic", "ppo.rollout_batch_size=4", "ppo.max_new_tokens=4",
             "ppo.ppo_epochs=2", "train.micro_batch_size=2", "train.grad_accum_steps=1", "train.max_steps=3",
             "train.optimizer=adamw", "train.save_every=0", "lora.r=4", "eval.every=0"]
PINNED = ("reward", "kl", "beta", "response_length", "policy_loss", "value_loss", "clip_frac", "value_clip_frac",
          "entropy", "approx_kl", "grad_norm", "value", "return")


def run_case(work_dir: Path) -> dict:
    """`qtune ppo ppo` with OVERRIDES on the tiny model, one thread (a fixed summation order)."""
    import click
    from click.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny import save_tiny_with_tokenizer

    from qtune.cli.ppo_cmds import COMMANDS
    from qtune.align.reward_functions import write_problems

    tiny_dir = save_tiny_with_tokenizer(TINY_KIND, work_dir / "tiny", seed=TINY_SEED)
    prompts = write_problems(work_dir / "addition.jsonl", "addition", 16)
    out = work_dir / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(click.Group(commands=COMMANDS), [
            "ppo", "ppo", f"model.path={tiny_dir}", f"data.path={prompts}", f"output.dir={out}", *OVERRIDES])
    finally:
        torch.set_num_threads(threads)
    if result.exit_code != 0:
        raise RuntimeError(f"qtune ppo failed:\n{result.output}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    return {**{k: [r[k] for r in steps] for k in PINNED}, "tokens": [r["tokens"] for r in steps],
            "val_reward_before": summary["val_reward_before"], "val_reward_after": summary["val_reward_after"]}


def test_ppo_recipe_reproduces_the_committed_numbers(tmp_path):
    want = json.loads(REFERENCE.read_text())
    got = run_case(tmp_path)
    assert got["tokens"] == want["tokens"] and got["response_length"] == want["response_length"]
    for key in PINNED:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert (got["val_reward_before"], got["val_reward_after"]) == (want["val_reward_before"], want["val_reward_after"])


def regenerate() -> None:
    import transformers

    with tempfile.TemporaryDirectory() as work:
        values = run_case(Path(work))
    record = {"case": f"qtune ppo ppo model.path=<tests/tiny.py {TINY_KIND}, seed {TINY_SEED}> " + " ".join(OVERRIDES),
              "torch": torch.__version__, "transformers": transformers.__version__, **values}
    REFERENCE.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {REFERENCE}: policy losses {values['policy_loss']}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(f"usage: python {sys.argv[0]} --regenerate   (rewrites {REFERENCE.name})")
    regenerate()
