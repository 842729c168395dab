"""Triton kernels of `qtune.kernels.experts`: one launch multiplies every expert's block of sorted slots by that
expert's NF4 weight, decoding the 4-bit codes on the fly (no dequantized copy of any expert).

The reference, the torch path, the autograd functions and the public op are in kernels/experts.py; this module
is imported only when a kernel is launched. The experts' packed codes are stacked (E, bytes) and their absmax
decoded to fp32 (E, blocks) by the launcher; a row tile never spans two experts (`tiles`).
"""

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # slots per tile (tl.dot needs at least 16)
BLOCK_N = 32
BLOCK_K = 64
NUM_WARPS = 4


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _nf4_tile(packed_ptr, absmax_ptr, code_ptr, rn, k, N, K, BLOCKSIZE: tl.constexpr):
    """W[n, k] (len(rn), len(k)) in fp32 of one expert: element n·K + k of its flat codes, byte (n·K + k) // 2,
    high nibble when the index is even; zero outside (N, K)."""
    mask = (rn < N)[:, None] & (k < K)[None, :]
    flat = rn[:, None].to(tl.int64) * K + k[None, :]
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = (byte >> ((1 - flat % 2) * 4)) & 0xF
    scale = tl.load(absmax_ptr + flat // BLOCKSIZE, mask=mask, other=0.0)
    return tl.load(code_ptr + nibble) * scale


@triton.jit
def _tile_slots(tile_expert_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M: tl.constexpr):
    """(expert, slot indices, which of them are in the expert's block) of this program's row tile."""
    tile = tl.program_id(0)
    rm = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    return tl.load(tile_expert_ptr + tile).to(tl.int64), rm, rm < tl.load(tile_end_ptr + tile)


@triton.jit
def grouped_nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, y_ptr, tile_expert_ptr, tile_start_ptr,
                              tile_end_ptr, N, K, n_bytes, n_blocks, BLOCKSIZE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[s, n] = Σ_k x[s, k] W_e[n, k] for the slots s of one tile, e the tile's expert; x (S, K), y (S, N)."""
    e, rm, rows = _tile_slots(tile_expert_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + k[None, :], mask=rows[:, None] & (k < K)[None, :],
                    other=0.0)
        w = _nf4_tile(packed_ptr + e * n_bytes, absmax_ptr + e * n_blocks, code_ptr, rn, k, N, K, BLOCKSIZE)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=rows[:, None] & (rn < N)[None, :])


@triton.jit
def grouped_nf4_matmul_transposed_kernel(dy_ptr, packed_ptr, absmax_ptr, code_ptr, dx_ptr, tile_expert_ptr,
                                         tile_start_ptr, tile_end_ptr, N, K, n_bytes, n_blocks,
                                         BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                         BLOCK_K: tl.constexpr):
    """dx[s, k] = Σ_n dy[s, n] W_e[n, k] (the input gradient of the product above); dy (S, N), dx (S, K)."""
    e, rm, rows = _tile_slots(tile_expert_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], mask=rows[:, None] & (rn < N)[None, :],
                     other=0.0)
        w = _nf4_tile(packed_ptr + e * n_bytes, absmax_ptr + e * n_blocks, code_ptr, rn, k, N, K, BLOCKSIZE)
        acc = tl.dot(dy, w.to(dy.dtype), acc, input_precision="ieee")
    tl.store(dx_ptr + rm[:, None].to(tl.int64) * K + k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=rows[:, None] & (k < K)[None, :])


# ----------------------------------------------------------------------------- launchers

def tiles(counts, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert, first slot, end slot) of every BLOCK_M-slot tile, tiles never spanning two experts."""
    expert, start, end, first = [], [], [], 0
    for e, count in enumerate(counts):
        for s in range(first, first + count, BLOCK_M):
            expert.append(e), start.append(s), end.append(first + count)
        first += count
    return tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in (expert, start, end))


def launch_grouped_nf4_matmul(x: torch.Tensor, weights, counts, code: torch.Tensor, transposed: bool) -> torch.Tensor:
    """x (S, K) @ W_eᵀ per expert block -> (S, N); transposed: x (S, N) @ W_e -> (S, K). weights: E NF4Weights
    of one shape (N, K)."""
    N, K = weights[0].shape
    x = x.contiguous()
    packed = torch.stack([q.packed.reshape(-1) for q in weights])  # (E, bytes)
    absmax = torch.stack([q.absmax_fp32() for q in weights])  # (E, blocks) fp32
    tile_expert, tile_start, tile_end = tiles(counts, x.device)
    out = x.new_empty(x.shape[0], K if transposed else N)
    if tile_expert.numel() == 0:
        return out
    kernel = grouped_nf4_matmul_transposed_kernel if transposed else grouped_nf4_matmul_kernel
    grid = (tile_expert.numel(), triton.cdiv(K if transposed else N, BLOCK_K if transposed else BLOCK_N))
    kernel[grid](x, packed, absmax, code, out, tile_expert, tile_start, tile_end, N, K, packed.shape[1],
                 absmax.shape[1], BLOCKSIZE=weights[0].blocksize, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                 num_warps=NUM_WARPS, num_stages=1)
    return out
