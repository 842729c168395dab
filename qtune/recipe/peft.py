"""The `[peft]` section: which parameter-efficient method a training recipe uses, and each method's settings.

`method = "lora"` (the default) keeps today's meaning: the `[lora]` section describes the adapter. DoRA and
AdaLoRA are LoRA variants and read `[lora]` too (AdaLoRA's ranks come from `[peft.adalora]`); the others
have their own sub-table, `[peft.<method>]`. Defaults follow each method's paper.
"""

from dataclasses import dataclass, field
from typing import Iterator, Literal

from qtune.recipe.schema import positive, positive_ints

ANCHORS = ("start", "response")
"""P-tuning's anchors in a rendered example, in the order they occur: before everything; after the prompt."""

PEFT_METHODS = ("lora", "dora", "adalora", "ia3", "adapter", "prefix", "prompt", "p_tuning")


@dataclass
class IA3Section:
    target_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    """Layers rescaled by a learned vector (IA3, Liu et al. 2022): keys, values and the feed-forward block."""
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])
    """Of target_modules, those whose input (the feed-forward activation) is rescaled instead of their output."""

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.target_modules:
            yield "target_modules", "the list is empty; name at least one layer (e.g. [\"k_proj\", \"v_proj\"])"
        for name in self.feedforward_modules:
            if name not in self.target_modules:
                yield "feedforward_modules", f"{name!r} is not in target_modules {self.target_modules}"


@dataclass
class BottleneckSection:
    size: int = 64
    """Bottleneck width m of each adapter: down-projection D -> m, non-linearity, up-projection m -> D."""
    placement: Literal["serial", "parallel"] = "serial"
    """"serial" (after the block, with a residual; Houlsby et al. 2019) or "parallel" (beside it; He et al. 2022)."""
    after: Literal["both", "attention", "feed_forward"] = "both"
    """Which sub-blocks of each decoder layer get an adapter (Houlsby: both)."""
    activation: Literal["relu", "gelu", "silu"] = "relu"
    """The non-linearity between the two projections."""
    scale: float = 1.0
    """Factor on the adapter's output before it joins the residual stream."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from positive_ints(self, "size")
        yield from positive(self, "scale")


@dataclass
class PrefixSection:
    num_virtual_tokens: int = 20
    """Prefix length: trainable key/value positions added in front of every layer's attention (10-100)."""
    projection: bool = True
    """Train the prefix through Li & Liang's reparameterisation MLP (folded away when saved)."""
    encoder_hidden_size: int = 512
    """Hidden width of that MLP."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from positive_ints(self, "num_virtual_tokens", "encoder_hidden_size")


@dataclass
class PromptSection:
    num_virtual_tokens: int = 20
    """Trainable virtual-token embeddings prepended to the input (Lester et al. 2021)."""
    init_text: str = ""
    """Initialise them from the embeddings of this text's tokens (cut or repeated to length); empty: random N(0, 1)."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from positive_ints(self, "num_virtual_tokens")


def parse_placement(entries: list[str], n: int) -> tuple[tuple[str, int], ...]:
    """P-tuning's `placement` as ((anchor, count), ...) in the order the anchors occur, counts summing to n.

    One entry may name an anchor alone ("response": all n there); several each give a count ("start:4").
    Raises ValueError saying what is wrong.
    """
    if not entries:
        raise ValueError(f"the list is empty; give an anchor ({', '.join(map(repr, ANCHORS))}) or counts such as "
                         f"[\"start:{n // 2}\", \"response:{n - n // 2}\"]")
    counts: dict[str, int] = {}
    for entry in entries:
        anchor, sep, count = entry.partition(":")
        if anchor not in ANCHORS:
            raise ValueError(f"unknown anchor {anchor!r} in {entry!r}; anchors are {', '.join(map(repr, ANCHORS))}")
        if anchor in counts:
            raise ValueError(f"anchor {anchor!r} is given twice")
        if not sep and len(entries) == 1:
            counts[anchor] = n
        elif not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"{entry!r}: give each anchor a positive count when there are several, e.g. "
                             f"\"{anchor}:{max(1, n // 2)}\"")
        else:
            counts[anchor] = int(count)
    if sum(counts.values()) != n:
        raise ValueError(f"the counts {entries} sum to {sum(counts.values())}, not num_virtual_tokens = {n}")
    return tuple((a, counts[a]) for a in ANCHORS if a in counts)


