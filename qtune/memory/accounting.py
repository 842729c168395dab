"""Bytes that training keeps in memory, by the formula: parameters, NF4 storage, adapters, optimizer state.

Three regimes, per base parameter (Dettmers et al. 2023, QLoRA, section 2; Rajbhandari et al. 2020, ZeRO,
section 3.1 for the 16 bytes of mixed-precision Adam):

    full    bf16 weights 2 + bf16 gradients 2 + fp32 master weights 4 + Adam m 4 + Adam v 4   = 16 B
    lora16  bf16 weights 2                        + adapters (fp32 A, B, their gradients, Adam m, v)
    qlora   NF4 codes 0.5 + block constants       + adapters (the same)

The adapters cost 16 bytes per *trainable* parameter with 32-bit AdamW (4 weight + 4 gradient + 8 state)
and about 10 with an 8-bit optimizer (2 bytes of state plus one fp32 scale per 256-value block per moment).
NF4 storage (QLoRA appendix, bitsandbytes' layout): codes n/2 bytes; double quantization keeps one uint8
absmax per 64-value block, one fp32 scale per 256 blocks, a 256-entry fp32 code and an fp32 offset (about
0.127 bit per parameter of constants, instead of 0.5 bit with fp32 absmax).

Layers kept in 16 bits under QLoRA (embeddings, lm_head, norms, a mixture of experts' router) are counted as
weights in the compute dtype. A mixture of experts keeps every expert resident (each MLP name below stands
for `num_experts` copies of the expert's shape) while each token runs only its top-k of them; "all-linear"
adapts attention only there, and experts get adapters when the targets name gate/up/down_proj.
"""

import math
from dataclasses import dataclass, fields

from qtune.config import ModelConfig

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_NAMES = LINEAR_NAMES[:4]
# Other families' names for these projections: Phi-3's fused ones, Mixtral's experts.
FUSED_NAMES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
               "w1": ("gate_proj",), "w3": ("up_proj",), "w2": ("down_proj",)}
REGIMES = ("full", "lora16", "qlora")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear layer of one decoder layer (of one expert, for the MLP
    of a mixture of experts), by its Hugging Face name."""
    D, I = cfg.hidden_size, cfg.moe_intermediate_size or cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": (q, D), "k_proj": (kv, D), "v_proj": (kv, D), "o_proj": (D, q),
            "gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a Llama-family model, split by how QLoRA stores them."""

    linear: int  # weights of the decoder layers' linear layers: quantized under QLoRA
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    other: int  # norms and biases, kept in the compute dtype

    @property
    def total(self) -> int:
        return self.linear + self.embedding + self.lm_head + self.other


def copies(cfg: ModelConfig, name: str) -> int:
    """How many of linear `name` one layer holds: `num_experts` for an expert's MLP projection, else 1."""
    return cfg.num_experts if cfg.num_experts and name not in ATTENTION_NAMES else 1


def param_counts(cfg: ModelConfig) -> ParamCounts:
    shapes = linear_shapes(cfg)
    per_layer = sum(copies(cfg, n) * o * i for n, (o, i) in shapes.items())
    bias = 0
    if cfg.qkv_bias:
        bias += sum(shapes[n][0] for n in ("q_proj", "k_proj", "v_proj"))
    if cfg.o_bias:
        bias += shapes["o_proj"][0]
    L, D, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    norms = L * (4 if cfg.gemma_norms else 2) * D + D  # two RMSNorms per layer (Gemma: four) and the final one
    norms += L * 2 * cfg.head_dim if cfg.qk_norm else 0
    router = L * D * cfg.num_experts
    return ParamCounts(linear=L * per_layer, embedding=V * D, lm_head=0 if cfg.tie_word_embeddings else V * D,
                       other=norms + L * bias + router)


def target_names(targets, moe: bool = False) -> tuple[str, ...]:
    """The linear kinds a LoRA `target_modules` setting adapts ("all-linear" or a list of names); "all-linear"
    on a mixture of experts (`moe`) is the attention projections."""
    if targets == "all-linear":
        return ATTENTION_NAMES if moe else LINEAR_NAMES
    # Phi-3's fused projections count as the projections they stack (one adapter each there, so its A
    # matrices are counted two or three times: a slight over-estimate); Mixtral's w1/w3/w2 as gate/up/down
    targets = [part for t in targets for part in FUSED_NAMES.get(t, (t,))]
    unknown = [t for t in targets if t not in LINEAR_NAMES]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not linear layers of a Llama block ({', '.join(LINEAR_NAMES)})")
    return tuple(t for t in LINEAR_NAMES if t in targets)


