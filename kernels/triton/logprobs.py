"""Triton kernels of `qtune.kernels.logprobs`: online log-sum-exp partials and the recomputed logit gradients.

The math, the references, the plain-torch path, the autograd functions and the public ops are in
kernels/logprobs.py; this module is imported only when a kernel is launched.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _logit_tile(h_ptr, w_ptr, tokens, rows_ok, cols, V, D,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = h[tokens] @ W[cols]^T for one (BLOCK_N, BLOCK_V) tile, accumulated in fp32 over D."""
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ks = d0 + tl.arange(0, BLOCK_D)
        h = tl.load(h_ptr + tokens[:, None] * D + ks[None, :], mask=rows_ok[:, None] & (ks[None, :] < D), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * D + ks[None, :], mask=(cols[:, None] < V) & (ks[None, :] < D), other=0.0)
        z = tl.dot(h, tl.trans(w), z, input_precision="ieee")  # (BLOCK_N, BLOCK_V); exact fp32 for fp32 inputs
    return z


@triton.jit
def _softcap(z, SOFTCAP: tl.constexpr):
    """c = cap · tanh(z / cap), tanh written as 2 σ(2x) − 1; z itself when SOFTCAP is 0 (no capping)."""
    if SOFTCAP > 0:
        z = SOFTCAP * (2.0 * tl.sigmoid(2.0 * z / SOFTCAP) - 1.0)
    return z


