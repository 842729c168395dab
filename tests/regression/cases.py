"""The recipe regression cases: each shipped training recipe, shaped down to a tiny model, through the real CLI.

    case    recipe                  data                                                  reference
    sft     recipes/quickstart.toml the quickstart's own generated tasks                  sft.json
    sft-<family>  the same, two steps on each tiny family beyond Llama (FAMILIES below)  sft-<family>.json
    reward  recipes/reward.toml     shared/data/hh_rlhf/harmless-base_test.jsonl.gz       reward.json
    dpo     recipes/dpo.toml        shared/data/llamafactory/dpo_en_demo.json             dpo.json
    ppo     recipes/ppo.toml        16 built-in addition problems (reward_functions)      ppo.json
    grpo    recipes/grpo.toml       24 generated addition problems (qtune:arithmetic)     grpo.json

`run_case(name, work_dir)` runs `qtune <verb> <recipe>` in a subprocess on a tiny model of tests/tiny.py
(Llama unless the case names another family; random weights, seeded; the small BPE tokenizer) and returns the values the reference pins down: the
per-step values the run logs (losses, accuracies, margins, lr, gradient norms ...) and the held-out results
of its summary. tests/test_<case>_regression.py compares a fresh run with the committed file.

The references are written by one script only, regenerate.py beside this file:

    python tests/regression/regenerate.py sft|reward|dpo|ppo|grpo|sft-qwen3|...|all

Run it only when a change is meant to change the numbers (a new tokenizer rule, a different loss
normalisation, sampling ...), and say in the commit that rewrites a file why its numbers changed.
"""

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from shared_data import DPO_DEMO, HH_HARMLESS  # noqa: E402
from tiny import save_tiny_with_tokenizer  # noqa: E402

from qtune.align.reward_functions import write_problems  # noqa: E402

REPO = TESTS.parent
TINY_KIND, TINY_SEED = "llama", 0


@dataclass(frozen=True)
class Case:
    verb: str
    """The CLI verb: `qtune <verb> <recipe>`."""
    recipe: str
    """The shipped recipe (recipes/<recipe>.toml)."""
    overrides: tuple[str, ...]
    """The recipe's settings stay as shipped except what a tiny model and a short test need."""
    step_keys: tuple[str, ...]
    """Values pinned from metrics.jsonl, one list each over the records that hold the key."""
    summary_keys: tuple[str, ...]
    """Values pinned from the run summary (the JSON object on the last stdout line)."""
    data: str = ""
    """The data file, named in the reference as `data.path=<data>`; empty: the recipe's own data."""
    kind: str = TINY_KIND
    """The tiny model (a key of tests/tiny.py's TINY_CONFIGS)."""
    name: str = ""
    """The reference file's name, <name>.json; empty: the verb's."""

    @property
    def reference(self) -> Path:
        return Path(__file__).with_name(f"{self.name or self.verb}.json")

    def command(self) -> str:
        """The case as the reference records it, the run's own paths written as <placeholders>."""
        data = [f"data.path=<{self.data}>"] if self.data else []
        return " ".join([f"qtune {self.verb} {self.recipe} model.path=<tests/tiny.py {self.kind}, seed {TINY_SEED}>",
                         *data, *self.overrides])