def adapter_numels(cfg: ModelConfig, r: int, targets="all-linear", method: str = "lora",
                   peft=None) -> list[tuple[int, int]]:
    """(elements, copies) of each trainable tensor of one decoder layer for a `[peft] method` (`peft`: the recipe's
    [peft] section, for the methods with settings of their own): LoRA's A (r, in) and B (out, r) on every targeted
    linear, plus DoRA's magnitude (out,), or AdaLoRA's E (r, 1) at rank init_r; IA3's one vector per targeted
    linear of `peft.ia3` (in wide on the feed-forward layers, out wide elsewhere); a bottleneck's down / up
    weights and biases per sub-block."""
    if method == "adapter":
        D, m = cfg.hidden_size, peft.adapter.size
        return [(n, 2 if peft.adapter.after == "both" else 1) for n in (m * D, m, D * m, D)]
    shapes = linear_shapes(cfg)
    if method == "ia3":
        ia3 = peft.ia3
        ff = set(target_names(ia3.feedforward_modules, bool(cfg.num_experts)))
        return [(shapes[n][1] if n in ff else shapes[n][0], copies(cfg, n))
                for n in target_names(ia3.target_modules, bool(cfg.num_experts))]
    extra = {"dora": lambda o: [(o, 1)], "adalora": lambda o: [(r, 1)]}.get(method, lambda o: [])
    out = []
    for name in target_names(targets, bool(cfg.num_experts)):
        (o, i), n = shapes[name], copies(cfg, name)
        out += [(r * i, n), (o * r, n)] + [(numel, n) for numel, _ in extra(o)]
    return out


def lora_param_count(cfg: ModelConfig, r: int, targets="all-linear", method: str = "lora", peft=None) -> int:
    """Trainable parameters of every layer's adapter tensors (`adapter_numels`)."""
    return cfg.num_hidden_layers * sum(numel * n for numel, n in adapter_numels(cfg, r, targets, method, peft))


