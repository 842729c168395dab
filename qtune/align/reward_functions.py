"""Verifiable rewards: Python functions that score a response by checking it, instead of a reward model.

A recipe names one as "module:function" (`ppo.reward_fn`, `best_of_n.reward_fn`); it is called once per
response as

    f(prompt: str, response: str, record: dict) -> float

with the prompt as the model saw it, the response's text (without the end-of-sequence token) and the data
record the prompt came from, whose extra fields (such as "answer") carry what the check needs.

Built in:

    exact_answer  1 when the response is exactly the record's "answer" (qtune's generated instruction tasks)
    arithmetic    1 when the first number in the response is the record's "answer"

and, for GRPO's `[[grpo.rewards]]` built-ins (`fn = "answer"`, `"format"`), the answer extractions

    last_number   the last number in the response ("... so 3 + 4 = 7" -> 7)
    boxed         the content of the last \\boxed{...}
    answer_tag    the content of the last <answer>...</answer>

with `answer_match` comparing the extracted answer with the record's (as numbers when both are) and
`format_match` checking a regular expression. Two tasks for `arithmetic`, whose prompt files
`python -m qtune.align.reward_functions TASK FILE` writes (GRPO reads generated ones, `qtune:arithmetic?...`,
see qtune/data/tasks.py). Their prompts read as plain text (data.chat = false) as well as inside a chat turn:

    addition    "Question: What is 13 + 29?\nAnswer:"                      answer 42
    comparison  "Question: Which number is larger, 17 or 23?\nAnswer:"     answer 23
"""

import argparse
import importlib
import json
import random
import re
from pathlib import Path
from typing import Callable

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
TASKS = ("addition", "comparison")

RewardFn = Callable[[str, str, dict], float]


def load_reward_function(spec: str) -> RewardFn:
    """The function a "module:function" string names (the module is imported as Python imports it)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {spec!r} must look like \"module:function\" (e.g. \"qtune.align.reward_functions:arithmetic\")")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} ({e}); "
                         "is it on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        found = "not callable" if fn is not None else "not defined there"
        raise ValueError(f"reward function {spec!r}: {attr!r} is {found} in {module.__file__}")
    return fn


def first_number(text: str) -> float | None:
    """The first number written in `text` (commas between digit groups allowed), or None."""
    found = NUMBER.search(text.replace(",", ""))
    return float(found[0]) if found else None


def arithmetic(prompt: str, response: str, record: dict) -> float:
    """1.0 when the first number in the response equals record["answer"], else 0.0.

    The first number, because the prompts ask for the answer itself: restating the question ("3 + 4 = 7")
    or listing guesses earns nothing.
    """
    if "answer" not in record:
        raise ValueError(f"the arithmetic reward needs an 'answer' field in each prompt record; this one has "
                         f"{sorted(record)} (write prompt files with `python -m qtune.align.reward_functions addition FILE`)")
    value = first_number(response)
    return float(value is not None and value == float(record["answer"]))


def exact_answer(prompt: str, response: str, record: dict) -> float:
    """1.0 when the response, stripped of surrounding space and a final period, is exactly record["answer"].

    The check of qtune's generated instruction tasks (`qtune:checkable-tasks?...` data), whose answers are
    a few words or digits and must come alone.
    """
    if "answer" not in record:
        raise ValueError(f"the exact_answer reward needs an 'answer' field in each prompt record; this one has "
                         f"{sorted(record)}")
    return float(response.strip().removesuffix(".").strip() == str(record["answer"]).strip())


ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
BOXED = "\\boxed{"


def last_number(text: str) -> str | None:
    """The last number written in `text` (commas between digit groups allowed), or None."""
    found = NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


def boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text`, braces inside it balanced, or None."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(BOXED)
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def answer_tag(text: str) -> str | None:
    """The content of the last <answer>...</answer> in `text`, or None."""
    found = ANSWER_TAG.findall(text)
    return found[-1] if found else None


EXTRACTORS = {"last_number": last_number, "boxed": boxed, "answer_tag": answer_tag}


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


def answer_match(response: str, record: dict, extract: str) -> float:
    """1.0 when the answer extracted from `response` (EXTRACTORS[extract]) equals record["answer"], else 0.0.

    Both are compared as numbers when both read as numbers (so "42.0" matches 42), else as stripped text.
    """
    if "answer" not in record:
        raise ValueError(f"the answer reward needs an 'answer' field in each prompt record; this one has {sorted(record)}")
    found = EXTRACTORS[extract](response)
    if found is None:
        return 0.0
    got, want = _as_number(found), _as_number(str(record["answer"]))
    if got is not None and want is not None:
        return float(got == want)
    return float(found.strip() == str(record["answer"]).strip())


def format_match(response: str, pattern: str) -> float:
    """1.0 when the regular expression `pattern` matches the whole response (re.DOTALL: '.' spans lines)."""
    return float(re.fullmatch(pattern, response.strip(), re.DOTALL) is not None)


def problems(task: str, n: int, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """`n` prompt records {"prompt", "answer"} of a built-in task, drawn with a seeded generator."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join(TASKS)}")
    rng = random.Random(f"{task}-{seed}")
    records = []
    for _ in range(n):
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        if task == "addition":
            records.append({"prompt": f"Question: What is {a} + {b}?\nAnswer:", "answer": a + b})
        else:
            while b == a:
                b = rng.randint(1, max_operand)
            records.append({"prompt": f"Question: Which number is larger, {a} or {b}?\nAnswer:", "answer": max(a, b)})
    return records


def write_problems(path, task: str, n: int, seed: int = 0, max_operand: int = 20) -> Path:
    """Write `problems(...)` as a JSONL prompt file that PPO and best-of-N recipes read (format "prompt")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in problems(task, n, seed, max_operand)))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qtune.align.reward_functions",
                                     description="Write a prompt file of a built-in task for qtune.align.reward_functions:arithmetic.")
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("path", help="output .jsonl file")
    parser.add_argument("--n", type=int, default=512, help="number of problems (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=20, help="operands are drawn from 1..max (default 20)")
    args = parser.parse_args(argv)
    print(write_problems(args.path, args.task, args.n, args.seed, args.max_operand))


if __name__ == "__main__":
    main()
