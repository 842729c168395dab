"""The GRPO recipe: critic-free RL (GRPO, Dr. GRPO, RLOO, DAPO's fixes) on one 4-bit base.

qtune/recipe/load.py lists its kind ("grpo") in the one table of recipe kinds.
"""

import re
import typing
from dataclasses import dataclass, field
from typing import Iterator, Literal

from qtune.recipe.align import PromptDataSection
from qtune.recipe.schema import nonnegative, positive, positive_ints
from qtune.recipe.sections import EvalSection, LoRASection, OutputSection, TrainRecipe

BUILTIN_REWARDS = ("answer", "format", "length")


@dataclass
class RewardSpec:
    """One reward of a GRPO recipe; the reward of a response is Σ weight · reward."""

    fn: str = ""
    """"module:function" called as f(prompt, response, record) -> float, or a built-in: "answer" (1 when the answer taken out by `extract` equals the record's "answer"), "format" (1 when `pattern` matches the whole response), "length" (−response tokens / grpo.max_new_tokens); set this or `model`."""
    weight: float = 1.0
    """Weight of this reward in the sum (negative weights penalise)."""
    model: str = ""
    """A reward model's adapter directory (what `qtune reward` writes to output.dir/adapter), scored on the shared base, instead of fn."""
    extract: Literal["last_number", "boxed", "answer_tag"] = "last_number"
    """For fn = "answer": the answer is the last number, the last \\boxed{...}, or the last <answer>...</answer>."""
    pattern: str = ""
    """For fn = "format": a Python regular expression the whole (stripped) response must match."""
    batched: bool = False
    """For a "module:function" fn: call it once per rollout batch as f(prompts, responses, records) -> list of floats, one per response."""

    def check(self) -> Iterator[tuple[str, str]]:
        if bool(self.fn) == bool(self.model):
            yield "fn", ("set exactly one of fn (\"module:function\" or a built-in: " + ", ".join(BUILTIN_REWARDS)
                         + ") and model (a reward adapter directory written by `qtune reward`)")
        if self.fn and self.fn not in BUILTIN_REWARDS and self.fn.count(":") != 1:
            yield "fn", (f"{self.fn!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor \"module:function\" "
                         "(e.g. \"qtune.align.reward_functions:arithmetic\")")
        if self.fn == "format":
            try:
                re.compile(self.pattern)
            except re.error as e:
                yield "pattern", f"{self.pattern!r} is not a regular expression: {e}"
            if not self.pattern:
                yield "pattern", "fn = \"format\" needs a pattern (e.g. \"<answer>.*</answer>\")"
        if self.batched and (not self.fn or self.fn in BUILTIN_REWARDS):
            yield "batched", "only a \"module:function\" fn can be batched"


