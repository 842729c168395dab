"""Token log-probabilities, cross-entropy and entropy straight from hidden states and the `lm_head` weight.

For hidden states h (N, D), the `lm_head` weight W (V, D) and targets y (N,):

    z[i, j]  = h[i] . W[j]                       (the logits, never held for all N x V at once)
    lse[i]   = log sum_j exp(z[i, j])
    logp[i]  = z[i, y_i] - lse[i]                (DPO / PPO log-probabilities; 0 where y_i = ignore_index)
    H[i]     = lse[i] - sum_j p[i, j] z[i, j]    (entropy, p = softmax(z))
    CE       = -sum_i logp[i] over unmasked tokens

The forward pass walks the vocabulary tile by tile with an online log-sum-exp (Milakov & Gimelshein 2018,
"Online normalizer calculation for softmax"): per token it keeps the running max m, s = sum exp(z - m),
t = sum exp(z - m) z and the target logit. Partial statistics of separate vocabulary slices merge exactly:

    M = max_k m_k,  S = sum_k s_k exp(m_k - M),  T = sum_k t_k exp(m_k - M),  lse = M + log S,  E[z] = T / S

Gradients, with upstream g = dL/dlogp and g_H = dL/dH:

    dL/dz[i, j] = g_i (onehot(y_i)_j - p[i, j]) + g_H,i p[i, j] (E[z]_i - z[i, j])
    dL/dh = dz @ W,   dL/dW = dz^T @ h

Memory trade-off: backward *recomputes* the logits chunk by chunk instead of computing gradients during the
forward pass ("fused linear cross-entropy"). Forward saves two fp32 numbers per token (lse, E[z]) besides
the inputs, and the same op serves per-token outputs whose upstream gradient is unknown at forward time
(DPO and PPO weight each token's log-probability), at the price of one extra h @ W^T matmul (4 matmuls
instead of 3). One case skips the recomputation: `cross_entropy_sum` with a frozen weight (QLoRA's
lm_head) on the plain-torch path knows its upstream gradient up to one scalar, so it accumulates dL/dh
during the forward walk (`cross_entropy_one_pass_torch`: 2 matmuls instead of 3, an (N, D) fp32 gradient
kept until backward). The Triton backward writes the logit gradients of `chunk_size` tokens (chunk_size x V in the
input dtype: 262 MB for 1024 tokens of a 128256 vocabulary in bf16) and lets cuBLAS do the two matmuls;
the plain-torch path holds at most two chunk_size x VOCAB_CHUNK fp32 tiles (4 MB each at the defaults)
and one chunk_size x D product. On a CPU its products run through oneDNN (kernels/cpu/linear.py).

Masked tokens (ignore_index) cost the Triton path nothing: its kernels read the scored rows through an
index. The torch path computes them and zeroes them, since gathering rows would copy them.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qtune.kernels.dispatch import use_triton
from qtune.kernels.cpu.linear import linear, matmul
from qtune.kernels import KernelSpec

VOCAB_CHUNK = 1024  # vocabulary columns per step of the plain-torch path (4 MB fp32 tiles at 1024 tokens)


def reference_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int = -100) -> torch.Tensor:
    """The spec: log_softmax over the full (N, V) logits, gathered at the targets; 0 for masked tokens."""
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)  # (N, V)
    valid = targets != ignore_index
    picked = logp.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)  # (N,)
    return torch.where(valid, picked, 0.0)


def reference_token_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            ignore_index: int = -100) -> torch.Tensor:
    """The spec for the entropy of softmax(h @ W^T) per token; 0 for masked tokens."""
    logp = torch.log_softmax(hidden @ weight.T, dim=-1)  # (N, V)
    entropy = -(logp.exp() * logp).sum(-1)  # (N,)
    return torch.where(targets != ignore_index, entropy, 0.0)


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
def logsumexp_partials_kernel(h_ptr, w_ptr, y_ptr, token_ptr, max_ptr, sumexp_ptr, zsum_ptr, target_ptr, M, V, D,
                              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                              VOCAB_SPLIT: tl.constexpr):
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
        z = _logit_tile(h_ptr, w_ptr, tokens, rows_ok, cols, V, D, BLOCK_N, BLOCK_V, BLOCK_D)
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
                      grad_z_ptr, M, V, D, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Recompute one (BLOCK_N, BLOCK_V) logit tile of M scored tokens (rows token_ptr of h; per-token inputs
    and the (M, V) output are indexed 0..M-1) and write dL/dz = g (onehot - p) + g_H p (E[z] - z)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    rows_ok = rows < M
    tokens = tl.load(token_ptr + rows, mask=rows_ok, other=0)
    z = _logit_tile(h_ptr, w_ptr, tokens, rows_ok, cols, V, D, BLOCK_N, BLOCK_V, BLOCK_D)
    y = tl.load(y_ptr + tokens, mask=rows_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rows_ok, other=0.0)
    mean_logit = tl.load(mean_logit_ptr + rows, mask=rows_ok, other=0.0)
    g = tl.load(grad_logp_ptr + rows, mask=rows_ok, other=0.0)
    g_entropy = tl.load(grad_entropy_ptr + rows, mask=rows_ok, other=0.0)
    p = tl.exp(z - lse[:, None])  # (BLOCK_N, BLOCK_V)
    grad_z = p * (g_entropy[:, None] * (mean_logit[:, None] - z) - g[:, None])
    grad_z += tl.where(cols[None, :] == y[:, None], g[:, None], 0.0)
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
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _merge_partials(m, s, t, z_target):
    """Merge (n_splits, M) online log-sum-exp statistics into lse, E[z] and the target logit, each (M,)."""
    m_max = m.max(dim=0).values  # (M,)
    scale = torch.exp(m - m_max)  # (n_splits, M)
    sumexp = (s * scale).sum(0)
    lse = m_max + torch.log(sumexp)
    mean_logit = (t * scale).sum(0) / sumexp
    return lse, mean_logit, z_target.sum(0)


def logsumexp_stats_triton(hidden, weight, targets, valid):
    """(lse, E[z], target logit), each (N,) fp32 and 0 where not `valid`, from the fused Triton forward kernel.

    Only the valid rows are computed: the kernel reads them through an index, so nothing is copied."""
    tokens = valid.nonzero().squeeze(1)  # (M,)
    (N, D), V, M = hidden.shape, weight.shape[0], tokens.numel()
    stats = torch.zeros(3, N, device=hidden.device, dtype=torch.float32)
    if M == 0:
        return stats.unbind(0)
    cfg = BLOCKS[hidden.dtype]
    n_splits = triton.cdiv(V, cfg.vocab_split)
    m, s, t, z_target = torch.empty(4, n_splits, M, device=hidden.device, dtype=torch.float32)
    grid = (triton.cdiv(M, cfg.block_n), n_splits)
    logsumexp_partials_kernel[grid](
        hidden, weight, targets, tokens, m, s, t, z_target, M, V, D,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, VOCAB_SPLIT=cfg.vocab_split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    stats[:, tokens] = torch.stack(_merge_partials(m, s, t, z_target))
    return stats.unbind(0)


def logit_grad_triton(hidden, weight, targets, tokens, lse, mean_logit, grad_logp, grad_entropy):
    """dL/dz (M, V) in the input dtype for the rows `tokens` of hidden, recomputing the logits tile by tile.
    lse, mean_logit and the gradients are the (M,) values of those rows."""
    D, V, M = hidden.shape[1], weight.shape[0], tokens.numel()
    cfg = BLOCKS[hidden.dtype]
    grad_z = torch.empty(M, V, device=hidden.device, dtype=hidden.dtype)
    grid = (triton.cdiv(M, cfg.block_n), triton.cdiv(V, cfg.block_v))
    logit_grad_kernel[grid](
        hidden, weight, targets, tokens, lse, mean_logit, grad_logp, grad_entropy, grad_z, M, V, D,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return grad_z


def logits_backward_triton(hidden, weight, targets, valid, lse, mean_logit, grad_logp, grad_entropy, chunk_size,
                           need_weight):
    """dL/dh (N, D) and dL/dW (V, D) in the input dtype (or None): Triton writes dz for `chunk_size` valid
    rows at a time, cuBLAS does the two matmuls. Rows that are not valid get zero gradient."""
    tokens = valid.nonzero().squeeze(1)  # (M,)
    grad_h = torch.zeros_like(hidden)
    grad_w = torch.zeros_like(weight) if need_weight else None
    for start in range(0, tokens.numel(), chunk_size):
        rows = tokens[start:start + chunk_size]  # (C,)
        grad_z = logit_grad_triton(hidden, weight, targets, rows, lse[rows], mean_logit[rows], grad_logp[rows],
                                   grad_entropy[rows])  # (C, V)
        grad_h[rows] = grad_z @ weight
        if need_weight:
            # addmm rounds once per chunk: with a single chunk this equals torch's own dz^T @ h
            grad_w.addmm_(grad_z.T, hidden[rows])
    return grad_h, grad_w


def logsumexp_stats_torch(hidden, weight, targets, chunk_size):
    """The same statistics in plain torch for all N rows: VOCAB_CHUNK-wide slices play the kernel's splits.

    Masked rows are computed too (and zeroed by the caller): slicing rows is free, while gathering the
    valid ones would copy (C, D) per step, and this path is written for the smallest memory footprint."""
    N, V = hidden.shape[0], weight.shape[0]
    h = hidden.float()  # (N, D); a no-op for fp32
    starts = range(0, V, VOCAB_CHUNK)
    m, s, t, z_target = torch.zeros(4, len(starts), N, device=hidden.device)
    for k, v0 in enumerate(starts):
        w = weight[v0:v0 + VOCAB_CHUNK].float()  # (Vc, D)
        for n0 in range(0, N, chunk_size):
            rows = slice(n0, n0 + chunk_size)
            z = linear(h[rows], w)  # (C, Vc) fp32: the only logits alive
            m[k, rows] = z.max(dim=1).values
            e = (z - m[k, rows, None]).exp_()  # (C, Vc)
            s[k, rows] = e.sum(1)
            t[k, rows] = torch.linalg.vecdot(e, z)
            local = targets[rows] - v0
            in_slice = (local >= 0) & (local < w.shape[0])
            picked = z.gather(1, local.clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
            z_target[k, rows] = torch.where(in_slice, picked, 0.0)
    return _merge_partials(m, s, t, z_target)


def logits_backward_torch(hidden, weight, targets, lse, mean_logit, grad_logp, grad_entropy, chunk_size, need_weight):
    """dL/dh (N, D) fp32 and dL/dW (V, D) in W's dtype (or None), recomputing (C, VOCAB_CHUNK) logit tiles.
    Masked rows must come with zero grad_logp and grad_entropy."""
    N, V = hidden.shape[0], weight.shape[0]
    h = hidden.float()  # (N, D)
    grad_h = torch.zeros_like(h)
    grad_w = torch.empty_like(weight) if need_weight else None
    for v0 in range(0, V, VOCAB_CHUNK):
        w = weight[v0:v0 + VOCAB_CHUNK].float()  # (Vc, D)
        grad_w_chunk = torch.zeros_like(w) if need_weight else None  # fp32 sum over all tokens, rounded once
        for n0 in range(0, N, chunk_size):
            rows = slice(n0, n0 + chunk_size)
            z = linear(h[rows], w)  # (C, Vc)
            p = (z - lse[rows, None]).exp_()
            # dz = p (g_H (E[z] - z) - g) + g onehot(y), computed in z's storage (a local temporary)
            grad_z = z.sub_(mean_logit[rows, None]).mul_(-grad_entropy[rows, None]).sub_(grad_logp[rows, None]).mul_(p)
            local = targets[rows] - v0
            hit = ((local >= 0) & (local < w.shape[0])).nonzero().squeeze(1)
            grad_z.index_put_((hit, local[hit]), grad_logp[rows][hit], accumulate=True)
            grad_h[rows].add_(matmul(grad_z, w))  # a row slice of grad_h, in place
            if need_weight:
                grad_w_chunk.addmm_(grad_z.T, h[rows])
        if need_weight:
            grad_w[v0:v0 + VOCAB_CHUNK] = grad_w_chunk
    return grad_h, grad_w


def cross_entropy_one_pass_torch(hidden, weight, targets, valid, chunk_size):
    """Per-token -log p(target) (N,) and d(sum of them)/dh (N, D), both fp32 and 0 where not `valid`, in one
    walk over the vocabulary: with a frozen weight and a summed loss, dL/dh is known during the forward.

    Besides the online log-sum-exp it keeps acc = sum_j exp(z_j - m) W_j per token, rescaled by
    exp(m_old - m_new) whenever the running max m grows, so that at the end

        dL/dh = softmax(z) W - W_y = acc / s - W_y

    Two matmuls per logit tile (z = h W_cᵀ and acc += exp(z - m) W_c) instead of the three that
    forward + recomputing backward take; the price is the (N, D) fp32 gradient held from forward to backward.
    """
    N, V = hidden.shape[0], weight.shape[0]
    h = hidden.float()  # (N, D)
    m = torch.full((N,), float("-inf"), device=hidden.device)
    s, z_target = torch.zeros(2, N, device=hidden.device)
    acc = torch.zeros_like(h)  # (N, D)
    for v0 in range(0, V, VOCAB_CHUNK):
        w = weight[v0:v0 + VOCAB_CHUNK].float()  # (Vc, D)
        for n0 in range(0, N, chunk_size):
            rows = slice(n0, n0 + chunk_size)
            z = linear(h[rows], w)  # (C, Vc) fp32: the only logits alive
            local = targets[rows] - v0
            in_slice = (local >= 0) & (local < w.shape[0])
            picked = z.gather(1, local.clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
            z_target[rows] += torch.where(in_slice, picked, 0.0)
            m_new = torch.maximum(m[rows], z.max(dim=1).values)  # (C,)
            rescale = (m[rows] - m_new).exp_()  # 0 on the first tile, where m = -inf
            e = z.sub_(m_new[:, None]).exp_()  # (C, Vc), in z's storage
            s[rows] = s[rows] * rescale + e.sum(1)
            acc[rows].mul_(rescale[:, None]).add_(matmul(e, w))  # a row slice of acc, in place
            m[rows] = m_new
    lse = m + s.log()
    safe_targets = torch.where(valid, targets, 0)
    grad_h = acc.div_(s[:, None]).sub_(weight[safe_targets].float()).mul_(valid[:, None])  # (N, D)
    return torch.where(valid, lse - z_target, 0.0), grad_h


class CrossEntropySumFn(torch.autograd.Function):
    """Sum over unmasked tokens of -log p(target) for a frozen weight; dL/dh is computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size):
        nll, grad_h = cross_entropy_one_pass_torch(hidden, weight, targets, targets != ignore_index, chunk_size)
        ctx.save_for_backward(grad_h)
        ctx.hidden_dtype = hidden.dtype
        return nll.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_loss).to(ctx.hidden_dtype), None, None, None, None


