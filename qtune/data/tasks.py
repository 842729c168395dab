"""Instruction data that qtune generates itself: small tasks whose answers a program can check.

    records = generate_tasks(count=800, seed=0)    # chat records, each with its "answer" and "family"
    load_records("qtune:checkable-tasks?count=800&seed=0")   # the same records as a data source
    load_records("qtune:arithmetic?task=word_problems&count=600&seed=0")   # prompts with numeric answers (RL)

The quickstart trains on these because they need no download and no judge: a held-out example is solved
when the model's greedy completion equals the answer exactly. Every family is a short instruction whose
answer is a few words or digits, so an example is about 30 tokens and a CPU can train on hundreds in
minutes. A small instruct model knows what the instructions mean but answers them at length and often
wrongly; fine-tuning teaches it the answer alone, and the operation.

The same (count, seed, families) always give the same records, on every machine and Python version: the
generator is `random.Random(seed)` and draws only through `randrange`, `sample` and `shuffle`.
"""

import random
from urllib.parse import parse_qs, urlsplit

# A data path with this prefix names generated data instead of a file (see `records_from_path`).
GENERATED_PREFIX = "qtune:"
SYSTEM_PROMPT = "Reply with the answer only."

# Short, common English nouns: each is one or two tokens for the usual BPE vocabularies.
WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "music", "paper", "garden", "window", "silver", "candle",
    "forest", "rabbit", "ocean", "pencil", "winter", "coffee", "dragon", "mirror", "planet", "bread", "chair",
    "horse", "lemon", "money", "night", "party", "queen", "radio", "sugar", "table", "train", "water", "zebra",
    "bottle", "castle", "doctor", "engine", "finger", "guitar", "island", "jacket", "kitten", "ladder",
    "market", "needle", "orange", "pillow", "rocket", "saddle", "tunnel", "violin", "wallet", "yellow",
)


def reverse_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def last_word(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 4)
    return f"What is the last word in this list: {' '.join(words)}", words[-1]


def larger_number(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    return f"Which number is larger, {a} or {b}?", str(max(a, b))


def sort_numbers(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), 3)
    return (f"Sort these numbers from smallest to largest: {' '.join(map(str, numbers))}",
            " ".join(map(str, sorted(numbers))))


def next_number(rng: random.Random) -> tuple[str, str]:
    start, step = rng.randrange(1, 30), rng.randrange(2, 6)
    seq = [start + step * i for i in range(4)]
    return f"What number comes next: {', '.join(map(str, seq))}?", str(start + 4 * step)


def capitals(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 2)
    return f"Write these words in capital letters: {' '.join(words)}", " ".join(words).upper()


# name -> generator of one (instruction, answer) pair
FAMILIES = {f.__name__: f for f in (reverse_words, last_word, larger_number, sort_numbers, next_number, capitals)}


def generate_tasks(count: int, seed: int = 0, families: tuple[str, ...] | list[str] = tuple(FAMILIES),
                   system: str = SYSTEM_PROMPT) -> list[dict]:
    """`count` chat records cycling through `families` in a seeded shuffled order.

    Each record: {"messages": [system, user, assistant], "answer": str, "family": str}. Instructions never
    repeat, so a held-out split never contains a training example verbatim.
    """
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"unknown task families {unknown}; choose from: {', '.join(FAMILIES)}")
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < count:
        name = families[len(records) % len(families)]
        for _ in range(1000):
            instruction, answer = FAMILIES[name](rng)
            if instruction not in seen:
                break
        else:
            raise ValueError(f"family {name!r} has fewer than {count // len(families)} distinct tasks; lower count")
        seen.add(instruction)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]
        records.append({"messages": messages, "answer": answer, "family": name})
    rng.shuffle(records)
    return records


# ----------------------------------------------------------------------------- arithmetic prompts for RL
# Plain-text prompt records {"prompt", "answer" (an int), "task"} that a verifiable reward checks: the
# addition task PPO's examples use, and short word problems that take two or three operations. Prompts never
# repeat within a set, so a held-out split shares no prompt with training.

NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mo", "Nia")
ITEMS = ("apples", "books", "coins", "stamps", "marbles", "pencils", "shells", "cards", "eggs", "stickers")


def addition_problem(rng: random.Random, max_operand: int) -> tuple[str, int]:
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    return f"Question: What is {a} + {b}?\nAnswer:", a + b


