"""Parsers for model completions: numbered instruction lists, Alpaca task lists, instances, yes/no answers.

Small models number their lists carelessly ("10)", "10 .", "10.Write", repeated or skipped numbers) and
stop mid-item when they run out of tokens, so the parsers accept any numbering and drop only the item a
truncated completion cut short. Instance parsing follows Self-Instruct's `prepare_for_finetuning.py`
(docs: data-pipelines §1.6).
"""

import re
from dataclasses import dataclass

# A line that starts a new list item: "10. ", "10.", "10) ", "10 . ", "10:" (the number is not checked).
_ITEM_START = re.compile(r"^\s*\d+\s*[.):]\s*")


@dataclass
class ParsedList:
    """Items parsed from a completion; how many trailing items were dropped as truncated, and how many
    were dropped as malformed (e.g. an Alpaca item without an output)."""

    items: list
    truncated: int = 0
    malformed: int = 0


def _collapse(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def split_numbered_items(text: str) -> list[str]:
    """Split a numbered list into item texts (numbers removed). The completion continues a prompt that
    ends with the next number, so text before the first numbered line is the first item; lines without a
    number continue the current item."""
    items: list[list[str]] = [[]]
    for line in text.split("\n"):
        start = _ITEM_START.match(line)
        if start:
            items.append([line[start.end():]])
        else:
            items[-1].append(line)
    return [_collapse(" ".join(lines)) for lines in items if _collapse(" ".join(lines))]


def parse_instruction_list(text: str, finish_reason: str, capitalize: bool = True) -> ParsedList:
    """New instructions from a Self-Instruct completion.

    Whitespace is collapsed; with `capitalize` each item goes through `str.capitalize()` as in Self-Instruct
    (which also lower-cases the rest: "NASA" -> "nasa"). When generation hit the token limit the last item
    may be cut off mid-sentence and is dropped; upstream drops the whole completion, but every earlier item
    was closed by the next number, so it is complete.
    """
    items = split_numbered_items(text)
    truncated = 0
    if finish_reason == "length" and items:
        items, truncated = items[:-1], 1
    if capitalize:
        items = [item.capitalize() for item in items]
    return ParsedList(items, truncated)


# Alpaca-style items: "N. Instruction: ...", "N. Input:\n...", "N. Output:\n...", separated by "###".
_FIELD = re.compile(r"^[ \t]*(?:\d+\s*[.)]\s*)?(Instruction|Input|Output)\s*:", flags=re.MULTILINE | re.IGNORECASE)
NO_INPUT = "<noinput>"


def parse_alpaca_list(text: str, finish_reason: str) -> ParsedList:
    """Instruction/input/output triples from a completion that continues "N. Instruction:".

    An item starts at each "Instruction:" field; it needs an "Output:" field to count (input is optional,
    and "<noinput>" in any case means none). Items are kept whatever their numbers. A completion that hit
    the token limit loses its last item, as in Alpaca.
    """
    text = "Instruction:" + re.sub(r"^\s*#{3,}\s*$", "", text, flags=re.MULTILINE)
    marks = list(_FIELD.finditer(text))
    items: list[dict] = []
    for k, mark in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        name, value = mark.group(1).lower(), text[mark.end():end].strip()
        if name == "instruction":
            items.append({"instruction": _collapse(value)})
        elif items and name not in items[-1]:
            items[-1][name] = value
    truncated = 0
    if finish_reason == "length" and items:
        items, truncated = items[:-1], 1
    parsed = []
    for item in items:
        if "output" in item:
            inp = item.get("input", "")
            parsed.append({"instruction": item["instruction"], "input": "" if inp.lower() == NO_INPUT else inp,
                           "output": item["output"]})
    return ParsedList(parsed, truncated, malformed=len(items) - len(parsed))


# Self-Instruct instance markers: "Example 3", "Output:", "Output 2:", "Input:", "Class label:".
_EXAMPLE = re.compile(r"Example\s?\d*\.?")
_OUTPUT = re.compile(r"Output\s*\d*\s*:")
_INPUT = re.compile(r"Input\s*\d*\s*:")
_INPUT_PREFIX = re.compile(r"^Input\s*\d*\s*:")
CLASS_LABEL = "Class label:"


def parse_input_output(chunk: str) -> tuple[str, str]:
    """One instance from an "input ... Output: output" chunk.

    input = text before the first "Output:" marker, output = text between the first and the second; with no
    marker the whole chunk is the output. An output that runs into another "Input:" is cut there, and a
    leading "Input:" label is removed from the input.
    """
    pieces = _OUTPUT.split(chunk)
    inp, out = (pieces[0], pieces[1]) if len(pieces) > 1 else ("", chunk)
    out = _INPUT.split(out)[0]
    inp = _INPUT_PREFIX.sub("", inp.strip())
    return inp.strip(), out.strip()


def parse_generation_instances(raw: str) -> list[tuple[str, str]]:
    """Instances of a non-classification task (input-first generation)."""
    raw = raw.strip()
    if _EXAMPLE.search(raw):
        return [parse_input_output(chunk) for chunk in _EXAMPLE.split(raw) if chunk.strip()]
    if _OUTPUT.search(raw):
        return [parse_input_output(raw)]
    return []


def parse_classification_instances(raw: str) -> list[tuple[str, str]]:
    """Instances of a classification task (output-first): each "Class label:" line gives the output and
    the lines after it, up to the next label, give the input (possibly empty)."""
    if CLASS_LABEL not in raw:
        return []
    instances = []
    for piece in raw.strip().split(CLASS_LABEL)[1:]:
        label, _, rest = piece.strip().partition("\n")
        instances.append((rest.strip(), label.strip()))
    return instances


def parse_instances(raw: str, is_classification: bool, finish_reason: str) -> ParsedList:
    """Instances of either kind; a completion cut by the token limit loses its last instance."""
    parse = parse_classification_instances if is_classification else parse_generation_instances
    instances = parse(raw)
    if finish_reason == "length" and instances:
        return ParsedList(instances[:-1], 1)
    return ParsedList(instances, 0)


def parse_yes_no(text: str) -> bool:
    """True when the answer starts with "yes" (any case, trailing punctuation ignored)."""
    words = text.strip().split()
    return bool(words) and words[0].strip(".,!:;\"'").lower() == "yes"
