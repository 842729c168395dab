"""The sections every recipe shares and the SFT recipe."""

import typing
from dataclasses import dataclass, field
from typing import Iterator, Literal

from qtune.recipe.peft import PeftSection
from qtune.recipe.schema import nonnegative, positive, positive_ints

# The linear layers of a Llama-family decoder block, by their Hugging Face names.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "qkv_proj", "gate_up_proj",  # Phi-3's fused projections
                "w1", "w2", "w3")  # Mixtral's experts (gate, down, up)


# ----------------------------------------------------------------------------- sections

@dataclass
class ModelSection:
    path: str = "smollm2-135m"
    """A Hugging Face model directory, or an alias that qtune can resolve (e.g. "smollm2-135m")."""
    quantize: Literal["nf4", "none"] = "nf4"
    """Frozen base weights: "nf4" stores them as QLoRA's 4-bit NormalFloat, "none" keeps them in `dtype`."""
    double_quant: bool = True
    """Quantize the NF4 block scales again (QLoRA's double quantization, about 0.37 bit per parameter saved)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype; "auto" is bfloat16 on CUDA and float32 on CPU."""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """Triton kernels or the plain-torch reference ops; "auto" uses Triton on CUDA tensors."""
    gradient_checkpointing: bool = True
    """Recompute each layer's activations during the backward pass instead of storing them (less memory)."""

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.path:
            yield "path", "must name a model directory or alias"


@dataclass
class LoRASection:
    r: int = 64
    """Rank of the low-rank update B @ A added to each target layer."""
    alpha: float = 16.0
    """Update scale numerator: scale = alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.1
    """Dropout on the adapter's input (QLoRA: 0.1 up to 13B, 0.05 for 33B and 65B)."""
    target_modules: str | list[str] = "all-linear"
    """Layers that get adapters: "all-linear" or a list such as ["q_proj", "v_proj"]."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r."""
    b_lr_ratio: float = 1.0
    """LoRA+ (Hayou et al. 2024): B learns this many times faster than A (the paper suggests 16); 1 = plain."""
    init: Literal["default", "pissa", "loftq"] = "default"
    """Adapter init: "default" (B = 0), "pissa" (W's top singular parts; base = residual) or "loftq" (NF4 base only)."""
    loftq_iter: int = 1
    """LoftQ's alternating steps (init = "loftq")."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from positive_ints(self, "r", "loftq_iter")
        yield from positive(self, "b_lr_ratio")
        yield from positive(self, "alpha")
        if not 0 <= self.dropout < 1:
            yield "dropout", f"must be in [0, 1), got {self.dropout}"
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                yield "target_modules", (f"{self.target_modules!r} is not allowed; use \"all-linear\" or a list "
                                         f"of: {', '.join(LORA_TARGETS)}")
        elif not self.target_modules:
            yield "target_modules", "the list is empty; name at least one layer or use \"all-linear\""
        else:
            for name in self.target_modules:
                if name not in LORA_TARGETS:
                    yield "target_modules", f"{name!r} is not a layer name; choose from: {', '.join(LORA_TARGETS)}"


@dataclass
class DataSection:
    """Data settings every training recipe shares; algorithms subclass it for their formats."""

    path: str = ""
    """Training data: a .json / .jsonl / .parquet file, a directory, or a `datasets` name (e.g. "tatsu-lab/alpaca")."""
    split: str = "train"
    """Split to read when `path` is a directory or a `datasets` name."""
    max_seq_len: int = 512
    """Longest example in tokens; longer ones are cut at the end (and counted)."""
    val_fraction: float = 0.0
    """Fraction of the examples held out for validation."""
    val_size: int = 0
    """Number of examples held out for validation (use this or val_fraction)."""
    shuffle: bool = True
    """Reshuffle the training examples every epoch (seeded by train.seed)."""
    cache_dir: str = "~/.cache/qtune/data"
    """Where tokenized data is cached (keyed by file, tokenizer and settings); "" turns the cache off."""

    def check(self) -> Iterator[tuple[str, str]]:
        if self.max_seq_len < 2:
            yield "max_seq_len", f"must be at least 2 tokens, got {self.max_seq_len}"
        if not 0 <= self.val_fraction < 1:
            yield "val_fraction", f"must be in [0, 1), got {self.val_fraction}"
        yield from nonnegative(self, "val_size")
        if self.val_size > 0 and self.val_fraction > 0:
            yield "val_size", "set either val_size or val_fraction, not both"


SFT_FORMATS = ("auto", "alpaca", "chat", "sharegpt", "text")


@dataclass
class DataSource:
    """One dataset of a mixture (`[[data.sources]]`)."""

    path: str = ""
    """A .json / .jsonl / .parquet file, a directory, or a `datasets` name."""
    format: Literal["auto", "alpaca", "chat", "sharegpt", "text"] = "auto"
    """Record layout; "auto" detects it from the fields of the first record."""
    weight: float = 1.0
    """Mixing weight: the source's share is proportional to weight * min(examples, max_examples)."""
    max_examples: int = 0
    """Cap K of examples-proportional mixing (T5, FLAN): use at most this many examples; 0 = no cap."""
    split: str = "train"
    """Split to read when `path` is a directory or a `datasets` name."""

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.path:
            yield "path", "every source needs a path"
        yield from positive(self, "weight")
        if self.max_examples < 0:
            yield "max_examples", f"must be >= 0 (0 = no cap), got {self.max_examples}"


