"""GGUF (llama.cpp) -> Hugging Face model directory: Llama-architecture models (Llama, SmolLM, Mistral, Mixtral),
Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 and Phi-3.

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")  # config.json, model.safetensors, tokenizer ...

Weights are dequantized with the `gguf` package. What llama.cpp changes on the way in is undone:
  - dims: GGUF lists a tensor's shape innermost-first; the reader already gives numpy arrays row-major, so
    a weight comes back (out_features, in_features) as in PyTorch.
  - Q/K rows (llama architecture only): llama.cpp rotates adjacent pairs (x0, x1), (x2, x3) ... there,
    while HF's `rotate_half` rotates (x_i, x_{i + d/2}). Its converter therefore interleaves each head's two
    row halves; we put them back. Qwen and Gemma use the half-split ("NeoX") rotation in llama.cpp too.
  - Gemma's norm weights: llama.cpp stores 1 + w (its norm multiplies by the weight); we subtract the 1.
  - experts (Mixtral, Qwen3-MoE): one 3-D tensor per projection holds every expert; we split it.
The family tables are in `qtune.weights.gguf_layout`.
The tokenizer becomes a `tokenizer.json` built from the vocabulary, merges and token types in the file.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from qtune.weights.gguf_layout import (BLOCK_TENSORS, GEMMA_BLOCK_TENSORS, GEMMA3_LOCAL_THETA, GLOBAL_TENSORS,
                                       PHI3_BLOCK_TENSORS, ROPE_FACTOR_TENSORS, SLIDING_PATTERN, SUPPORTED_ARCHITECTURES,
                                       llama_cpp_query_scalar, moe_tensors, reader_architecture)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GGUFFile:
    """A GGUF file's metadata and tensors, with errors that name the file."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such GGUF file")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError) as err:
            raise ValueError(f"{self.path}: not a readable GGUF file ({err})") from err
        self.architecture = self.get("general.architecture")

    def get(self, key: str, default=...):
        """A metadata value; without a default, a missing key is an error naming the file and the key."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise KeyError(f"{self.path}: metadata key {key!r} is missing; the GGUF file is incomplete")
            return default
        return field.contents()

    def arch(self, key: str, default=...):
        """`{architecture}.{key}`, e.g. arch("block_count") reads "llama.block_count"."""
        return self.get(f"{self.architecture}.{key}", default)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: per head, rows (0, d/2, 1, d/2+1, ...) back to (0, 1, ..., d-1).

    llama.cpp wrote w.reshape(n_head, 2, d/2, in).swapaxes(1, 2); this is its inverse. A bias (1-D) works too.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def _float32_repr(value: float) -> float:
    # GGUF stores floats as float32: 1e-5 reads back as 9.999999747378752e-06. Keep float32's shortest spelling.
    return float(str(np.float32(value)))


def llama_config(g: GGUFFile, dtype: torch.dtype) -> dict:
    """config.json fields every architecture shares (those of LlamaForCausalLM) from the GGUF metadata."""
    n_head = g.arch("attention.head_count")
    hidden = g.arch("embedding_length")
    tensor_names = {t.name for t in g.reader.tensors}
    vocab_size = g.arch("vocab_size", None) or len(g.get("tokenizer.ggml.tokens"))
    model_type, hf_class = reader_architecture(g.architecture, g.arch("expert_count", 0))
    config = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": g.arch("feed_forward_length"),
        "num_hidden_layers": g.arch("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": g.arch("attention.head_count_kv", n_head),
        "head_dim": g.arch("attention.key_length", None) or g.arch("rope.dimension_count", None) or hidden // n_head,
        "hidden_act": "silu",
        "rms_norm_eps": _float32_repr(g.arch("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _float32_repr(g.arch("rope.freq_base", 10000.0)),
        "max_position_embeddings": g.arch("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_output.bias" in tensor_names,
        "mlp_bias": False,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": g.get("tokenizer.ggml.eos_token_id", None),
        "pad_token_id": g.get("tokenizer.ggml.padding_token_id", None),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    rope_scaling = _rope_scaling(g, config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def model_config(g: GGUFFile, dtype: torch.dtype) -> dict:
    """config.json for the file's architecture: the Llama fields, then what each other family adds."""
    config = llama_config(g, dtype)
    if g.architecture in ("gemma2", "gemma3"):
        scalar = llama_cpp_query_scalar(g.architecture, config["num_hidden_layers"], config["hidden_size"],
                                        config["num_attention_heads"], config["head_dim"])
        config.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                      query_pre_attn_scalar=scalar,
                      sliding_window=g.arch("attention.sliding_window"),
                      final_logit_softcapping=g.arch("final_logit_softcapping", None))
    if g.architecture == "gemma2":
        config["attn_logit_softcapping"] = g.arch("attn_logit_softcapping", None)
    if g.architecture == "phi3":
        _phi3_fields(g, config)
    if config["model_type"] in ("mixtral", "qwen3_moe"):
        _expert_fields(g, config)
    if g.architecture == "gemma3":
        config["rope_local_base_freq"] = GEMMA3_LOCAL_THETA  # llama.cpp's fixed base of the sliding layers
        # one sliding-or-not flag per layer, or every n-th layer global (llama.cpp's default n: 6)
        pattern = g.arch("attention.sliding_window_pattern", SLIDING_PATTERN["gemma3"])
        if isinstance(pattern, int):
            config["sliding_window_pattern"] = pattern
        else:
            config["layer_types"] = ["sliding_attention" if flag else "full_attention" for flag in pattern]
    return config


