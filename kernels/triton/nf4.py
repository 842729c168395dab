"""Triton kernels of `qtune.kernels.nf4`: NF4 dequantization and the fused small-M 4-bit matmul.

The plain-torch references, the autograd function and the public ops are in kernels/nf4.py; this module
is imported only when a kernel is launched. `q` is an NF4 weight (`qtune.weights.nf4.NF4Weight`: packed
bytes, absmax, nested quantization state, shape, blocksizes); `code` is the 16-value NF4 table on q's device.
"""

import torch
import triton
import triton.language as tl

DEQUANT_BLOCK = 1024  # packed bytes (2048 weights) per program of the dequantize kernel
MATMUL_BLOCK_N = 32  # output features per program: N / 32 programs keep every SM busy at M = 1
MATMUL_BLOCK_K = 64
NUM_WARPS = 4
# Row tiles (tl.dot needs at least 16) and software-pipelining depth of the fused kernel per input
# dtype, the largest that compile without register spills for sm_80 to sm_90. fp32, whose tl.dot
# runs as exact fp32 FMAs rather than on tensor cores, needs more registers per tile.
# (A 32-row tile for 16-bit inputs spills on sm_90 with double quantization: rows beyond 16 take more tiles.)
MATMUL_BLOCK_MS = {torch.float32: (16,), torch.bfloat16: (16,), torch.float16: (16,)}
MATMUL_NUM_STAGES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 2}


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, block, mask,
                  NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of the given quantization blocks, decoded from 8 bits under double quantization."""
    if DOUBLE_QUANT:
        c = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        return tl.load(nested_code_ptr + c) * nested + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _round_fp32_to(v, dtype: tl.constexpr):
    """Cast fp32 to `dtype` rounding to nearest even, also under TRITON_INTERPRET.

    The interpreter's numpy cast to bf16 truncates; rounding on the bits (add 0x7FFF plus the lowest
    kept bit, drop 16 bits) gives the same bf16 as a GPU and as torch.
    """
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def nf4_dequantize_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                          out_ptr, numel, n_bytes,
                          BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                          BLOCK: tl.constexpr):
    """out[2j] = code[byte j >> 4] · absmax, out[2j+1] = code[byte j & 15] · absmax for BLOCK bytes."""
    pid = tl.program_id(0)
    byte_idx = pid * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    in_bounds = byte_idx < n_bytes
    byte = tl.load(packed_ptr + byte_idx, mask=in_bounds, other=0)
    # both elements of a byte lie in one quantization block (block sizes are even)
    scale = _block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, (2 * byte_idx) // BLOCKSIZE,
                          in_bounds, NESTED_BLOCKSIZE, DOUBLE_QUANT)
    high = tl.load(code_ptr + (byte >> 4)) * scale
    low = tl.load(code_ptr + (byte & 0xF)) * scale
    values = tl.interleave(high, low)  # (2 * BLOCK,) in element order
    elem = pid * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + elem, _round_fp32_to(values, out_ptr.dtype.element_ty), mask=elem < numel)


@triton.jit
def nf4_matmul_small_m_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                              code_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                              BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] = Σ_k x[m, k] W[n, k] for a (BLOCK_M, BLOCK_N) tile, decoding W's 4-bit codes on the fly.

    W[n, k] is element n·K + k of the flat quantized tensor: byte (n·K + k) // 2, high nibble when the
    index is even. Any K works, odd ones included (rows then start mid-byte).
    """
    pid_m = tl.program_id(0)  # the row tiles of one weight tile run back to back and share it in L2
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    rk = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x_mask = (rm < M)[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=x_mask, other=0.0)  # (BLOCK_M, BLOCK_K)
        w_mask = (rn < N)[:, None] & (k < K)[None, :]
        flat = rn[:, None] * K + k[None, :]  # (BLOCK_N, BLOCK_K)
        byte = tl.load(packed_ptr + flat // 2, mask=w_mask, other=0).to(tl.int32)
        nibble = (byte >> ((1 - flat % 2) * 4)) & 0xF
        scale = _block_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, flat // BLOCKSIZE, w_mask,
                              NESTED_BLOCKSIZE, DOUBLE_QUANT)
        w = tl.load(code_ptr + nibble) * scale  # (BLOCK_N, BLOCK_K) fp32
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
    y_mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


# ----------------------------------------------------------------------------- launchers

def _quant_state_args(q, code: torch.Tensor) -> tuple:
    """Pointer arguments shared by both kernels; without double quant the nested slots are unused."""
    if q.double_quant:
        return q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset.reshape(1), code
    absmax = q.absmax.float()
    return q.packed, absmax, absmax, absmax, absmax, code


def launch_dequantize(q, code: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the dequantized q into `out` (q.numel elements of fp32, bf16 or fp16)."""
    n_bytes = q.packed.numel()
    grid = (triton.cdiv(n_bytes, DEQUANT_BLOCK),)
    # No fused multiply-add: absmax = code · nested + offset must round twice, as the reference does.
    nf4_dequantize_kernel[grid](*_quant_state_args(q, code), out, q.numel, n_bytes,
                                BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize,
                                DOUBLE_QUANT=q.double_quant, BLOCK=DEQUANT_BLOCK, num_warps=NUM_WARPS,
                                enable_fp_fusion=False)
    return out


def matmul_block_m(m: int, dtype: torch.dtype) -> int:
    """Row tile of the fused kernel for an input of m rows: the smallest that covers m, else the largest."""
    tiles = MATMUL_BLOCK_MS[dtype]
    return next((b for b in tiles if m <= b), tiles[-1])


def launch_matmul_small_m(x2: torch.Tensor, q, code: torch.Tensor) -> torch.Tensor:
    """(M, K) @ W(N, K)ᵀ -> (M, N) in x2.dtype with the fused kernel."""
    (M, K), N = x2.shape, q.shape[0]
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    block_m = matmul_block_m(M, x2.dtype)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, MATMUL_BLOCK_N))
    nf4_matmul_small_m_kernel[grid](x2, *_quant_state_args(q, code), y, M, N, K, x2.stride(0), y.stride(0),
                                    BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize,
                                    DOUBLE_QUANT=q.double_quant, BLOCK_M=block_m, BLOCK_N=MATMUL_BLOCK_N,
                                    BLOCK_K=MATMUL_BLOCK_K, num_warps=NUM_WARPS,
                                    num_stages=MATMUL_NUM_STAGES[x2.dtype], enable_fp_fusion=False)
    return y
