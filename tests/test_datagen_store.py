"""Resumable JSONL output: uncommitted appends vanish on reopen, committed ones survive, settings must match."""

import json

import pytest

from qtune.datagen.store import Journal, ResumeError, write_json_atomic


def _journal(tmp_path, seed=1):
    return Journal(tmp_path / "run", ("kept.jsonl", "rejected.jsonl"), {"seed": seed})


def test_commit_then_crash_mid_round_resumes_at_the_last_commit(tmp_path):
    j = _journal(tmp_path)
    assert j.open() == {"kept.jsonl": [], "rejected.jsonl": []}
    j.append("kept.jsonl", [{"i": 0}, {"i": 1}])
    j.append("rejected.jsonl", [{"r": 0}])
    j.commit(1, {"kept": 2})
    # Round 2 is half written when the process dies: one file got its records, the other did not,
    # and the last line is cut in the middle.
    j.append("kept.jsonl", [{"i": 2}])
    with (tmp_path / "run" / "kept.jsonl").open("a") as f:
        f.write('{"i": 3, "trunc')
    again = _journal(tmp_path)
    records = again.open()
    assert records == {"kept.jsonl": [{"i": 0}, {"i": 1}], "rejected.jsonl": [{"r": 0}]}
    assert again.round == 1 and again.counters == {"kept": 2}
    lines = (tmp_path / "run" / "kept.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"i": 0}, {"i": 1}]


def test_crash_in_the_first_round_resumes_empty(tmp_path):
    j = _journal(tmp_path)
    j.open()
    j.append("kept.jsonl", [{"i": 0}])  # appended, never committed
    again = _journal(tmp_path)
    assert again.open() == {"kept.jsonl": [], "rejected.jsonl": []} and again.round == 0


def test_resume_refuses_other_settings_and_foreign_files(tmp_path):
    j = _journal(tmp_path)
    j.open()
    j.commit(1, {})
    with pytest.raises(ResumeError, match="different settings \\(seed\\)"):
        _journal(tmp_path, seed=2).open()
    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "kept.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(ResumeError, match="not written by a qtune generation run"):
        Journal(foreign, ("kept.jsonl",), {}).open()


def test_atomic_json_write(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": [1, 2]}
    assert not (tmp_path / "a.json.tmp").exists()
