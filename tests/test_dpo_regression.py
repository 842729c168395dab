"""Recipe regression: the shipped DPO recipe, shaped down to a tiny model, runs through the real CLI on
LLaMA-Factory's DPO demo conversations and reproduces the committed per-step values (tests/regression/dpo.json).

Only tests/regression/regenerate.py writes them (`python tests/regression/regenerate.py dpo`); a commit that
does says why the numbers changed.
"""

from regression.cases import assert_reproduces
from shared_data import SHARED_DATA

# The implicit rewards β (log π − log π_ref) are differences of sums over ~100 tokens: their float noise is
# about 1e-6 absolute. An accuracy counts pairs (8 a step, 8 held out); one flipped pair moves it by 1/8.
REWARD = dict(rel=1e-3, abs=1e-5)
ONE_PAIR = dict(abs=1 / 8)
TOLERANCES = {"loss": dict(rel=1e-4), "lr": dict(rel=1e-9), "grad_norm": dict(rel=1e-3), "chosen_reward": REWARD,
              "rejected_reward": REWARD, "margin": REWARD, "val_margin": REWARD, "val_margin_after": REWARD,
              "val_loss": dict(rel=1e-4), "accuracy": ONE_PAIR, "val_accuracy": ONE_PAIR, "val_accuracy_after": ONE_PAIR}


@SHARED_DATA
def test_dpo_recipe_reproduces_the_committed_values(tmp_path):
    assert_reproduces("dpo", tmp_path, TOLERANCES)