def nf4_nbytes(numel: int, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> tuple[int, int]:
    """(packed code bytes, quantization-constant bytes) of one NF4 tensor as qtune.weights.nf4 stores it."""
    n_blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed, 4 * n_blocks
    # uint8 absmax codes + fp32 nested absmax + 256-entry fp32 code + fp32 offset
    return packed, n_blocks + 4 * math.ceil(n_blocks / nested_blocksize) + 256 * 4 + 4


def nf4_model_nbytes(cfg: ModelConfig, double_quant: bool = True) -> tuple[int, int]:
    """(codes, constants) over all quantized linears of the model."""
    codes = consts = 0
    for name, (o, i) in linear_shapes(cfg).items():
        c, k = nf4_nbytes(o * i, double_quant=double_quant)
        codes, consts = codes + copies(cfg, name) * c, consts + copies(cfg, name) * k
    return codes * cfg.num_hidden_layers, consts * cfg.num_hidden_layers


def adam_state_nbytes(numel: int, optimizer: str = "adamw") -> int:
    """Adam's two moments for one fp32 tensor: 8 B/param, or 8-bit moments with one fp32 scale per 256 values.

    bitsandbytes keeps tensors under 4096 values in 32 bits even with an 8-bit optimizer; a step counter
    is not counted.
    """
    if optimizer in ("adamw", "paged_adamw") or numel < 4096:
        return 8 * numel
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        return 2 * (numel + 4 * math.ceil(numel / 256))
    raise ValueError(f"optimizer {optimizer!r} is not one of adamw, adamw8bit, paged_adamw, paged_adamw8bit")


def lora_state_nbytes(cfg: ModelConfig, r: int, targets="all-linear", optimizer: str = "adamw", method: str = "lora",
                      peft=None) -> dict[str, int]:
    """fp32 adapter weights, their gradients and the optimizer state, in bytes (any method, `adapter_numels`)."""
    weights = grads = state = 0
    for numel, n in adapter_numels(cfg, r, targets, method, peft):
        weights, grads = weights + 4 * n * numel, grads + 4 * n * numel
        state += n * adam_state_nbytes(numel, optimizer)
    L = cfg.num_hidden_layers
    return {"adapter_weights": L * weights, "adapter_grads": L * grads, "optimizer_state": L * state}


VIRTUAL_METHODS = ("prompt", "p_tuning", "prefix")


def virtual_token_numels(cfg: ModelConfig, peft) -> list[int]:
    """Sizes of the tensors a prompt / P-tuning / prefix adapter trains (qtune/peft/prompt.py, prefix.py), from a
    recipe's [peft] section: the N virtual-token table and, while training, its encoder."""
    D, L = cfg.hidden_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    linear = lambda i, o: [o * i, o]  # noqa: E731  weight, bias
    if peft.method == "prompt":
        return [peft.prompt.num_virtual_tokens * D]
    if peft.method == "prefix":
        n, h = peft.prefix.num_virtual_tokens, peft.prefix.encoder_hidden_size
        if not peft.prefix.projection:
            return [n * 2 * L * kv]
        return [n * kv, *linear(kv, h), *linear(h, 2 * L * kv)]
    n, h = peft.p_tuning.num_virtual_tokens, peft.p_tuning.encoder_hidden_size
    if peft.p_tuning.encoder == "mlp":
        return [n * D, *linear(D, h), *linear(h, h), *linear(h, D)]
    # two bidirectional LSTM layers (per direction: W_ih 4h x input, W_hh 4h x h, two 4h biases), then the MLP
    lstm = [numel for width in (D, 2 * h) for _ in range(2) for numel in (4 * h * width, 4 * h * h, 4 * h, 4 * h)]
    return [n * D, *lstm, *linear(2 * h, 2 * h), *linear(2 * h, D)]


def virtual_state_nbytes(numels: list[int], optimizer: str = "adamw") -> dict[str, int]:
    """fp32 virtual-token tensors, their gradients and the optimizer state, in bytes."""
    total = sum(numels)
    return {"adapter_weights": 4 * total, "adapter_grads": 4 * total,
            "optimizer_state": sum(adam_state_nbytes(n, optimizer) for n in numels)}


def residual_pair_nbytes(cfg: ModelConfig, r: int, targets="all-linear", init: str = "default") -> int:
    """PiSSA / LoftQ: the fp32 pair (A_r, B_r) each adapted layer keeps beside its residual base (not trained)."""
    if init == "default":
        return 0
    shapes = linear_shapes(cfg)
    return cfg.num_hidden_layers * sum(4 * copies(cfg, n) * r * sum(shapes[n])
                                       for n in target_names(targets, bool(cfg.num_experts)))


@dataclass
class RegimeBytes:
    """What one training regime keeps in memory besides activations, in bytes."""

    regime: str
    base_params: int
    trainable_params: int
    weights: int  # base weights as stored (NF4 codes + 16-bit layers under QLoRA)
    quant_constants: int  # NF4 absmax and double-quant statistics
    gradients: int  # gradients of base weights (full fine-tuning only)
    optimizer: int  # master weights + Adam moments of the base weights (full fine-tuning only)
    adapters: int  # adapter weights + their gradients + their optimizer state (+ PiSSA / LoftQ's residual pairs)

    @property
    def total(self) -> int:
        return self.weights + self.quant_constants + self.gradients + self.optimizer + self.adapters

    def per_param(self) -> dict[str, float]:
        """Bytes per base parameter of every part, and the adapters' bytes per trainable parameter."""
        parts = ("weights", "quant_constants", "gradients", "optimizer", "adapters", "total")
        out = {p: getattr(self, p) / self.base_params for p in parts}
        out["adapter_bytes_per_trainable_param"] = self.adapters / self.trainable_params if self.trainable_params else 0.0
        return out

    def as_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "total": self.total}


def regime_bytes(cfg: ModelConfig, regime: str, r: int = 16, targets="all-linear", optimizer: str = "adamw",
                 double_quant: bool = True, method: str = "lora", peft=None, init: str = "default") -> RegimeBytes:
    """The accounting of `regime` ("full", "lora16", "qlora") for model `cfg`, 16-bit layers in bf16, with a
    `[peft] method` adapter (`peft`: its [peft] section) started as `init` says in the adapter regimes."""
    if regime not in REGIMES:
        raise ValueError(f"regime {regime!r} is not one of {', '.join(REGIMES)}")
    p = param_counts(cfg)
    if regime == "full":
        # bf16 weights and gradients; fp32 master copy and Adam moments (ZeRO's 2 + 2 + 12)
        return RegimeBytes(regime, p.total, p.total, weights=2 * p.total, quant_constants=0, gradients=2 * p.total,
                           optimizer=4 * p.total + adam_state_nbytes(p.total, optimizer), adapters=0)
    lora = lora_state_nbytes(cfg, r, targets, optimizer, method, peft)
    lora["residual_pairs"] = residual_pair_nbytes(cfg, r, targets, init)
    trainable = lora_param_count(cfg, r, targets, method, peft)
    if regime == "lora16":
        weights, consts = 2 * p.total, 0
    else:
        codes, consts = nf4_model_nbytes(cfg, double_quant)
        weights = codes + 2 * (p.total - p.linear)
    return RegimeBytes(regime, p.total, trainable, weights=weights, quant_constants=consts, gradients=0, optimizer=0,
                       adapters=sum(lora.values()))