@dataclass
class PTuningSection:
    num_virtual_tokens: int = 20
    """Virtual tokens produced by the prompt encoder (Liu et al. 2021), placed in the example as `placement` says."""
    encoder: Literal["mlp", "lstm"] = "mlp"
    """The prompt encoder: an MLP, or a bidirectional LSTM followed by an MLP."""
    encoder_hidden_size: int = 128
    """Hidden width of the prompt encoder."""
    placement: list[str] = field(default_factory=lambda: ["start"])
    """Virtual-token anchors: "start" (PEFT's), "response" (before the reply) or counts ["start:4", "response:16"]."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from positive_ints(self, "num_virtual_tokens", "encoder_hidden_size")
        try:
            parse_placement(self.placement, self.num_virtual_tokens)
        except ValueError as e:
            yield "placement", str(e)

    def check_data(self, data) -> Iterator[tuple[str, str]]:
        """Refuse the data settings a placement inside the example cannot train on: packed rows (each example
        would grow by its virtual tokens, past data.max_seq_len) and, for the "response" anchor, examples that
        train on their prompt too (the reply's start is the first trained token). Keys are the recipe's."""
        try:
            placement = parse_placement(self.placement, self.num_virtual_tokens)
        except ValueError:
            return  # check() reports it
        if placement[0] == ("start", self.num_virtual_tokens):
            return
        key = "peft.p_tuning.placement"
        if getattr(data, "packing", False):
            yield key, (f"{self.placement} puts virtual tokens inside each example, which packed rows cannot hold; set "
                        "data.packing = false or placement = [\"start\"]")
        if getattr(data, "train_on_input", False) and "response" in dict(placement):
            yield key, (f"{self.placement} puts tokens before the response, whose start data.train_on_input = true "
                        "hides (the prompt is trained too); set data.train_on_input = false or use \"start\" only")


@dataclass
class AdaLoRASection:
    init_r: int = 12
    """Initial rank of every adapted matrix (AdaLoRA, Zhang et al. 2023)."""
    target_r: int = 8
    """Average rank per matrix once the budget has been pruned."""
    tinit: int = 0
    """Steps of warm-up before any singular value is pruned."""
    tfinal: int = 0
    """Steps at the end with the final budget fixed."""
    delta_t: int = 1
    """Steps between two budget allocations."""
    beta1: float = 0.85
    """Smoothing of the importance scores (exponential moving average)."""
    beta2: float = 0.85
    """Smoothing of their uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regulariser on P and Q."""

    def check(self) -> Iterator[tuple[str, str]]:
        yield from positive_ints(self, "init_r", "target_r", "delta_t")
        if self.target_r > self.init_r:
            yield "target_r", f"must be <= init_r ({self.init_r}), got {self.target_r}"
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                yield name, f"must be in [0, 1), got {getattr(self, name)}"
        if self.tinit < 0 or self.tfinal < 0:
            yield "tinit", "tinit and tfinal must be >= 0"
        if self.orth_reg_weight < 0:
            yield "orth_reg_weight", f"must be >= 0, got {self.orth_reg_weight}"


@dataclass
class PeftSection:
    method: Literal["lora", "dora", "adalora", "ia3", "adapter", "prefix", "prompt", "p_tuning"] = "lora"
    """The parameter-efficient method ("lora" as [lora] says; "adapter" = bottleneck adapters)."""
    ia3: IA3Section = field(default_factory=IA3Section)
    """IA3's settings (method = "ia3")."""
    adapter: BottleneckSection = field(default_factory=BottleneckSection)
    """Bottleneck adapters' settings (method = "adapter")."""
    prefix: PrefixSection = field(default_factory=PrefixSection)
    """Prefix tuning's settings (method = "prefix")."""
    prompt: PromptSection = field(default_factory=PromptSection)
    """Prompt tuning's settings (method = "prompt")."""
    p_tuning: PTuningSection = field(default_factory=PTuningSection)
    """P-tuning's settings (method = "p_tuning")."""
    adalora: AdaLoRASection = field(default_factory=AdaLoRASection)
    """AdaLoRA's rank budget (method = "adalora"; the rest comes from [lora])."""

    def check(self) -> Iterator[tuple[str, str]]:
        return iter(())
