"""Recipe schemas of the data-generation verbs (`kind = "self-instruct"` and `kind = "evol-instruct"`).

They reuse the recipe machinery of `qtune.recipe` (documented dataclass sections, checked loading,
`key.sub=value` overrides); only the sections are specific to generation.
"""

import typing
from dataclasses import dataclass, field
from typing import Iterator, Literal

from qtune.datagen.evol import OPERATIONS
from qtune.datagen.filters import SELF_INSTRUCT_BLACKLIST
from qtune.recipe.schema import nonnegative, positive, positive_ints
from qtune.recipe.sections import ModelSection, OutputSection, Recipe


@dataclass
class GenModelSection(ModelSection):
    quantize: Literal["nf4", "none"] = "none"
    """Base weights: "none" keeps them dense (fastest decoding on a CPU), "nf4" stores them in 4 bits."""


@dataclass
class GenDataSection:
    seed_tasks: str = "builtin"
    """Seed tasks: a Self-Instruct JSONL file, an Alpaca JSON array (Evol-Instruct), or "builtin" (qtune's set)."""

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.seed_tasks:
            yield "seed_tasks", 'must name a seed file or "builtin"'


@dataclass
class GenerateSection:
    method: Literal["self-instruct", "alpaca"] = "self-instruct"
    """Self-Instruct (numbered instruction lists, then instances) or Alpaca (whole tasks in one prompt)."""
    num_instructions: int = 100
    """Kept instructions to reach (Evol-Instruct: how many seed instructions to evolve; 0 = all)."""
    seed: int = 42
    """Seed of all sampling (demonstrations, decoding); each round derives its own from it."""
    prompts_per_round: int = 8
    """Instruction-generation prompts per round; a round is also the unit that is committed to disk."""
    batch_size: int = 8
    """Sequences decoded together by the KV-cache generator."""
    chat: bool = False
    """Wrap prompts in the model's chat template (instruct models) instead of plain continuation."""
    num_demonstrations: int = 8
    """Instructions shown per Self-Instruct prompt (Self-Instruct: 8)."""
    machine_demonstrations: int = 2
    """Of those, how many are generated ones once available (Self-Instruct: 2)."""
    alpaca_demonstrations: int = 3
    """Seed tasks shown per Alpaca prompt (Alpaca: 3)."""
    alpaca_tasks_per_prompt: int = 20
    """Length of the task list the Alpaca prompt asks for (Alpaca: 20)."""
    max_new_tokens: int = 256
    """Token budget of one instruction-list completion."""
    instance_max_new_tokens: int = 256
    """Token budget of one instance completion (Self-Instruct: 300-350)."""
    max_instances: int = 5
    """Instances kept per task at most (Self-Instruct: 5)."""
    temperature: float = 0.7
    """Sampling temperature of instruction generation (Self-Instruct: 0.7, Alpaca: 1.0)."""
    top_p: float = 0.9
    """Nucleus sampling of instruction generation (Self-Instruct: 0.5, Alpaca: 1.0)."""
    instance_greedy: bool = True
    """Greedy instances, as Self-Instruct's temperature 0 (else sampled with `temperature`/`top_p`)."""
    instance_stop_strings: list[str] = field(default_factory=lambda: ["Task:"])
    """Strings that end an instance completion ("Example N+1" is added); "\n\n" suits small models."""
    max_rounds: int = 0
    """Stop after this many rounds even if num_instructions is not reached; 0 = no limit."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from nonnegative(self, "num_instructions", "seed", "max_rounds")
        yield from positive_ints(self, "prompts_per_round", "batch_size", "num_demonstrations", "alpaca_demonstrations",
                                 "alpaca_tasks_per_prompt", "max_new_tokens", "instance_max_new_tokens", "max_instances")
        if not 0 <= self.machine_demonstrations <= self.num_demonstrations:
            yield "machine_demonstrations", f"must be in [0, num_demonstrations], got {self.machine_demonstrations}"
        yield from positive(self, "temperature")
        if not 0 < self.top_p <= 1:
            yield "top_p", f"must be in (0, 1], got {self.top_p}"


@dataclass
class FilterSection:
    min_words: int = 3
    """Instructions of this many words or fewer are rejected as too short (upstream: 3)."""
    max_words: int = 150
    """Instructions of more words are rejected as too long (upstream: 150)."""
    max_similarity: float = 0.7
    """Reject an instruction whose ROUGE-L F1 with any pool instruction is above this (upstream: 0.7)."""
    blacklist: list[str] = field(default_factory=lambda: list(SELF_INSTRUCT_BLACKLIST))
    """Whole words (case-insensitive) that reject an instruction: tasks a text model cannot do."""
    capitalize: bool = True
    """Pass instructions through str.capitalize() as Self-Instruct does (lower-cases all but the first letter)."""

    def check(self) -> Iterator[tuple[str, str]]:
        if self.min_words < 0 or self.max_words <= self.min_words:
            yield "max_words", f"need 0 <= min_words < max_words, got {self.min_words} and {self.max_words}"
        if not 0 < self.max_similarity <= 1:
            yield "max_similarity", f"must be in (0, 1], got {self.max_similarity}"


@dataclass
class DifficultySection:
    enabled: bool = False
    """Score every example by instruction-following difficulty (IFD) and drop the quantiles below."""
    drop_easiest: float = 0.0
    """Fraction of examples with the lowest IFD (the instruction makes the answer easy) left out of alpaca.json."""
    drop_hardest: float = 0.0
    """Fraction of examples with the highest IFD (the instruction barely helps) left out of alpaca.json."""
    max_ifd: float = 1.0
    """Examples with IFD at or above this are dropped first (the prompt makes the answer less likely); 0 = off."""
    batch_size: int = 4
    """Sequences per scoring forward pass."""
    max_length: int = 512
    """Longest prompt + answer in tokens; longer examples get no score and are dropped."""

    def check(self) -> Iterator[tuple[str, str]]:
        for name in ("drop_easiest", "drop_hardest"):
            if not 0 <= getattr(self, name) < 1:
                yield name, f"must be in [0, 1), got {getattr(self, name)}"
        if self.drop_easiest + self.drop_hardest >= 1:
            yield "drop_hardest", "drop_easiest + drop_hardest must stay below 1"
        if self.max_ifd < 0:
            yield "max_ifd", f"must be >= 0 (0 = off), got {self.max_ifd}"
        if self.batch_size < 1 or self.max_length < 2:
            yield "batch_size", "batch_size must be >= 1 and max_length >= 2"


@dataclass
class GenOutputSection(OutputSection):
    dir: str = "runs/self_instruct"
    """Run directory: instructions.jsonl, alpaca.json, report.json (re-running the same directory resumes)."""
    include_seeds: bool = False
    """Also put the seed tasks' instances into alpaca.json (Self-Instruct's --include_seed_tasks)."""


@dataclass
class SelfInstructRecipe(Recipe):
    """Self-Instruct / Alpaca-style instruction generation with a local model."""

    KIND: typing.ClassVar[str] = "self-instruct"
    kind: str = "self-instruct"
    """Which recipe schema this file follows."""
    model: GenModelSection = field(default_factory=GenModelSection)
    """The model that writes the data."""
    data: GenDataSection = field(default_factory=GenDataSection)
    """The seed tasks."""
    generate: GenerateSection = field(default_factory=GenerateSection)
    """Prompting and decoding."""
    filter: FilterSection = field(default_factory=FilterSection)
    """Which instructions are kept."""
    difficulty: DifficultySection = field(default_factory=DifficultySection)
    """Instruction-following-difficulty selection of the final examples."""
    output: GenOutputSection = field(default_factory=GenOutputSection)
    """Where the data goes."""


@dataclass
class EvolveSection:
    rounds: int = 2
    """Evolution epochs: each one evolves every instruction of the previous epoch once (WizardLM: 4)."""
    operations: list[str] = field(default_factory=lambda: ["constraints", "deepen", "concretize", "reasoning",
                                                           "complicate_input", "breadth"])
    """Operations drawn with equal probability per instruction (five in-depth ones and "breadth")."""
    input_formats: list[str] = field(default_factory=lambda: ["a short Python function", "a JSON object",
                                                              "a small Markdown table", "an SQL query",
                                                              "a few lines of CSV"])
    """Kinds of data the complicate_input operation may add to an instruction."""
    max_new_tokens: int = 128
    """Token budget of one evolved instruction."""
    response_max_new_tokens: int = 256
    """Token budget of one answer."""
    temperature: float = 0.7
    """Sampling temperature of evolution and answers (WizardLM: 1.0)."""
    top_p: float = 0.9
    """Nucleus sampling of evolution and answers (WizardLM: 0.9 in the paper, 0.95 in its code)."""
    min_change: float = 0.9
    """An evolved instruction whose ROUGE-L F1 with the original is at or above this counts as unchanged."""
    judge_equal: bool = False
    """Also ask the model whether the two instructions are equal (WizardLM's elimination judge)."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from positive_ints(self, "rounds")
        if not self.operations:
            yield "operations", f"name at least one of: {', '.join(OPERATIONS)}"
        for op in self.operations:
            if op not in OPERATIONS:
                yield "operations", f"{op!r} is not an operation; choose from: {', '.join(OPERATIONS)}"
        if "complicate_input" in self.operations and not self.input_formats:
            yield "input_formats", "complicate_input needs at least one format"
        if self.max_new_tokens < 1 or self.response_max_new_tokens < 1:
            yield "max_new_tokens", "token budgets must be positive"
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            yield "temperature", "temperature must be positive and top_p in (0, 1]"
        if not 0 < self.min_change <= 1:
            yield "min_change", f"must be in (0, 1], got {self.min_change}"


@dataclass
class EvolOutputSection(GenOutputSection):
    dir: str = "runs/evol_instruct"
    """Run directory: instructions.jsonl, alpaca.json, report.json (re-running the same directory resumes)."""


@dataclass
class EvolInstructRecipe(Recipe):
    """Evol-Instruct: rewrite instructions into harder (in-depth) or new rarer (in-breadth) ones, and answer them."""

    KIND: typing.ClassVar[str] = "evol-instruct"
    kind: str = "evol-instruct"
    """Which recipe schema this file follows."""
    model: GenModelSection = field(default_factory=GenModelSection)
    """The model that writes the data."""
    data: GenDataSection = field(default_factory=GenDataSection)
    """The starting instructions."""
    generate: GenerateSection = field(default_factory=GenerateSection)
    """Shared decoding settings (seed, batch size, chat, num_instructions)."""
    evolve: EvolveSection = field(default_factory=EvolveSection)
    """The evolution operations and their elimination rules."""
    difficulty: DifficultySection = field(default_factory=DifficultySection)
    """Instruction-following-difficulty selection of the final examples."""
    output: EvolOutputSection = field(default_factory=EvolOutputSection)
    """Where the data goes."""


