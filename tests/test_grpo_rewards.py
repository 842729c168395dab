"""GRPO's built-in verifiable rewards (answer extraction, format, length) and its generated arithmetic tasks."""

import re

import pytest

from qtune.align.reward_functions import answer_match, answer_tag, boxed, format_match, last_number
from qtune.data.records import DataError, load_records
from qtune.data.tasks import arithmetic_tasks


@pytest.mark.parametrize("text, number", [
    (" 7", "7"), ("3 + 4 = 7", "7"), ("1,234 apples, then 12", "12"), ("about -3.5 or so", "-3.5"), ("none", None),
    ("x 1,200", "1200"),
])
def test_last_number(text, number):
    assert last_number(text) == number


def test_boxed_and_answer_tag():
    assert boxed(r"so \boxed{3} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert boxed(r"\boxed{unclosed") is None and boxed("no box") is None
    assert answer_tag("<answer>1</answer> text <answer>\n 42 </answer>") == "\n 42 "
    assert answer_tag("<answer>open") is None


@pytest.mark.parametrize("response, extract, answer, reward", [
    ("3 + 4 = 7", "last_number", 7, 1.0), ("7 apples, not 8", "last_number", 7, 0.0),
    (" 42.0", "last_number", 42, 1.0), (r"\boxed{12}", "boxed", 12, 1.0), (r"\boxed{x}", "boxed", "x", 1.0),
    ("12 <answer> 12 </answer>", "answer_tag", "12", 1.0), ("<answer>13</answer>", "answer_tag", 12, 0.0),
    ("nothing", "boxed", 1, 0.0),
])
def test_answer_match(response, extract, answer, reward):
    assert answer_match(response, {"answer": answer}, extract) == reward


def test_answer_match_needs_an_answer():
    with pytest.raises(ValueError, match="'answer' field"):
        answer_match("1", {"prompt": "q"}, "last_number")


def test_format_match_is_on_the_whole_response():
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    assert format_match(" <think>a\nb</think> <answer>3</answer>\n", pattern) == 1.0
    assert format_match("<answer>3</answer>", pattern) == 0.0 and format_match("x <think></think><answer>3</answer>",
                                                                               pattern) == 0.0


def recomputed(prompt: str) -> int:
    """The answer worked out again from the problem's own words."""
    steps = re.search(r"has (\d+) \w+, buys (\d+) more and gives away (\d+)", prompt)
    start, more, lost = (int(x) for x in steps.groups())
    have = start + more - lost
    if (shared := re.search(r"equally among (\d+) friends", prompt)):
        assert have % int(shared[1]) == 0
        return have // int(shared[1])
    return have * int(re.search(r"multiplied by (\d+)", prompt)[1])


def test_word_problems_answers_and_distinct_prompts():
    records = arithmetic_tasks("word_problems", 400, seed=2)
    assert records == arithmetic_tasks("word_problems", 400, seed=2) != arithmetic_tasks("word_problems", 400, seed=3)
    assert len({r["prompt"] for r in records}) == 400
    for r in records:
        assert r["answer"] == recomputed(r["prompt"]) and r["answer"] >= 0
        assert r["prompt"].startswith("Question: ") and r["prompt"].endswith("\nAnswer:")
    kinds = {"equally" in r["prompt"] for r in records}
    assert kinds == {True, False}  # both endings occur


def test_addition_prompts_are_distinct_and_check():
    records = load_records("qtune:arithmetic?task=addition&count=300&seed=0&max_operand=20").rows
    assert len({r["prompt"] for r in records}) == 300
    for r in records:
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", r["prompt"]).groups())
        assert r["answer"] == a + b


@pytest.mark.parametrize("path, says", [
    ("qtune:arithmetic?task=addition&count=500&max_operand=20", "fewer than 500 distinct"),
    ("qtune:arithmetic?task=subtraction", "unknown arithmetic task"),
    ("qtune:arithmetic?count=ten", "must be integers"),
    ("qtune:arithmetic?task=addition&colour=red", "unknown parameter"),
])
def test_bad_generated_paths_are_data_errors(path, says):
    with pytest.raises(DataError, match=says):
        load_records(path)
