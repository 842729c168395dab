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
input dtype, at most LOGIT_GRAD_BYTES: 256 tokens of a 128256 vocabulary in bf16) and lets cuBLAS do the two matmuls;
the plain-torch path holds at most two chunk_size x VOCAB_CHUNK fp32 tiles (4 MB each at the defaults)
and one chunk_size x D product. On a CPU its products run through oneDNN (kernels/cpu/linear.py).

Soft-capped logits (Gemma 2, `softcap` = cap): every formula above reads c = cap · tanh(z / cap) for z, and
the chain rule adds one factor, dL/dz = dL/dc · (1 − (c / cap)²). Both paths apply it tile by tile, the
one-pass cross-entropy too (its accumulated rows are weighted by that factor: two vocabulary products per
tile for Gemma 2's loss as for any other).

Masked tokens (ignore_index) cost the Triton path nothing: its kernels read the scored rows through an
index. The torch path computes them and zeroes them, since gathering rows would copy them.

The `@triton.jit` kernels, their tile configurations and launchers live in kernels/triton/logprobs.py,
imported only when one runs: triton is optional, and this file (which every training loop uses) imports
without it.
"""

import torch

from qtune.kernels import KernelSpec
from qtune.kernels.cpu.linear import linear, matmul
from qtune.kernels.dispatch import autocast_off, compute_dtype, tile_starts, use_triton

VOCAB_CHUNK = 1024  # vocabulary columns per step of the plain-torch path (4 MB fp32 tiles at 1024 tokens)
# The Triton backward's chunk_size x V logit gradients stay within this many bytes: 256 tokens of Llama-3's
# 128,256 words in bf16 (64 MB) instead of 1024 (262 MB), so a 128K vocabulary leaves room for long sequences.
LOGIT_GRAD_BYTES = 64 * 2**20
# The input dtypes the Triton kernels take (each with its tiles in kernels/triton/logprobs.py's BLOCKS).
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def reference_softcap(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """c = cap · tanh(z / cap) (Gemma 2's final logits); z itself when softcap is None."""
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def reference_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int = -100, softcap: float | None = None) -> torch.Tensor:
    """The spec: log_softmax over the full (N, V) logits (soft-capped when `softcap`), gathered at the
    targets; 0 for masked tokens."""
    logp = torch.log_softmax(reference_softcap(hidden @ weight.T, softcap), dim=-1)  # (N, V)
    valid = targets != ignore_index
    picked = logp.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)  # (N,)
    return torch.where(valid, picked, 0.0)


def reference_token_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                            ignore_index: int = -100, softcap: float | None = None) -> torch.Tensor:
    """The spec for the entropy of softmax(h @ W^T) (soft-capped when `softcap`) per token; 0 for masked tokens."""
    logp = torch.log_softmax(reference_softcap(hidden @ weight.T, softcap), dim=-1)  # (N, V)
    entropy = -(logp.exp() * logp).sum(-1)  # (N,)
    return torch.where(targets != ignore_index, entropy, 0.0)


def _merge_partials(m, s, t, z_target):
    """Merge (n_splits, M) online log-sum-exp statistics into lse, E[z] and the target logit, each (M,)."""
    m_max = m.max(dim=0).values  # (M,)
    scale = torch.exp(m - m_max)  # (n_splits, M)
    sumexp = (s * scale).sum(0)
    lse = m_max + torch.log(sumexp)
    mean_logit = (t * scale).sum(0) / sumexp
    return lse, mean_logit, z_target.sum(0)


def _kernels():
    """kernels/triton/logprobs.py, imported on the first launch."""
    from qtune.kernels.triton import logprobs  # here, not at the top: triton is optional (absent on macOS/Windows)
    return logprobs


