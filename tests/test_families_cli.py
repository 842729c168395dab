"""Every family beyond Llama trains through the real CLI on its tiny model (tests/tiny.py): SFT reproduces its
committed losses (tests/regression/sft-<family>.json, written only by tests/regression/regenerate.py), and
DPO and reward modelling run two steps each."""

import json
import math

import pytest
from regression.cases import CASES, FAMILIES, run_case, two_step_case
from shared_data import SHARED_DATA


@pytest.mark.parametrize("kind", FAMILIES)
def test_sft_on_each_family_reproduces_the_committed_losses(tmp_path, kind):
    want = json.loads(CASES[f"sft-{kind}"].reference.read_text())
    got = run_case(f"sft-{kind}", tmp_path)
    assert got["tokens"] == want["tokens"]
    assert got["lr"] == pytest.approx(want["lr"], rel=1e-9)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-3)
    assert got["val_loss_after"] == pytest.approx(want["val_loss_after"], rel=1e-4)
    assert got["val_loss_after"] < got["val_loss_before"]  # two steps at the quickstart's rate already help


@SHARED_DATA
@pytest.mark.parametrize("verb", ["dpo", "reward"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_dpo_and_reward_run_two_steps_on_each_family(tmp_path, verb, kind):
    got = run_case(two_step_case(verb, kind), tmp_path)
    assert len(got["loss"]) == 2 and all(math.isfinite(x) for x in got["loss"] + got["grad_norm"])
    assert all(g > 0 for g in got["grad_norm"])
