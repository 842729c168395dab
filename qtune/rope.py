"""Rotary position embeddings (RoPE) in Hugging Face's `rotate_half` layout, with the scalings the supported
families use: linear (Gemma 3's global layers), Llama 3.1's frequency bands, and LongRoPE (Phi-3 128K), plus
Phi-3's partial rotation of the first `partial_rotary_factor` of each head.

The model asks for tables of inverse frequencies once (`rope_inv_freq`) and turns them into cos / sin for
each batch's positions (`rope_cos_sin`); LongRoPE keeps two tables and picks one per batch (`longrope_table`).
"""

import math

import torch

from qtune.config import ModelConfig


def rotary_dim(cfg: ModelConfig) -> int:
    """How many features of each head RoPE rotates (all of them unless partial_rotary_factor < 1)."""
    return int(cfg.head_dim * cfg.partial_rotary_factor)


def rope_inv_freq(cfg: ModelConfig, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) over the rotated features d, with the configured scaling. (d/2,)
    `local`: the sliding layers' plain RoPE with base `rope_local_theta` (Gemma 3). `long`: LongRoPE's
    table for sequences past the pre-training context (its short table otherwise)."""
    d = rotary_dim(cfg)
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    scaling = cfg.rope_scaling
    if not scaling or local:
        return inv_freq
    if scaling["rope_type"] == "longrope":
        # LongRoPE: each frequency is divided by its own searched factor, one set for short and one for long
        factors = scaling["long_factor" if long else "short_factor"]
        return inv_freq / torch.tensor(factors, dtype=torch.float32, device="cpu")
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, the band between blended
    # (Meta's reference `apply_scaling` in llama-models).
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def rope_attention_scale(cfg: ModelConfig) -> float:
    """The factor cos and sin are multiplied by: LongRoPE's sqrt(1 + ln(s) / ln(L0)) for a context stretched
    s = max_position_embeddings / L0 times (or its configured `attention_factor`); 1 otherwise."""
    scaling = cfg.rope_scaling
    if not scaling or scaling["rope_type"] != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    stretch = scaling.get("factor") or cfg.max_position_embeddings / original
    return 1.0 if stretch <= 1.0 else math.sqrt(1 + math.log(stretch) / math.log(original))


def longrope_past_original(cfg: ModelConfig, position_ids: torch.Tensor) -> bool:
    """Whether a LongRoPE model takes its long table for these positions: any past the pre-training context."""
    scaling = cfg.rope_scaling
    return bool(scaling and scaling["rope_type"] == "longrope"
                and int(position_ids.max()) + 1 > scaling["original_max_position_embeddings"])


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos and sin tables (times `scale`) for the given positions, each (B, 1, T, rotated features)."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :].to(position_ids.device)  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
    return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # RoPE in the half-split layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), over the first
    # cos.shape[-1] features (Phi-3's partial rotation leaves the rest of each head as it is)
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :d], x[..., d:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
