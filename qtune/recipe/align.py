"""Recipe schemas of the alignment loops: reward model, DPO, PPO and best-of-N.

Their sections build on the shared ones in qtune/recipe/sections.py; qtune/recipe/load.py lists their
kinds ("reward", "dpo", "ppo", "best_of_n") in the one table of recipe kinds.
"""

import typing
from dataclasses import dataclass, field
from typing import Iterator, Literal

from qtune.recipe.schema import nonnegative, positive, positive_ints
from qtune.recipe.sections import DataSection, LoRASection, OutputSection, TrainRecipe


@dataclass
class PrefDataSection(DataSection):
    """Preference data for reward models and DPO (layouts: see `qtune.data.prefs`)."""

    max_seq_len: int = 512
    """Longest prompt + response in tokens; a longer prompt loses its first tokens (down to half of this), then responses their last."""
    cache_dir: str = "~/.cache/qtune/data"
    """Where precomputed DPO reference log-probabilities are cached (keyed by data and model); "" turns the cache off."""
    format: Literal["auto", "pairs", "ranking", "sharegpt", "chat", "hh", "kto"] = "auto"
    """Record layout: pairs {prompt, chosen, rejected}, ranking {prompt, responses best first}, sharegpt / chat conversations with chosen and rejected, hh transcripts; kto {prompt, completion, label} for dpo.loss = "kto"."""
    bad_records: Literal["error", "skip"] = "error"
    """A record that cannot be used (missing field, empty or identical responses ...) stops loading, or is skipped and counted."""
    group_by_length: bool = True
    """Batch records of similar length together (sorted within shuffled mega-batches) to waste less padding."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        if not self.path:
            yield "path", "no preference data: set data.path to a .json / .jsonl file"


@dataclass
class RewardSection:
    loss: Literal["pairwise", "listwise", "mse"] = "pairwise"
    """pairwise: −log σ(r⁺ − r⁻ − margin) averaged over pairs; listwise: averaged within each ranking first (InstructGPT); mse: (r − score)² on the records' scores."""
    lm_loss_coef: float = 0.0
    """Weight of a language-modelling loss on the chosen response, added as a regulariser; 0 turns it off."""
    head_init: Literal["normal", "zero"] = "normal"
    """Initial head weights: normal N(0, 1/(D+1)) as OpenAI's reward models, or zero (every reward starts at 0)."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from nonnegative(self, "lm_loss_coef")


@dataclass
class DPOSection:
    beta: float = 0.1
    """Strength β: DPO's KL penalty towards the reference (IPO's τ); the reward scale of SimPO and CPO."""
    loss: Literal["sigmoid", "ipo", "robust", "simpo", "cpo", "orpo", "kto"] = "sigmoid"
    """sigmoid: DPO (cDPO with label_smoothing > 0); ipo: IPO; robust: rDPO; simpo, cpo, orpo: reference-free SimPO, CPO, ORPO; kto: KTO on unpaired records (data.format = "kto")."""
    label_smoothing: float = 0.0
    """Assumed fraction ε of flipped preference labels, for the sigmoid, robust, simpo and cpo losses; 0 <= ε < 0.5."""
    precompute_reference: bool = False
    """Compute the reference log-probabilities once before training and cache them (in data.cache_dir, keyed by data and model) instead of running the adapter-free model every step."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin γ (TRL's CPOConfig.simpo_gamma)."""
    cpo_alpha: float = 1.0
    """Weight α of CPO's behaviour-cloning NLL term on the chosen response (TRL's CPOConfig.cpo_alpha)."""
    orpo_lambda: float = 0.1
    """Weight λ of ORPO's odds-ratio term beside the chosen NLL (TRL's ORPOConfig.beta)."""
    kto_desirable_weight: float = 1.0
    """KTO's λ_D, the weight of desirable completions' losses (TRL's KTOConfig.desirable_weight)."""
    kto_undesirable_weight: float = 1.0
    """KTO's λ_U, the weight of undesirable completions' losses (TRL's KTOConfig.undesirable_weight)."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from positive(self, "beta", "orpo_lambda", "kto_desirable_weight", "kto_undesirable_weight")
        yield from nonnegative(self, "simpo_gamma", "cpo_alpha")
        if not 0 <= self.label_smoothing < 0.5:
            yield "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}"
        if self.loss in ("ipo", "orpo", "kto") and self.label_smoothing > 0:
            yield "label_smoothing", (f"{self.loss} has no label smoothing; set it to 0 or use loss = "
                                      "\"sigmoid\" / \"robust\" / \"simpo\" / \"cpo\"")
        if self.loss in ("simpo", "cpo", "orpo") and self.precompute_reference:
            yield "precompute_reference", f"{self.loss} uses no reference model, so there is nothing to precompute; set it to false"
        if self.loss == "kto" and self.precompute_reference:
            yield "precompute_reference", ("KTO's mismatched pairs change with every batch, so their reference "
                                           "log-probs cannot be cached; set it to false")


@dataclass
class RewardRecipe(TrainRecipe):
    """A reward model: the base plus a LoRA adapter plus a scalar head, trained on preferences."""

    KIND: typing.ClassVar[str] = "reward"
    kind: str = "reward"
    """Which recipe schema this file follows (e.g. "sft")."""
    data: PrefDataSection = field(default_factory=PrefDataSection)
    """The preference data; train.micro_batch_size counts records (a K-way ranking brings K sequences)."""
    reward: RewardSection = field(default_factory=RewardSection)
    """The reward model's loss."""
    output: OutputSection = field(default_factory=lambda: OutputSection(dir="runs/reward"))
    """Where results go; the adapter and the reward head are written to output.dir/adapter/."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        if self.data.format == "kto":
            yield "data.format", "a reward model trains on paired preferences; KTO's unpaired records are for `qtune dpo`"


@dataclass
class DPORecipe(TrainRecipe):
    """Direct preference optimisation of a LoRA adapter; the reference is the base with adapters disabled."""

    KIND: typing.ClassVar[str] = "dpo"
    kind: str = "dpo"
    """Which recipe schema this file follows (e.g. "sft")."""
    data: PrefDataSection = field(default_factory=PrefDataSection)
    """The preference data; train.micro_batch_size counts records (a K-way ranking brings K sequences)."""
    dpo: DPOSection = field(default_factory=DPOSection)
    """The DPO loss and its reference model."""
    output: OutputSection = field(default_factory=lambda: OutputSection(dir="runs/dpo"))
    """Where results go."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        kto_data, kto_loss = self.data.format == "kto", self.dpo.loss == "kto"
        if kto_data and not kto_loss:
            yield "data.format", f"KTO's unpaired records need dpo.loss = \"kto\", not {self.dpo.loss!r}"
        if kto_loss and self.data.format not in ("auto", "kto"):
            yield "data.format", (f"dpo.loss = \"kto\" reads unpaired {{prompt, completion, label}} records, not "
                                  f"{self.data.format!r} ones; set data.format = \"kto\" (or \"auto\")")
        if kto_loss and self.train.micro_batch_size < 2:
            yield "train.micro_batch_size", ("KTO estimates its reference point from each record's prompt paired "
                                             "with another record's completion, so it needs >= 2 records per micro-batch")