@dataclass
class GRPOSection:
    group_size: int = 8
    """G, responses sampled per prompt; each one's advantage compares its reward with the rest of its group."""
    rollout_batch_size: int = 64
    """Responses sampled per step (rollout_batch_size / group_size prompts); train.max_steps counts steps."""
    num_iterations: int = 1
    """Passes of policy updates over each rollout batch (μ of GRPO); the first pass starts at ratio 1."""
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """grpo: (r − group mean) / group std; dr_grpo: r − group mean, and losses summed over tokens / (responses × max_new_tokens) with no length normalisation; rloo: r − mean of the other G − 1."""
    clip_low: float = 0.2
    """ε_low: the ratio counts down to 1 − ε_low."""
    clip_high: float = 0.28
    """ε_high: the ratio counts up to 1 + ε_high (DAPO's clip-higher; = clip_low is PPO's symmetric clip)."""
    beta: float = 0.04
    """Weight of the k3 KL estimate to the reference (the base with adapters off); 0 skips the reference pass entirely."""
    loss_normalization: Literal["token", "sequence"] = "token"
    """token: every response token weighs the same (DAPO); sequence: each response's token mean, averaged (GRPO). Not used by dr_grpo."""
    max_new_tokens: int = 64
    """Longest sampled response in tokens (L_max of the overlong shaping)."""
    temperature: float = 1.0
    """Sampling temperature; the log-probabilities come from the same tempered distribution."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p; 1 = off."""
    stop_strings: list[str] = field(default_factory=list)
    """A response ends at the first of these strings (kept in its tokens, cut from the text rewards see)."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(fn="answer")])
    """The rewards, as [[grpo.rewards]] tables; each one is logged on its own (reward_<i>_<fn>)."""
    accuracy_reward: int = 0
    """Index in `rewards` of the pass/fail reward whose mean on held-out greedy responses is the accuracy."""
    dynamic_sampling: bool = True
    """Drop groups whose rewards are all equal (no signal) before the update, and count them (DAPO)."""
    overlong_buffer: int = 0
    """DAPO's soft overlong punishment: responses longer than max_new_tokens − overlong_buffer lose up to overlong_penalty linearly; 0 = off."""
    overlong_penalty: float = 1.0
    """Weight of the overlong punishment (−1 at max_new_tokens before weighting)."""
    generation_batch_size: int = 64
    """Sequences decoded together while sampling."""
    nf4_cpu_kernel: Literal["dense", "bitsandbytes"] = "dense"
    """Sampling from the NF4 base on a CPU: exact fp32 copies, or bitsandbytes' 4-bit kernel (bf16 products, faster; only where a check on this CPU finds it matches)."""

    def check(self) -> Iterator[tuple[str, str]]:
        if self.group_size < 2:
            yield "group_size", f"must be >= 2 (a group compares its responses with each other), got {self.group_size}"
        yield from positive_ints(self, "rollout_batch_size", "num_iterations", "max_new_tokens",
                                 "generation_batch_size")
        if self.rollout_batch_size % self.group_size:
            yield "rollout_batch_size", (f"{self.rollout_batch_size} does not hold whole groups of group_size = "
                                         f"{self.group_size}; make it a multiple of it")
        yield from positive(self, "temperature")
        yield from nonnegative(self, "clip_low", "clip_high", "beta", "overlong_buffer", "overlong_penalty")
        if self.clip_low >= 1:
            yield "clip_low", f"must be < 1 (the ratio's lower bound is 1 − clip_low), got {self.clip_low}"
        if not 0 < self.top_p <= 1:
            yield "top_p", f"must be in (0, 1], got {self.top_p}"
        if self.overlong_buffer >= self.max_new_tokens:
            yield "overlong_buffer", f"must be below max_new_tokens = {self.max_new_tokens}, got {self.overlong_buffer}"
        if not self.rewards:
            yield "rewards", "no rewards: add at least one [[grpo.rewards]] table"
        if not 0 <= self.accuracy_reward < max(len(self.rewards), 1):
            yield "accuracy_reward", f"must index grpo.rewards (0 .. {len(self.rewards) - 1}), got {self.accuracy_reward}"
        if any(not s for s in self.stop_strings):
            yield "stop_strings", "an empty stop string would end every response at once"


@dataclass
class GRPORecipe(TrainRecipe):
    """GRPO on one 4-bit base: a policy adapter, rewards (functions or reward adapters), the reference = adapters off."""

    KIND: typing.ClassVar[str] = "grpo"
    kind: str = "grpo"
    """Which recipe schema this file follows (e.g. "sft")."""
    lora: LoRASection = field(default_factory=lambda: LoRASection(r=16, alpha=32.0, dropout=0.0))
    """The policy adapter. Dropout makes the policy differ from the one that sampled, so the first ratio is not 1."""
    data: PromptDataSection = field(default_factory=PromptDataSection)
    """The prompts; held-out ones (val_size / val_fraction) are answered greedily for the accuracy."""
    grpo: GRPOSection = field(default_factory=GRPOSection)
    """Rollouts, rewards, advantages and the clipped update."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Held-out greedy accuracy every eval.every steps (0: before and after training only)."""
    output: OutputSection = field(default_factory=lambda: OutputSection(dir="runs/grpo"))
    """Where results go: the policy adapter to output.dir/adapter/, reward_curve.png beside it."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        if self.peft.method != "lora":
            yield "peft.method", (f"GRPO trains LoRA adapters (its policy is switched with the others on one base); "
                                  f"{self.peft.method!r} is for sft, dpo and reward: set method = \"lora\"")
        minibatch = self.train.micro_batch_size * self.train.grad_accum_steps
        if self.grpo.rollout_batch_size % minibatch:
            yield "grpo.rollout_batch_size", (f"{self.grpo.rollout_batch_size} is not a multiple of the minibatch "
                                              f"train.micro_batch_size * train.grad_accum_steps = {minibatch}")
        if self.grpo.accuracy_reward < len(self.grpo.rewards) and self.grpo.rewards[self.grpo.accuracy_reward].model:
            yield "grpo.accuracy_reward", "the accuracy needs a pass/fail reward function, not a reward model"
