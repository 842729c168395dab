"""Model configuration, read from a Hugging Face `config.json`.

One dataclass covers the decoder families qtune trains: Llama-2/3/3.1, Mistral (Nemo, Small), SmolLM2,
Qwen2, Qwen3, Gemma 2/3 and Phi-3/4. They differ only in switches (q/k norms, Gemma's (1 + w) norms and
extra norms, GeGLU, soft-capping, per-layer sliding windows, Phi-3's fused projections and partial
rotary embedding), each a field below. Fields keep Hugging Face's
names where Hugging Face has one, so a `config.json` maps onto them one to one. `SHAPES` names the shapes
of public checkpoints (one line each) so the memory planner can size a model without its files.
"""

import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

MOE_TYPES = ("mixtral", "qwen3_moe")  # mixtures of experts
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3", *MOE_TYPES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
GEMMA_TYPES = ("gemma2", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # SwiGLU; GeGLU with tanh-approximated GELU (Gemma)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM"}

# Shapes of public checkpoints (their config.json), one line each.
SHAPES: dict[str, dict] = {
    "llama2-7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 10000.0, "max_position_embeddings": 4096},
    "llama2-13b": {"vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40, "rope_theta": 10000.0, "max_position_embeddings": 4096},
    "llama3-8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0, "max_position_embeddings": 8192},
    "mistral-7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 10000.0, "max_position_embeddings": 32768},
    "smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True},
    "smollm2-360m": {"vocab_size": 49152, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5, "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True},
    "llama3.1-8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0, "max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "mistral-nemo-12b": {"model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 14336, "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 1000000.0, "max_position_embeddings": 1024000},
    "qwen3-8b": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960},
    "qwen3-14b": {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960},
    "gemma-2-9b": {"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "max_position_embeddings": 8192},
    "gemma-3-12b": {"model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 1024, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "max_position_embeddings": 131072},
    "phi-4": {"model_type": "phi3", "vocab_size": 100352, "hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 10, "rope_theta": 250000.0, "max_position_embeddings": 16384},
    "mixtral-8x7b": {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 1000000.0, "max_position_embeddings": 32768},
}


class ConfigError(ValueError):
    """A config.json that qtune cannot use; the message names the file and the field."""


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # may differ from hidden / heads (Mistral Nemo, Qwen3, Gemma)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear" | "longrope", "factor": ..., ...}
    partial_rotary_factor: float = 1.0  # Phi-3: RoPE rotates the first int(head_dim * this) features of a head
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias) put a bias on q, k, v
    o_bias: bool = False  # Llama's attention_bias also covers o_proj
    sliding_window: int | None = None  # the layers marked "sliding_attention" attend to at most this many tokens
    layer_types: tuple[str, ...] = ()  # per layer "full_attention" | "sliding_attention"; () = all full
    hidden_act: str = "silu"  # the MLP's gate activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)
    qk_norm: bool = False  # Qwen3 / Gemma 3: RMSNorm over each head of q and k before RoPE
    gemma_norms: bool = False  # Gemma: norms scale by (1 + w), four per layer, embeddings times sqrt(hidden)
    query_pre_attn_scalar: int | float | None = None  # Gemma: attention scale this ** -0.5, not head_dim ** -0.5
    attn_logit_softcapping: float | None = None  # Gemma 2: attention scores become cap · tanh(s / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: logits become cap · tanh(z / cap)
    rope_local_theta: float | None = None  # Gemma 3: RoPE base of the sliding layers (rope_local_base_freq)
    multimodal_text: bool = False  # the language model of a Gemma 3 image-text checkpoint (vision tower skipped)
    fused_projections: bool = False  # Phi-3: one qkv_proj for q, k, v and one gate_up_proj for gate, up
    num_experts: int = 0  # mixture of experts (Mixtral, Qwen3-MoE): experts per layer; 0 = a dense MLP
    num_experts_per_tok: int = 0  # experts each token is routed to (top-k)
    moe_intermediate_size: int = 0  # intermediate size of one expert
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1 (Mixtral always does)
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None
    extra: dict = field(default_factory=dict, repr=False)  # the rest of config.json, written back unchanged

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def layer_window(self, layer: int) -> int | None:
        """How many past tokens layer `layer` may attend to (None: all of them)."""
        sliding = self.layer_types and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a parsed config.json; errors name `source` and the offending field."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object of model settings, got {type(d).__name__} {d!r:.60}")
        model_type = d.get("model_type", "llama")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if model_type == "gemma3":
            return cls._gemma3_text_model(d, source)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(key), int) or d[key] <= 0:
                raise ConfigError(f"{source}: field {key!r} is missing or not a positive integer (found {d.get(key)!r})")
        for key in ("num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window"):
            if d.get(key) is not None and (not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] <= 0):
                raise ConfigError(f"{source}: field {key!r} must be a positive integer or absent (found {d[key]!r})")
        eps = d.get("rms_norm_eps", 1e-5)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ConfigError(f"{source}: field 'rms_norm_eps' must be a small positive number (found {eps!r})")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        if d.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported (no checkpoint of these families uses it)")
        known = {f.name for f in fields(cls)} | {"attention_bias", "num_key_value_heads", "rope_parameters",
                                                 "use_sliding_window", "dtype", "hidden_activation",
                                                 "rope_local_base_freq", "max_window_layers", "sliding_window_pattern",
                                                 "num_local_experts", "original_max_position_embeddings"}
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=d.get("max_position_embeddings") or 4096,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type in GEMMA_TYPES)),
            model_type=model_type, bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"), torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            extra={k: v for k, v in d.items() if k not in known},
            **_rope_fields(d, model_type, source), **_family_fields(d, model_type, source),
            **_expert_fields(d, model_type, source),
        )

    @classmethod
    def _gemma3_text_model(cls, d: dict, source: str) -> "ModelConfig":
        """The language model of a Gemma 3 image-text checkpoint; its vision tower is not loaded."""
        text = d.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: model_type 'gemma3' needs a 'text_config' object (the language model)")
        print(f"note: {source}: Gemma 3 image-text checkpoint; loading its language model only "
              "(the vision tower and projector are skipped)", file=sys.stderr)
        text = {"tie_word_embeddings": d.get("tie_word_embeddings", True),
                "torch_dtype": d.get("torch_dtype") or d.get("dtype"), **text, "model_type": "gemma3_text"}
        cfg = cls.from_dict(text, f"{source} (text_config)")
        cfg.multimodal_text = True
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        d = read_json(path, ConfigError, "no config.json here; a model directory needs config.json and *.safetensors")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        """A Hugging Face config.json dict (what `qtune merge` / `qtune quantize` write)."""
        d = dict(self.extra)
        d.update(
            model_type=self.model_type, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, hidden_act=self.hidden_act,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
        )
        if self.model_type in ("llama", "qwen3") or self.model_type in GEMMA_TYPES:
            d["attention_bias"] = self.qkv_bias
        if self.model_type != "llama":
            d["sliding_window"] = self.sliding_window
        if self.layer_types or self.model_type in GEMMA_TYPES:  # Gemma's default would be a sliding pattern
            d["layer_types"] = list(self.layer_types) or ["full_attention"] * self.num_hidden_layers
        if self.model_type in GEMMA_TYPES:
            d.update(hidden_activation=self.hidden_act, query_pre_attn_scalar=self.query_pre_attn_scalar,
                     attn_logit_softcapping=self.attn_logit_softcapping,
                     final_logit_softcapping=self.final_logit_softcapping)
        if self.rope_local_theta is not None:
            d["rope_local_base_freq"] = self.rope_local_theta
        if self.model_type == "phi3":
            d["partial_rotary_factor"] = self.partial_rotary_factor
            if self.rope_scaling:  # Phi3Config reads it at the top level, over the one in rope_scaling
                d["original_max_position_embeddings"] = self.rope_scaling["original_max_position_embeddings"]
        if self.model_type == "mixtral":
            d.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok)
        elif self.model_type == "qwen3_moe":
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob)
        d.setdefault("architectures", [ARCHITECTURES[self.model_type]])
        if self.torch_dtype:
            d["torch_dtype"] = self.torch_dtype
        return d


