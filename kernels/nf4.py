"""NF4 dequantization and the 4-bit linear y = x Wᵀ (+ bias), beside their plain-torch references.

- `dequantize_nf4(q, dtype)`: one pass decodes the double-quantized absmax *and* the 4-bit codes,
      absmax[b] = nested_code[c[b]] · nested_absmax[b // 256] + offset
      w[i]      = NF4_CODE[nibble(i)] · absmax[i // blocksize]
  with the same fp32 rounding steps as `qtune.weights.nf4` (and so bitsandbytes): the result is bit-equal.
- `nf4_matmul(x, q, bias)`: for up to SMALL_M rows (decoding, rollouts) a fused kernel reads the
  4-bit weight directly and never writes a dequantized W; for more rows W is dequantized into a
  reusable workspace and multiplied with `torch.matmul` on tensor cores. Backward gives
  dX = dY W, dequantizing W again; the frozen W gets no gradient.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qtune.kernels.dispatch import interpreting
from qtune.kernels import KernelSpec
from qtune.weights.nf4 import NF4_CODE, NF4Weight

DEQUANT_BLOCK = 1024  # packed bytes (2048 weights) per program of the dequantize kernel
SMALL_M = 64  # inputs with at most this many rows take the fused kernel
MATMUL_BLOCK_N = 32  # output features per program: N / 32 programs keep every SM busy at M = 1
MATMUL_BLOCK_K = 64
NUM_WARPS = 4
# Row tiles (tl.dot needs at least 16) and software-pipelining depth of the fused kernel per input
# dtype, the largest that compile without register spills for sm_80 to sm_90. fp32, whose tl.dot
# runs as exact fp32 FMAs rather than on tensor cores, needs more registers per tile.
# (A 32-row tile for 16-bit inputs spills on sm_90 with double quantization: rows beyond 16 take more tiles.)
MATMUL_BLOCK_MS = {torch.float32: (16,), torch.bfloat16: (16,), torch.float16: (16,)}
MATMUL_NUM_STAGES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 2}
TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------- references (the spec)

def reference_dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of `q` in `dtype` (default q.dtype): qtune.weights.nf4's plain-torch decode."""
    return q.dequantize_torch(dtype)


def reference_nf4_matmul(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ (+ bias) in x.dtype, W = dequantized q; (..., in) -> (..., out)."""
    bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, reference_dequantize_nf4(q, x.dtype), bias)


# ----------------------------------------------------------------------------- Triton kernels

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
def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
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
def _nf4_matmul_small_m_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
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

def _triton_can_run(t: torch.Tensor) -> bool:
    return t.is_cuda or interpreting()


_NF4_CODE_ON_DEVICE: dict[torch.device, torch.Tensor] = {}  # copied once, not on every launch


def _quant_state_args(q: NF4Weight) -> tuple:
    """Pointer arguments shared by both kernels; without double quant the nested slots are unused."""
    code = _NF4_CODE_ON_DEVICE.get(q.device)
    if code is None:
        code = _NF4_CODE_ON_DEVICE[q.device] = NF4_CODE.to(q.device)
    if q.double_quant:
        return q.packed, q.absmax, q.nested_absmax, q.nested_code, q.offset.reshape(1), code
    absmax = q.absmax.float()
    return q.packed, absmax, absmax, absmax, absmax, code


def _launch_dequantize(q: NF4Weight, out: torch.Tensor) -> torch.Tensor:
    """Write the dequantized q into `out` (q.numel elements of fp32, bf16 or fp16)."""
    n_bytes = q.packed.numel()
    grid = (triton.cdiv(n_bytes, DEQUANT_BLOCK),)
    # No fused multiply-add: absmax = code · nested + offset must round twice, as the reference does.
    _nf4_dequantize_kernel[grid](*_quant_state_args(q), out, q.numel, n_bytes,
                                 BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize,
                                 DOUBLE_QUANT=q.double_quant, BLOCK=DEQUANT_BLOCK, num_warps=NUM_WARPS,
                                 enable_fp_fusion=False)
    return out


def matmul_block_m(m: int, dtype: torch.dtype) -> int:
    """Row tile of the fused kernel for an input of m rows: the smallest that covers m, else the largest."""
    tiles = MATMUL_BLOCK_MS[dtype]
    return next((b for b in tiles if m <= b), tiles[-1])


def _launch_matmul_small_m(x2: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """(M, K) @ W(N, K)ᵀ -> (M, N) in x2.dtype with the fused kernel."""
    (M, K), N = x2.shape, q.shape[0]
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    block_m = matmul_block_m(M, x2.dtype)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, MATMUL_BLOCK_N))
    _nf4_matmul_small_m_kernel[grid](x2, *_quant_state_args(q), y, M, N, K, x2.stride(0), y.stride(0),
                                     BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=q.nested_blocksize,
                                     DOUBLE_QUANT=q.double_quant, BLOCK_M=block_m, BLOCK_N=MATMUL_BLOCK_N,
                                     BLOCK_K=MATMUL_BLOCK_K, num_warps=NUM_WARPS,
                                     num_stages=MATMUL_NUM_STAGES[x2.dtype], enable_fp_fusion=False)
    return y


# One dequantized-weight buffer per (device, dtype, shape), shared by every layer of that shape.
# A layer's forward or backward dequantizes into it and consumes it in the very next matmul on the
# same stream, so layers never see each other's weights; keeping it saves a (out, in) allocation per
# call. `clear_dequantize_workspaces()` frees them.
_DEQUANTIZE_WORKSPACES: dict[tuple, torch.Tensor] = {}


def dequantize_into_workspace(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """q dequantized into the shared workspace of its shape: valid only until the next call."""
    key = (q.device, dtype, tuple(q.shape))
    workspace = _DEQUANTIZE_WORKSPACES.get(key)
    if workspace is None:
        workspace = _DEQUANTIZE_WORKSPACES[key] = torch.empty(q.shape, dtype=dtype, device=q.device)
    return _launch_dequantize(q, workspace)


def clear_dequantize_workspaces() -> None:
    _DEQUANTIZE_WORKSPACES.clear()


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"{what} dtype {dtype} is not one of float32, bfloat16, float16")


# ----------------------------------------------------------------------------- autograd and public ops

class NF4MatmulFn(torch.autograd.Function):
    """y = x Wᵀ + bias with W frozen in NF4; gradients for x and bias only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
        N, K = q.shape
        x2 = x.reshape(-1, K).contiguous()  # (M, K)
        if x2.shape[0] <= SMALL_M:
            y = _launch_matmul_small_m(x2, q)
        else:
            y = x2 @ dequantize_into_workspace(q, x.dtype).t()
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.q = q  # the frozen quantized weight (module buffers), not an activation
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        N, K = ctx.q.shape
        dy2 = dy.reshape(-1, N)  # (M, N)
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            # dX = dY W, W dequantized again rather than kept from the forward
            dx = (dy2 @ dequantize_into_workspace(ctx.q, dy.dtype)).reshape(*dy.shape[:-1], K)
        if ctx.needs_input_grad[2]:
            dbias = dy2.sum(0).to(ctx.bias_dtype)
        return dx, None, dbias


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of `q` in `dtype` (default q.dtype), bit-equal to `reference_dequantize_nf4`."""
    dtype = dtype or q.dtype
    _check_dtype(dtype, "dequantize_nf4: output")
    if not _triton_can_run(q.packed):
        return reference_dequantize_nf4(q, dtype)
    return _launch_dequantize(q, torch.empty(q.shape, dtype=dtype, device=q.device))


def nf4_matmul(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ (+ bias) in x.dtype for x (..., in_features) and W = q (out_features, in_features)."""
    if len(q.shape) != 2 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"nf4_matmul: input (..., {x.shape[-1]}) does not match weight {tuple(q.shape)} "
                         "(out_features, in_features)")
    _check_dtype(x.dtype, "nf4_matmul: input")
    if x.device != q.device:
        raise ValueError(f"nf4_matmul: input on {x.device} but weight on {q.device}; move both to one device")
    if not _triton_can_run(x):
        return reference_nf4_matmul(x, q, bias)
    return NF4MatmulFn.apply(x, q, bias)


