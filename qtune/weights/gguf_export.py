"""Hugging Face model directory -> GGUF (llama.cpp, Ollama, LM Studio), written with the `gguf` package alone.

    write_gguf("merged/", "model.gguf", "q8_0")

The inverse of `qtune.weights.gguf` (the reader): HF names become llama.cpp names through the gguf
package's own name map, laid out per family as `qtune.weights.gguf_layout` describes (Q/K rows interleaved
for "llama", Gemma's norms as 1 + w, experts stacked, RoPE scalings as metadata or tensors); a setting llama.cpp
would run differently is refused. 1-D tensors stay F32 and the others take the requested type, quantized by
the gguf package's reference quantisers. The tokenizer (vocabulary, merges, token types, special ids, end-of-turn
token, add_bos_token) and the Jinja chat template travel in the metadata.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from qtune.config import ModelConfig
from qtune.rope import rope_attention_scale, rope_inv_freq, rotary_dim
from qtune.tokenizer import load_tokenizer
from qtune.weights.checkpoint import CheckpointError, shard_files
from qtune.weights.gguf_check import FLOAT_TYPES, QUANT_TOLERANCE, end_of_turn_id
from qtune.weights.gguf import BYTE, CONTROL, NORMAL, PRE_TOKENIZERS, UNKNOWN, UNUSED, USER_DEFINED
from qtune.weights.gguf_layout import (EXPORT_ARCHITECTURES, ROPE_FACTOR_TENSORS, GGUFArchitecture, expert_key,
                                       unsupported)


class ExportError(ValueError):
    """A model, adapter or type that cannot be written as GGUF; the message names it and what to do."""


def writable_types() -> list[str]:
    """Tensor types the installed gguf package can write (it has no quantiser for the K- and IQ-quants) and
    the round-trip check has a tolerance for."""
    import gguf

    names = []
    for qtype in gguf.GGMLQuantizationType:
        if qtype.name.lower() not in {*FLOAT_TYPES, *QUANT_TOLERANCE}:
            continue
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        try:
            gguf.quants.quantize(np.zeros((1, 256 * block), dtype=np.float32), qtype)
        except (NotImplementedError, gguf.quants.QuantError, ValueError):
            continue
        names.append(qtype.name.lower())
    return names


def parse_type(name: str):
    """The GGMLQuantizationType called `name` (f16, bf16, q8_0, q4_0 ...), or an ExportError listing those
    the gguf package can write."""
    import gguf

    can = writable_types()
    if name.lower() not in can:
        raise ExportError(f"--type {name!r}: the gguf package cannot write this type (no reference quantiser); "
                          f"types it can write: {', '.join(can)}")
    return gguf.GGMLQuantizationType[name.upper()]


def architecture(cfg: ModelConfig, source) -> GGUFArchitecture:
    """The llama.cpp layout of `cfg`'s family, or an ExportError naming `source` and what llama.cpp would run
    differently."""
    import gguf

    if cfg.model_type not in EXPORT_ARCHITECTURES or cfg.multimodal_text:
        what = "an image-text checkpoint" if cfg.multimodal_text else f"model_type {cfg.model_type!r}"
        raise ExportError(f"{source}: {what} has no GGUF layout here (exported: {', '.join(EXPORT_ARCHITECTURES)})")
    arch = EXPORT_ARCHITECTURES[cfg.model_type]
    problem = unsupported(cfg, arch, gguf.MODEL_TENSORS[model_arch(arch)])
    if problem:
        raise ExportError(f"{source}: {problem}; llama.cpp would not run this model as trained, so it is not exported")
    return arch


def exportable_architecture(model_dir: Path) -> GGUFArchitecture:
    """`architecture` of the Hugging Face directory `model_dir`, errors naming its config.json."""
    return architecture(ModelConfig.from_json(model_dir), model_dir / "config.json")


def model_arch(arch: GGUFArchitecture):
    """The gguf package's MODEL_ARCH member of `arch`."""
    import gguf

    return next(member for member, name in gguf.MODEL_ARCH_NAMES.items() if name == arch.name)


def tensor_names(arch: GGUFArchitecture, cfg: ModelConfig):
    """The gguf package's Hugging Face -> llama.cpp tensor-name map of the architecture (the one llama.cpp's
    converter uses): `gguf_tensor_name` reads it."""
    import gguf

    return gguf.get_tensor_name_map(model_arch(arch), cfg.num_hidden_layers)


