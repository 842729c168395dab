"""Tiny random Llama-family checkpoints written by transformers (the independent reference), for tests."""

from pathlib import Path

import torch

# 512 positions: the default data.max_seq_len of the reward and DPO recipes (qtune refuses longer sequences than
# a model has positions for); the default RoPE does not depend on max_position_embeddings, so nothing else changes.
# Intermediate sizes are deliberately not multiples of 64 (odd blocks), and not multiples of 16 either:
# bitsandbytes' CPU `dequantize_4bit` (0.50.2) decodes wrongly when the last dimension is a multiple of
# 16 but not of 64 (e.g. 80 or 96), although its packed bytes are right; real models never have such widths.
TINY_CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=160, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=512, tie_word_embeddings=False),
    "llama3": dict(model_type="llama", vocab_size=160, hidden_size=64, intermediate_size=104, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=500000.0,
                   max_position_embeddings=512, tie_word_embeddings=True, attention_bias=True,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(model_type="mistral", vocab_size=160, hidden_size=64, intermediate_size=120, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                    max_position_embeddings=512, sliding_window=4096, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", vocab_size=160, hidden_size=64, intermediate_size=72, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  max_position_embeddings=512, tie_word_embeddings=True),
}


def hf_config(kind: str):
    import transformers

    d = dict(TINY_CONFIGS[kind])
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[d.pop("model_type")]
    return cls(**d, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_hf_model(kind: str, seed: int = 0):
    """A randomly initialised transformers model (fp32, eval mode) with non-trivial norms and biases."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind), torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


def save_tiny(kind: str, out_dir: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    model = make_hf_model(kind, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    return Path(out_dir)


def save_tiny_with_tokenizer(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """A tiny random model plus a small real byte-level BPE tokenizer with a ChatML template."""
    from test_data_tokenizer import make_tokenizer_dir
    from tokenizers import Tokenizer

    out_dir = Path(out_dir)
    make_tokenizer_dir(out_dir)
    vocab = Tokenizer.from_file(str(out_dir / "tokenizer.json")).get_vocab_size()
    saved = dict(TINY_CONFIGS[kind])
    TINY_CONFIGS[kind] = {**saved, "vocab_size": vocab}
    try:
        model = make_hf_model(kind, seed)
    finally:
        TINY_CONFIGS[kind] = saved
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
