"""Filters for generated instructions and instances. Each returns the reason it rejects (or None), so the
run can count rejections by reason in its report.

Rules and numbers follow Self-Instruct's `bootstrap_instructions.py` / `prepare_for_finetuning.py` and
Alpaca's `generate_instruction.py` (see docs: data-pipelines §1.3, §1.6, §2.4).
"""

import re
import string
from collections import Counter
from dataclasses import dataclass, field

# Tasks a text-only model cannot do (Self-Instruct's list; Alpaca adds the last five).
SELF_INSTRUCT_BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
                           "map", "maps", "draw", "plot", "go to")
ALPACA_BLACKLIST = SELF_INSTRUCT_BLACKLIST + ("video", "audio", "music", "flowchart", "diagram")

# Reasons, as they appear in report.json.
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
BLACKLISTED = "blacklisted_word"
PROGRAM = "write_a_program"
PUNCTUATION_START = "starts_with_punctuation"
NON_ASCII_START = "starts_with_non_ascii"
TOO_SIMILAR = "rouge_l_too_similar"
EMPTY_INSTRUCTION = "empty_instruction"


@dataclass
class InstructionFilter:
    """The instruction-level filters. Word counts use `str.split()`; a word count `<= min_words` or
    `> max_words` rejects (upstream: 3 and 150)."""

    min_words: int = 3
    max_words: int = 150
    blacklist: tuple[str, ...] = SELF_INSTRUCT_BLACKLIST
    max_similarity: float = 0.7  # ROUGE-L F1 above this against any pool instruction rejects
    _pattern: re.Pattern | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Whole words, case-insensitive: "mapping" passes, "Map" and "go to" do not.
        words = "|".join(re.escape(w) for w in self.blacklist)
        self._pattern = re.compile(rf"\b({words})\b", flags=re.IGNORECASE) if words else None

    def reject_reason(self, instruction: str) -> str | None:
        """Why `instruction` is rejected by the text filters, or None when it passes (similarity aside)."""
        if not instruction.strip():
            return EMPTY_INSTRUCTION
        n_words = len(instruction.split())
        if n_words <= self.min_words:
            return TOO_SHORT
        if n_words > self.max_words:
            return TOO_LONG
        if self._pattern is not None and self._pattern.search(instruction):
            return BLACKLISTED
        if instruction.startswith("Write a program"):
            return PROGRAM
        if instruction[0] in string.punctuation:
            return PUNCTUATION_START
        if not instruction[0].isascii():
            return NON_ASCII_START
        return None

    def similarity_reason(self, max_score: float) -> str | None:
        """Self-Instruct's diversity rule: keep only when the best ROUGE-L F1 is at most the threshold."""
        return TOO_SIMILAR if max_score > self.max_similarity else None


# Instance-level reasons.
INPUT_EQUALS_OUTPUT = "input_equals_output"
EMPTY_OUTPUT = "empty_output"
ENDS_WITH_COLON = "ends_with_colon"
CONFLICTING_OUTPUTS = "conflicting_outputs"
DUPLICATE_INSTANCE = "duplicate_instance"
NO_INSTANCES = "no_valid_instances"


def instance_reject_reason(inp: str, out: str) -> str | None:
    """Self-Instruct's `filter_invalid_instances`: input equal to output, empty output, or a field that
    ends with ':' (an unfinished "Input:" / "Output:" header)."""
    if inp == out:
        return INPUT_EQUALS_OUTPUT
    if out == "":
        return EMPTY_OUTPUT
    if inp.endswith(":") or out.endswith(":"):
        return ENDS_WITH_COLON
    return None


def filter_instances(instances: list[tuple[str, str]], rejected: Counter) -> list[tuple[str, str]]:
    """Drop invalid instances, then apply the conflict rule, counting each dropped instance in `rejected`.

    Conflict rule: two instances with the same non-empty input but different outputs make the whole task
    unreliable, so every instance is dropped. Otherwise exact duplicates are removed (the first is kept and
    the order too, where upstream's `set` leaves the order to the hash seed).
    """
    valid = []
    for inp, out in instances:
        reason = instance_reject_reason(inp, out)
        if reason:
            rejected[reason] += 1
        else:
            valid.append((inp, out))
    outputs_by_input: dict[str, set[str]] = {}
    for inp, out in valid:
        if inp:
            outputs_by_input.setdefault(inp, set()).add(out)
    if any(len(outs) > 1 for outs in outputs_by_input.values()):
        rejected[CONFLICTING_OUTPUTS] += len(valid)
        return []
    unique = list(dict.fromkeys(valid))
    if len(unique) < len(valid):
        rejected[DUPLICATE_INSTANCE] += len(valid) - len(unique)
    return unique
