"""Recipe regression: the shipped reward-model recipe, shaped down to a tiny model, runs through the real CLI
on the HH-RLHF harmless pairs and reproduces the committed per-step values (tests/regression/reward.json).

Only tests/regression/regenerate.py writes them (`python tests/regression/regenerate.py reward`); a commit
that does says why the numbers changed.
"""

from regression.cases import assert_reproduces
from shared_data import SHARED_DATA

# An accuracy counts pairs (8 a step, 8 held out): one pair whose margin float noise can flip moves it by 1/8.
ONE_PAIR = dict(abs=1 / 8)
MARGIN = dict(rel=1e-3, abs=1e-6)
TOLERANCES = {"loss": dict(rel=1e-4), "lr": dict(rel=1e-9), "grad_norm": dict(rel=1e-3), "margin": MARGIN,
              "val_margin": MARGIN, "val_margin_after": MARGIN, "val_loss": dict(rel=1e-4), "accuracy": ONE_PAIR,
              "val_accuracy": ONE_PAIR, "val_accuracy_after": ONE_PAIR}


@SHARED_DATA
def test_reward_recipe_reproduces_the_committed_values(tmp_path):
    assert_reproduces("reward", tmp_path, TOLERANCES)
