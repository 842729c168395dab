"""How each family is laid out in llama.cpp's GGUF, in both directions: the tables `qtune convert` reads
with (`qtune.weights.gguf`) and the ones `qtune export-gguf` writes with (`qtune.weights.gguf_export`).

What llama.cpp changes on the way in, family by family (its convert_hf_to_gguf.py and llama-model.cpp):
  - llama, mistral, mixtral -> "llama": each head's Q/K rows interleaved (it rotates adjacent pairs);
    mixtral's experts stacked into one 3-D tensor per projection, its router is ffn_gate_inp.
  - qwen2, qwen3 (+ q/k norms), qwen3_moe -> "qwen3moe" (experts as mixtral's; llama.cpp always renormalises
    the top-k routing weights): half-split rotation as in Hugging Face, names only.
  - gemma2, gemma3: norms stored as 1 + w (llama.cpp multiplies by the stored weight); embeddings stored
    unscaled (llama.cpp multiplies by sqrt(hidden) itself, as Hugging Face does); soft-caps and the window as
    metadata; the sliding layers' pattern, Gemma 3's local RoPE base (10000) and the query scale (head_dim,
    hidden / heads for the 27B layer counts) are fixed in llama.cpp, not stored.
  - phi3: fused attn_qkv and ffn_up (gate rows, then up rows), the rotated width as rope.dimension_count,
    LongRoPE's factors as the rope_factors_short / rope_factors_long tensors.
"""

from dataclasses import dataclass

import torch

# --- GGUF -> Hugging Face (the reader) -----------------------------------------------------------------

# GGUF architecture -> Hugging Face model_type and class ("llama" with experts is Mixtral: `reader_architecture`).
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                 "qwen3": ("qwen3", "Qwen3ForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
                 "gemma3": ("gemma3_text", "Gemma3ForCausalLM"), "phi3": ("phi3", "Phi3ForCausalLM"),
                 "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM")}
MIXTRAL = ("mixtral", "MixtralForCausalLM")
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# GGUF tensor name -> Hugging Face LlamaForCausalLM parameter name ("{i}" is the layer index).
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.bias": "self_attn.q_proj.bias",  # Qwen2; Llama with attention_bias
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # Qwen3, Gemma 3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
# Gemma's four norms a layer: llama.cpp's ffn_norm is the norm before the MLP there.
GEMMA_BLOCK_TENSORS = {
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Phi-3's fused projections: llama.cpp's ffn_up holds gate and up stacked, as gate_up_proj does.
PHI3_BLOCK_TENSORS = {"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"}
# LongRoPE's per-frequency factors travel as tensors; they become config["rope_scaling"].
ROPE_FACTOR_TENSORS = ("rope_factors_short.weight", "rope_factors_long.weight")
# llama.cpp tells the Gemma sizes apart by layer count and scales queries of the 27B ones by
# (hidden / heads)^-1/2 instead of head_dim^-1/2 (transformers: query_pre_attn_scalar).
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# llama.cpp's fixed sliding-layer pattern: layer i slides unless (i + 1) is a multiple of this.
SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6}
GEMMA3_LOCAL_THETA = 10000.0

# Mixture-of-experts tensors: the router, and each projection of all experts stacked (experts, out, in).
ROUTER_TENSOR = "ffn_gate_inp.weight"
EXPERT_TENSORS = {"ffn_gate_exps.weight": 0, "ffn_up_exps.weight": 1, "ffn_down_exps.weight": 2}
# One expert's projections in the order of EXPERT_TENSORS (gate, up, down), and the MoE block's name.
EXPERT_NAMES = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
                "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def reader_architecture(architecture: str, expert_count: int) -> tuple[str, str]:
    """(model_type, class name) of a GGUF architecture; llama.cpp writes Mixtral as "llama" with experts."""
    return MIXTRAL if architecture == "llama" and expert_count else ARCHITECTURES[architecture]


def moe_tensors(gguf_name: str, w: torch.Tensor, model_type: str) -> dict[str, torch.Tensor] | None:
    """The HF tensors of a mixture-of-experts GGUF tensor: the router as it is, a stacked projection
    ("blk.3.ffn_up_exps.weight", (E, out, in)) as the E experts' weights; None for any other tensor."""
    parts = gguf_name.split(".", 2)  # "blk", "{i}", "ffn_up_exps.weight"
    if model_type not in EXPERT_NAMES or len(parts) != 3 or parts[2] not in (ROUTER_TENSOR, *EXPERT_TENSORS):
        return None
    block, projections = EXPERT_NAMES[model_type]
    prefix = f"model.layers.{int(parts[1])}.{block}"
    if parts[2] == ROUTER_TENSOR:
        return {f"{prefix}.gate.weight": w}
    projection = projections[EXPERT_TENSORS[parts[2]]]
    return {f"{prefix}.experts.{e}.{projection}.weight": expert for e, expert in enumerate(w)}


