"""The Llama family in one file: Llama-2, Llama-3/3.1, Mistral, SmolLM2, Qwen2.

RMSNorm -> attention (RoPE in Hugging Face's `rotate_half` layout, grouped-query heads, SDPA) -> RMSNorm
-> SwiGLU MLP, repeated; then a final RMSNorm and the output projection. Parameter names match Hugging
Face's (`model.layers.0.self_attn.q_proj.weight`, ...) so checkpoints and PEFT adapters load without
renaming, and the RoPE layout matches so adapters need no permutation.

Masks: `attention_mask` (B, T) holds 0 for padding and a positive *segment id* for real tokens. A token
attends to earlier tokens of the same segment only, so one tensor expresses both padding (all ids 1) and
packing (ids 1, 2, 3 ... for the examples sharing a row).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qtune.config import ModelConfig
from qtune.kernels.cpu.attention import cpu_attention
from qtune.kernels.dispatch import check_mode, use_triton
from qtune.kernels.lora import LoraParams, lora_mlp, lora_qkv


class RMSNormFn(torch.autograd.Function):
    """y = w · (x r) with r = 1 / sqrt(mean(x²) + eps), normalised in fp32 and rounded to x's dtype before
    the weight like the reference implementation. Saves x itself and r (one fp32 number per row).

    Backward in closed form, with x̂ = x r and g = dy · w:
        dx = r (g − x̂ · mean(g x̂)),     dw = Σ_rows dy · x̂
    (autograd through the forward's six ops took 3.1 ms per (1024, 576) fp32 backward on a CPU, this 1.6 ms).
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # (..., 1) fp32
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, r = ctx.saved_tensors
        x_hat = x.float() * r  # (..., D) fp32
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g = grad_y.float() * weight.float()
            grad_x = g.sub_(x_hat * (g * x_hat).mean(-1, keepdim=True)).mul_(r).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_y * x_hat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # y = x / sqrt(mean(x^2) + eps) * w
        return RMSNormFn.apply(x, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama-3.1 / linear scaling applied when configured. (d/2,)"""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq
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


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin tables for the given positions, each (B, 1, T, head_dim)."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :].to(position_ids.device)  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    # RoPE in the half-split layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated keys and values for every layer, plus the segment id of every cached position."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.segments = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k, v):
        """Store this step's keys/values (B, H_kv, T, d); return everything cached so far (B, H_kv, S, d)."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished sequences: keep only batch rows `rows` (so later steps compute less)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.segments = self.segments.index_select(0, rows)


def attention_mask_4d(segments_q, segments_k, offset: int, window: int | None):
    """Boolean (B, 1, T, S) mask, True where query t (absolute position offset + t) may attend to key s."""
    T, S = segments_q.shape[1], segments_k.shape[1]
    q_idx = torch.arange(offset, offset + T, device=segments_q.device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=segments_q.device)[None, :]  # (1, S)
    allowed = (k_idx <= q_idx)[None]  # (1, T, S) causal
    allowed = allowed & (segments_q[:, :, None] == segments_k[:, None, :]) & (segments_k[:, None, :] != 0)
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)[None]
    # A padding query has no key to attend to; letting it see itself keeps softmax finite (its output is unused).
    allowed = allowed | (k_idx == q_idx)[None]
    return allowed[:, None]


def fused_path(mode: str, x, *projections) -> bool:
    """Use a fused QLoRA block when the Triton kernels run for x and some projection is quantized or adapted
    (offers `fused_params`)."""
    return use_triton(mode, x) and any(hasattr(p, "fused_params") for p in projections)


def fused_params(projection: nn.Module) -> LoraParams:
    """A projection as the fused ops take it: an adapted or quantized layer describes itself (frozen weight,
    bias, active adapter A / B, scale, dropout p); a plain `nn.Linear` is its weight and bias."""
    if hasattr(projection, "fused_params"):
        return projection.fused_params()
    return LoraParams(projection.weight, projection.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, D, bias=cfg.o_bias)
        self.intermediate_size = cfg.intermediate_size  # bounds the scores block attention may save
        self.kernels = "auto"  # "triton" routes q/k/v through the fused QLoRA op (see kernels/dispatch.py)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        B, T, _ = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if fused_path(self.kernels, x, *projections):
            # one fused QLoRA op for the three projections: x is saved once, NF4 weights are recomputed
            q, k, v = lora_qkv(x, *map(fused_params, projections), training=self.training, kernels=self.kernels)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, H_kv, T, d)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H_kv, S, d)
        if q.is_cuda:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_head > self.n_kv).transpose(1, 2)  # (B, T, H, d)
        else:
            y = cpu_attention(q, k, v, mask, cache, self.intermediate_size)  # (B, T, H, d)
        return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.kernels = "auto"  # "triton" runs the whole block as one fused QLoRA op

    def forward(self, x):
        # SwiGLU: down(silu(gate x) * up x)
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if fused_path(self.kernels, x, *projections):
            # the fused block saves x, gate x and up x only and recomputes the rest in backward
            return lora_mlp(x, *map(fused_params, projections), training=self.training, kernels=self.kernels)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """A Llama-family decoder with its output projection (Hugging Face's `*ForCausalLM` layout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False
        self.kernels = "auto"  # the kernel choice every layer and loss of this model uses; see set_kernels

    def output_weight(self) -> torch.Tensor:
        """The (V, D) output projection (the embedding matrix when tied), for fused log-prob losses."""
        return self.lm_head.weight

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, kv_cache: KVCache | None = None):
        """Final normalised hidden states (B, T, D).

        input_ids (B, T); attention_mask (B, T) segment ids (0 = padding) or None for plain causal;
        position_ids (B, T), by default counting from the cache length; kv_cache for incremental decoding.
        """
        B, T = input_ids.shape
        offset = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(self.rope_inv_freq, position_ids, x.dtype)
        mask = self._mask(input_ids, attention_mask, kv_cache)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        return self.model.norm(x)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache: KVCache | None = None):
        """Logits (B, T, V)."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, kv_cache))

    def _mask(self, input_ids, attention_mask, kv_cache):
        window = self.config.sliding_window
        T = input_ids.shape[1]
        if kv_cache is None:
            if attention_mask is None and (window is None or T <= window):
                return None  # plain causal: SDPA's fast is_causal path
            segments = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            return attention_mask_4d(segments, segments, 0, window)
        start, end = kv_cache.length, kv_cache.length + T
        kv_cache.segments[:, start:end] = attention_mask if attention_mask is not None else 1
        segments_k = kv_cache.segments[:, :end]
        return attention_mask_4d(segments_k[:, start:], segments_k, start, window)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    def set_kernels(self, mode: str) -> None:
        """Choose "auto" | "triton" | "torch" for the model (`self.kernels`, which training losses read) and
        every layer with a kernel switch (attention, MLP, quantized and LoRA layers)."""
        check_mode(mode)
        for m in self.modules():
            if hasattr(m, "kernels"):
                m.kernels = mode
