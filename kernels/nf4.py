"""NF4 dequantization and the 4-bit linear y = x Wᵀ (+ bias), beside their plain-torch references.

- `dequantize_nf4(q, dtype)`: one pass decodes the double-quantized absmax *and* the 4-bit codes,
      absmax[b] = nested_code[c[b]] · nested_absmax[b // 256] + offset
      w[i]      = NF4_CODE[nibble(i)] · absmax[i // blocksize]
  with the same fp32 rounding steps as `qtune.weights.nf4` (and so bitsandbytes): the result is bit-equal.
- `nf4_matmul(x, q, bias)`: for up to SMALL_M rows (decoding, rollouts) a fused kernel reads the
  4-bit weight directly and never writes a dequantized W; for more rows W is dequantized into a
  reusable workspace and multiplied with `torch.matmul` on tensor cores. Backward gives
  dX = dY W, dequantizing W again; the frozen W gets no gradient.

`q` is an NF4 weight as `qtune.weights.nf4.NF4Weight` holds it (packed bytes, absmax, the nested
quantization state, shape, dtype, blocksizes); this module only reads those attributes, so it imports
nothing from qtune.weights. The `@triton.jit` kernels and their launchers live in kernels/triton/nf4.py,
imported only when one runs: triton is optional, and this file imports without it.
"""

import torch
import torch.nn.functional as F

from qtune.kernels import KernelSpec
from qtune.kernels.dispatch import autocast_off, compute_dtype, interpreting, triton_importable

# The 16 NF4 levels as bitsandbytes lists them: quantiles of N(0, 1) normalized to [-1, 1], with an
# exact zero (QLoRA appendix E).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)  # (16,)

SMALL_M = 64  # inputs with at most this many rows take the fused kernel
TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ----------------------------------------------------------------------------- references (the spec)