# ----------------------------------------------------------------------------- PPO and best-of-N recipes

@dataclass
class PromptDataSection(DataSection):
    """Prompts that responses are sampled for (PPO rollouts, best-of-N); layouts: see `qtune.data.prompts`."""

    format: Literal["auto", "prompt", "alpaca", "chat", "sharegpt", "hh"] = "auto"
    """Record layout: prompt {"prompt": text or chat messages}, alpaca (instruction, input), chat / sharegpt (the conversation up to its last user turn), hh (a transcript up to its last "\\n\\nAssistant:"); a record's other fields (e.g. "answer") reach reward functions."""
    chat: bool = True
    """Render text prompts (prompt, alpaca) as a user turn with the model's chat template; false feeds the text as it is (hh transcripts always are)."""
    max_seq_len: int = 256
    """Longest prompt in tokens (a longer one keeps its last tokens); also the row length of PPO-ptx text."""
    pretrain_path: str = ""
    """Plain text (records with a "text" field) for PPO-ptx's language-modelling term, weighted by ppo.ptx_coef."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        if not self.path:
            yield "path", "no prompts: set data.path to a .json / .jsonl file of prompt records"


def _check_reward_source(section) -> Iterator[tuple[str, str]]:
    if bool(section.reward_model) == bool(section.reward_fn):
        yield "reward_model", ("set exactly one of reward_model (an adapter directory written by `qtune reward`) "
                               "and reward_fn (\"module:function\", e.g. \"qtune.align.reward_functions:arithmetic\")")
    if section.reward_fn and section.reward_fn.count(":") != 1:
        yield "reward_fn", f"{section.reward_fn!r} must look like \"module:function\" (e.g. \"qtune.align.reward_functions:arithmetic\")"


@dataclass
class PPOSection:
    reward_model: str = ""
    """A reward model's adapter directory (what `qtune reward` writes to output.dir/adapter): it joins the base as the frozen "reward" role."""
    reward_fn: str = ""
    """Instead of a reward model, a Python function "module:function" called as f(prompt, response, record) -> float (e.g. "qtune.align.reward_functions:arithmetic")."""
    init_value_from_reward: bool = True
    """Start the value adapter and head as copies of the reward model's (InstructGPT); false, or a reward function, starts them fresh."""
    rollout_batch_size: int = 16
    """Prompts per PPO iteration, one sampled response each; train.max_steps counts iterations."""
    max_new_tokens: int = 64
    """Longest sampled response in tokens."""
    temperature: float = 1.0
    """Sampling temperature; the log-probabilities PPO uses come from the same tempered distribution."""
    ppo_epochs: int = 4
    """Passes over each rollout batch, in minibatches of train.micro_batch_size * train.grad_accum_steps responses."""
    clip_range: float = 0.2
    """ε of the clipped policy objective: the probability ratio counts only within [1 - ε, 1 + ε]."""
    clip_range_value: float = 0.2
    """ε_v of the clipped value loss: a value moves at most this far from its rollout value."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount γ of the per-token rewards."""
    lam: float = 0.95
    """λ of generalised advantage estimation (1 = Monte-Carlo returns, 0 = one-step TD)."""
    kl_coef: float = 0.05
    """Initial β of the per-token KL penalty against the reference (the base with adapters off)."""
    adaptive_kl: bool = True
    """Steer β towards kl_target (Ziegler et al. 2019); false keeps β = kl_coef."""
    kl_target: float = 6.0
    """Target KL (nats per response) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in responses: β's gain per batch is rollout_batch_size / kl_horizon."""
    whiten_advantages: bool = True
    """Normalise the advantages of each rollout batch to mean 0 and variance 1."""
    score_clip: float = 0.0
    """Clip scores to [-score_clip, score_clip] before they enter the rewards; 0 = no clipping."""
    ptx_coef: float = 0.0
    """PPO-ptx (InstructGPT): weight γ of the language-modelling loss on data.pretrain_path text; 0 = off."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from _check_reward_source(self)
        yield from positive_ints(self, "rollout_batch_size", "max_new_tokens", "ppo_epochs", "kl_horizon")
        yield from positive(self, "temperature", "clip_range", "clip_range_value", "kl_coef", "kl_target")
        yield from nonnegative(self, "vf_coef", "score_clip", "ptx_coef")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                yield name, f"must be in [0, 1], got {getattr(self, name)}"


@dataclass
class PPORecipe(TrainRecipe):
    """PPO on one 4-bit base: policy, value (+ head) and reward (+ head) adapters; the reference is the base itself."""

    KIND: typing.ClassVar[str] = "ppo"
    kind: str = "ppo"
    """Which recipe schema this file follows (e.g. "sft")."""
    lora: LoRASection = field(default_factory=lambda: LoRASection(r=16, alpha=32.0, dropout=0.0))
    """The policy adapter (and a fresh value adapter). Dropout makes the policy differ from the one that sampled."""
    data: PromptDataSection = field(default_factory=PromptDataSection)
    """The prompts; held-out ones (val_size / val_fraction) are answered greedily and scored at each evaluation."""
    ppo: PPOSection = field(default_factory=PPOSection)
    """Rollouts, rewards and the PPO update."""
    output: OutputSection = field(default_factory=lambda: OutputSection(dir="runs/ppo"))
    """Where results go: the policy adapter to output.dir/adapter/, the value adapter and head to output.dir/value/."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        if self.peft.method != "lora":
            yield "peft.method", (f"PPO trains LoRA adapters (its policy is switched with the others on one base); "
                                  f"{self.peft.method!r} is for sft, dpo and reward: set method = \"lora\"")
        minibatch = self.train.micro_batch_size * self.train.grad_accum_steps
        if self.ppo.rollout_batch_size % minibatch:
            yield "ppo.rollout_batch_size", (f"{self.ppo.rollout_batch_size} is not a multiple of the minibatch "
                                             f"train.micro_batch_size * train.grad_accum_steps = {minibatch}")
        if self.ppo.ptx_coef > 0 and not self.data.pretrain_path:
            yield "data.pretrain_path", "ppo.ptx_coef > 0 needs plain text in data.pretrain_path"


