"""Recipe regression: the shipped GRPO recipe, shaped down to a tiny model and generated addition prompts, runs
through the CLI and reproduces the committed per-step numbers (tests/regression/grpo.json).

Only tests/regression/regenerate.py writes them (`python tests/regression/regenerate.py grpo`); a commit that
does says why the numbers changed.
"""

import json

import pytest
from regression.cases import CASES, run_case

EXACT = ("reward", "reward_0_format", "reward_1_length", "dropped_groups", "completion_length", "tokens")
# A clip fraction counts response tokens: a step averages 2 passes x 2 minibatches of 16 tokens, so one token
# whose ratio sits on a clip boundary, where 1e-7 of float noise flips it, moves it by 1/64.
ONE_TOKEN = 1 / 64


def test_grpo_recipe_reproduces_the_committed_numbers(tmp_path):
    want = json.loads(CASES["grpo"].reference.read_text())
    got = run_case("grpo", tmp_path)
    for key in EXACT + ("before", "after"):
        assert got[key] == want[key], key
    for key in ("loss", "kl", "entropy", "ratio_first", "grad_norm", "clip_low_frac", "clip_high_frac"):
        slack = ONE_TOKEN if key.endswith("clip_frac") else 1e-6
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=slack), key