# --- Hugging Face -> GGUF (the writer) -----------------------------------------------------------------


@dataclass(frozen=True)
class GGUFArchitecture:
    """How llama.cpp names and lays out one Hugging Face `model_type`."""

    name: str
    """`general.architecture`, the prefix of the model's metadata keys."""
    permute_qk: bool = False
    """llama.cpp's "llama" rotates adjacent pairs, so each head's Q/K rows are interleaved."""
    norm_offset: float = 0.0
    """Added to every norm weight: Gemma's norms scale by 1 + w in Hugging Face, by the stored weight in llama.cpp."""


# HF model_type -> llama.cpp architecture: a new family is one row here (and one in the reader's tables).
EXPORT_ARCHITECTURES = {
    "llama": GGUFArchitecture("llama", permute_qk=True),
    "mistral": GGUFArchitecture("llama", permute_qk=True),  # llama.cpp's own converter writes Mistral as llama
    "mixtral": GGUFArchitecture("llama", permute_qk=True),
    "qwen2": GGUFArchitecture("qwen2"),
    "qwen3": GGUFArchitecture("qwen3"),
    "qwen3_moe": GGUFArchitecture("qwen3moe"),
    "gemma2": GGUFArchitecture("gemma2", norm_offset=1.0),
    "gemma3_text": GGUFArchitecture("gemma3", norm_offset=1.0),
    "phi3": GGUFArchitecture("phi3"),
}


def expert_key(hf_name: str) -> tuple[str, int] | None:
    """("model.layers.3.mlp.experts.gate_proj.weight", 5) for "model.layers.3.mlp.experts.5.gate_proj.weight":
    the name llama.cpp's converter gives the stacked tensor, and the expert's index; None for other tensors."""
    parts = hf_name.split(".")
    if "experts" not in parts:
        return None
    at = parts.index("experts")
    return ".".join(parts[:at + 1] + parts[at + 2:]), int(parts[at + 1])


def llama_cpp_query_scalar(arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """The query_pre_attn_scalar llama.cpp uses for a Gemma of this shape (it stores none)."""
    return hidden // heads if layers == GEMMA_27B_LAYERS[arch] else head_dim


def llama_cpp_layer_types(cfg, arch: str) -> tuple[str, ...]:
    """The sliding / full layer types llama.cpp gives a Gemma of `cfg.num_hidden_layers` layers."""
    pattern = SLIDING_PATTERN[arch]
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(cfg.num_hidden_layers))


def unsupported(cfg, arch: GGUFArchitecture, tensor_kinds) -> str | None:
    """Why llama.cpp would run this model differently from qtune (a setting it fixes or cannot store), or None.
    `tensor_kinds`: the gguf package's MODEL_TENSORS for the architecture (what llama.cpp can load)."""
    import gguf

    scaling = (cfg.rope_scaling or {}).get("rope_type")
    allowed = {"linear"} | ({"llama3"} if gguf.MODEL_TENSOR.ROPE_FREQS in tensor_kinds else set())
    allowed |= {"longrope"} if arch.name == "phi3" else set()
    if scaling is not None and scaling not in allowed:
        return f"rope_scaling type {scaling!r} has no {arch.name} GGUF form (written: {', '.join(sorted(allowed))})"
    if cfg.model_type == "qwen3_moe" and not cfg.norm_topk_prob:
        return "norm_topk_prob is false, but llama.cpp's qwen3moe always renormalises the top-k routing weights"
    if arch.name not in ("gemma2", "gemma3"):
        return None
    scalar = llama_cpp_query_scalar(arch.name, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                                    cfg.head_dim)
    if cfg.query_pre_attn_scalar != scalar:
        return (f"query_pre_attn_scalar is {cfg.query_pre_attn_scalar}, but llama.cpp scales the queries of a "
                f"{cfg.num_hidden_layers}-layer {arch.name} by {scalar}^-1/2")
    if cfg.sliding_window is None or tuple(cfg.layer_types) != llama_cpp_layer_types(cfg, arch.name):
        return (f"the sliding layers ({list(cfg.layer_types) or 'none'}) are not llama.cpp's fixed pattern for "
                f"{arch.name} (every layer but each {SLIDING_PATTERN[arch.name]}th slides)")
    if arch.name == "gemma3" and cfg.rope_local_theta != GEMMA3_LOCAL_THETA:
        return f"rope_local_base_freq is {cfg.rope_local_theta}, but llama.cpp fixes Gemma 3's at {GEMMA3_LOCAL_THETA:g}"
    return None