@dataclass
class BestOfNSection:
    reward_model: str = ""
    """A reward model's adapter directory (what `qtune reward` writes to output.dir/adapter)."""
    reward_fn: str = ""
    """Instead of a reward model, a Python function "module:function" called as f(prompt, response, record) -> float."""
    n: int = 8
    """Responses sampled per prompt; the best-scoring one is kept."""
    num_prompts: int = 0
    """Prompts to sample for, the first ones of the training split; 0 = all."""
    max_new_tokens: int = 128
    """Longest sampled response in tokens."""
    temperature: float = 1.0
    """Sampling temperature (higher: more varied candidates to choose from)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p; 1 = off."""
    sample_batch_size: int = 16
    """Sequences decoded together while sampling."""
    min_score: float = float("-inf")
    """Keep a prompt only when its best response scores at least this (e.g. 1 with a pass/fail check); -inf keeps all."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from _check_reward_source(self)
        yield from positive_ints(self, "n", "max_new_tokens", "sample_batch_size")
        if self.num_prompts < 0:
            yield "num_prompts", f"must be >= 0 (0 = all), got {self.num_prompts}"
        yield from positive(self, "temperature")
        if not 0 < self.top_p <= 1:
            yield "top_p", f"must be in (0, 1], got {self.top_p}"


@dataclass
class BestOfNRecipe(TrainRecipe):
    """Rejection-sampling fine-tuning: sample n responses per prompt, keep the best-scoring, train on them with SFT."""

    KIND: typing.ClassVar[str] = "best_of_n"
    kind: str = "best_of_n"
    """Which recipe schema this file follows (e.g. "sft")."""
    data: PromptDataSection = field(default_factory=PromptDataSection)
    """The prompts; val_size / val_fraction hold out that share of the kept samples for the SFT validation loss."""
    best_of_n: BestOfNSection = field(default_factory=BestOfNSection)
    """Sampling and scoring."""
    output: OutputSection = field(default_factory=lambda: OutputSection(dir="runs/best-of-n"))
    """Where results go: samples.jsonl, best.jsonl, and the SFT run in output.dir/sft/."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        if not self.data.chat:
            yield "data.chat", ("best-of-n fine-tunes on chat records (prompt turns + the kept reply), so prompts must "
                                "use the chat template: set data.chat = true")
        if self.data.format == "hh":
            yield "data.format", "hh transcripts are raw text; best-of-n needs chat prompts (prompt, alpaca, chat, sharegpt)"


