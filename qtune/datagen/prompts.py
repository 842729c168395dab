"""Prompt builders for Self-Instruct and Alpaca-style generation (qtune's own wording).

The structure follows the upstream pipelines (docs: data-pipelines §1.3-§1.5, §2.2): 8 demonstration
instructions per Self-Instruct prompt (6 from the seed tasks, 2 machine-made once there are two), a
few-shot yes/no prompt for "is this a classification task", output-first instance prompts for
classification and input-first ones otherwise, and 3 seed demonstrations per Alpaca prompt. The
markers the parsers look for ("N.", "Example k", "Output:", "Class label:", "N. Instruction:") are kept.
"""

import random
import re
from dataclasses import dataclass

from qtune.datagen.seeds import Task


@dataclass
class Demonstration:
    """An instruction shown in a prompt and where it came from (a seed id or a generated task id)."""

    text: str
    source: str


def clean_instruction(text: str) -> str:
    """One line, no trailing colon: the form instructions take inside a numbered prompt list."""
    return re.sub(r"\s+", " ", text).strip().rstrip(":")


def sample_demonstrations(rng: random.Random, seeds: list[Task], machine: list[Task],
                          total: int = 8, machine_count: int = 2) -> list[Demonstration]:
    """Self-Instruct's prompt sampling: up to `machine_count` generated instructions (as many as exist),
    the rest from the seeds, shuffled together."""
    picked = rng.sample(machine, min(machine_count, len(machine)))
    picked += rng.sample(seeds, min(total - len(picked), len(seeds)))
    rng.shuffle(picked)
    return [Demonstration(clean_instruction(t.instruction), t.id) for t in picked]


INSTRUCTION_HEADER = "Below are everyday requests that people type to a helpful text assistant, one per line:\n"
CLASSIFICATION_HEADER = ("Below are requests that people type to a helpful text assistant; each asks to sort "
                         "its input into one of a few labels, and names the labels when it can:\n")


def instruction_prompt(demos: list[Demonstration], classification: bool = False, chat: bool = False) -> str:
    """A numbered list of the demonstrations, ending with the next number for the model to continue
    (with `chat`, a request to continue the list instead, for a chat model's user turn)."""
    header = CLASSIFICATION_HEADER if classification else INSTRUCTION_HEADER
    lines = "".join(f"{k}. {d.text}\n" for k, d in enumerate(demos, start=1))
    if chat:
        return f"{header}{lines}\nContinue the list with new requests that differ from these, numbered from {len(demos) + 1}."
    return f"{header}{lines}{len(demos) + 1}."


# Few-shot examples for "is this a classification task?" (qtune's own; 5 yes, 7 no).
CLASSIFICATION_EXAMPLES = (
    ("Decide whether the customer review is positive, negative or neutral.", True),
    ("Write a short story about a lighthouse keeper.", False),
    ("Is the following statement true or false?", True),
    ("Suggest a name for a new coffee shop.", False),
    ("Explain how a bicycle gear works.", False),
    ("Which of the two sentences is grammatically correct? Answer 1 or 2.", True),
    ("Translate the sentence into Spanish.", False),
    ("Tell me if the email is spam or not spam.", True),
    ("Give me three tips for a job interview.", False),
    ("Summarize the article in two sentences.", False),
    ("Identify the part of speech of the underlined word.", True),
    ("Write a thank-you note to a colleague.", False),
)
CLASSIFICATION_QUESTION = "Does the answer come from a small, fixed set of labels?"


def classification_prompt(instruction: str) -> str:
    """Few-shot prompt whose continuation is "Yes" or "No"."""
    shots = "".join(f"Task: {t}\n{CLASSIFICATION_QUESTION} {'Yes' if y else 'No'}\n\n"
                    for t, y in CLASSIFICATION_EXAMPLES)
    return f"{shots}Task: {clean_instruction(instruction)}\n{CLASSIFICATION_QUESTION}"


# Instance generation. Classification: the label first, then an input that fits it (so labels are
# balanced and the model does not simply pick the easiest label for an input it wrote).
OUTPUT_FIRST_HEADER = ("For each task, write a few class labels, each followed by an input that belongs "
                       "to that label.\n\n")
OUTPUT_FIRST_DEMOS = (
    "Task: Decide whether the movie review is positive or negative.\n"
    "Class label: Positive\nReview: The actors were wonderful and the ending made me smile.\n"
    "Class label: Negative\nReview: Two hours of my life I will never get back.\n\n"
    "Task: Tell me which number in the list is the smallest.\n"
    "Class label: 3\nList: 8, 3, 12, 5\n"
    "Class label: -1\nList: 4, 0, -1, 7\n\n"
    "Task: Is the sentence a question or a statement?\n"
    "Class label: Question\nSentence: Where did you park the car?\n"
    "Class label: Statement\nSentence: The car is parked outside.\n\n"
)
INPUT_FIRST_HEADER = ("For each task, write a few examples: an input, then the correct output. When the "
                      "task needs no input, write the output directly.\n\n")
INPUT_FIRST_DEMOS = (
    "Task: Give three tips for sleeping better.\n"
    "Output: Go to bed at the same time every night, keep the bedroom dark and cool, and avoid screens in "
    "the hour before sleep.\n\n"
    "Task: Convert the sentence to the past tense.\n"
    "Example 1\nSentence: She walks to school.\nOutput: She walked to school.\n"
    "Example 2\nSentence: We eat dinner at seven.\nOutput: We ate dinner at seven.\n\n"
    "Task: Add up the numbers.\n"
    "Example 1\nNumbers: 4, 9, 12\nOutput: 25\n"
    "Example 2\nNumbers: 100, 250\nOutput: 350\n\n"
)


def instance_prompt(instruction: str, is_classification: bool) -> str:
    """Output-first (classification) or input-first prompt for the instances of one task."""
    if is_classification:
        return f"{OUTPUT_FIRST_HEADER}{OUTPUT_FIRST_DEMOS}Task: {instruction.strip()}\n"
    return f"{INPUT_FIRST_HEADER}{INPUT_FIRST_DEMOS}Task: {instruction.strip()}\n"


ALPACA_HEADER = (
    "You are writing a list of {n} varied tasks for training a text assistant. Rules:\n"
    "- Vary the verbs and mix questions with commands.\n"
    "- Mix kinds of task: writing, rewriting, classification, explanation, math, advice.\n"
    "- The assistant only reads and writes text, so never ask for pictures, sound or actions in the world.\n"
    "- Each instruction is one or two sentences of English.\n"
    "- Give an input with real content (under 100 words) when the task needs one, otherwise write <noinput>.\n"
    "- The output answers the instruction for that input in under 100 words.\n\n"
    "Tasks:\n"
)


def alpaca_prompt(demos: list[Task], n_tasks: int = 20, chat: bool = False) -> str:
    """Alpaca-style prompt: the rules, `len(demos)` complete seed tasks, then "N. Instruction:" to continue
    (with `chat`, a request to continue from task N). Each seed contributes its first instance; an empty
    input is written as <noinput>."""
    parts = [ALPACA_HEADER.format(n=n_tasks)]
    for k, task in enumerate(demos, start=1):
        inst = task.instances[0]
        parts.append(f"###\n{k}. Instruction: {clean_instruction(task.instruction)}\n"
                     f"{k}. Input:\n{inst.input or '<noinput>'}\n{k}. Output:\n{inst.output}\n")
    if chat:
        parts.append(f"###\nContinue the list in the same format, starting with task {len(demos) + 1}.")
    else:
        parts.append(f"###\n{len(demos) + 1}. Instruction:")
    return "".join(parts)
