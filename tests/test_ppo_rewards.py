"""Verifiable rewards: the built-in arithmetic check, its task files, and loading "module:function" names."""

import json

import pytest

from qtune.align.reward_functions import arithmetic, exact_answer, first_number, load_reward_function, main, problems


@pytest.mark.parametrize("response, answer, reward", [
    (" 7", 7, 1.0), (" 7.", 7, 1.0), ("The answer is 42, not 41", 42, 1.0), (" 1,234 apples", 1234, 1.0),
    ("3 + 4 = 7", 7, 0.0),  # restating the question: the first number is 3
    (" seven", 7, 0.0), ("", 7, 0.0), (" 7.5", 7, 0.0), (" -3", -3, 1.0),
])
def test_arithmetic_reward(response, answer, reward):
    assert arithmetic("Question: ...", response, {"answer": answer}) == reward


def test_arithmetic_reward_needs_an_answer():
    with pytest.raises(ValueError, match="'answer' field"):
        arithmetic("q", "7", {"prompt": "q"})


@pytest.mark.parametrize("response, answer, reward", [
    ("APPLE RIVER", "APPLE RIVER", 1.0), ("  12 \n", "12", 1.0), ("tiger.", "tiger", 1.0), (" 7", 7, 1.0),
    ("apple river", "APPLE RIVER", 0.0), ("The answer is 12", "12", 0.0), ("12 13", "12", 0.0),
])
def test_exact_answer_reward(response, answer, reward):
    assert exact_answer("q", response, {"answer": answer}) == reward
    with pytest.raises(ValueError, match="'answer' field"):
        exact_answer("q", response, {})


def test_first_number():
    assert first_number("x 12 and 13") == 12.0 and first_number("none") is None


@pytest.mark.parametrize("task", ["addition", "comparison"])
def test_problems_are_seeded_and_their_answers_check(task):
    records = problems(task, 50, seed=3)
    assert records == problems(task, 50, seed=3) and records != problems(task, 50, seed=4)
    for r in records:
        a, b = (int(x) for x in r["prompt"].replace("?", " ").replace(",", " ").split() if x.isdigit())
        assert r["answer"] == (a + b if task == "addition" else max(a, b))
        assert r["prompt"].startswith("Question: ") and r["prompt"].endswith("\nAnswer:")
        assert arithmetic(r["prompt"], f" {r['answer']}", r) == 1.0


def test_command_line_writes_a_prompt_file(tmp_path, capsys):
    path = tmp_path / "sub" / "add.jsonl"
    main(["addition", str(path), "--n", "7", "--seed", "1"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == problems("addition", 7, seed=1) and str(path) in capsys.readouterr().out


def test_load_reward_function():
    assert load_reward_function("qtune.align.reward_functions:arithmetic") is arithmetic
    for spec, message in [("qtune.align.reward_functions", "module:function"), ("no_such_module_xyz:f", "cannot import module"),
                          ("qtune.align.reward_functions:nope", "not defined there"), ("qtune.align.reward_functions:TASKS", "not callable")]:
        with pytest.raises(ValueError, match=message):
            load_reward_function(spec)