@dataclass
class SFTDataSection(DataSection):
    format: Literal["auto", "alpaca", "chat", "sharegpt", "text"] = "auto"
    """Record layout of `path`: alpaca (instruction/input/output), chat (messages), sharegpt (conversations), text."""
    train_on_input: bool = False
    """Also train on prompt / user / system tokens (by default only responses carry loss)."""
    packing: bool = False
    """Pack several examples into each max_seq_len row; attention never crosses example boundaries."""
    group_by_length: bool = True
    """Batch examples of similar length together (sorted within shuffled mega-batches) to waste less padding."""
    sources: list[DataSource] = field(default_factory=list)
    """A mixture of datasets as [[data.sources]] tables (instead of `path`)."""
    pretrain_path: str = ""
    """Plain text (records with a "text" field) mixed into training as a regulariser."""
    pretrain_fraction: float = 0.0
    """Share of the training examples that come from pretrain_path."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        if self.path and self.sources:
            yield "sources", "set either data.path or [[data.sources]], not both"
        if not self.path and not self.sources:
            yield "path", "no training data: set data.path or add [[data.sources]] tables"
        if not 0 <= self.pretrain_fraction < 1:
            yield "pretrain_fraction", f"must be in [0, 1), got {self.pretrain_fraction}"
        if self.pretrain_fraction > 0 and not self.pretrain_path:
            yield "pretrain_path", "pretrain_fraction > 0 needs a pretrain_path"
        if self.pretrain_path and self.pretrain_fraction == 0:
            yield "pretrain_fraction", "pretrain_path is set, so give it a pretrain_fraction in (0, 1)"

    def source_list(self) -> list[DataSource]:
        """The datasets to read: the `sources` mixture, or `path` as a single source."""
        if self.sources:
            return list(self.sources)
        return [DataSource(path=self.path, format=self.format, split=self.split)]


@dataclass
class TrainSection:
    max_steps: int = 0
    """Optimizer steps to run; 0 runs `epochs` full passes over the training data."""
    epochs: int = 1
    """Passes over the training data when max_steps is 0."""
    micro_batch_size: int = 4
    """Rows per forward/backward pass."""
    grad_accum_steps: int = 4
    """Micro-batches accumulated per optimizer step (batch size = micro_batch_size * grad_accum_steps)."""
    lr: float = 2e-4
    """Peak learning rate."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    warmup_steps: int = 0
    """Warmup length in steps; when > 0 it replaces warmup_ratio."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay on the adapter weights."""
    max_grad_norm: float = 0.3
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    router_aux_loss_coef: float = 0.0
    """`qtune sft` on a mixture of experts: weight of the router's load-balancing loss added to the loss (Mixtral trains with 0.02, Qwen3-MoE 0.001); 0 = off."""
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = "paged_adamw"
    """AdamW with 32-bit or 8-bit states; paged variants let the states spill to CPU memory under pressure."""
    seed: int = 0
    """Seed for adapter initialisation, data order and dropout."""
    log_every: int = 10
    """Log loss and learning rate every this many steps."""
    save_every: int = 0
    """Save a resumable checkpoint every this many steps; 0 saves only at the end."""
    collapse_steps: int = 50
    """Stop a collapsed run: gradient norm exactly 0 (or an SFT loss within collapse_tolerance of ln(vocab_size)) this many steps in a row; 0 = off."""
    collapse_tolerance: float = 1e-3
    """How close (in nats) an SFT loss must stay to ln(vocab_size), a uniform guess, to count towards collapse_steps."""
    log: list[Literal["jsonl", "tensorboard", "wandb"]] = field(default_factory=lambda: ["jsonl"])
    """Where metrics go: metrics.jsonl always, plus TensorBoard (output.dir/tensorboard/) and W&B (extras)."""
    offload_checkpoints: bool = False
    """With gradient checkpointing, keep each layer's saved input in pinned host memory (long sequences on one card)."""
    tiled_mlp: Literal["auto", "on", "off"] = "auto"
    """Run the feed-forward block over chunks of tokens: "auto" for micro-batches of more than 8192 tokens."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from nonnegative(self, "max_steps", "warmup_steps", "save_every", "seed", "collapse_steps",
                               "collapse_tolerance")
        yield from positive_ints(self, "epochs", "micro_batch_size", "grad_accum_steps", "log_every")
        yield from positive(self, "lr")
        if not 0 <= self.warmup_ratio < 1:
            yield "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"
        yield from nonnegative(self, "weight_decay", "router_aux_loss_coef")
        if self.max_grad_norm < 0:
            yield "max_grad_norm", f"must be >= 0 (0 = no clipping), got {self.max_grad_norm}"


@dataclass
class EvalSection:
    every: int = 0
    """Compute the validation loss every this many steps; 0 only at the end."""
    max_batches: int = 0
    """Validation micro-batches per evaluation; 0 uses the whole validation set."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from nonnegative(self, "every", "max_batches")