def _cap_inplace(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """z ← cap · tanh(z / cap) in z's own storage (a local logit tile)."""
    return z if softcap is None else z.div_(softcap).tanh_().mul_(softcap)


def logsumexp_stats_triton(hidden, weight, targets, valid, softcap=None):
    """(lse, E[z], target logit), each (N,) fp32 and 0 where not `valid`, from the fused Triton forward kernel.

    Only the valid rows are computed: the kernel reads them through an index, so nothing is copied."""
    tokens = valid.nonzero().squeeze(1)  # (M,)
    stats = torch.zeros(3, hidden.shape[0], device=hidden.device, dtype=torch.float32)
    if tokens.numel() == 0:
        return stats.unbind(0)
    partials = _kernels().logsumexp_partials(hidden, weight, targets, tokens, softcap)
    stats[:, tokens] = torch.stack(_merge_partials(*partials))
    return stats.unbind(0)


def logsumexp_stats_torch(hidden, weight, targets, chunk_size, softcap=None):
    """The same statistics in plain torch for all N rows: VOCAB_CHUNK-wide slices play the kernel's splits.

    Masked rows are computed too (and zeroed by the caller): slicing rows is free, while gathering the
    valid ones would copy (C, D) per step, and this path is written for the smallest memory footprint."""
    N, V = hidden.shape[0], weight.shape[0]
    h = hidden.float()  # (N, D); a no-op for fp32
    m, s, t, z_target = torch.zeros(4, -(-V // VOCAB_CHUNK), N, device=hidden.device)
    for v0 in tile_starts(V, VOCAB_CHUNK):
        k = v0 // VOCAB_CHUNK
        w = weight[v0:v0 + VOCAB_CHUNK].float()  # (Vc, D)
        for n0 in tile_starts(N, chunk_size):
            rows = slice(n0, n0 + chunk_size)
            z = _cap_inplace(linear(h[rows], w), softcap)  # (C, Vc) fp32: the only logits alive
            m[k, rows] = z.max(dim=1).values
            e = (z - m[k, rows, None]).exp_()  # (C, Vc)
            s[k, rows] = e.sum(1)
            t[k, rows] = torch.linalg.vecdot(e, z)
            local = targets[rows] - v0
            in_slice = (local >= 0) & (local < w.shape[0])
            picked = z.gather(1, local.clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
            z_target[k, rows] = torch.where(in_slice, picked, 0.0)
    return _merge_partials(m, s, t, z_target)


def logits_backward_torch(hidden, weight, targets, lse, mean_logit, grad_logp, grad_entropy, chunk_size, need_weight,
                          softcap=None):
    """dL/dh (N, D) fp32 and dL/dW (V, D) in W's dtype (or None), recomputing (C, VOCAB_CHUNK) logit tiles.
    Masked rows must come with zero grad_logp and grad_entropy."""
    N, V = hidden.shape[0], weight.shape[0]
    h = hidden.float()  # (N, D)
    grad_h = torch.zeros_like(h)
    grad_w = torch.empty_like(weight) if need_weight else None
    for v0 in tile_starts(V, VOCAB_CHUNK):
        w = weight[v0:v0 + VOCAB_CHUNK].float()  # (Vc, D)
        grad_w_chunk = torch.zeros_like(w) if need_weight else None  # fp32 sum over all tokens, rounded once
        for n0 in tile_starts(N, chunk_size):
            rows = slice(n0, n0 + chunk_size)
            z = _cap_inplace(linear(h[rows], w), softcap)  # (C, Vc)
            cap_grad = None if softcap is None else 1 - (z / softcap).square_()  # dc/dz
            p = (z - lse[rows, None]).exp_()
            # dz = p (g_H (E[z] - z) - g) + g onehot(y), computed in z's storage (a local temporary)
            grad_z = z.sub_(mean_logit[rows, None]).mul_(-grad_entropy[rows, None]).sub_(grad_logp[rows, None]).mul_(p)
            local = targets[rows] - v0
            hit = ((local >= 0) & (local < w.shape[0])).nonzero().squeeze(1)
            grad_z.index_put_((hit, local[hit]), grad_logp[rows][hit], accumulate=True)
            if cap_grad is not None:
                grad_z.mul_(cap_grad)
            grad_h[rows].add_(matmul(grad_z, w))  # a row slice of grad_h, in place
            if need_weight:
                grad_w_chunk.addmm_(grad_z.T, h[rows])
        if need_weight:
            grad_w[v0:v0 + VOCAB_CHUNK] = grad_w_chunk
    return grad_h, grad_w


def cross_entropy_one_pass_torch(hidden, weight, targets, valid, chunk_size, softcap=None):
    """Per-token -log p(target) (N,) and d(sum of them)/dh (N, D), both fp32 and 0 where not `valid`, in one
    walk over the vocabulary: with a frozen weight and a summed loss, dL/dh is known during the forward.

    Besides the online log-sum-exp it keeps acc = sum_j exp(z_j - m) W_j per token, rescaled by
    exp(m_old - m_new) whenever the running max m grows, so that at the end

        dL/dh = softmax(z) W - W_y = acc / s - W_y

    With `softcap` the logits are c = cap · tanh(z / cap) and each row j of W carries dc_j/dz_j = 1 − (c_j / cap)²:
    acc = sum_j exp(c_j - m) (1 − (c_j / cap)²) W_j and dL/dh = acc / s − (1 − (c_y / cap)²) W_y.

    Two matmuls per logit tile (z = h W_cᵀ and acc += exp(z - m) W_c) instead of the three that
    forward + recomputing backward take; the price is the (N, D) fp32 gradient held from forward to backward.
    """
    N, V = hidden.shape[0], weight.shape[0]
    h = hidden.float()  # (N, D)
    m = torch.full((N,), float("-inf"), device=hidden.device)
    s, z_target = torch.zeros(2, N, device=hidden.device)
    acc = torch.zeros_like(h)  # (N, D)
    for v0 in tile_starts(V, VOCAB_CHUNK):
        w = weight[v0:v0 + VOCAB_CHUNK].float()  # (Vc, D)
        for n0 in tile_starts(N, chunk_size):
            rows = slice(n0, n0 + chunk_size)
            z = _cap_inplace(linear(h[rows], w), softcap)  # (C, Vc) fp32: the only logits alive
            local = targets[rows] - v0
            in_slice = (local >= 0) & (local < w.shape[0])
            picked = z.gather(1, local.clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
            z_target[rows] += torch.where(in_slice, picked, 0.0)
            m_new = torch.maximum(m[rows], z.max(dim=1).values)  # (C,)
            rescale = (m[rows] - m_new).exp_()  # 0 on the first tile, where m = -inf
            cap_grad = None if softcap is None else (z / softcap).square_().neg_().add_(1)  # dc/dz (C, Vc)
            e = z.sub_(m_new[:, None]).exp_()  # (C, Vc), in z's storage
            s[rows] = s[rows] * rescale + e.sum(1)
            e = e if cap_grad is None else e.mul_(cap_grad)
            acc[rows].mul_(rescale[:, None]).add_(matmul(e, w))  # a row slice of acc, in place
            m[rows] = m_new
    lse = m + s.log()
    safe_targets = torch.where(valid, targets, 0)
    grad_h = acc.div_(s[:, None])  # (N, D), in acc's storage
    target_grad = None if softcap is None else (z_target / softcap).square_().neg_().add_(1)  # dc_y/dz_y (N,)
    for n0 in tile_starts(N, chunk_size):  # - W_y by row chunks: gathering all N target rows at once would copy (N, D)
        rows = slice(n0, n0 + chunk_size)
        w_y = weight[safe_targets[rows]].float()
        w_y = w_y if target_grad is None else w_y.mul_(target_grad[rows, None])
        grad_h[rows].sub_(w_y).mul_(valid[rows, None])
    return torch.where(valid, lse - z_target, 0.0), grad_h


class CrossEntropySumFn(torch.autograd.Function):
    """Sum over unmasked tokens of -log p(target) for a frozen weight; dL/dh is computed in the forward."""

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size, softcap):
        nll, grad_h = cross_entropy_one_pass_torch(hidden, weight, targets, targets != ignore_index, chunk_size,
                                                   softcap)
        # Held on ctx, not saved for backward: it is no input or output autograd could see modified, and the
        # backward scales it in place and hands it over (no second (N, D) fp32 buffer at the loss's peak).
        ctx.grad_h = grad_h
        ctx.hidden_dtype = hidden.dtype
        return nll.sum()

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss):
        grad_h, ctx.grad_h = ctx.grad_h, None
        if grad_h is None:
            raise RuntimeError("cross_entropy_sum's backward ran twice (retain_graph=True): its one-pass gradient "
                               "is handed over on the first; call it again instead")
        return grad_h.mul_(grad_loss).to(ctx.hidden_dtype), None, None, None, None, None


class LogprobsEntropyFn(torch.autograd.Function):
    """(logp, entropy) per token, each (N,) fp32 and 0 where targets == ignore_index."""

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size, triton_kernels, softcap):
        valid = targets != ignore_index  # (N,)
        if triton_kernels:
            lse, mean_logit, z_target = logsumexp_stats_triton(hidden, weight, targets, valid, softcap)
        else:
            lse, mean_logit, z_target = logsumexp_stats_torch(hidden, weight, targets, chunk_size, softcap)
        ctx.save_for_backward(hidden, weight, targets, lse, mean_logit)
        ctx.ignore_index, ctx.chunk_size, ctx.triton_kernels = ignore_index, chunk_size, triton_kernels
        ctx.softcap = softcap
        return torch.where(valid, z_target - lse, 0.0), torch.where(valid, lse - mean_logit, 0.0)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, mean_logit = ctx.saved_tensors
        valid = targets != ctx.ignore_index
        grad_logp = torch.where(valid, grad_logp.float(), 0.0)  # masked outputs are constants
        grad_entropy = torch.where(valid, grad_entropy.float(), 0.0)
        need_weight = ctx.needs_input_grad[1]
        if ctx.triton_kernels:
            grad_h, grad_w = _kernels().logits_backward_triton(hidden, weight, targets, valid, lse, mean_logit,
                                                               grad_logp, grad_entropy, ctx.chunk_size, need_weight,
                                                               ctx.softcap)
        else:
            grad_h, grad_w = logits_backward_torch(hidden, weight, targets, lse, mean_logit, grad_logp, grad_entropy,
                                                   ctx.chunk_size, need_weight, ctx.softcap)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        return grad_h.to(hidden.dtype), grad_w, None, None, None, None, None


logprobs_entropy = LogprobsEntropyFn.apply


def _check_inputs(hidden, weight, targets, ignore_index, chunk_size, softcap=None):
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
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


def _autocast_inputs(hidden, weight):
    """hidden and weight in autocast's dtype where autocast is on (one explicit compute dtype), else as given
    (mismatched dtypes outside autocast are the caller's to fix: `_check_inputs` says so)."""
    if not torch.is_autocast_enabled(hidden.device.type):
        return hidden, weight
    dtype = compute_dtype(hidden)
    return hidden.to(dtype), weight.to(dtype)


def _use_triton_kernels(kernels: str, hidden: torch.Tensor) -> bool:
    if not use_triton(kernels, hidden):
        return False
    if hidden.dtype in TRITON_TYPES:
        return True
    if kernels == "auto":
        return False  # e.g. fp64 on a GPU: the plain-torch path handles it
    raise ValueError(f"the Triton kernels take {', '.join(TRITON_TYPES.values())} inputs, got {hidden.dtype}: "
                     "cast the inputs or use kernels='torch'")


def token_logprobs_and_entropy(hidden, weight, targets, ignore_index=-100, chunk_size=1024, kernels="auto",
                               softcap=None):
    """Per-token log p(target) and entropy of softmax(hidden @ weight^T), both differentiable, both fp32.

    hidden (..., D) and weight (V, D) share one dtype; targets (...) are token ids, `ignore_index` marks tokens
    whose outputs are 0 and get no gradient. Returns (logp, entropy), each shaped like targets. The full
    logits are never materialised: `chunk_size` tokens are handled per step (the torch path holds
    chunk_size x VOCAB_CHUNK fp32 logits, the Triton backward chunk_size x V logit gradients in the input
    dtype). kernels="auto" | "triton" | "torch" picks the implementation (see qtune.kernels.dispatch).
    `softcap`: the logits are cap · tanh(z / cap) (Gemma 2's final_logit_softcapping), or plain when None.
    """
    hidden, weight = _autocast_inputs(hidden, weight)
    _check_inputs(hidden, weight, targets, ignore_index, chunk_size, softcap)
    triton_kernels = _use_triton_kernels(kernels, hidden)
    if triton_kernels:
        chunk_size = bounded_chunk(chunk_size, weight.shape[0], hidden.element_size())
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # (N, D)
    flat_targets = targets.reshape(-1).long().contiguous()  # (N,)
    logp, entropy = logprobs_entropy(flat_hidden, weight.contiguous(), flat_targets, ignore_index, chunk_size,
                                     triton_kernels, None if softcap is None else float(softcap))
    return logp.reshape(targets.shape), entropy.reshape(targets.shape)


def bounded_chunk(chunk_size: int, vocab_size: int, itemsize: int) -> int:
    """Tokens per Triton backward chunk: at most chunk_size, and chunk x vocab_size x itemsize <= LOGIT_GRAD_BYTES."""
    return max(1, min(chunk_size, LOGIT_GRAD_BYTES // (vocab_size * itemsize)))


def token_logprobs(hidden, weight, targets, ignore_index=-100, chunk_size=1024, kernels="auto", softcap=None):
    """Per-token log p(target) under softmax(hidden @ weight^T): fp32, 0 for masked tokens, differentiable
    with respect to hidden and weight. Shapes and arguments as in `token_logprobs_and_entropy`."""
    return token_logprobs_and_entropy(hidden, weight, targets, ignore_index, chunk_size, kernels, softcap)[0]


def cross_entropy_sum(hidden, weight, targets, ignore_index=-100, chunk_size=1024, kernels="auto", softcap=None):
    """(sum of -log p(target) over unmasked tokens as a differentiable fp32 scalar, number of unmasked tokens).

    Returning the sum and the count lets a training step normalise by the target tokens of all its
    micro-batches instead of averaging per micro-batch.
    """
    count = (targets != ignore_index).sum()
    hidden, weight = _autocast_inputs(hidden, weight)
    one_pass = (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
                and not _use_triton_kernels(kernels, hidden))
    if one_pass:  # QLoRA's frozen lm_head on the plain-torch path: dL/dh during the forward
        _check_inputs(hidden, weight, targets, ignore_index, chunk_size, softcap)  # token_logprobs checks the rest
        flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # (N, D)
        loss = CrossEntropySumFn.apply(flat_hidden, weight.contiguous(), targets.reshape(-1).long().contiguous(),
                                       ignore_index, chunk_size, None if softcap is None else float(softcap))
        return loss, count
    logp = token_logprobs(hidden, weight, targets, ignore_index, chunk_size, kernels, softcap)
    return -logp.sum(), count


def _launched_tiles(k, softcap: float) -> list[tuple]:
    """(dtype, Blocks, capability ranges) of every tile configuration launched, as `blocks_for` picks them."""
    capped = k.SOFTCAP_BLOCKS if softcap else {}
    configs = [(dtype, cfg, ((0, 1000),)) for dtype, cfg in capped.items()]
    configs += [(dtype, cfg, (span,)) for span, table in k.ARCH_BLOCKS for dtype, cfg in table.items()
                if dtype not in capped]
    for dtype, cfg in k.BLOCKS.items():  # everywhere an exception does not take over
        if dtype in capped:
            continue
        taken = sorted(span for span, table in k.ARCH_BLOCKS if dtype in table)
        edges = [0, *(edge for span in taken for edge in span), 1000]
        configs.append((dtype, cfg, tuple((low, high) for low, high in zip(edges[::2], edges[1::2]) if low < high)))
    return configs


def compile_specs() -> list[KernelSpec]:
    """Both kernels in every dtype the op launches them with, each with its shipped block configuration (BLOCKS,
    and ARCH_BLOCKS' tiles on the capabilities they take over), uncapped and with Gemma 2's final-logit
    soft-cap (30; SOFTCAP_BLOCKS' tiles): SOFTCAP is a constexpr, so each is its own compiled kernel."""
    k = _kernels()
    specs = []
    for (dtype, cfg, capabilities), cap in ((item, cap) for cap in (0.0, 30.0) for item in _launched_tiles(k, cap)):
        ty = TRITON_TYPES[dtype]
        tiles = {"BLOCK_N": cfg.block_n, "BLOCK_V": cfg.block_v, "BLOCK_D": cfg.block_d}
        sizes = {"M": "i32", "V": "i32", "D": "i32"}
        inputs = {"h_ptr": f"*{ty}", "w_ptr": f"*{ty}", "y_ptr": "*i64", "token_ptr": "*i64"}
        tag = f"{ty},BLOCK_N={cfg.block_n},BLOCK_V={cfg.block_v},BLOCK_D={cfg.block_d},stages={cfg.num_stages}"
        constexprs = {**{k: "constexpr" for k in tiles}, "SOFTCAP": "constexpr"}
        partials = {name: "*fp32" for name in ("max_ptr", "sumexp_ptr", "zsum_ptr", "target_ptr")}
        specs.append(KernelSpec(
            f"logsumexp_partials[{tag},VOCAB_SPLIT={cfg.vocab_split},SOFTCAP={cap}]", k.logsumexp_partials_kernel,
            {**inputs, **partials, **sizes, **constexprs, "VOCAB_SPLIT": "constexpr"},
            {**tiles, "VOCAB_SPLIT": cfg.vocab_split, "SOFTCAP": cap}, cfg.num_warps, cfg.num_stages,
            capabilities=capabilities))
        stats = {name: "*fp32" for name in ("lse_ptr", "mean_logit_ptr", "grad_logp_ptr", "grad_entropy_ptr")}
        specs.append(KernelSpec(
            f"logit_grad[{tag},SOFTCAP={cap}]", k.logit_grad_kernel,
            {**inputs, **stats, "grad_z_ptr": f"*{ty}", **sizes, **constexprs},
            {**tiles, "SOFTCAP": cap}, cfg.num_warps, cfg.num_stages, capabilities=capabilities))
    return specs