class LogprobsEntropyFn(torch.autograd.Function):
    """(logp, entropy) per token, each (N,) fp32 and 0 where targets == ignore_index."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size, triton_kernels):
        valid = targets != ignore_index  # (N,)
        if triton_kernels:
            lse, mean_logit, z_target = logsumexp_stats_triton(hidden, weight, targets, valid)
        else:
            lse, mean_logit, z_target = logsumexp_stats_torch(hidden, weight, targets, chunk_size)
        ctx.save_for_backward(hidden, weight, targets, lse, mean_logit)
        ctx.ignore_index, ctx.chunk_size, ctx.triton_kernels = ignore_index, chunk_size, triton_kernels
        return torch.where(valid, z_target - lse, 0.0), torch.where(valid, lse - mean_logit, 0.0)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, mean_logit = ctx.saved_tensors
        valid = targets != ctx.ignore_index
        grad_logp = torch.where(valid, grad_logp.float(), 0.0)  # masked outputs are constants
        grad_entropy = torch.where(valid, grad_entropy.float(), 0.0)
        need_weight = ctx.needs_input_grad[1]
        if ctx.triton_kernels:
            grad_h, grad_w = logits_backward_triton(hidden, weight, targets, valid, lse, mean_logit, grad_logp,
                                                    grad_entropy, ctx.chunk_size, need_weight)
        else:
            grad_h, grad_w = logits_backward_torch(hidden, weight, targets, lse, mean_logit, grad_logp, grad_entropy,
                                                   ctx.chunk_size, need_weight)
        return grad_h.to(hidden.dtype), grad_w, None, None, None, None


logprobs_entropy = LogprobsEntropyFn.apply


def _check_inputs(hidden, weight, targets, ignore_index, chunk_size):
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be (..., D) and (V, D)")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match hidden {tuple(hidden.shape)} without its last dim")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: cast one so they match")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bad.any():
        where = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"target {targets[where].item()} at position {where} is outside the vocabulary "
                         f"[0, {weight.shape[0]}) and is not ignore_index={ignore_index}")


def _use_triton_kernels(kernels: str, hidden: torch.Tensor) -> bool:
    if not use_triton(kernels, hidden):
        return False
    if hidden.dtype in BLOCKS:
        return True
    if kernels == "auto":
        return False  # e.g. fp64 on a GPU: the plain-torch path handles it
    raise ValueError(f"the Triton kernels take {', '.join(TRITON_TYPES.values())} inputs, got {hidden.dtype}: "
                     "cast the inputs or use kernels='torch'")


def token_logprobs_and_entropy(hidden, weight, targets, ignore_index=-100, chunk_size=1024, kernels="auto"):
    """Per-token log p(target) and entropy of softmax(hidden @ weight^T), both differentiable, both fp32.

    hidden (..., D) and weight (V, D) share one dtype; targets (...) are token ids, `ignore_index` marks tokens
    whose outputs are 0 and get no gradient. Returns (logp, entropy), each shaped like targets. The full
    logits are never materialised: `chunk_size` tokens are handled per step (the torch path holds
    chunk_size x VOCAB_CHUNK fp32 logits, the Triton backward chunk_size x V logit gradients in the input
    dtype). kernels="auto" | "triton" | "torch" picks the implementation (see qtune.kernels.dispatch).
    """
    _check_inputs(hidden, weight, targets, ignore_index, chunk_size)
    triton_kernels = _use_triton_kernels(kernels, hidden)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # (N, D)
    flat_targets = targets.reshape(-1).long().contiguous()  # (N,)
    logp, entropy = logprobs_entropy(flat_hidden, weight.contiguous(), flat_targets, ignore_index, chunk_size,
                                     triton_kernels)
    return logp.reshape(targets.shape), entropy.reshape(targets.shape)


def token_logprobs(hidden, weight, targets, ignore_index=-100, chunk_size=1024, kernels="auto"):
    """Per-token log p(target) under softmax(hidden @ weight^T): fp32, 0 for masked tokens, differentiable
    with respect to hidden and weight. Shapes and arguments as in `token_logprobs_and_entropy`."""
    return token_logprobs_and_entropy(hidden, weight, targets, ignore_index, chunk_size, kernels)[0]


def cross_entropy_sum(hidden, weight, targets, ignore_index=-100, chunk_size=1024, kernels="auto"):
    """(sum of -log p(target) over unmasked tokens as a differentiable fp32 scalar, number of unmasked tokens).

    Returning the sum and the count lets a training step normalise by the target tokens of all its
    micro-batches instead of averaging per micro-batch.
    """
    count = (targets != ignore_index).sum()
    one_pass = (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
                and not _use_triton_kernels(kernels, hidden))
    if one_pass:  # QLoRA's frozen lm_head on the plain-torch path: dL/dh during the forward
        _check_inputs(hidden, weight, targets, ignore_index, chunk_size)  # token_logprobs checks the other path
        flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # (N, D)
        loss = CrossEntropySumFn.apply(flat_hidden, weight.contiguous(), targets.reshape(-1).long().contiguous(),
                                       ignore_index, chunk_size)
        return loss, count
    logp = token_logprobs(hidden, weight, targets, ignore_index, chunk_size, kernels)
    return -logp.sum(), count


def compile_specs() -> list[KernelSpec]:
    """Both kernels in every dtype the op launches them with, each with its shipped block configuration."""
    specs = []
    for dtype, cfg in BLOCKS.items():
        ty = TRITON_TYPES[dtype]
        tiles = {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_D": cfg.block_d}
        sizes = {"M": "i32", "V": "i32", "D": "i32"}
        inputs = {"h_ptr": f"*{ty}", "w_ptr": f"*{ty}", "y_ptr": "*i64", "token_ptr": "*i64"}
        tag = f"{ty},BLOCK_N={cfg.block_n},BLOCK_V={cfg.block_v},BLOCK_D={cfg.block_d}"
        partials = {name: "*fp32" for name in ("max_ptr", "sumexp_ptr", "zsum_ptr", "target_ptr")}
        specs.append(KernelSpec(
            f"logsumexp_partials[{tag},VOCAB_SPLIT={cfg.vocab_split}]", logsumexp_partials_kernel,
            {**inputs, **partials, **sizes, **{k: "constexpr" for k in tiles}, "VOCAB_SPLIT": "constexpr"},
            {**tiles, "VOCAB_SPLIT": cfg.vocab_split}, cfg.num_warps, cfg.num_stages))
        stats = {name: "*fp32" for name in ("lse_ptr", "mean_logit_ptr", "grad_logp_ptr", "grad_entropy_ptr")}
        specs.append(KernelSpec(
            f"logit_grad[{tag}]", logit_grad_kernel,
            {**inputs, **stats, "grad_z_ptr": f"*{ty}", **sizes, **{k: "constexpr" for k in tiles}},
            tiles, cfg.num_warps, cfg.num_stages))
    return specs