def gguf_tensor_name(hf_name: str, names) -> str | None:
    """llama.cpp's name of a HF parameter ("model.layers.3.self_attn.q_proj.weight" -> "blk.3.attn_q.weight");
    None where the architecture has no such tensor. `names`: `tensor_names(...)`."""
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rows (0, 1, ..., d-1) of each head -> llama.cpp's (0, d/2, 1, d/2+1, ...); `unpermute_qk` inverts it."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(w: torch.Tensor, qtype):
    """(array, raw_dtype) for GGUFWriter.add_tensor: 1-D tensors F32, rows whose length is not a multiple
    of the type's block F16 (llama.cpp's converter falls back the same way), the rest in `qtype`."""
    import gguf

    values = w.detach().to(torch.float32).contiguous().numpy()
    if values.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return values, None
    if values.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16), None
    return gguf.quants.quantize(values, qtype), qtype


def add_model_metadata(writer, cfg: ModelConfig, arch: GGUFArchitecture, name: str) -> None:
    """The `{arch}.*` hyper-parameters llama.cpp reads (the keys its converter writes for the family)."""
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(rotary_dim(cfg))
    if arch.name != "phi3":  # llama.cpp's Phi-3 heads are hidden / heads wide, whatever the file says
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.num_experts:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        if arch.name == "qwen3moe":  # Mixtral's experts are feed_forward_length wide
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch.name in ("gemma2", "gemma3", "phi3"):  # the other families' windows are not read by llama.cpp
        writer.add_sliding_window(cfg.sliding_window or 0)  # 0: none (Phi-4), as llama.cpp's converter writes
    if cfg.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    if cfg.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    add_rope_scaling(writer, cfg)


def add_rope_scaling(writer, cfg: ModelConfig) -> None:
    """Linear scaling as type + factor; LongRoPE's pre-training context and attention factor (its per-frequency
    factors are tensors, as are Llama 3.1's: `rope_tensors`)."""
    import gguf

    scaling = cfg.rope_scaling
    if scaling and scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling and scaling["rope_type"] == "longrope":
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        writer.add_rope_scaling_attn_factors(rope_attention_scale(cfg))


def rope_tensors(cfg: ModelConfig):
    """(name, tensor) of the RoPE scalings llama.cpp stores as tensors."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "llama3":
        # llama.cpp divides each inverse frequency by rope_freqs[i]; the reader recovers rope_scaling from it.
        unscaled = dataclasses.replace(cfg, rope_scaling=None)
        yield "rope_freqs.weight", rope_inv_freq(unscaled) / rope_inv_freq(cfg)
    elif scaling.get("rope_type") == "longrope":
        short, long = ROPE_FACTOR_TENSORS
        yield short, torch.tensor(scaling["short_factor"], dtype=torch.float32)
        yield long, torch.tensor(scaling["long_factor"], dtype=torch.float32)


def _laid_out(key: str, w: torch.Tensor, cfg: ModelConfig, arch: GGUFArchitecture) -> torch.Tensor:
    # Q/K rows interleaved for llama.cpp's "llama" (weights and biases alike); Gemma's norms as 1 + w.
    if arch.permute_qk and ".q_proj." in key:
        return permute_qk(w, cfg.num_attention_heads)
    if arch.permute_qk and ".k_proj." in key:
        return permute_qk(w, cfg.num_key_value_heads)
    return w + arch.norm_offset if key.endswith("norm.weight") else w


def model_tensors(model_dir: Path, cfg: ModelConfig, arch: GGUFArchitecture):
    """(gguf name, tensor) for every tensor of the checkpoint in llama.cpp's layout: each expert projection
    stacked over the experts (E, out, in) once all of a layer's experts are read."""
    names, experts = tensor_names(arch, cfg), {}
    for file in shard_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                stacked, index = expert_key(key) or (key, None)
                name = gguf_tensor_name(stacked, names)
                if name is None:
                    raise ExportError(f"{file}: tensor {key!r} has no GGUF counterpart in the {arch.name} layout")
                w = _laid_out(key, f.get_tensor(key).to(torch.float32), cfg, arch)
                if index is None:
                    yield name, w
                    continue
                group = experts.setdefault(name, {})
                group[index] = w
                if len(group) == cfg.num_experts:
                    yield name, torch.stack([group[e] for e in range(cfg.num_experts)])
                    del experts[name]
    if experts:
        raise ExportError(f"{model_dir}: the checkpoint lacks experts of {sorted(experts)[0]} "
                          f"(config.json says {cfg.num_experts})")
    yield from rope_tensors(cfg)


# --- tokenizer ---------------------------------------------------------------------------------------


def _without_offsets(spec):
    # trim_offsets only changes the character offsets tokenizers report, never the tokens.
    if isinstance(spec, dict):
        return {k: _without_offsets(v) for k, v in spec.items() if k != "trim_offsets"}
    return [_without_offsets(v) for v in spec] if isinstance(spec, list) else spec


