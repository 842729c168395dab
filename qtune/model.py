"""The decoder families in one file: Llama-2, Llama-3/3.1, Mistral (Nemo, Small), SmolLM2, Qwen2, Qwen3,
Gemma 2, Gemma 3 (text) and Phi-3/3.5/4.

RMSNorm -> attention (RoPE in Hugging Face's `rotate_half` layout, grouped-query heads, SDPA) -> RMSNorm
-> SwiGLU MLP, repeated; then a final RMSNorm and the output projection. Parameter names match Hugging
Face's (`model.layers.0.self_attn.q_proj.weight`, ...) so checkpoints and PEFT adapters load without
renaming, and the RoPE layout matches so adapters need no permutation.

What the other families change, each a ModelConfig switch:
- Qwen3, Gemma 3 (`qk_norm`): an RMSNorm over each head of q and k, before RoPE.
- Gemma (`gemma_norms`): norms scale by (1 + w) in fp32; the attention and MLP outputs are normalised too
  before joining the residual (four norms a layer); embeddings are multiplied by sqrt(D) rounded to the
  model's dtype; the MLP gate is tanh-approximated GELU (GeGLU, `hidden_act`).
- Gemma 2: attention scores and final logits are soft-capped, s -> cap · tanh(s / cap).
- `layer_types`: sliding-window layers (Gemma 2: every other one; Gemma 3: five of six, with their own
  RoPE base `rope_local_theta`).
- Mixtral, Qwen3-MoE (`num_experts`): the MLP is a mixture of experts; a router picks each token's top-k
  experts and their weights, and each expert runs once over all the tokens routed to it.
- Phi-3 (`fused_projections`): q, k, v come from one `qkv_proj` and gate, up from one `gate_up_proj`, as
  its checkpoints store them (so PEFT adapters on those modules load unchanged); RoPE may rotate only part
  of each head and use LongRoPE (qtune/rope.py).

Masks: `attention_mask` (B, T) holds 0 for padding and a positive *segment id* for real tokens. A token
attends to earlier tokens of the same segment only, so one tensor expresses both padding (all ids 1) and
packing (ids 1, 2, 3 ... for the examples sharing a row). Segment id -1 marks shared positions (the virtual
tokens of prompt tuning, the prefix of prefix tuning) that every later token attends to.

Virtual tokens (two optional slots, None by default, filled by qtune/peft/): `virtual_tokens` gives N
embeddings put in front of the input, `kv_prefix` gives N keys and values put in front of every layer's. As
PEFT counts them, they take positions 0..N-1 and each real token's position moves up by N; they enter once
(the first call of a KV cache), and hidden_states returns the real tokens' states only. Virtual tokens placed
inside the input instead (P-tuning's templates) are ids from the vocabulary size up: id V + j is row j of the
slot's `placed()` table; they are ordinary positions of the input.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qtune.config import ModelConfig
from qtune.rope import apply_rope, longrope_past_original, rope_attention_scale, rope_cos_sin, rope_inv_freq
from qtune.kernels.cpu.attention import cpu_attention
from qtune.kernels.document_attention import DocumentMask, document_attention, document_mask
from qtune.kernels.dispatch import check_mode
from qtune.kernels.lora import fused_params, fused_path, lora_qkv
from qtune.offload import HostCheckpoints, offloaded_checkpoint
from qtune.feed_forward import MLP, SparseMoE


def rms_norm(x, weight, eps: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNormFn's forward: y and r = 1 / sqrt(mean(x²) + eps) (..., 1) fp32."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
    if offset:
        return (xf * r * (weight.float() + offset)).to(x.dtype), r
    return weight * (xf * r).to(x.dtype), r


class RMSNormFn(torch.autograd.Function):
    """y = (w + offset) · (x r) with r = 1 / sqrt(mean(x²) + eps) and offset 0 (Llama) or 1 (Gemma). Llama
    rounds x r to x's dtype before the weight; Gemma multiplies by (1 + w) in fp32 and rounds once, as each
    reference implementation does. Saves x itself and r (one fp32 number per row).

    Backward in closed form, with x̂ = x r and g = dy · (w + offset):
        dx = r (g − x̂ · mean(g x̂)),     dw = Σ_rows dy · x̂
    (autograd through the forward's six ops took 3.1 ms per (1024, 576) fp32 backward on a CPU, this 1.6 ms).
    """

    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        y, r = rms_norm(x, weight, eps, offset)
        ctx.save_for_backward(x, weight, r)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, r = ctx.saved_tensors
        x_hat = x.float() * r  # (..., D) fp32
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g = grad_y.float() * (weight.float() + ctx.offset)
            grad_x = g.sub_(x_hat * (g * x_hat).mean(-1, keepdim=True)).mul_(r).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_y * x_hat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_w, None, None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · (w + offset): offset 0 for Llama, 1 for Gemma (whose w starts at 0)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return RMSNormFn.apply(x, self.weight, self.eps, self.offset)
        # no graph to record (decoding, frozen forwards): the ops without the autograd.Function's per-call cost
        # (75 microseconds a call under the profiler: 7% of a profiled SmolLM2-135M decoding step on one CPU thread)
        return rms_norm(x, self.weight, self.eps, self.offset)[0]


class KVCache:
    """Preallocated keys and values for every layer, plus the segment id of every cached position."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.segments = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len

    def start_with_prefix(self, prefix: list) -> None:
        """Begin an empty cache with prefix tuning's keys/values: prefix[layer] = (k, v), each (B, H_kv, N, d)."""
        n = prefix[0][0].shape[2]
        for layer, (k, v) in enumerate(prefix):
            self.k[layer][:, :, :n], self.v[layer][:, :, :n] = k, v
        self.segments[:, :n] = -1
        self.length = n

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


class PrefixedKV:
    """Without a KV cache, each layer's keys/values preceded by prefix tuning's (a cache that already holds the
    prefix and keeps nothing new). prefix[layer] = (k, v), each (B, H_kv, N, d); segments (B, N + T)."""

    def __init__(self, prefix: list, segments: torch.Tensor):
        self.prefix, self.segments = prefix, segments
        self.length = prefix[0][0].shape[2]

    def update(self, layer: int, k, v):
        pk, pv = self.prefix[layer]
        return torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2)  # (B, H_kv, N + T, d)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's soft-capping: cap · tanh(x / cap), smooth and bounded by ±cap; x itself when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def softcapped_attention(q, k, v, mask, scale: float, cap: float):
    """Attention with soft-capped scores (Gemma 2), which no fused attention kernel offers:
    softmax(cap · tanh(scale · q kᵀ / cap) + mask) v. q (B, H, T, d), k and v (B, H_kv, S, d) -> (B, T, H, d).
    It holds the (B, H, T, S) scores, as transformers' eager attention does."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, d)
    scores = softcap(torch.matmul(q, k.transpose(-1, -2)) * scale, cap)  # (B, H, T, S)
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril_(S - T)
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v).transpose(1, 2)


def attention_mask_4d(segments_q, segments_k, offset: int, window: int | None):
    """Boolean (B, 1, T, S) mask, True where query t (absolute position offset + t) may attend to key s."""
    T, S = segments_q.shape[1], segments_k.shape[1]
    q_idx = torch.arange(offset, offset + T, device=segments_q.device)[:, None]  # (T, 1)
    k_idx = torch.arange(S, device=segments_q.device)[None, :]  # (1, S)
    allowed = (k_idx <= q_idx)[None]  # (1, T, S) causal
    same = (segments_q[:, :, None] == segments_k[:, None, :]) & (segments_k[:, None, :] != 0)
    allowed = allowed & (same | (segments_k[:, None, :] < 0))  # -1: shared virtual positions, seen by all
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)[None]
    # A padding query has no key to attend to; letting it see itself keeps softmax finite (its output is unused).
    allowed = allowed | (k_idx == q_idx)[None]
    return allowed[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D = cfg.hidden_size
        # plain flags, read on every call (a missing submodule found by hasattr costs an exception each time)
        self.fused_qkv, self.qk_norm = cfg.fused_projections, cfg.qk_norm
        if cfg.fused_projections:
            self.qkv_proj = nn.Linear(D, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(D, self.n_head * self.head_dim, bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, D, bias=cfg.o_bias)
        if cfg.qk_norm:
            offset = 1.0 if cfg.gemma_norms else 0.0
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, offset)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, offset)
        # softmax(c · q kᵀ): c = d^-1/2, or Gemma's query_pre_attn_scalar^-1/2
        self.scale = (cfg.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.window = cfg.layer_window(layer_idx)  # picks the layer's mask and (Gemma 3) its RoPE table
        self.intermediate_size = cfg.intermediate_size  # bounds the scores block attention may save
        self.kernels = "auto"  # "triton" routes q/k/v through the fused QLoRA op (see kernels/dispatch.py)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        B, T, _ = x.shape
        if self.fused_qkv:  # Phi-3: rows of q, then k, then v
            q, k, v = self.qkv_proj(x).split([self.n_head * self.head_dim, *[self.n_kv * self.head_dim] * 2], -1)
        elif fused_path(self.kernels, x, self.q_proj, self.k_proj, self.v_proj):
            # one fused QLoRA op for the three projections: x is saved once, NF4 weights are recomputed
            projections = (self.q_proj, self.k_proj, self.v_proj)
            q, k, v = lora_qkv(x, *map(fused_params, projections), training=self.training, kernels=self.kernels)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q.view(B, T, self.n_head, self.head_dim), k.view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:  # over each head's d features, while they are contiguous rows
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, d), (B, H_kv, T, d)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H_kv, S, d)
        if isinstance(mask, DocumentMask):  # CUDA, packed or soft-capped: flex attention, no T x T mask
            y = document_attention(q, k, v, mask, self.scale, self.softcap)  # (B, T, H, d)
        elif self.softcap is not None:
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)  # (B, T, H, d)
        elif q.is_cuda:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                               enable_gqa=self.n_head > self.n_kv).transpose(1, 2)  # (B, T, H, d)
        else:
            if self.scale != self.head_dim ** -0.5:  # the CPU kernels scale by d^-1/2: fold the rest into q
                q = q * (self.scale * self.head_dim ** 0.5)
            y = cpu_attention(q, k, v, mask, cache, self.intermediate_size)  # (B, T, H, d)
        return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D, eps, offset = cfg.hidden_size, cfg.rms_norm_eps, 1.0 if cfg.gemma_norms else 0.0
        self.input_layernorm = RMSNorm(D, eps, offset)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(D, eps, offset)
        self.gemma_norms = cfg.gemma_norms
        if cfg.gemma_norms:
            self.pre_feedforward_layernorm = RMSNorm(D, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(D, eps, offset)
        self.ffn_name = "block_sparse_moe" if cfg.model_type == "mixtral" else "mlp"  # Mixtral checkpoints' name
        self.add_module(self.ffn_name, SparseMoE(cfg) if cfg.num_experts else MLP(cfg))
        self.adapter: nn.Module | None = None
        """Optional: called as adapter(where, block_input, block_output) -> block_output after each sub-block
        (where = "attention" / "feed_forward"); bottleneck adapters live here."""

    @property
    def ffn(self) -> nn.Module:
        """The feed-forward block: `mlp`, or Mixtral's `block_sparse_moe`."""
        return self._modules[self.ffn_name]

    def forward(self, x, cos, sin, mask, cache=None):
        if self.gemma_norms:
            # Gemma: each block's output is normalised too before it joins the residual stream
            x = x + self.post_attention_layernorm(self.sub_block("attention", self.input_layernorm(x), cos, sin, mask,
                                                                 cache))
            return x + self.post_feedforward_layernorm(self.sub_block("feed_forward", self.pre_feedforward_layernorm(x)))
        x = x + self.sub_block("attention", self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.sub_block("feed_forward", self.post_attention_layernorm(x))

    def sub_block(self, where: str, h, *attention_args):
        """The attention (`where` = "attention") or feed-forward block on its normalised input h, through the
        adapter slot when one is set."""
        out = self.self_attn(h, *attention_args) if where == "attention" else self.ffn(h)
        return out if self.adapter is None else self.adapter(where, h, out)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, 1.0 if cfg.gemma_norms else 0.0)


