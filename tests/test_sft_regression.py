"""Recipe regression: the quickstart recipe, shaped down to a tiny model, runs through the real CLI and
reproduces the committed losses (tests/regression/sft.json).

Only tests/regression/regenerate.py writes them (`python tests/regression/regenerate.py sft`); a commit that
does says why the numbers changed.
"""

import json

import pytest
from regression.cases import CASES, run_case


def test_quickstart_recipe_reproduces_the_committed_losses(tmp_path):
    want = json.loads(CASES["sft"].reference.read_text())
    got = run_case("sft", tmp_path)
    assert got["tokens"] == want["tokens"]
    assert got["lr"] == pytest.approx(want["lr"], rel=1e-9)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-3)
    assert got["val_loss_before"] == pytest.approx(want["val_loss_before"], rel=1e-4)
    assert got["val_loss_after"] == pytest.approx(want["val_loss_after"], rel=1e-4)
    assert (got["metric"], got["before"], got["after"]) == (want["metric"], want["before"], want["after"])