CASES = {
    "sft": Case("sft", "quickstart",
                ("train.max_steps=6", "train.save_every=3", "data.val_size=8", "data.cache_dir=",
                 "eval.exact_match=4", "eval.max_new_tokens=4"),
                step_keys=("loss", "lr", "grad_norm", "tokens"),
                summary_keys=("metric", "before", "after", "val_loss_before", "val_loss_after")),
    # The shipped learning rates move a few steps' margins by ~1e-4, too little for a tiny model's numbers to
    # stand clear of float noise; 1e-3 (the quickstart's) makes every pinned margin about ten times larger.
    "reward": Case("reward", "reward",
                   ("data.cache_dir=", "data.max_seq_len=64", "data.val_size=8", "train.max_steps=4", "train.lr=1e-3",
                    "train.log_every=1", "train.save_every=2", "eval.every=2"),
                   step_keys=("loss", "accuracy", "margin", "lr", "grad_norm", "val_accuracy", "val_margin",
                              "val_loss"),
                   summary_keys=("pairs", "val_pairs", "val_accuracy_before", "val_accuracy_after",
                                 "val_margin_after"),
                   data="shared/data/hh_rlhf/harmless-base_test.jsonl.gz"),
    "dpo": Case("dpo", "dpo",
                ("data.cache_dir=", "data.max_seq_len=96", "data.val_size=8", "train.max_steps=4", "train.lr=1e-3",
                 "train.log_every=1", "train.save_every=2", "eval.every=2"),
                step_keys=("loss", "chosen_reward", "rejected_reward", "accuracy", "margin", "lr", "grad_norm",
                           "val_accuracy", "val_margin", "val_loss"),
                summary_keys=("pairs", "val_pairs", "val_accuracy_after", "val_margin_after"),
                data="shared/data/llamafactory/dpo_en_demo.json"),
    "ppo": Case("ppo", "ppo",
                ("data.format=prompt", "data.chat=false", "data.val_size=4", "data.cache_dir=", "ppo.reward_model=",
                 "ppo.reward_fn=qtune.align.reward_functions:arithmetic", "ppo.rollout_batch_size=4",
                 "ppo.max_new_tokens=4", "ppo.ppo_epochs=2", "train.micro_batch_size=2", "train.grad_accum_steps=1",
                 "train.max_steps=3", "train.optimizer=adamw", "train.save_every=0", "lora.r=4", "eval.every=0"),
                step_keys=("reward", "kl", "beta", "response_length", "policy_loss", "value_loss", "clip_frac",
                           "value_clip_frac", "entropy", "approx_kl", "grad_norm", "value", "return", "tokens"),
                summary_keys=("val_reward_before", "val_reward_after")),
    # The tiny model never writes the right sum, so the answer reward would drop every group: a format reward
    # (a vowel anywhere in the response) splits its random text instead. Two minibatches and two passes per step
    # exercise log π_old, clipping and the KL term.
    "grpo": Case("grpo", "grpo",
                 ("data.path=qtune:arithmetic?task=addition&count=24&seed=0", "data.val_size=4", "lora.r=4",
                  'grpo.rewards=[{fn="format", pattern=".*[aeiou].*"}, {fn="length", weight=-0.5}]',
                  "grpo.group_size=4", "grpo.rollout_batch_size=8", "grpo.max_new_tokens=4", "grpo.num_iterations=2",
                  "grpo.temperature=1.0",
                  "grpo.generation_batch_size=8", "train.micro_batch_size=2", "train.grad_accum_steps=2",
                  "train.max_steps=3", "train.lr=1e-2", "train.save_every=0", "eval.every=0"),
                 step_keys=("reward", "reward_0_format", "reward_1_length", "dropped_groups", "completion_length",
                            "loss", "kl", "clip_low_frac", "clip_high_frac", "entropy", "ratio_first", "grad_norm",
                            "tokens"),
                 summary_keys=("before", "after")),
}
FAMILIES = ("qwen3", "gemma2", "gemma3", "mistral-nemo", "phi3", "qwen3-moe", "mixtral")  # beyond Llama (issue #16)
# SFT on each family: the quickstart for two steps, its held-out evaluation shortened too.
CASES.update({f"sft-{kind}": Case("sft", "quickstart",
                                  ("train.max_steps=2", "train.save_every=0", "data.val_size=4", "data.cache_dir=",
                                   "eval.exact_match=2", "eval.max_new_tokens=2"),
                                  step_keys=("loss", "lr", "grad_norm", "tokens"),
                                  summary_keys=("val_loss_before", "val_loss_after"), kind=kind, name=f"sft-{kind}")
              for kind in FAMILIES})


def two_step_case(verb: str, kind: str) -> Case:
    """The `verb` regression case (reward, dpo) cut to two steps on the tiny model of `kind`: a smoke run of
    the family through the CLI, not pinned by a reference."""
    case = CASES[verb]
    overrides = [o for o in case.overrides if not o.startswith(("train.max_steps=", "train.save_every=", "eval.every="))]
    return dataclasses.replace(case, kind=kind, name=f"{verb}-{kind}",
                               overrides=(*overrides, "train.max_steps=2", "train.save_every=0", "eval.every=0"))


DATA_FILES = {"shared/data/hh_rlhf/harmless-base_test.jsonl.gz": HH_HARMLESS,
              "shared/data/llamafactory/dpo_en_demo.json": DPO_DEMO}


def case_data(case: Case, work_dir: Path) -> list[str]:
    """The data override of a case: a shared data file, or (PPO) prompts written into `work_dir`."""
    if case.data:
        return [f"data.path={DATA_FILES[case.data]}"]
    if case.verb == "ppo":
        return [f"data.path={write_problems(work_dir / 'addition.jsonl', 'addition', 16)}"]
    return []


def run_case(name: str | Case, work_dir: Path) -> dict:
    """Run case `name` (or the case itself) in `work_dir`; the values its reference pins down, step values
    first, summary values last."""
    case = CASES[name] if isinstance(name, str) else name
    tiny_dir = save_tiny_with_tokenizer(case.kind, work_dir / "tiny", seed=TINY_SEED)
    out = work_dir / "run"
    command = [sys.executable, "-c", "from qtune.cli import main; main()", case.verb, case.recipe,
               f"model.path={tiny_dir}", *case_data(case, work_dir), f"output.dir={out}", *case.overrides]
    # One thread: a tiny model gains nothing from more, and the sums then run in one fixed order.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"qtune {case.verb} {case.recipe} failed:\n{proc.stderr}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**{k: [r[k] for r in records if k in r] for k in case.step_keys},
            **{k: summary[k] for k in case.summary_keys}}


def assert_reproduces(name: str, work_dir: Path, tolerances: dict[str, dict]) -> None:
    """Run case `name` and compare every value with its reference: within `tolerances[key]` (pytest.approx's
    rel / abs) where the key is listed, exactly where it is not."""
    want = json.loads(CASES[name].reference.read_text())
    got = run_case(name, work_dir)
    for key, value in got.items():
        assert value == (pytest.approx(want[key], **tolerances[key]) if key in tolerances else want[key]), key