def reference_dequantize_nf4(q, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of `q` in `dtype` (default q.dtype): qtune.weights.nf4's plain-torch decode."""
    return q.dequantize_torch(dtype)


def reference_nf4_matmul(x: torch.Tensor, q, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ (+ bias) in x.dtype, W = dequantized q; (..., in) -> (..., out)."""
    bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, reference_dequantize_nf4(q, x.dtype), bias)


# ----------------------------------------------------------------------------- the Triton path

def _triton_can_run(t: torch.Tensor) -> bool:
    return (t.is_cuda or interpreting()) and triton_importable()


def _kernels():
    """kernels/triton/nf4.py, imported on the first launch."""
    from qtune.kernels.triton import nf4  # here, not at the top: triton is optional (absent on macOS/Windows)
    return nf4


_NF4_CODE_ON_DEVICE: dict[torch.device, torch.Tensor] = {}  # copied once, not on every launch


def code_on(device: torch.device) -> torch.Tensor:
    """The 16 NF4 levels on `device` (copied there once)."""
    code = _NF4_CODE_ON_DEVICE.get(device)
    if code is None:
        code = _NF4_CODE_ON_DEVICE[device] = NF4_CODE.to(device)
    return code


# One dequantized-weight buffer per (device, dtype, shape), shared by every layer of that shape.
# A layer's forward or backward dequantizes into it and consumes it in the very next matmul on the
# same stream, so layers never see each other's weights; keeping it saves a (out, in) allocation per
# call. `clear_dequantize_workspaces()` frees them.
_DEQUANTIZE_WORKSPACES: dict[tuple, torch.Tensor] = {}


def dequantize_into_workspace(q, dtype: torch.dtype) -> torch.Tensor:
    """q dequantized by the Triton kernel into the shared workspace of its shape: valid only until the next call."""
    key = (q.device, dtype, tuple(q.shape))
    workspace = _DEQUANTIZE_WORKSPACES.get(key)
    if workspace is None:
        workspace = _DEQUANTIZE_WORKSPACES[key] = torch.empty(q.shape, dtype=dtype, device=q.device)
    return _kernels().launch_dequantize(q, code_on(q.device), workspace)


def clear_dequantize_workspaces() -> None:
    _DEQUANTIZE_WORKSPACES.clear()


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in TRITON_DTYPES:
        raise ValueError(f"{what} dtype {dtype} is not one of float32, bfloat16, float16")


# ----------------------------------------------------------------------------- autograd and public ops

class NF4MatmulFn(torch.autograd.Function):
    """y = x Wᵀ + bias with W frozen in NF4 (Triton path); gradients for x and bias only."""

    @staticmethod
    @autocast_off
    def forward(ctx, x: torch.Tensor, q, bias: torch.Tensor | None) -> torch.Tensor:
        N, K = q.shape
        x2 = x.reshape(-1, K).contiguous()  # (M, K)
        if x2.shape[0] <= SMALL_M:
            y = _kernels().launch_matmul_small_m(x2, q, code_on(q.device))
        else:
            y = x2 @ dequantize_into_workspace(q, x.dtype).t()
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.q = q  # the frozen quantized weight (module buffers), not an activation
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], N)

    @staticmethod
    @autocast_off
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


def dequantize_nf4(q, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight of `q` in `dtype` (default q.dtype), bit-equal to `reference_dequantize_nf4`."""
    dtype = dtype or q.dtype
    _check_dtype(dtype, "dequantize_nf4: output")
    if not _triton_can_run(q.packed):
        return reference_dequantize_nf4(q, dtype)
    return _kernels().launch_dequantize(q, code_on(q.device), torch.empty(q.shape, dtype=dtype, device=q.device))


def nf4_matmul(x: torch.Tensor, q, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ (+ bias) in x.dtype for x (..., in_features) and W = q (out_features, in_features)."""
    if len(q.shape) != 2 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"nf4_matmul: input (..., {x.shape[-1]}) does not match weight {tuple(q.shape)} "
                         "(out_features, in_features)")
    x = x.to(compute_dtype(x))
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


NO_FP_FUSION = {"enable_fp_fusion": False}  # what both launchers pass (kernels/triton/nf4.py says why)


def compile_specs() -> list[KernelSpec]:
    """Every (kernel, dtype, tile) configuration the launchers can pick, with 64/256 blocks."""
    k = _kernels()
    specs = []
    quant_constexprs = {"BLOCKSIZE": 64, "NESTED_BLOCKSIZE": 256}
    for dtype, tt in TRITON_DTYPES.items():
        for double_quant in (True, False):
            flags = {**quant_constexprs, "DOUBLE_QUANT": double_quant}
            signature = {**_quant_state_signature(double_quant), "out_ptr": f"*{tt}", "numel": "i32",
                         "n_bytes": "i32", **{c: "constexpr" for c in (*flags, "BLOCK")}}
            specs.append(KernelSpec(f"nf4_dequantize[{tt}, double_quant={double_quant}, BLOCK={k.DEQUANT_BLOCK}]",
                                    k.nf4_dequantize_kernel, signature, {**flags, "BLOCK": k.DEQUANT_BLOCK},
                                    num_warps=k.NUM_WARPS, options=NO_FP_FUSION))
            for block_m in k.MATMUL_BLOCK_MS[dtype]:
                tiles = {"BLOCK_M": block_m, "BLOCK_N": k.MATMUL_BLOCK_N, "BLOCK_K": k.MATMUL_BLOCK_K}
                signature = {"x_ptr": f"*{tt}", **_quant_state_signature(double_quant), "y_ptr": f"*{tt}",
                             "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32",
                             **{c: "constexpr" for c in (*flags, *tiles)}}
                specs.append(KernelSpec(
                    f"nf4_matmul_small_m[{tt}, double_quant={double_quant}, BLOCK_M={block_m}, "
                    f"BLOCK_N={k.MATMUL_BLOCK_N}, BLOCK_K={k.MATMUL_BLOCK_K}]",
                    k.nf4_matmul_small_m_kernel, signature, {**flags, **tiles}, num_warps=k.NUM_WARPS,
                    num_stages=k.MATMUL_NUM_STAGES[dtype], options=NO_FP_FUSION))
    return specs
