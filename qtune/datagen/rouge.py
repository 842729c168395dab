"""ROUGE-L F1, the similarity that Self-Instruct and Alpaca use to keep the instruction pool diverse.

It reproduces the scores of the `rouge-score` package (`RougeScorer(["rougeL"], use_stemmer=False)`) on the
same strings: the same tokenizer and the same LCS-based F1. The package is only a test reference.
"""

import re
from dataclasses import dataclass, field

# rouge-score's tokenizer: lower-case, every run of characters outside [a-z0-9] becomes one space, split on
# whitespace, keep tokens made only of [a-z0-9]. Non-ASCII letters therefore vanish ("café" -> "caf").
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """Tokens exactly as rouge-score's default tokenizer (no stemming) makes them."""
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (one DP row, O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l_tokens(target: list[str], prediction: list[str]) -> float:
    """ROUGE-L F1 of two token lists.

    P = LCS / len(prediction), R = LCS / len(target), F = 2PR / (P + R); 0 when either list is empty.
    Computed in the same order as rouge-score so the floats agree bit for bit.
    """
    if not target or not prediction:
        return 0.0
    lcs = lcs_length(target, prediction)
    precision = lcs / len(prediction)
    recall = lcs / len(target)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def rouge_l(target: str, prediction: str) -> float:
    """ROUGE-L F1 of two strings, equal to `RougeScorer(["rougeL"]).score(target, prediction)["rougeL"].fmeasure`."""
    return rouge_l_tokens(rouge_tokenize(target), rouge_tokenize(prediction))


@dataclass
class Similarity:
    """How close a candidate instruction is to the pool: the most similar entries and the mean score."""

    max_score: float
    mean_score: float
    most_similar: dict[str, float]  # up to `top` pool texts -> score, highest first

    def as_dict(self) -> dict:
        return {"max": self.max_score, "mean": self.mean_score, "most_similar": self.most_similar}


@dataclass
class InstructionPool:
    """The instructions a new one is compared with; tokens are kept so each text is tokenized once."""

    texts: list[str] = field(default_factory=list)
    tokens: list[list[str]] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.texts.append(text)
        self.tokens.append(rouge_tokenize(text))

    def __len__(self) -> int:
        return len(self.texts)

    def similarity(self, candidate: str, top: int = 10) -> Similarity:
        """ROUGE-L F1 of `candidate` against every pool entry (the pool is the target side, as upstream)."""
        cand = rouge_tokenize(candidate)
        scores = [rouge_l_tokens(t, cand) for t in self.tokens]
        if not scores:
            return Similarity(0.0, 0.0, {})
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:top]
        return Similarity(max(scores), sum(scores) / len(scores), {self.texts[i]: scores[i] for i in order})
