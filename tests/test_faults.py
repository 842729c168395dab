"""Fault injection through the real CLI (tests/fault_matrix.py, about a minute): `qtune sft` killed at every
phase of a checkpoint and adapter write resumes to exactly the uninterrupted run (losses to 0.0, the adapter
byte for byte, no leftovers); a second run on a live run's directory refuses and leaves the first's record
intact; a full disk in the middle of a checkpoint or of the final adapter is one clean Error with no partial
files, and the run resumes once there is room (where a tmpfs can be mounted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fault_matrix import FULL_DISKS, PHASES

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    done = subprocess.run([sys.executable, str(TESTS / "fault_matrix.py"), "--keep", str(root)], capture_output=True,
                          text=True, timeout=900, cwd=TESTS.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(done.stdout)  # the phases x outcome table and the counts, shown with pytest -s
    result = json.loads((root / "result.json").read_text())
    return {**result, "rows": {row["phase"]: row for row in result["rows"]}}


def test_a_kill_at_every_phase_resumes_to_the_uninterrupted_run(matrix):
    phases = [f"{phase}:{arrival}" for phase, arrival, _ in PHASES]
    assert {p: matrix["rows"][p]["outcome"] for p in phases} == dict.fromkeys(phases, "identical")
    assert matrix["max_loss_diff"] == 0.0


def test_a_second_run_refuses_and_the_first_record_is_intact(matrix):
    assert matrix["rows"]["concurrent-run"]["outcome"] == "identical"


@pytest.mark.parametrize("row", [row for row, _, _ in FULL_DISKS])
def test_a_full_disk_mid_write_is_clean_and_resumable(matrix, row):
    row = matrix["rows"][row]
    if row["outcome"] == "skipped":
        pytest.skip(f"no tmpfs could be mounted here: {row['reason']}")
    assert row["outcome"] == "identical" and row["max_loss_diff"] == 0.0