@dataclass
class SFTEvalSection(EvalSection):
    exact_match: int = 0
    """Held-out examples whose greedy completion must equal the reference response, scored before and after training; 0 = off."""
    max_new_tokens: int = 32
    """Longest completion generated for exact_match."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        if self.exact_match < 0:
            yield "exact_match", f"must be >= 0 (0 = off), got {self.exact_match}"
        yield from positive_ints(self, "max_new_tokens")


@dataclass
class OutputSection:
    dir: str = "runs/sft"
    """Run directory: the resolved recipe, logs, checkpoints and the final adapter are written here."""

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.dir:
            yield "dir", "must name a directory"


# ----------------------------------------------------------------------------- recipes

@dataclass
class Recipe:
    """Fields every recipe has. Subclasses set KIND and add their sections."""

    KIND: typing.ClassVar[str] = ""
    kind: str = ""
    """Which recipe schema this file follows (e.g. "sft")."""
    description: str = ""
    """One line shown by `qtune ls`."""
    model: ModelSection = field(default_factory=ModelSection)
    """The base model."""
    output: OutputSection = field(default_factory=OutputSection)
    """Where results go."""

    def check(self) -> Iterator[tuple[str, str]]:
        if self.kind != self.KIND:
            yield "kind", f"this is a {self.KIND!r} recipe schema but the file says kind = {self.kind!r}"


@dataclass
class TrainRecipe(Recipe):
    """A fine-tuning run: model, adapters, data, optimisation, evaluation, output."""

    peft: PeftSection = field(default_factory=PeftSection)
    """The parameter-efficient method (default LoRA, as [lora] describes)."""
    lora: LoRASection = field(default_factory=LoRASection)
    """The LoRA adapters."""
    data: DataSection = field(default_factory=DataSection)
    """The training data."""
    train: TrainSection = field(default_factory=TrainSection)
    """Optimisation."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Validation during training."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from super().check()
        if self.lora.init == "loftq" and self.model.quantize != "nf4" and self.peft.method in ("lora", "dora"):
            yield "lora.init", ('"loftq" alternates NF4 quantization with SVD steps, so it needs the 4-bit base '
                                '(model.quantize = "nf4"); on a 16-bit base use init = "pissa"')
        if self.peft.method == "p_tuning":
            yield from self.peft.p_tuning.check_data(self.data)
        if self.train.router_aux_loss_coef and self.KIND not in ("sft", "best_of_n"):  # best-of-n's stage 2 is SFT
            yield "train.router_aux_loss_coef", (f"the router's load-balancing loss is added to SFT only (`qtune sft`, "
                                                 f"best-of-n), not to a {self.KIND!r} run; set it to 0")


@dataclass
class SFTRecipe(TrainRecipe):
    """Supervised fine-tuning on instruction / chat / text data."""

    KIND: typing.ClassVar[str] = "sft"
    kind: str = "sft"
    """Which recipe schema this file follows (e.g. "sft")."""
    data: SFTDataSection = field(default_factory=SFTDataSection)
    """The training data."""
    eval: SFTEvalSection = field(default_factory=SFTEvalSection)
    """Validation during training, and the held-out exact match before and after."""