@triton.jit
def logsumexp_partials_kernel(h_ptr, w_ptr, y_ptr, token_ptr, max_ptr, sumexp_ptr, zsum_ptr, target_ptr, M, V, D,
                              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                              VOCAB_SPLIT: tl.constexpr, SOFTCAP: tl.constexpr):
    """Online log-sum-exp statistics of BLOCK_N of the M scored tokens over one VOCAB_SPLIT-wide vocabulary slice.

    token_ptr lists the rows of h that are scored (masked tokens are skipped). Writes, per scored token and
    slice (row `split` of the (n_splits, M) outputs): the max logit m, s = sum exp(z - m), t = sum exp(z - m) z,
    and the target logit if the target falls in this slice (else 0).
    """
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < M
    tokens = tl.load(token_ptr + rows, mask=rows_ok, other=0)
    y = tl.load(y_ptr + tokens, mask=rows_ok, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    z_target = tl.zeros((BLOCK_N,), tl.float32)
    v_start = split * VOCAB_SPLIT
    for v0 in range(v_start, tl.minimum(v_start + VOCAB_SPLIT, V), BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        z = _softcap(_logit_tile(h_ptr, w_ptr, tokens, rows_ok, cols, V, D, BLOCK_N, BLOCK_V, BLOCK_D), SOFTCAP)
        in_vocab = cols[None, :] < V
        z = tl.where(in_vocab, z, float("-inf"))
        # m' = max(m, max_j z_j); rescale the running sums by exp(m - m'). The first tile of a slice is never
        # empty, so m' is finite and exp(-inf - m') = 0 starts the sums cleanly.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # (BLOCK_N, BLOCK_V), 0 past the vocabulary
        s = s * alpha + tl.sum(e, axis=1)
        t = t * alpha + tl.sum(e * tl.where(in_vocab, z, 0.0), axis=1)
        z_target += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m = m_new
    out = split * M + rows
    tl.store(max_ptr + out, m, mask=rows_ok)
    tl.store(sumexp_ptr + out, s, mask=rows_ok)
    tl.store(zsum_ptr + out, t, mask=rows_ok)
    tl.store(target_ptr + out, z_target, mask=rows_ok)


@triton.jit
def logit_grad_kernel(h_ptr, w_ptr, y_ptr, token_ptr, lse_ptr, mean_logit_ptr, grad_logp_ptr, grad_entropy_ptr,
                      grad_z_ptr, M, V, D, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                      SOFTCAP: tl.constexpr):
    """Recompute one (BLOCK_N, BLOCK_V) logit tile of M scored tokens (rows token_ptr of h; per-token inputs
    and the (M, V) output are indexed 0..M-1) and write dL/dz = g (onehot - p) + g_H p (E[z] - z), times
    dc/dz = 1 - (c / cap)² when the logits z are soft-capped to c."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    rows_ok = rows < M
    tokens = tl.load(token_ptr + rows, mask=rows_ok, other=0)
    z = _softcap(_logit_tile(h_ptr, w_ptr, tokens, rows_ok, cols, V, D, BLOCK_N, BLOCK_V, BLOCK_D), SOFTCAP)
    y = tl.load(y_ptr + tokens, mask=rows_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rows_ok, other=0.0)
    mean_logit = tl.load(mean_logit_ptr + rows, mask=rows_ok, other=0.0)
    g = tl.load(grad_logp_ptr + rows, mask=rows_ok, other=0.0)
    g_entropy = tl.load(grad_entropy_ptr + rows, mask=rows_ok, other=0.0)
    p = tl.exp(z - lse[:, None])  # (BLOCK_N, BLOCK_V)
    grad_z = p * (g_entropy[:, None] * (mean_logit[:, None] - z) - g[:, None])
    grad_z += tl.where(cols[None, :] == y[:, None], g[:, None], 0.0)
    if SOFTCAP > 0:
        grad_z *= 1.0 - (z / SOFTCAP) * (z / SOFTCAP)
    mask = rows_ok[:, None] & (cols[None, :] < V)
    tl.store(grad_z_ptr + rows[:, None] * V + cols[None, :], grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Blocks:
    """One shipped tile configuration of both kernels."""

    block_n: int  # tokens per tile
    block_v: int  # vocabulary columns per tile
    block_d: int  # hidden features per dot step
    vocab_split: int  # vocabulary columns per forward program (a multiple of block_v)
    num_warps: int
    num_stages: int


# 16-bit inputs run on tensor cores; fp32 uses exact fp32 dots (like torch's default matmul). The tiles are
# chosen to compile without register spills on sm_80..sm_90 even when the JIT cannot assume aligned
# sizes (an odd token count after masking); benchmarks/kernel_report.py checks this for every target.
BLOCKS = {
    torch.bfloat16: Blocks(block_n=64, block_v=128, block_d=32, vocab_split=2048, num_warps=8, num_stages=3),
    torch.float16: Blocks(block_n=64, block_v=128, block_d=32, vocab_split=2048, num_warps=8, num_stages=3),
    torch.float32: Blocks(block_n=64, block_v=64, block_d=32, vocab_split=1024, num_warps=8, num_stages=2),
}
# Where those tiles spill, per range of compute capabilities [low, high) (10 * major + minor):
# - Turing (sm_75: T4, RTX 20xx): the 16-bit tiles take 255 registers and spill up to 2 KB per thread;
#   half-width vocabulary tiles do not.
# - consumer Blackwell (sm_120: RTX 50xx): the pipelined fp32 forward spills 12 B; one stage does not.
ARCH_BLOCKS = (
    ((0, 80), {
        torch.bfloat16: Blocks(block_n=64, block_v=64, block_d=32, vocab_split=2048, num_warps=8, num_stages=2),
        torch.float16: Blocks(block_n=64, block_v=64, block_d=32, vocab_split=2048, num_warps=8, num_stages=2),
    }),
    ((120, 130), {
        torch.float32: Blocks(block_n=64, block_v=64, block_d=32, vocab_split=1024, num_warps=8, num_stages=1),
    }),
)


# Soft-capped logits (tanh per logit) take more registers: BLOCKS' fp32 tiles then spill (the forward 24 B on
# sm_90, the gradient 20 B on sm_75), and so do one-stage and 32-row ones somewhere in sm_75..sm_120; 16-row
# tiles on 4 warps do not. They take over on every capability.
SOFTCAP_BLOCKS = {
    torch.float32: Blocks(block_n=16, block_v=64, block_d=32, vocab_split=1024, num_warps=4, num_stages=2),
}


@functools.cache
def _capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def blocks_for(hidden: torch.Tensor, softcap=None) -> Blocks:
    """The tiles for hidden's dtype on hidden's device: SOFTCAP_BLOCKS for capped logits, else an ARCH_BLOCKS
    exception where one applies, else BLOCKS."""
    if softcap and hidden.dtype in SOFTCAP_BLOCKS:
        return SOFTCAP_BLOCKS[hidden.dtype]
    if hidden.is_cuda:
        capability = _capability(hidden.device.index or 0)
        for (low, high), table in ARCH_BLOCKS:
            if low <= capability < high and hidden.dtype in table:
                return table[hidden.dtype]
    return BLOCKS[hidden.dtype]


def logsumexp_partials(hidden, weight, targets, tokens, softcap=None):
    """(m, s, t, z_target), each (n_splits, M) fp32: the kernel's statistics of the M rows `tokens` of hidden
    over each VOCAB_SPLIT-wide vocabulary slice (M > 0); the rows are read through the index, not copied.
    `softcap`: statistics of the capped logits cap · tanh(z / cap)."""
    (_, D), V, M = hidden.shape, weight.shape[0], tokens.numel()
    cfg = blocks_for(hidden, softcap)
    n_splits = triton.cdiv(V, cfg.vocab_split)
    m, s, t, z_target = torch.empty(4, n_splits, M, device=hidden.device, dtype=torch.float32)
    grid = (triton.cdiv(M, cfg.block_n), n_splits)
    logsumexp_partials_kernel[grid](
        hidden, weight, targets, tokens, m, s, t, z_target, M, V, D,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, VOCAB_SPLIT=cfg.vocab_split,
        SOFTCAP=softcap or 0.0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return m, s, t, z_target


def logit_grad_triton(hidden, weight, targets, tokens, lse, mean_logit, grad_logp, grad_entropy, softcap=None):
    """dL/dz (M, V) in the input dtype for the rows `tokens` of hidden, recomputing the logits tile by tile.
    lse, mean_logit and the gradients are the (M,) values of those rows."""
    D, V, M = hidden.shape[1], weight.shape[0], tokens.numel()
    cfg = blocks_for(hidden, softcap)
    grad_z = torch.empty(M, V, device=hidden.device, dtype=hidden.dtype)
    grid = (triton.cdiv(M, cfg.block_n), triton.cdiv(V, cfg.block_v))
    logit_grad_kernel[grid](
        hidden, weight, targets, tokens, lse, mean_logit, grad_logp, grad_entropy, grad_z, M, V, D,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, SOFTCAP=softcap or 0.0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return grad_z


def logits_backward_triton(hidden, weight, targets, valid, lse, mean_logit, grad_logp, grad_entropy, chunk_size,
                           need_weight, softcap=None):
    """dL/dh (N, D) fp32 and dL/dW (V, D) fp32 (or None): Triton writes dz for `chunk_size` valid rows at a
    time, cuBLAS does the two matmuls. Rows that are not valid get zero gradient; `softcap`: the gradient
    through capped logits.

    dz is linear in the upstream gradients (g, g_H), so they enter divided by `scale` (their largest magnitude
    over 2^10) and the products are multiplied back: the 16-bit dz then spans ~1e-3..1e3 instead of g · p,
    which for a loss averaged over 10^4 tokens and a 10^5 vocabulary lies far below fp16's smallest normal
    (6e-5). dL/dW sums its per-chunk products in fp32, rounded once by the caller.
    """
    tokens = valid.nonzero().squeeze(1)  # (M,)
    scale = torch.maximum(grad_logp.abs().max(), grad_entropy.abs().max()).clamp_min(1e-30) / 1024  # on the device
    grad_logp, grad_entropy = grad_logp / scale, grad_entropy / scale
    grad_h = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
    grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
    for start in range(0, tokens.numel(), chunk_size):
        rows = tokens[start:start + chunk_size]  # (C,)
        grad_z = logit_grad_triton(hidden, weight, targets, rows, lse[rows], mean_logit[rows], grad_logp[rows],
                                   grad_entropy[rows], softcap)  # (C, V), scaled by 1 / scale
        grad_h[rows] = (grad_z @ weight).float().mul_(scale)
        if need_weight:
            grad_w.add_((grad_z.T @ hidden[rows]).float().mul_(scale))
    return grad_h, grad_w
