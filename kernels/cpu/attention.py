"""Causal attention for CPU fp32 training, in query blocks with batched matrix products.

torch's CPU flash attention runs its small per-block products at about a quarter of the machine's matmul
rate: at SmolLM2-135M's 4 x 256 tokens (9 query heads, 3 KV heads, d = 64) it takes 4.1 ms forward and
9.6 ms backward per layer. With gradient checkpointing a layer's attention runs forward twice and backward
once, so 18 ms a layer, 0.54 s of a 5.5 s step.

This version splits the queries into blocks of L rows. Block j (rows j0..j1) attends to keys 0..j1 only,
so the products cover (n + 1) / 2n of the full T x T score matrix for n blocks (9/16 with eight). The query
heads that share a KV head are stacked along the rows, so grouped-query attention needs no repeated K/V,
and each product is one batched GEMM over (batch, KV head):

    S = (c·Q_j) K_{:j1}ᵀ      P = softmax(S + mask)      O_j = P V_{:j1}          (c = d^-1/2)
    dV_{:j1} += Pᵀ dO_j       dP = dO_j V_{:j1}ᵀ         dS = P ∘ (dP − rowsum(dP ∘ P))
    dQ_j = c · dS K_{:j1}     dK_{:j1} += dSᵀ (c·Q_j)

The probabilities P are saved for backward instead of being recomputed: (n + 1) / 2n · H·T floats per
token. `block_attention_applies` takes this path only where that is at most one of the MLP's (N, I)
tensors (the layer's backward already holds several); longer sequences keep flash attention. Measured at
the shape above: 3.5 ms forward and 5.7 ms backward (13 ms a layer instead of 18).

The output comes back as (B, T, H, d), which is o_proj's input layout, so no transposed copy is made.

`cpu_attention` is the model's one attention call on the CPU: this block path where it applies,
`decode_attention` for one new token per row against a KV cache, and otherwise torch's SDPA called the way
that is fast on the CPU.
"""

import torch
import torch.nn.functional as F


