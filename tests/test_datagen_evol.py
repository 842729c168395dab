"""Evol-Instruct runs: the epoch bookkeeping by hand, and `qtune evol-instruct` end to end on SmolLM2 (tiny budgets)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from qtune.datagen.evol_instruct import frontier, starting_set, task_text
from qtune.datagen.seeds import Instance, Task

REPO = Path(__file__).resolve().parents[1]


def _kept(epoch, index, text):
    return {"instruction": text, "provenance": {"epoch": epoch, "index": index}}


def test_frontier_replaces_only_successful_evolutions_of_earlier_epochs():
    start = ["a", "b", "c"]
    kept = [_kept(1, 0, "a1"), _kept(1, 2, "c1"), _kept(2, 0, "a2"), _kept(3, 1, "b3")]
    assert frontier(start, kept, 1) == ["a", "b", "c"]
    assert frontier(start, kept, 2) == ["a1", "b", "c1"]  # b failed in epoch 1 and goes on unchanged
    assert frontier(start, kept, 3) == ["a2", "b", "c1"]
    assert frontier(start, kept, 4) == ["a2", "b3", "c1"]


def test_starting_set_and_task_text():
    tasks = [Task(f"t{i}", "n", f"Instruction {i}", [Instance("" if i % 2 else "some input", "out")]) for i in range(10)]
    assert starting_set(tasks, 0, 1) == tasks and starting_set(tasks, 50, 1) == tasks
    picked = starting_set(tasks, 4, 1)
    assert len(picked) == 4 and len({t.id for t in picked}) == 4 and picked == starting_set(tasks, 4, 1)
    assert task_text(tasks[0]) == "Instruction 0\nsome input" and task_text(tasks[1]) == "Instruction 1"


def test_evol_instruct_cli_two_epochs(smollm2_dir, tmp_path):
    out = tmp_path / "evol"
    cmd = [sys.executable, "-c", "from qtune.cli.datagen_cmds import evol_instruct_cmd; evol_instruct_cmd()",
           str(REPO / "recipes" / "evol_instruct.toml"), f"model.path={smollm2_dir}", f"output.dir={out}",
           "generate.num_instructions=3", "generate.prompts_per_round=3", "generate.batch_size=3", "evolve.rounds=2",
           "evolve.max_new_tokens=40", "evolve.response_max_new_tokens=48", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    kept = [json.loads(line) for line in (out / "instructions.jsonl").read_text().splitlines()]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    # Every starting instruction is tried once per epoch: 3 x 2 outcomes, each kept or rejected with a reason.
    assert report["rounds"] == 2 and report["candidates"] == 6 == len(kept) + len(rejected)
    assert {(r["provenance"]["epoch"], r["provenance"]["index"]) for r in kept} | \
        {(r["epoch"], r["index"]) for r in rejected} == {(e, i) for e in (1, 2) for i in range(3)}
    assert sum(report["rejected"].values()) == len(rejected)
    # An epoch-2 parent is the epoch-1 rewrite when that one succeeded.
    first = {r["provenance"]["index"]: r["instruction"] for r in kept if r["provenance"]["epoch"] == 1}
    second = [r["provenance"] for r in kept if r["provenance"]["epoch"] == 2] + [r for r in rejected if r["epoch"] == 2]
    for r in second:
        if r["index"] in first:
            assert r["parent"] == first[r["index"]]
    alpaca = json.loads((out / "alpaca.json").read_text())
    assert len(alpaca) + sum(report["difficulty_dropped"].values()) == len(kept)
    assert all(ex["input"] == "" and ex["output"] for ex in alpaca)