def _positive_number(value, source: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{source}: field {key!r} must be a positive number (found {value!r})")
    return float(value)


def _family_fields(d: dict, model_type: str, source: str) -> dict:
    """The switches that tell the families apart, read from the keys each family's config.json uses."""
    gemma = model_type in GEMMA_TYPES
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(d.get("attention_bias", False))
    act_key = "hidden_activation" if gemma and d.get("hidden_activation") else "hidden_act"
    act = d.get(act_key, "gelu_pytorch_tanh" if gemma else "silu")
    if act not in ACTIVATIONS:
        raise ConfigError(f"{source}: {act_key} {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    caps = {}
    for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
        value = d.get(key, {"query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
                            "final_logit_softcapping": 30.0}[key] if model_type == "gemma2" else None)
        if not gemma and value is not None:
            raise ConfigError(f"{source}: field {key!r} is a Gemma setting; model_type {model_type!r} has no such "
                              "feature (remove the field or fix model_type)")
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{source}: field {key!r} must be a positive number or null (found {value!r})")
        caps[key] = value  # kept as written: transformers wants query_pre_attn_scalar an int
    if model_type == "gemma3_text" and caps["attn_logit_softcapping"] is not None:
        raise ConfigError(f"{source}: attn_logit_softcapping is set, but Gemma 3 does not soft-cap attention "
                          "(transformers ignores the field too); set it to null")
    if d.get("use_bidirectional_attention"):
        raise ConfigError(f"{source}: use_bidirectional_attention=true (an embedding model) is not supported; "
                          "qtune trains causal language models")
    window, layer_types = _layer_types(d, model_type, source)
    return dict(qkv_bias=qkv_bias, o_bias=o_bias, hidden_act=act, fused_projections=model_type == "phi3",
                qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe"),
                gemma_norms=gemma, sliding_window=window, layer_types=layer_types, **caps)


def _expert_fields(d: dict, model_type: str, source: str) -> dict:
    """Mixtral: `num_local_experts` experts of `intermediate_size`; Qwen3-MoE: `num_experts` (or
    `num_local_experts`) of `moe_intermediate_size`. Both route each token to `num_experts_per_tok` of them."""
    if model_type not in MOE_TYPES:
        return {}
    mixtral = model_type == "mixtral"
    # transformers >= 5 writes Qwen3-MoE's num_experts as num_local_experts, as Mixtral's
    experts = "num_experts" if not mixtral and "num_local_experts" not in d else "num_local_experts"
    keys = (experts, "num_experts_per_tok", "intermediate_size" if mixtral else "moe_intermediate_size")
    for key in keys:
        if not isinstance(d.get(key), int) or d[key] <= 0:
            raise ConfigError(f"{source}: field {key!r} is missing or not a positive integer (found {d.get(key)!r})")
    if not mixtral and (d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1):
        raise ConfigError(f"{source}: mlp_only_layers / decoder_sparse_step (dense layers among the expert "
                          "layers) are not supported; every layer must be a mixture of experts")
    return dict(num_experts=d[keys[0]], num_experts_per_tok=d[keys[1]], moe_intermediate_size=d[keys[2]],
                norm_topk_prob=mixtral or bool(d.get("norm_topk_prob", False)))


def _layer_types(d: dict, model_type: str, source: str) -> tuple[int | None, tuple[str, ...]]:
    """The sliding window and which layers use it: `layer_types` when given, else each family's default
    (Mistral: all layers; Qwen: layers from max_window_layers on, when use_sliding_window; Gemma 2: every
    other layer, starting with the first; Gemma 3: five sliding layers, then one global)."""
    n = d["num_hidden_layers"]
    window = d.get("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not d.get("use_sliding_window", False):
        window = None
    given = d.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or len(given) != n or any(t not in LAYER_TYPES for t in given):
            raise ConfigError(f"{source}: field 'layer_types' must list one of {', '.join(LAYER_TYPES)} for each of "
                              f"the {n} layers (found {given!r:.80})")
        types = tuple(given)
    elif model_type == "gemma2":
        types = tuple(LAYER_TYPES[(i + 1) % 2] for i in range(n))
    elif model_type == "gemma3_text":
        pattern = d.get("sliding_window_pattern", 6)
        types = tuple(LAYER_TYPES[bool((i + 1) % pattern)] for i in range(n))
    elif model_type in ("qwen2", "qwen3", "qwen3_moe"):
        first = d.get("max_window_layers", 28)
        types = tuple(LAYER_TYPES[window is not None and i >= first] for i in range(n))
    else:
        types = tuple(LAYER_TYPES[window is not None] for _ in range(n))
    if window is None or "sliding_attention" not in types:
        return None, ()
    return window, types


def _rope_fields(d: dict, model_type: str, source: str) -> dict:
    """RoPE base, scaling and (Gemma 3) the local layers' base, from either the classic fields or the newer
    `rope_parameters` dict (per layer type for Gemma 3)."""
    params = d.get("rope_parameters")
    default_theta = {"gemma3_text": 1_000_000.0}.get(model_type, 10000.0)
    local = None
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        sliding = params.get("sliding_attention") or {}
        if sliding.get("rope_type", "default") != "default":
            raise ConfigError(f"{source}: rope_parameters.sliding_attention.rope_type {sliding['rope_type']!r} is "
                              "not supported (the sliding layers take plain RoPE)")
        local = sliding.get("rope_theta")
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = _positive_number(params.get("rope_theta", d.get("rope_theta", default_theta)), source, "rope_theta")
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = _positive_number(d.get("rope_theta", default_theta), source, "rope_theta")
        scaling = d.get("rope_scaling")
    partial = (params or {}).get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if not isinstance(partial, (int, float)) or isinstance(partial, bool) or not 0 < partial <= 1:
        raise ConfigError(f"{source}: field 'partial_rotary_factor' must be a number in (0, 1] (found {partial!r})")
    if model_type == "gemma3_text":
        key = "rope_parameters.sliding_attention.rope_theta" if local is not None else "rope_local_base_freq"
        local = _positive_number(local if local is not None else d.get("rope_local_base_freq", 10000.0), source, key)
    if scaling:
        if not isinstance(scaling, dict):
            raise ConfigError(f"{source}: rope_scaling must be an object such as {{\"rope_type\": \"linear\", "
                              f"\"factor\": 2.0}}, or null (found {scaling!r:.60})")
        for key in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"):
            if key in scaling:
                _positive_number(scaling[key], source, f"rope_scaling.{key}")
        scaling = dict(scaling)
        scaling.pop("partial_rotary_factor", None)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if model_type == "phi3" and rope_type in ("su", "yarn"):
            rope_type = "longrope"  # Phi-3's earlier names for it, as transformers reads them
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        scaling["rope_type"] = rope_type
        scaling.pop("type", None)
        if rope_type == "longrope":
            _check_longrope(scaling, d, source)
        if rope_type == "default":
            scaling = None
    return dict(rope_theta=theta, rope_scaling=scaling or None, rope_local_theta=local,
                partial_rotary_factor=float(partial))


def _check_longrope(scaling: dict, d: dict, source: str) -> None:
    """LongRoPE (Phi-3 128K): per-frequency short and long factors and the pre-training context they switch at."""
    scaling.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings"))
    if not isinstance(scaling["original_max_position_embeddings"], int):
        raise ConfigError(f"{source}: longrope needs 'original_max_position_embeddings' "
                          "(in rope_scaling or at the top)")
    for key in ("short_factor", "long_factor"):
        if not isinstance(scaling.get(key), list) or not scaling[key]:
            raise ConfigError(f"{source}: rope_scaling.{key} must be a list of numbers for longrope")


def shape_config(name: str) -> ModelConfig:
    """The ModelConfig of a named shape in SHAPES (e.g. "llama2-7b")."""
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}")
    d = {"model_type": "llama", **SHAPES[name]}
    return ModelConfig.from_dict(d, source=f"shape {name!r}")


def read_json(path: Path, error: type[Exception], missing: str):
    """The parsed JSON file `path`; `error` naming the file when it is absent (`missing` says what belongs
    there) or is not valid JSON."""
    if not path.exists():
        raise error(f"{path}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from e


def position_limit(config) -> int:
    """The longest sequence the model's positions cover: max_position_embeddings, or what its RoPE scaling's
    factor extends the original positions to."""
    scaling = config.rope_scaling or {}
    limit = config.max_position_embeddings
    if scaling.get("factor"):
        limit = max(limit, int(scaling["factor"] * scaling.get("original_max_position_embeddings", limit)))
    return limit