def block_size(seq_len: int) -> int:
    """Rows per query block: 32, or T/8 for longer sequences (at most eight blocks, each a sizeable GEMM)."""
    return max(32, -(-seq_len // 8))


def saved_scores_per_token(n_heads: int, seq_len: int) -> float:
    """Floats of P saved per token: H times the mean number of keys a query block attends to."""
    L = block_size(seq_len)
    total = sum((min(j0 + L, seq_len) - j0) * min(j0 + L, seq_len) for j0 in range(0, seq_len, L))
    return n_heads * total / seq_len


def block_attention_applies(q: torch.Tensor, cache, intermediate_size: int) -> bool:
    """CPU fp32 without a KV cache, and P per token at most one (N, I) row.

    Forward passes without gradients take it too (they save nothing, and the forward is faster than
    flash attention's as well), so a frozen reference model scores exactly as the policy it started from.
    """
    return (not q.is_cuda and q.dtype == torch.float32 and cache is None
            and saved_scores_per_token(q.shape[1], q.shape[2]) <= intermediate_size)


class BlockCausalAttentionFn(torch.autograd.Function):
    """q (B, H, T, d), k and v (B, H_kv, T, d), mask None (causal) or bool (B, 1, T, T) -> (B, T, H, d)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        B, H, T, d = q.shape
        KV = k.shape[1]
        g, c, L = H // KV, d ** -0.5, block_size(T)
        k, v = k.contiguous(), v.contiguous()  # slices along T are then plain batched matrices
        q5 = q.unflatten(1, (KV, g))  # (B, KV, g, T, d), a view
        blocked = None if mask is None else ~mask.unsqueeze(2)  # (B, 1, 1, T, T): True where not allowed
        upper = torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1)  # later keys in a diagonal block
        out = q.new_empty(B, T, KV, g, d)
        saved = []
        for j0 in range(0, T, L):
            j1 = min(j0 + L, T)
            qj = q.new_empty(B, KV, g, j1 - j0, d)
            torch.mul(q5[:, :, :, j0:j1], c, out=qj)  # c·Q_j, query heads of a group stacked along rows
            qj = qj.view(B, KV, g * (j1 - j0), d)
            s = torch.matmul(qj, k[:, :, :j1].transpose(-1, -2))  # (B, KV, g·L_j, j1)
            s5 = s.view(B, KV, g, j1 - j0, j1)
            if blocked is None:
                s5[..., j0:].masked_fill_(upper[:j1 - j0, :j1 - j0], float("-inf"))  # the diagonal square only
            else:
                s5.masked_fill_(blocked[..., j0:j1, :j1], float("-inf"))
            p = torch.softmax(s, dim=-1)
            del s, s5
            out[:, j0:j1] = torch.matmul(p, v[:, :, :j1]).view(B, KV, g, j1 - j0, d).permute(0, 3, 1, 2, 4)
            saved += [qj, p]
        ctx.save_for_backward(k, v, *saved)
        ctx.dims = (B, H, T, d)
        return out.view(B, T, H, d)

    @staticmethod
    def backward(ctx, grad_out):
        k, v, *saved = ctx.saved_tensors
        B, H, T, d = ctx.dims
        KV = k.shape[1]
        g, c, L = H // KV, d ** -0.5, block_size(T)
        do5 = grad_out.reshape(B, T, KV, g, d)
        dq = grad_out.new_empty(B, T, KV, g, d)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for i, j0 in enumerate(range(0, T, L)):
            j1 = min(j0 + L, T)
            qj, p = saved[2 * i], saved[2 * i + 1]
            doj = do5[:, j0:j1].permute(0, 2, 3, 1, 4).reshape(B, KV, g * (j1 - j0), d)
            dv[:, :, :j1] += torch.matmul(p.transpose(-1, -2), doj)
            ds = torch._softmax_backward_data(torch.matmul(doj, v[:, :, :j1].transpose(-1, -2)), p, -1, p.dtype)
            dq[:, j0:j1] = torch.matmul(ds, k[:, :, :j1]).view(B, KV, g, j1 - j0, d).permute(0, 3, 1, 2, 4)
            dk[:, :, :j1] += torch.matmul(ds.transpose(-1, -2), qj)
        dq = dq.mul_(c).view(B, T, H, d).transpose(1, 2)  # (B, H, T, d)
        return dq, dk, dv, None


def block_causal_attention(q, k, v, mask=None) -> torch.Tensor:
    """Causal attention (B, H, T, d) x (B, H_kv, T, d) -> (B, T, H, d); mask: bool (B, 1, T, T) allowed pairs."""
    return BlockCausalAttentionFn.apply(q, k, v, mask)


def cpu_attention(q, k, v, mask, cache, intermediate_size: int) -> torch.Tensor:
    """Causal attention on the CPU: q (B, H, T, d), k and v (B, H_kv, S, d), mask None (causal) or bool
    (B, 1, T, S) -> (B, T, H, d). `cache` is the model's KV cache or None; `intermediate_size` bounds the
    probabilities the block path may save (see `block_attention_applies`)."""
    if block_attention_applies(q, cache, intermediate_size):
        return block_causal_attention(q, k, v, mask)
    if q.shape[2] == 1 and mask is not None:
        return decode_attention(q, k, v, mask)
    groups = q.shape[1] // k.shape[1]
    repeat_kv = mask is not None
    if repeat_kv:
        # CPU SDPA with a mask is ~10-100x slower with enable_gqa or a strided query (torch 2.13); without
        # a mask (plain causal) enable_gqa is the faster one: 15 vs 19 ms forward + backward at SmolLM2's
        # 4 x 256 tokens
        q = q.contiguous()
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, d)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                       enable_gqa=groups > 1 and not repeat_kv)  # (B, H, T, d)
    return y.transpose(1, 2)


def decode_attention(q, k, v, mask) -> torch.Tensor:
    """One query per row, as in decoding: q (B, H, 1, d), k and v (B, H_kv, S, d), mask bool (B, 1, 1, S)
    -> (B, 1, H, d).

    The g = H / H_kv query heads that share a KV head are the rows of one product against that head's keys,
    so the cache is read where it lies; CPU SDPA with a mask needs K and V repeated to H heads first, a copy
    of the whole cache at every layer and step (copies were 17% of a batch-16 SmolLM2-135M decoding profile,
    cache writes included).

        S = (c·q) Kᵀ (B, H_kv, g, S)      P = softmax(S masked)      y = P V       (c = d^-1/2)
    """
    B, H, _, d = q.shape
    n_kv = k.shape[1]
    q = q.reshape(B, n_kv, H // n_kv, d)  # head h = kv * g + j reads KV head h // g, as repeat_interleave pairs them
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(d ** -0.5)  # (B, H_kv, g, S)
    scores = scores.masked_fill_(~mask.view(B, 1, 1, -1), float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(p, v).view(B, 1, H, d)