def _pre_tokenizer_name(pre: dict | None, path: Path) -> str:
    # The reader's table maps llama.cpp names to HF pre-tokenizers; the first name of a match is llama.cpp's own.
    for name, spec in PRE_TOKENIZERS.items():
        if name != "default" and _without_offsets(spec) == _without_offsets(pre):
            return name
    raise ExportError(f"{path}: its pre_tokenizer is not one llama.cpp names here (known: "
                      f"{', '.join(n for n in PRE_TOKENIZERS if n != 'default')}); the file could not be tokenized "
                      "the same way by llama.cpp")


def _padded(tokens: dict[int, str], types: dict[int, int], vocab_size: int) -> tuple[list[str], list[int]]:
    # Ids the tokenizer leaves unused (the model's embedding is padded) get placeholder names, as in llama.cpp.
    size = max(vocab_size, max(tokens) + 1)
    return ([tokens.get(i, f"[PAD{i}]") for i in range(size)],
            [types.get(i, NORMAL if i in tokens else UNUSED) for i in range(size)])


def sentencepiece_vocab(model_dir: Path, vocab_size: int) -> dict:
    """`tokenizer.model` as llama.cpp's "llama" tokenizer: pieces, scores, types (+ added tokens)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tokens, types, scores = {}, {}, {}
    for i in range(sp.get_piece_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i) else BYTE if sp.is_byte(i)
                    else UNUSED if sp.is_unused(i) else NORMAL)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    for i, spec in config.get("added_tokens_decoder", {}).items():
        if int(i) >= sp.get_piece_size():
            tokens[int(i)] = spec["content"]
            types[int(i)] = CONTROL if spec.get("special", True) else USER_DEFINED
    token_list, type_list = _padded(tokens, types, vocab_size)
    return {"model": "llama", "tokens": token_list, "types": type_list,
            "scores": [scores.get(i, -1000.0) for i in range(len(token_list))]}


def tokenizer_vocab(model_dir: Path, vocab_size: int) -> dict:
    """The vocabulary as llama.cpp stores it: byte-level BPE of `tokenizer.json` (tokens, types, merges, pre)
    or, where the directory has one, the sentencepiece `tokenizer.model` (tokens, types, scores)."""
    path = model_dir / "tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    model = spec.get("model", {})
    if (model_dir / "tokenizer.model").is_file() and (not spec or model.get("byte_fallback")):
        return sentencepiece_vocab(model_dir, vocab_size)
    if not spec:
        raise ExportError(f"{model_dir}: no tokenizer.json or tokenizer.model to write the vocabulary from")
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"{path}: only byte-level BPE tokenizers (or a sentencepiece tokenizer.model) are "
                          f"exported (this one is {model.get('type')!r}"
                          f"{', byte fallback, without its tokenizer.model' if model.get('byte_fallback') else ''})")
    tokens, types = {i: t for t, i in model["vocab"].items()}, {}
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    token_list, type_list = _padded(tokens, types, vocab_size)
    return {"model": "gpt2", "pre": _pre_tokenizer_name(spec.get("pre_tokenizer"), path), "tokens": token_list,
            "types": type_list, "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]}


def add_tokenizer_metadata(writer, model_dir: Path, vocab_size: int) -> None:
    """Vocabulary, merges, token types, special ids, end-of-turn id, add_bos_token and the chat template."""
    vocab = tokenizer_vocab(model_dir, vocab_size)
    tok = load_tokenizer(model_dir)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if vocab["model"] == "gpt2":
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_merges(vocab["merges"])
    else:
        writer.add_token_scores(vocab["scores"])
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
    if "pad_token" in tok.special_tokens:
        writer.add_pad_token_id(tok.pad_id)
    if tok.unk_id is not None:
        writer.add_unk_token_id(tok.unk_id)
    writer.add_add_bos_token(tok.add_bos_token)
    writer.add_add_eos_token(False)
    if tok.has_chat_template:
        writer.add_chat_template(tok.chat_template)
        eot = end_of_turn_id(tok)
        if eot is not None:
            writer.add_eot_token_id(eot)


def write_gguf(model_dir, out_path, type_name: str = "f16") -> Path:
    """Write the Hugging Face directory `model_dir` (weights, config, tokenizer) as one GGUF file at `out_path`."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    qtype = parse_type(type_name)
    cfg = ModelConfig.from_json(model_dir)
    arch = architecture(cfg, model_dir / "config.json")
    writer = gguf.GGUFWriter(out_path, arch.name)
    try:
        add_model_metadata(writer, cfg, arch, model_dir.name)
        writer.add_file_type(gguf.LlamaFileType["ALL_F32" if qtype.name == "F32" else f"MOSTLY_{qtype.name}"])
        add_tokenizer_metadata(writer, model_dir, cfg.vocab_size)
        for name, w in model_tensors(model_dir, cfg, arch):
            data, raw_dtype = encode_tensor(w, qtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    finally:
        writer.close()
    return out_path
