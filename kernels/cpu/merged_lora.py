"""LoRA training on the plain-torch fp32 path: one product with the merged weight per projection.

    y = x (W + s · B A)ᵀ + bias        which equals  x Wᵀ + bias + s · x Aᵀ Bᵀ  (no dropout)

The unmerged form spends, per projection and per forward, a rank-r product with an (N, out) output, a
scaling pass and an addition pass over (N, out), and in backward a rank-r product with an (N, in) output
and another addition. On a CPU these are memory-bound: about 0.2 s of a 6.5 s SmolLM2-135M step (4 x 256
tokens, r = 16). The base weight is dequantized for every product anyway (an NF4 weight is never kept
in 16/32 bits), so folding s · B A into that fresh copy costs one (out, r) x (r, in) product, small next
to the (N, in) x (in, out) one. In fp32 the sum W + s · B A keeps the update to 2⁻²⁴ of |W|; in 16-bit
types it would round most of a young adapter's update away, so this path is for fp32 only.

Two autograd nodes per projection, and why:
- `AdapterTapFn(x, A, B)` saves x, A and B and returns a stride-0 zero tensor shaped like y (the "tap").
  Its backward receives dY and returns the adapter gradients in rank-r order:
      dB = s · dYᵀ (x Aᵀ)        dA = s · (dY B)ᵀ x
- `MergedProductFn(x, tap, ...)` computes y and saves no tensor: backward dequantizes W again, adds
  s · B A and returns dX = dY (W + s · B A), passing dY on to the tap unchanged.
torch.utils.checkpoint (non-reentrant) stops recomputing a block as soon as it has regenerated every
tensor the forward saved. Because the product saves nothing and comes after its tap, a block whose last
projection feeds only the residual sum (the MLP's down projection) is recomputed without that product:
one of the MLP's three big products is skipped in every checkpointed layer.
"""

import torch

from qtune.kernels.cpu.linear import linear, matmul


def merged_weight(weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + s · B A (out, in) in fp32, W a dense frozen tensor or an NF4Weight (dequantized into a fresh copy)."""
    if isinstance(weight, torch.Tensor):
        return torch.addmm(weight.float(), lora_b, lora_a, alpha=scale)  # out of place: W is the model's own
    return weight.dequantize(torch.float32).addmm_(lora_b, lora_a, alpha=scale)  # a fresh copy: in place


class AdapterTapFn(torch.autograd.Function):
    """Saves x (N, in), A (r, in), B (out, r); returns a stride-0 zero (N, out). Backward: dA and dB only."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, scale):
        ctx.save_for_backward(x, lora_a, lora_b)
        ctx.scale = scale
        return x.new_zeros(()).expand(x.shape[0], lora_b.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_a, lora_b = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        d_a = d_b = None
        if ctx.needs_input_grad[2]:
            d_b = (grad_y.t() @ (x @ lora_a.t())).mul_(ctx.scale)  # s · dYᵀ (x Aᵀ): (out, r)
        if ctx.needs_input_grad[1]:
            d_a = ((grad_y @ lora_b).t() @ x).mul_(ctx.scale)  # s · (dY B)ᵀ x: (r, in)
        return None, d_a, d_b, None


class MergedProductFn(torch.autograd.Function):
    """y = x (W + s · B A)ᵀ + bias for x (N, in); saves no tensor (see the module docstring).

    A and B are kept as plain references, not saved tensors (saving them would make a checkpoint
    recompute this product); their version counters are checked in backward instead, so an in-place
    update between forward and backward is an error, as it would be for saved tensors.
    """

    @staticmethod
    def forward(ctx, x, tap, weight, bias, lora_a, lora_b, scale):
        ctx.weight, ctx.scale = weight, scale
        ctx.lora_a, ctx.lora_b = lora_a.detach(), lora_b.detach()
        ctx.versions = (lora_a._version, lora_b._version)
        return linear(x, merged_weight(weight, ctx.lora_a, ctx.lora_b, scale), bias)

    @staticmethod
    def backward(ctx, grad_y):
        if (ctx.lora_a._version, ctx.lora_b._version) != ctx.versions:
            raise RuntimeError("a LoRA matrix was modified in place between forward and backward "
                               "(e.g. an optimizer step before backward of an earlier forward)")
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul(grad_y, merged_weight(ctx.weight, ctx.lora_a, ctx.lora_b, ctx.scale))  # (N, in)
        return grad_x, grad_y, None, None, None, None, None


def merged_path_applies(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, dropout_active: bool) -> bool:
    """Whether `merged_lora_linear` serves this call: fp32 throughout, no active dropout, gradients wanted."""
    return (not dropout_active and x.dtype == lora_a.dtype == lora_b.dtype == torch.float32
            and torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad))


def merged_lora_linear(x, weight, bias, lora_a, lora_b, scale: float) -> torch.Tensor:
    """x (..., in) -> (..., out) = x (W + s · B A)ᵀ + bias, W dense or NF4, with adapter gradients in rank-r order."""
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    tap = AdapterTapFn.apply(flat, lora_a, lora_b, scale)  # (N, out), stride 0
    y = MergedProductFn.apply(flat, tap, weight, None if bias is None else bias.float(), lora_a, lora_b, scale)
    return y.reshape(*x.shape[:-1], y.shape[-1])