def _phi3_fields(g: GGUFFile, config: dict) -> None:
    """Phi-3: heads of hidden / heads features of which rope.dimension_count rotate; LongRoPE from the
    rope_factors tensors and the pre-training context length; an optional sliding window."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rotary = g.arch("rope.dimension_count", head_dim)
    # llama.cpp's converter writes a window of 0 for "none" (Phi-4)
    config.update(head_dim=head_dim, partial_rotary_factor=rotary / head_dim,
                  sliding_window=g.arch("attention.sliding_window", None) or None)
    factors = {t.name: _dequantize(g, t).tolist() for t in g.reader.tensors if t.name in ROPE_FACTOR_TENSORS}
    if factors:
        config["rope_scaling"] = {"rope_type": "longrope", "short_factor": factors["rope_factors_short.weight"],
                                  "long_factor": factors["rope_factors_long.weight"],
                                  "original_max_position_embeddings": g.arch("rope.scaling.original_context_length")}
        config["original_max_position_embeddings"] = config["rope_scaling"]["original_max_position_embeddings"]


def _expert_fields(g: GGUFFile, config: dict) -> None:
    """Mixtral: `num_local_experts` experts of feed_forward_length; Qwen3-MoE: `num_experts` of
    expert_feed_forward_length, top-k weights always renormalised (llama.cpp's qwen3moe does)."""
    experts, used = g.arch("expert_count"), g.arch("expert_used_count")
    if config["model_type"] == "mixtral":
        config.update(architectures=["MixtralForCausalLM"], num_local_experts=experts, num_experts_per_tok=used)
    else:
        config.update(num_experts=experts, num_experts_per_tok=used, norm_topk_prob=True,
                      moe_intermediate_size=g.arch("expert_feed_forward_length"))


def llama3_rope_scaling(rope_factors: torch.Tensor, theta: float, head_dim: int) -> dict:
    """Recover Llama 3.1's `rope_scaling` from the per-frequency divisors llama.cpp stores as rope_freqs.

    HF's llama3 rule, with wavelength w_i = 2*pi / theta^(-2i/d) and L = original context length:
        w_i < L/high: divisor 1;  w_i > L/low: divisor `factor`;
        between: 1/divisor = (1 - s)/factor + s,  s = (L/w_i - low) / (high - low) = a/w_i - b
    so it depends on (factor, a, b) only. The band's points give a and b by least squares; then
    low = 1, high = 1 + 1/b, L = a/b reproduce every divisor (for Llama 3.1: 1, 4, 8192).
    """
    divisors = rope_factors.double()
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = divisors.max().item()
    medium = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    if medium.sum() < 2:
        raise ValueError("fewer than two rope_freqs values lie between 1 and the scaling factor")
    s = (1 / divisors[medium] - 1 / factor) / (1 - 1 / factor)
    design = torch.stack([1 / wavelen[medium], -torch.ones_like(s)], dim=1)
    a, b = torch.linalg.lstsq(design, s[:, None]).solution.flatten().tolist()
    return {
        "rope_type": "llama3",
        "factor": round(factor, 4),
        "low_freq_factor": 1.0,
        "high_freq_factor": round(1 + 1 / b, 4),
        "original_max_position_embeddings": round(a / b),
    }


def _rope_scaling(g: GGUFFile, config: dict) -> dict | None:
    freqs = next((t for t in g.reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        try:
            return llama3_rope_scaling(_dequantize(g, freqs), config["rope_theta"], config["head_dim"])
        except ValueError as err:
            raise ValueError(f"{g.path}: cannot read Llama-3-style rope scaling from rope_freqs: {err}") from err
    kind = g.arch("rope.scaling.type", None)
    if kind in (None, "none"):
        return None
    factor = g.arch("rope.scaling.factor", None)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = g.arch("rope.scaling.original_context_length")
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise ValueError(f"{g.path}: rope scaling type {kind!r} is not supported (supported: linear, yarn)")


def _hf_name(gguf_name: str, architecture: str = "llama") -> str | None:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    block = {**BLOCK_TENSORS, **GEMMA_BLOCK_TENSORS} if architecture.startswith("gemma") else BLOCK_TENSORS
    block = {**block, **PHI3_BLOCK_TENSORS} if architecture == "phi3" else block
    parts = gguf_name.split(".", 2)  # "blk", "{i}", "attn_q.weight"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in block:
        return f"model.layers.{int(parts[1])}.{block[parts[2]]}"
    return None


def _dequantize(g: GGUFFile, tensor) -> torch.Tensor:
    import gguf

    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise ValueError(
            f"{g.path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize; re-quantize the model to a supported type (e.g. Q8_0, Q4_K, F16)"
        ) from err
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF dims are innermost-first
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
    if not values.flags.writeable:  # F32 tensors come back as read-only views of the memory-mapped file
        values = values.copy()
    return torch.from_numpy(values)


def llama_state_dict(g: GGUFFile, config: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized, renamed to HF names, cast to `dtype`: Q/K rows un-permuted
    (llama architecture), Gemma's stored 1 + w norms back to w, stacked experts split. The names must be exactly the tensors the
    config's model has."""
    state = {}
    llama, gemma = g.architecture == "llama", g.architecture.startswith("gemma")
    for tensor in g.reader.tensors:
        if tensor.name in ("rope_freqs.weight", *ROPE_FACTOR_TENSORS):  # became config["rope_scaling"]
            continue
        w = _dequantize(g, tensor)
        experts = moe_tensors(tensor.name, w, config["model_type"])
        if experts is not None:  # Mixtral, Qwen3-MoE: the router, or one projection of every expert
            state.update((name, e.to(dtype).contiguous()) for name, e in experts.items())
            continue
        name = _hf_name(tensor.name, g.architecture)
        if name is None:
            raise ValueError(f"{g.path}: tensor {tensor.name!r} has no {config['architectures'][0]} counterpart")
        if llama and ".q_proj." in name:  # weights and biases alike
            w = unpermute_qk(w, config["num_attention_heads"])
        elif llama and ".k_proj." in name:
            w = unpermute_qk(w, config["num_key_value_heads"])
        elif gemma and name.endswith("norm.weight"):
            w = w - 1
        state[name] = w.to(dtype).contiguous()
    expected = _expected_tensors(config)
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{g.path}: the tensors do not match a {config['architectures'][0]} of this config "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    return state


def _expected_tensors(config: dict) -> set[str]:
    """The parameter names of the model `config` describes, from the model itself built on the meta device."""
    from qtune.config import ModelConfig
    from qtune.model import CausalLM

    with torch.device("meta"):
        model = CausalLM(ModelConfig.from_dict(config, source="the GGUF metadata"))
    names = set(model.state_dict())
    return names - {"lm_head.weight"} if config["tie_word_embeddings"] else names


# --- tokenizer ---------------------------------------------------------------------------------------

# llama.cpp token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Llama 3's split regex (its tokenizer.json Split pre-tokenizer): contractions, letters with one leading
# non-letter, numbers in groups of at most three digits, punctuation runs, newlines, other whitespace.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: Llama 3's with every digit on its own.
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
BYTE_LEVEL_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
BYTE_LEVEL_NO_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}

# `tokenizer.ggml.pre` -> the pre-tokenizer that splits text before byte-level BPE, as in llama.cpp's
# llama-vocab.cpp: the StarCoder family splits every digit on its own and then applies GPT-2's regex.
PRE_TOKENIZERS = {
    "default": BYTE_LEVEL_REGEX,
    "gpt2": BYTE_LEVEL_REGEX,
    **{
        name: {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL_REGEX]}
        for name in ("smollm", "starcoder", "refact", "codeshell")
    },
    **{
        name: {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                BYTE_LEVEL_NO_REGEX,
            ],
        }
        for name in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")
    },
    "qwen2": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            BYTE_LEVEL_NO_REGEX,
        ],
    },
}


