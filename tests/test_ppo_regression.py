"""Recipe regression: the shipped PPO recipe, shaped down to a tiny model and the built-in addition task, runs
through the CLI and reproduces the committed per-iteration numbers (tests/regression/ppo.json).

Only tests/regression/regenerate.py writes them (`python tests/regression/regenerate.py ppo`); a commit that
does says why the numbers changed.
"""

import json

import pytest
from regression.cases import CASES, run_case

PINNED = tuple(key for key in CASES["ppo"].step_keys if key != "tokens")
# A clip fraction counts response tokens: an iteration averages 2 epochs x 2 minibatches of 8 tokens, so one
# token whose ratio (or value) sits on the clip boundary, where 1e-7 of float noise flips it, moves it by 1/32.
ONE_TOKEN = 1 / 32


def test_ppo_recipe_reproduces_the_committed_numbers(tmp_path):
    want = json.loads(CASES["ppo"].reference.read_text())
    got = run_case("ppo", tmp_path)
    assert got["tokens"] == want["tokens"] and got["response_length"] == want["response_length"]
    for key in PINNED:
        slack = ONE_TOKEN if key.endswith("clip_frac") else 1e-6
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=slack), key
    assert (got["val_reward_before"], got["val_reward_after"]) == (want["val_reward_before"], want["val_reward_after"])
