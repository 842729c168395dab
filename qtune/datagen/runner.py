"""What the generation pipelines share: the model behind a counting generate call, the progress bar,
the counters, and the final files (alpaca.json, report.json).
"""

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qtune.datagen.difficulty import difficulty_drops, ifd_scores
from qtune.datagen.seeds import Task
from qtune.datagen.store import write_json_atomic
from qtune.generate import generate_text
from qtune.tokenizer import load_tokenizer
from qtune.weights.checkpoint import load_model
from qtune.weights.hub import resolve_model_path

INSTRUCTIONS_FILE = "instructions.jsonl"
REJECTED_FILE = "rejected.jsonl"
ALPACA_FILE = "alpaca.json"
REPORT_FILE = "report.json"


@dataclass
class Generator:
    """A loaded model and tokenizer behind `generate_text`, counting generated tokens and decoding time."""

    model: object
    tokenizer: object
    batch_size: int = 8
    tokens: int = 0
    seconds: float = 0.0

    def __call__(self, prompts: list[str], *, chat: bool, max_new_tokens: int, greedy: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop_strings: tuple = (), seed: int | None = None):
        """Completions of `prompts` (see `qtune.generate.generate_text`)."""
        if not prompts:
            return []
        start = time.perf_counter()
        outs = generate_text(self.model, self.tokenizer, prompts, chat=chat, max_new_tokens=max_new_tokens,
                             greedy=greedy, temperature=temperature, top_p=top_p, stop_strings=stop_strings,
                             seed=seed, batch_size=self.batch_size)
        self.seconds += time.perf_counter() - start
        self.tokens += sum(len(o.token_ids) for o in outs)
        return outs

    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def load_generator(model_section, batch_size: int) -> Generator:
    """Load the recipe's model (an alias such as "smollm2-135m" is resolved to its converted directory)."""
    path = resolve_model_path(model_section.path)
    dtype = None if model_section.dtype == "auto" else model_section.dtype
    model = load_model(path, quantize=model_section.quantize, dtype=dtype, kernels=model_section.kernels,
                       double_quant=model_section.double_quant)
    return Generator(model, load_tokenizer(path), batch_size)


def round_seed(seed: int, round_: int) -> int:
    """The seed of one round: a redone round (after an interruption) draws exactly what the lost one drew."""
    return (seed * 1_000_003 + round_) % 2**31


@dataclass
class Counters:
    """Running totals of a run, saved with every commit so a resumed run continues them."""

    values: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    instances_rejected: Counter = field(default_factory=Counter)

    def to_json(self) -> dict:
        return {"values": dict(self.values), "rejected": dict(self.rejected),
                "instances_rejected": dict(self.instances_rejected)}

    @classmethod
    def from_json(cls, d: dict) -> "Counters":
        return cls(Counter(d.get("values", {})), Counter(d.get("rejected", {})), Counter(d.get("instances_rejected", {})))


class ProgressBar:
    """A rich progress bar: kept / target, rejected count, generation tokens per second."""

    def __init__(self, description: str, total: int, enabled: bool = True):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("kept {task.completed:.0f}  rejected {task.fields[rejected]}  "
                                            "{task.fields[tps]:.1f} tok/s  round {task.fields[round]}"),
                                 TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled)
        self.task = self.progress.add_task(description, total=total, rejected=0, tps=0.0, round=0)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def update(self, kept: int, rejected: int, tokens_per_second: float, round_: int) -> None:
        self.progress.update(self.task, completed=kept, rejected=rejected, tps=tokens_per_second, round=round_)


def score_tasks(gen: Generator, tasks: list[Task], difficulty) -> None:
    """Put each instance's IFD scores into its task's provenance (when difficulty scoring is on)."""
    if not difficulty.enabled or not tasks:
        return
    examples = [ex for t in tasks for ex in t.alpaca_examples()]
    scores = iter(ifd_scores(gen.model, gen.tokenizer, examples, difficulty.batch_size, difficulty.max_length))
    for t in tasks:
        t.provenance["ifd"] = [next(scores).as_dict() for _ in t.instances]


def export(out_dir: Path, kept: list[dict], seeds: list[Task], counters: Counters, difficulty, include_seeds: bool,
           settings: dict) -> dict:
    """Write alpaca.json (the generated examples after difficulty selection, plus the seeds if asked) and
    report.json (counts kept and rejected by reason). Returns the report."""
    examples, ifds = [], []
    for record in kept:
        scores = record.get("provenance", {}).get("ifd", [])
        for k, inst in enumerate(record["instances"]):
            examples.append({"instruction": record["instruction"], "input": inst["input"], "output": inst["output"]})
            ifds.append(scores[k]["ifd"] if k < len(scores) else float("nan"))
    dropped = Counter()
    if difficulty.enabled:
        reasons = difficulty_drops(ifds, difficulty.drop_easiest, difficulty.drop_hardest, difficulty.max_ifd)
        dropped.update(r for r in reasons if r)
        examples = [ex for ex, r in zip(examples, reasons) if r is None]
    seed_examples = [ex for t in seeds for ex in t.alpaca_examples()] if include_seeds else []
    write_json_atomic(out_dir / ALPACA_FILE, seed_examples + examples, indent=2)
    v = counters.values
    report = {
        "settings": settings,
        "kept_instructions": len(kept),
        "kept_instances": sum(len(r["instances"]) for r in kept),
        "alpaca_examples": len(seed_examples) + len(examples),
        "seed_examples": len(seed_examples),
        "candidates": v["candidates"],
        "rejected": {k: n for k, n in sorted(counters.rejected.items()) if n},
        "instances_rejected": {k: n for k, n in sorted(counters.instances_rejected.items()) if n},
        "difficulty_dropped": dict(sorted(dropped.items())),
        "rounds": v["rounds"],
        "completions": v["completions"],
        "completions_truncated": v["truncated"],
        "generated_tokens": v["tokens"],
        "generation_seconds": round(v["gen_millis"] / 1000, 3),
        "tokens_per_second": round(v["tokens"] / (v["gen_millis"] / 1000), 2) if v["gen_millis"] else 0.0,
    }
    write_json_atomic(out_dir / REPORT_FILE, report)
    return report
