"""Evol-Instruct operations (qtune's own prompt wording) and the elimination rules.

WizardLM (Xu et al. 2023, arXiv:2304.12244; docs: data-pipelines §3) rewrites each instruction with one
operation drawn uniformly: five in-depth ones (add a constraint, deepen, concretize, ask for more reasoning
steps, complicate the input with data) that make it harder by a small step ("add 10 to 20 words"), and one
in-breadth operation that writes a new, rarer instruction of the same domain. An evolution fails, and the
original goes on unchanged, when the rewrite brings nothing new, the answer is an apology or empty, or the
rewrite copies words of the prompt that asked for it.
"""

import random
import re
from dataclasses import dataclass

from qtune.datagen.rouge import rouge_l

IN_DEPTH = ("constraints", "deepen", "concretize", "reasoning", "complicate_input")
IN_BREADTH = ("breadth",)
OPERATIONS = IN_DEPTH + IN_BREADTH

# One sentence per in-depth operation: what the rewrite should change.
_DEPTH_METHODS = {
    "constraints": "Add exactly one extra requirement or constraint that the answer has to satisfy.",
    "deepen": "If the task asks about something, ask about it in more depth and from more angles.",
    "concretize": "Replace general words with more specific, concrete ones (names, numbers, settings).",
    "reasoning": "If a little thinking solves the task, make it explicitly ask for several steps of reasoning.",
    "complicate_input": "Add {fmt} to the task as input data that the task works on, and show that data in full.",
}

DEPTH_TEMPLATE = (
    "Rewrite the task below into a slightly harder version. The new task must still make sense and be "
    "answerable by a person, and it must keep any input, table or code the original has.\n"
    "How to make it harder: {method}\n"
    "Add only 10 to 20 words. Reply with the rewritten task alone.\n\n"
    "Original task:\n{instruction}\n\n"
    "Rewritten task:\n"
)
BREADTH_TEMPLATE = (
    "Read the task below and write one brand-new task from the same field, about a less common topic. It "
    "should be about as long and as hard as the original, and answerable by a person. Reply with the new "
    "task alone.\n\n"
    "Original task:\n{instruction}\n\n"
    "Created task:\n"
)
EQUAL_TEMPLATE = (
    "Do these two tasks ask for the same thing, with the same requirements and the same depth? "
    "Answer with one word: Equal or Different.\n\n"
    "First task:\n{first}\n\nSecond task:\n{second}\n\nAnswer:"
)
# The labels of our templates, plus WizardLM's, which a rewrite must not repeat.
PROMPT_WORDS = ("original task", "rewritten task", "created task", "given prompt", "rewritten prompt",
                "created prompt", "#given prompt#", "#rewritten prompt#", "#created prompt#", "#the given prompt#")


def evolution_prompt(op: str, instruction: str, rng: random.Random, input_formats: list[str]) -> str:
    """The prompt that asks for one evolution of `instruction` (an input, if any, is part of it)."""
    if op in IN_BREADTH:
        return BREADTH_TEMPLATE.format(instruction=instruction.strip())
    method = _DEPTH_METHODS[op]
    if op == "complicate_input":
        method = method.format(fmt=rng.choice(input_formats))
    return DEPTH_TEMPLATE.format(method=method, instruction=instruction.strip())


def equal_prompt(first: str, second: str) -> str:
    """WizardLM's elimination judge: are the two instructions equal? (qtune wording)."""
    return EQUAL_TEMPLATE.format(first=first.strip(), second=second.strip())


def judged_equal(answer: str) -> bool:
    """True when the judge's answer starts with "Equal" (any case)."""
    words = answer.strip().split()
    return bool(words) and words[0].strip(".,!:;\"'").lower() == "equal"


_LABEL = re.compile(r"^\s*(?:#*\s*)?(?:rewritten|created|new|harder)\s+(?:task|prompt)\s*#*\s*:\s*", re.IGNORECASE)


def clean_evolved(text: str) -> str:
    """The evolved instruction from a completion: an echoed label ("Rewritten task:") and wrapping quotes
    removed; the text itself is kept as written (inputs may span lines)."""
    text = _LABEL.sub("", text.strip()).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


# Reasons (report.json).
EMPTY_EVOLUTION = "empty_evolution"
UNCHANGED = "no_real_change"
JUDGED_EQUAL = "judged_equal"
COPIED_PROMPT = "copied_prompt_words"
APOLOGY = "apology_answer"
EMPTY_ANSWER = "empty_answer"

# English function words; an answer made only of these (and punctuation) says nothing.
STOP_WORDS = frozenset(
    "a an the and or but if then else of to in on at by for with from as is are was were be been being am do does "
    "did have has had i you he she it we they me him her us them my your his its our their this that these those "
    "there here what which who whom whose when where why how not no yes so too very can could will would shall "
    "should may might must just also only all any some such than up down out over under again once about into "
    "through during before after above below between ok okay oh well".split())


@dataclass
class Elimination:
    """Thresholds of the elimination rules."""

    min_change: float = 0.9  # ROUGE-L F1 with the original at or above this = no real change
    apology_max_words: int = 80  # WizardLM: an answer with "sorry" that is shorter than 80 words fails

    def evolution_reason(self, original: str, evolved: str) -> str | None:
        """Reject a rewrite before it is answered: empty, unchanged, or copying the prompt's labels."""
        if not evolved.strip():
            return EMPTY_EVOLUTION
        lowered = evolved.lower()
        if any(w in lowered for w in PROMPT_WORDS):
            return COPIED_PROMPT
        if _normalise(original) == _normalise(evolved) or rouge_l(original, evolved) >= self.min_change:
            return UNCHANGED
        return None

    def answer_reason(self, answer: str) -> str | None:
        """Reject an answer that is an apology, or empty apart from punctuation and stop words."""
        words = re.findall(r"[a-z0-9']+", answer.lower())
        if not any(w not in STOP_WORDS for w in words):
            return EMPTY_ANSWER
        if "sorry" in answer.lower() and len(answer.split()) < self.apology_max_words:
            return APOLOGY
        return None


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def pick_operation(rng: random.Random, operations: list[str]) -> str:
    """One operation, uniformly (WizardLM: each of the six with probability 1/6)."""
    return rng.choice(operations)
