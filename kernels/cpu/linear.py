"""Products with a frozen weight on the CPU in fp32, run by oneDNN's inner product instead of MKL's sgemm.

    linear(x, w, bias) = x wᵀ + bias        x (..., in), w (out, in) in any layout (a transposed view too)

torch's fp32 `mm` / `F.linear` call MKL's sgemm. On the AMD EPYC this project measures on, MKL takes its
AVX2 "zen" code path and runs the SmolLM2-135M shapes (1024 x 576 by 576 x 1536 and back) at 160-190
GFLOP/s on two cores; oneDNN's brgemm inner product (`torch.ops.mkldnn._linear_pointwise`, the op that
torch's own CPU compiler emits for linear layers) runs them at 185-210 in the same process, AVX-512 or
restricted to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`: within a few per cent of MKL or faster). Both sum in fp32;
against an fp64 product both are within ~1e-6 of the largest output.

The op has no autograd formula, so it serves only where autograd is not recording: inside the forward and
backward of qtune's own autograd functions (which write the gradient formulas themselves), and in
no-grad passes. Everywhere else, and where oneDNN is missing, `linear` is `F.linear`.

Every frozen product of a CPU fp32 forward goes through here, with or without gradients, so that a policy
and its frozen reference (DPO, PPO) compute bit-identical outputs while their weights are equal.
"""

import functools

import torch
import torch.nn.functional as F


@functools.cache
def onednn_available() -> bool:
    """oneDNN is built in and its inner-product op is registered (x86-64 builds of torch have both)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """CPU fp32 operands and nothing that autograd would have to differentiate through."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (onednn_available() and weight.dim() == 2 and x.dim() >= 2
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) -> (..., out) = x weightᵀ + bias, by oneDNN where `onednn_applies`, else by F.linear."""
    if not onednn_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")  # (N, out)
    if x.dim() == 2:
        return y
    # Not a view of y (as matmul's own result is not): an autograd function may return it and callers
    # may then write into it in place.
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (..., k) @ b (k, n), e.g. dY (N, out) @ W (out, in) for the input gradient of a frozen product."""
    return linear(a, b.t())


def dense(weight, dtype: torch.dtype) -> torch.Tensor:
    """A dense weight as it is; an NF4Weight (anything with `dequantize`) dequantized into a fresh copy."""
    return weight if isinstance(weight, torch.Tensor) else weight.dequantize(dtype)


class FrozenLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b for a frozen W (dense, or an NF4Weight dequantized for each product) and b; backward
    returns dX = dY W only, dequantizing W again.

    W is kept as a plain reference, not a saved tensor. Plain autograd would keep the dequantized W of every
    layer alive until backward, i.e. a 16/32-bit copy of the whole model; recomputing it costs one more
    dequantization per layer. And a checkpoint's recomputation then has nothing to regenerate for this
    product (as for the merged LoRA product).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        return linear(x, dense(weight, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):
        return matmul(grad_y, dense(ctx.weight, grad_y.dtype)), None, None


def frozen_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a weight (dense or NF4Weight) and bias that take no gradient, x trainable or not;
    through oneDNN on CPU fp32."""
    if isinstance(weight, torch.Tensor) and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and x.requires_grad:
        return FrozenLinearFn.apply(x, weight, bias)
    return linear(x, dense(weight, x.dtype), bias)