def word_problem(rng: random.Random, max_operand: int) -> tuple[str, int]:
    """Two or three steps of buying, giving away, and sharing equally; every intermediate count is whole and >= 0."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, more = rng.randint(2, max_operand), rng.randint(1, max_operand)
    have = start + more
    lost = rng.randint(1, have - 1)
    have -= lost
    text = f"{name} has {start} {item}, buys {more} more and gives away {lost}."
    if rng.random() < 0.5:
        groups = rng.choice([k for k in (2, 3, 4) if have % k == 0] or [1])
        if groups > 1:
            text += f" Then {name} shares them equally among {groups} friends."
            return f"Question: {text} How many {item} does each friend get?\nAnswer:", have // groups
    times = rng.randint(2, 3)
    text += f" Then the number of {item} {name} has is multiplied by {times}."
    return f"Question: {text} How many {item} does {name} have now?\nAnswer:", have * times


ARITHMETIC = {"addition": addition_problem, "word_problems": word_problem}


def arithmetic_tasks(task: str, count: int, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """`count` distinct prompt records of an arithmetic task, fixed by (task, count, seed, max_operand)."""
    if task not in ARITHMETIC:
        raise ValueError(f"unknown arithmetic task {task!r}; choose from: {', '.join(ARITHMETIC)}")
    rng = random.Random(f"{task}-{seed}")
    records, seen = [], set()
    for _ in range(count * 50):
        if len(records) == count:
            return records
        prompt, answer = ARITHMETIC[task](rng, max_operand)
        if prompt not in seen:
            seen.add(prompt)
            records.append({"prompt": prompt, "answer": answer, "task": task})
    raise ValueError(f"task {task!r} with max_operand={max_operand} has fewer than {count} distinct prompts; "
                     "lower count or raise max_operand")


def generated_records(path: str) -> list[dict]:
    """The records a generated data path names: qtune:checkable-tasks?... or qtune:arithmetic?...."""
    if urlsplit(path).path == "arithmetic":
        return arithmetic_tasks(**parse_arithmetic_path(path))
    return generate_tasks(**parse_generated_path(path))


def _query(path: str, allowed: set) -> dict:
    query = {k: v[-1] for k, v in parse_qs(urlsplit(path).query, keep_blank_values=True).items()}
    if set(query) - allowed:
        raise ValueError(f"{path}: unknown parameter(s) {sorted(set(query) - allowed)}; allowed: {sorted(allowed)}")
    return query


def parse_arithmetic_path(path: str) -> dict:
    """"qtune:arithmetic?task=word_problems&count=600&seed=0&max_operand=20" -> arithmetic_tasks kwargs."""
    query = _query(path, {"task", "count", "seed", "max_operand"})
    try:
        kwargs = {"task": query.get("task", "addition"), "count": int(query.get("count", 512)),
                  "seed": int(query.get("seed", 0)), "max_operand": int(query.get("max_operand", 20))}
    except ValueError:
        raise ValueError(f"{path}: count, seed and max_operand must be integers") from None
    if kwargs["count"] < 1 or kwargs["max_operand"] < 2:
        raise ValueError(f"{path}: count must be at least 1 and max_operand at least 2")
    return kwargs


def parse_generated_path(path: str) -> dict:
    """"qtune:checkable-tasks?count=800&seed=0&families=reverse_words,last_word" -> generate_tasks kwargs."""
    url = urlsplit(path)
    if url.scheme + ":" != GENERATED_PREFIX or url.path != "checkable-tasks":
        raise ValueError(f"{path}: unknown generated data; qtune makes "
                         "qtune:checkable-tasks?count=N&seed=S&families=a,b and "
                         "qtune:arithmetic?task=addition|word_problems&count=N&seed=S&max_operand=M")
    query = _query(path, {"count", "seed", "families"})
    try:
        kwargs = {"count": int(query.get("count", 1000)), "seed": int(query.get("seed", 0))}
    except ValueError:
        raise ValueError(f"{path}: count and seed must be integers") from None
    if kwargs["count"] < 1:
        raise ValueError(f"{path}: count must be at least 1")
    if "families" in query:
        kwargs["families"] = tuple(f for f in query["families"].split(",") if f)
    return kwargs