# ----------------------------------------------------------------------------- shipped configurations

def _quant_state_signature(double_quant: bool) -> dict:
    return {"packed_ptr": "*u8", "absmax_ptr": "*u8" if double_quant else "*fp32", "nested_absmax_ptr": "*fp32",
            "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32"}


def compile_specs() -> list[KernelSpec]:
    """Every (kernel, dtype, tile) configuration the launchers above can pick, with 64/256 blocks."""
    specs = []
    quant_constexprs = {"BLOCKSIZE": 64, "NESTED_BLOCKSIZE": 256}
    for dtype, tt in TRITON_DTYPES.items():
        for double_quant in (True, False):
            flags = {**quant_constexprs, "DOUBLE_QUANT": double_quant}
            signature = {**_quant_state_signature(double_quant), "out_ptr": f"*{tt}", "numel": "i32",
                         "n_bytes": "i32", **{k: "constexpr" for k in (*flags, "BLOCK")}}
            specs.append(KernelSpec(f"nf4_dequantize[{tt}, double_quant={double_quant}, BLOCK={DEQUANT_BLOCK}]",
                                    _nf4_dequantize_kernel, signature, {**flags, "BLOCK": DEQUANT_BLOCK},
                                    num_warps=NUM_WARPS))
            for block_m in MATMUL_BLOCK_MS[dtype]:
                tiles = {"BLOCK_M": block_m, "BLOCK_N": MATMUL_BLOCK_N, "BLOCK_K": MATMUL_BLOCK_K}
                signature = {"x_ptr": f"*{tt}", **_quant_state_signature(double_quant), "y_ptr": f"*{tt}",
                             "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32",
                             **{k: "constexpr" for k in (*flags, *tiles)}}
                specs.append(KernelSpec(
                    f"nf4_matmul_small_m[{tt}, double_quant={double_quant}, BLOCK_M={block_m}, "
                    f"BLOCK_N={MATMUL_BLOCK_N}, BLOCK_K={MATMUL_BLOCK_K}]",
                    _nf4_matmul_small_m_kernel, signature, {**flags, **tiles}, num_warps=NUM_WARPS,
                    num_stages=MATMUL_NUM_STAGES[dtype]))
    return specs