def _added_tokens(tokens: list[str], types: list[int], special_types: tuple[int, ...]) -> list[dict]:
    """Control tokens (and `special_types`) are matched whole and are special; user-defined ones are plain."""
    added = []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind in special_types or kind == USER_DEFINED:
            special = kind in special_types
            added.append(
                {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": not special, "special": special}
            )
    return added


def _byte_level_tokenizer(g: GGUFFile, tokens: list[str], types: list[int]) -> dict:
    pre = g.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"{g.path}: tokenizer.ggml.pre={pre!r} is not a pre-tokenizer this converter knows "
            f"(known: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    merges = [merge.split(" ") for merge in g.get("tokenizer.ggml.merges")]
    return {
        "added_tokens": _added_tokens(tokens, types, (CONTROL,)),
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(tokens)}, "merges": merges,
        },
    }


def sentencepiece_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[list[str]]:
    """BPE merges implied by a sentencepiece BPE vocabulary.

    Sentencepiece merges, at each step, the adjacent pair whose concatenation is the vocabulary piece with
    the highest score. A BPE merge list ranked by that score (ties: lower left, then right id) does the same.
    """
    ids = {token: i for i, (token, kind) in enumerate(zip(tokens, types)) if kind == NORMAL}
    ranked = []
    for token, i in ids.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


