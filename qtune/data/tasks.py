"""Instruction data that qtune generates itself: small tasks whose answers a program can check.

    records = generate_tasks(count=800, seed=0)    # chat records, each with its "answer" and "family"
    load_records("qtune:checkable-tasks?count=800&seed=0")   # the same records as a data source

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


def parse_generated_path(path: str) -> dict:
    """"qtune:checkable-tasks?count=800&seed=0&families=reverse_words,last_word" -> generate_tasks kwargs."""
    url = urlsplit(path)
    if url.scheme + ":" != GENERATED_PREFIX or url.path != "checkable-tasks":
        raise ValueError(f"{path}: unknown generated data; the one qtune makes is "
                         "qtune:checkable-tasks?count=N&seed=S&families=a,b")
    query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
    allowed = {"count", "seed", "families"}
    if set(query) - allowed:
        raise ValueError(f"{path}: unknown parameter(s) {sorted(set(query) - allowed)}; allowed: {sorted(allowed)}")
    try:
        kwargs = {"count": int(query.get("count", 1000)), "seed": int(query.get("seed", 0))}
    except ValueError:
        raise ValueError(f"{path}: count and seed must be integers") from None
    if kwargs["count"] < 1:
        raise ValueError(f"{path}: count must be at least 1")
    if "families" in query:
        kwargs["families"] = tuple(f for f in query["families"].split(",") if f)
    return kwargs
