"""Bad input to `qtune sft`: each case stops with a message naming the file, line or key and the fix, and
the checkpoints and metrics of the run being resumed stay byte for byte as they were.

A resumed run must keep its recipe's data.path (tests/test_error_contract.py checks that), so bad data reaches
it as new content of the same file."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny import save_tiny_with_tokenizer

from qtune.cli import main

GOOD = [{"instruction": f"Repeat the word {w}.", "input": "", "output": w}
        for w in ("apple", "river", "stone", "cloud", "tiger", "music", "paper", "garden", "window", "silver",
                  "candle", "forest", "rabbit", "ocean", "pencil", "winter")]
LONG = {"instruction": "Summarise: " + "the river runs past the stone garden " * 40, "input": "", "output": "ok"}


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def args(tiny_dir, out, data, *extra) -> list[str]:
    return ["sft", "quickstart", f"model.path={tiny_dir}", f"output.dir={out}", f"data.path={data}",
            "data.format=alpaca", "data.cache_dir=", "data.max_seq_len=160", "data.val_size=4", "eval.exact_match=0",
            "train.max_steps=2", "train.save_every=1", "train.micro_batch_size=2", *extra]


def snapshot(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True, scope="module")
def keep_thread_count():
    """`qtune sft` sets the process's torch threads (one per idle core); give the other tests theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run with checkpoints, to be --resumed with bad input."""
    root = tmp_path_factory.mktemp("bad_input")
    tiny_dir = save_tiny_with_tokenizer("llama", root / "tiny", seed=2)
    jsonl(root / "good.jsonl", GOOD)
    out = root / "run"
    result = CliRunner().invoke(main, args(tiny_dir, out, jsonl(root / "data.jsonl", GOOD)))
    assert result.exit_code == 0, result.output
    assert (out / "checkpoints" / "step-000002").is_dir()
    return tiny_dir, root, out


CASES = {
    "malformed_json_line": ([GOOD[0], GOOD[1], '{"instruction": "x", "output": ', GOOD[2]],
                            r"data\.jsonl line 3: not valid JSON"),
    "missing_field": ([GOOD[0], {"instruction": "Name a colour.", "input": ""}],
                      r"data\.jsonl line 2: alpaca record has no 'output' field"),
    "empty_response": ([GOOD[0], GOOD[1], {"instruction": "Name a colour.", "input": "", "output": "  "}],
                       r"data\.jsonl line 3: 'output' is empty"),
    "every_example_too_long": ([LONG, LONG], r"no example has a trained token left after truncation to 160 tokens; "
                                             r"raise data.max_seq_len"),
    "not_a_record": ([GOOD[0], "[1, 2]"], r"data\.jsonl line 2: expected a JSON object"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_named_and_the_run_is_untouched(run, case):
    tiny_dir, root, out = run
    rows, message = CASES[case]
    data = jsonl(root / "data.jsonl", rows)
    before = snapshot(out)
    try:
        result = CliRunner().invoke(main, args(tiny_dir, out, data, "train.max_steps=4", "--resume"))
    finally:
        jsonl(data, GOOD)
    assert result.exit_code == 1
    assert re.search(message, " ".join(result.output.split())), result.output
    assert "Traceback" not in result.output
    assert snapshot(out) == before


@pytest.mark.parametrize("model, message", [
    ("/no/such/model", "is neither an existing model directory nor a known alias"),
    ("llama-9b", "Known aliases: smollm2-135m"),
])
def test_missing_model_is_named_and_nothing_is_written(run, model, message):
    tiny_dir, root, out = run
    result = CliRunner().invoke(main, args(model, root / "no_model_run", root / "good.jsonl"))
    assert result.exit_code == 1 and message in " ".join(result.output.split())
    assert not (root / "no_model_run").exists() or not any((root / "no_model_run").iterdir())


def test_missing_data_file_and_bad_override(run):
    tiny_dir, root, out = run
    missing = CliRunner().invoke(main, args(tiny_dir, root / "new", root / "nope.jsonl"))
    assert missing.exit_code == 1 and "nope.jsonl: no such file" in missing.output
    typo = CliRunner().invoke(main, args(tiny_dir, root / "new", root / "good.jsonl", "train.max_step=3"))
    assert typo.exit_code == 1 and "did you mean 'max_steps'" in typo.output


def test_long_examples_are_cut_and_counted(run):
    """Examples longer than max_seq_len are cut (or dropped when no response token is left), and said so."""
    tiny_dir, root, out = run
    mixed = jsonl(root / "mixed.jsonl", GOOD + [LONG, {**GOOD[0], "output": "word " * 80}])
    result = CliRunner().invoke(main, args(tiny_dir, root / "mixed_run", mixed, "train.max_steps=1"))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 cut to data.max_seq_len" in text and "1 dropped (no response token left within data.max_seq_len)" in text