class CausalLM(nn.Module):
    """A Llama-family decoder with its output projection (Hugging Face's `*ForCausalLM` layout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.set_rope_tables("cpu")
        self.gradient_checkpointing = False
        self.offload_checkpoints = False  # with gradient checkpointing: keep the checkpoints in host memory
        self.kernels = "auto"  # the kernel choice every layer and loss of this model uses; see set_kernels
        self.logit_softcap = cfg.final_logit_softcapping  # Gemma 2: the losses cap logits as forward() does
        # module(B) -> (B, N, D) embeddings before the input, or None; its placed() -> (N, D) rows of ids >= V, or None
        self.virtual_tokens: nn.Module | None = None
        self.kv_prefix: nn.Module | None = None  # module(B) -> per layer (k, v) (B, H_kv, N, d) before its own, or None

    def set_rope_tables(self, device) -> None:
        """(Re)build the RoPE inverse frequencies on `device` (a model built on the meta device has none):
        `rope_inv_freq`, `rope_local_inv_freq` for Gemma 3's sliding layers, `rope_long_inv_freq` for LongRoPE."""
        self.register_buffer("rope_inv_freq", rope_inv_freq(self.config).to(device), persistent=False)
        if self.config.rope_local_theta is not None:
            local = rope_inv_freq(self.config, local=True).to(device)
            self.register_buffer("rope_local_inv_freq", local, persistent=False)
        if self.config.rope_scaling and self.config.rope_scaling["rope_type"] == "longrope":
            long = rope_inv_freq(self.config, long=True).to(device)
            self.register_buffer("rope_long_inv_freq", long, persistent=False)

    def output_weight(self) -> torch.Tensor:
        """The (V, D) output projection (the embedding matrix when tied), for fused log-prob losses."""
        return self.lm_head.weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of final hidden states (..., D), soft-capped where the model is (Gemma 2)."""
        return softcap(self.lm_head(hidden), self.logit_softcap)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, kv_cache: KVCache | None = None):
        """Final normalised hidden states (B, T, D) of the input tokens (virtual tokens are not returned).

        input_ids (B, T); attention_mask (B, T) segment ids (0 = padding) or None for plain causal;
        position_ids (B, T), by default counting from the cache length; kv_cache for incremental decoding.
        """
        B, T = input_ids.shape
        x = self.embed(input_ids)  # (B, T, D)
        prompt, prefix, n = self.virtual_inputs(B)
        fresh = kv_cache is None or kv_cache.length == 0  # virtual tokens enter once, in front of everything
        if position_ids is None:
            offset = (kv_cache.length if kv_cache is not None else 0) + (n if fresh else 0)
            position_ids = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        else:
            position_ids = position_ids + n  # the virtual tokens hold positions 0..n-1
        if prompt is not None and fresh:
            x = torch.cat([prompt.to(x.dtype), x], 1)  # (B, n + T, D)
            position_ids = torch.cat([torch.arange(n, device=x.device).expand(B, n), position_ids], 1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_full((B, n), -1), attention_mask], 1)
        if prefix is not None and kv_cache is None:
            kv_cache = PrefixedKV(prefix, torch.full((B, n + T), -1, device=x.device))
        elif prefix is not None and fresh:
            kv_cache.start_with_prefix(prefix)
        # LongRoPE switches to its long table once any position passes the pre-training context
        freq = self.rope_long_inv_freq if longrope_past_original(self.config, position_ids) else self.rope_inv_freq
        rope = {None: rope_cos_sin(freq, position_ids, x.dtype, rope_attention_scale(self.config))}
        masks = {None: self._mask(position_ids, attention_mask, kv_cache, None)}
        if self.config.sliding_window is not None:
            local_freq = getattr(self, "rope_local_inv_freq", self.rope_inv_freq)
            rope[self.config.sliding_window] = rope_cos_sin(local_freq, position_ids, x.dtype)
            masks[self.config.sliding_window] = self._mask(position_ids, attention_mask, kv_cache,
                                                           self.config.sliding_window)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        host = HostCheckpoints(x.device) if checkpointing and self.offload_checkpoints else None
        for layer in self.model.layers:
            (cos, sin), mask = rope[layer.self_attn.window], masks[layer.self_attn.window]
            if host is not None:  # each layer's input waits in host memory (qtune/offload.py)
                x = offloaded_checkpoint(layer, x, host, cos, sin, mask, kv_cache)
            elif checkpointing:
                x = checkpoint(layer, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += x.shape[1]
        return self.model.norm(x[:, x.shape[1] - T:])

    def embed(self, input_ids) -> torch.Tensor:
        """Input embeddings (B, T, D); Gemma scales them by sqrt(D) rounded to their dtype (virtual tokens, which
        are embeddings already, are not scaled: transformers scales inside its embedding layer)."""
        placed = self.virtual_tokens.placed() if self.virtual_tokens is not None else None  # (N, D) or None
        V = self.model.embed_tokens.num_embeddings
        x = self.model.embed_tokens(input_ids if placed is None else input_ids.clamp(max=V - 1))
        if self.config.gemma_norms:
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        if placed is not None:  # ids V + j are the placed virtual tokens: row j of the table
            rows = placed[(input_ids - V).clamp(min=0)].to(x.dtype)  # (B, T, D)
            x = torch.where((input_ids >= V)[..., None], rows, x)
        return x

    def virtual_inputs(self, batch_size: int):
        """(prompt embeddings (B, N, D) or None, per-layer prefix keys/values or None, N) of the active slots."""
        prompt = self.virtual_tokens(batch_size) if self.virtual_tokens is not None else None
        prefix = self.kv_prefix(batch_size) if self.kv_prefix is not None else None
        n = prompt.shape[1] if prompt is not None else prefix[0][0].shape[2] if prefix is not None else 0
        return prompt, prefix, n

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache: KVCache | None = None):
        """Logits (B, T, V)."""
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, kv_cache))

    def _mask(self, positions, attention_mask, kv_cache, window):
        T = positions.shape[1]
        if kv_cache is None:
            capped = self.config.attn_logit_softcapping is not None  # no SDPA kernel soft-caps scores
            if attention_mask is None and (window is None or T <= window) and not (capped and positions.is_cuda):
                return None  # plain causal: SDPA's fast is_causal path (on a CPU, soft-capped attention's own)
            segments = attention_mask if attention_mask is not None else torch.ones_like(positions)
            if positions.is_cuda:
                return document_mask(segments, window)  # flex attention's block mask, linear in T
            return attention_mask_4d(segments, segments, 0, window)
        start, end = kv_cache.length, kv_cache.length + T
        kv_cache.segments[:, start:end] = attention_mask if attention_mask is not None else 1
        segments_k = kv_cache.segments[:, :end]
        return attention_mask_4d(segments_k[:, start:], segments_k, start, window)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache for `max_len` tokens (plus room for the active virtual tokens)."""
        p = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len + self.virtual_inputs(1)[2], p.device, p.dtype)

    def set_kernels(self, mode: str) -> None:
        """Choose "auto" | "triton" | "torch" for the model (`self.kernels`, which training losses read) and
        every layer with a kernel switch (attention, MLP, quantized and LoRA layers)."""
        check_mode(mode)
        for m in self.modules():
            if hasattr(m, "kernels"):
                m.kernels = mode
