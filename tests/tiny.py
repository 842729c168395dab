"""Tiny random checkpoints of every supported family, written by transformers (the independent reference)."""

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
    # Mistral Nemo / Small: head_dim (18) is not hidden / heads (16); no sliding window
    "mistral-nemo": dict(model_type="mistral", vocab_size=160, hidden_size=64, intermediate_size=120,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=18,
                         rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=512, sliding_window=None,
                         tie_word_embeddings=False),
    # Qwen3: q/k norms, explicit head_dim (32, not 64 / 4), tied embeddings like the small sizes
    "qwen3": dict(model_type="qwen3", vocab_size=160, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, max_position_embeddings=512, tie_word_embeddings=True),
    # Gemma 2: window 8 on layers 0 and 2 so that the tests' sequences reach past it; a query scale that is
    # not head_dim; soft-capping low enough for the random weights (attention 0.02, logits 0.5) that tanh bends the values
    "gemma2": dict(model_type="gemma2", vocab_size=160, hidden_size=64, intermediate_size=88, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
                   max_position_embeddings=512, query_pre_attn_scalar=24, sliding_window=8,
                   attn_logit_softcapping=0.02, final_logit_softcapping=0.5, tie_word_embeddings=True),
    # Gemma 3: q/k norms, local RoPE base 10000 and global 1e6 with linear scaling, 2 local : 1 global here
    "gemma3": dict(model_type="gemma3_text", vocab_size=160, hidden_size=64, intermediate_size=88,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                   rms_norm_eps=1e-6, max_position_embeddings=512, query_pre_attn_scalar=32, sliding_window=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                   tie_word_embeddings=True),
    # Phi-3 / 3.5 / 4: fused qkv_proj and gate_up_proj; half of each head rotated; LongRoPE with a pre-training
    # context of 32 so that the tests' long sequences take the long factors and short ones the short factors.
    # 256 positions, not 512: LongRoPE's attention scaling depends on max / original positions (sft-phi3.json)
    "phi3": dict(model_type="phi3", vocab_size=160, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
                 original_max_position_embeddings=32, partial_rotary_factor=0.5, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                  "short_factor": [1.0, 1.3, 2.1, 3.4], "long_factor": [1.5, 4.0, 9.0, 20.0],
                                  "original_max_position_embeddings": 32}),
    # Mixtures of experts: 4 experts of width 40, 2 per token; Qwen3-MoE renormalises the top-2 weights
    "qwen3-moe": dict(model_type="qwen3_moe", vocab_size=160, hidden_size=64, intermediate_size=88,
                      moe_intermediate_size=40, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=512, tie_word_embeddings=False),
    "mixtral": dict(model_type="mixtral", vocab_size=160, hidden_size=64, intermediate_size=40, num_local_experts=4,
                    num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=512, tie_word_embeddings=False),
}


def hf_config(kind: str):
    import transformers

    d = dict(TINY_CONFIGS[kind])
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig,
           "phi3": transformers.Phi3Config, "qwen3_moe": transformers.Qwen3MoeConfig,
           "mixtral": transformers.MixtralConfig}[d.pop("model_type")]
    return cls(**d, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_hf_model(kind: str, seed: int = 0):
    """A randomly initialised transformers model (fp32, eval mode) with non-trivial norms and biases (Gemma's
    norm weights, which multiply 1 + w, around 0)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind), torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                offset = 1.0 if name.endswith("norm.weight") and "gemma" not in model.config.model_type else 0.0
                p.copy_(torch.randn_like(p) * 0.1 + offset)
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


def save_trained_adapter(model_dir: Path, out_dir: Path, target_modules="all-linear", seed: int = 1) -> Path:
    """A LoRA adapter (r 4, alpha 8) for the model in `model_dir` whose B is not zero, as after training."""
    from qtune.lora import LoraConfig, add_lora
    from qtune.peft import save_adapter
    from qtune.weights.checkpoint import load_model

    model = load_model(model_dir, quantize="none", dtype=torch.float32)
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=target_modules), seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):  # the adapter's: the base is frozen
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return save_adapter(model, out_dir)