def _sentencepiece_tokenizer(g: GGUFFile, tokens: list[str], types: list[int]) -> dict:
    scores = g.get("tokenizer.ggml.scores")
    add_prefix = g.get("tokenizer.ggml.add_space_prefix", True)
    unk_id = g.get("tokenizer.ggml.unknown_token_id", types.index(UNKNOWN) if UNKNOWN in types else None)
    decoder = [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if add_prefix:  # the prefix "▁" becomes a leading space when decoding; drop it
        decoder.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "added_tokens": _added_tokens(tokens, types, (CONTROL, UNKNOWN)),
        "normalizer": None,
        # Only the start of the text gets the "▁" prefix, not text after a special token (transformers'
        # non-legacy Llama behaviour, the one its own GGUF loader uses).
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "split": False,
                          "prepend_scheme": "first" if add_prefix else "never"},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoder},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": tokens[unk_id] if unk_id is not None else None,
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": True, "ignore_merges": False,
            "vocab": {token: i for i, token in enumerate(tokens)},
            "merges": sentencepiece_merges(tokens, types, scores),
        },
    }


def gguf_tokenizer_files(g: GGUFFile) -> tuple[dict, dict, dict]:
    """(tokenizer.json, tokenizer_config.json, generation_config.json) contents from the GGUF's tokenizer."""
    tokens = g.get("tokenizer.ggml.tokens")
    types = g.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    kind = g.get("tokenizer.ggml.model")
    if kind == "gpt2":
        body = _byte_level_tokenizer(g, tokens, types)
    elif kind == "llama":
        body = _sentencepiece_tokenizer(g, tokens, types)
    else:
        raise ValueError(
            f"{g.path}: tokenizer.ggml.model={kind!r} is not supported (supported: gpt2 = byte-level BPE, "
            "llama = sentencepiece BPE)"
        )
    tokenizer_json = {"version": "1.0", "truncation": None, "padding": None, **body}

    def token(key: str) -> str | None:
        i = g.get(f"tokenizer.ggml.{key}", None)
        return tokens[i] if i is not None else None

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(g.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(g.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": g.arch("context_length"),
    }
    template = g.get("tokenizer.chat_template", None)
    if template is not None:
        tokenizer_config["chat_template"] = template
    # End-of-turn / end-of-message ids (Llama 3's <|eot_id|>, <|eom_id|>) also end generation.
    eos_ids = [g.get(f"tokenizer.ggml.{key}", None) for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
    generation_config = {
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": g.get("tokenizer.ggml.padding_token_id", None),
    }
    return tokenizer_json, tokenizer_config, generation_config


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a Hugging Face directory for a GGUF of a supported architecture and return its path.

    Files: config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json.
    """
    g = GGUFFile(gguf_path)
    if g.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{g.path}: architecture {g.architecture!r} is not supported; this converter handles "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (llama: Llama, SmolLM, Mistral, Mixtral)"
        )
    config = model_config(g, dtype)
    state = llama_state_dict(g, config, dtype)
    tokenizer_json, tokenizer_config, generation_config = gguf_tokenizer_files(g)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", generation_config)
    _write_json(out_dir / "tokenizer.json", tokenizer_json)
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    return out_dir
