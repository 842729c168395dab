"""The gated activations of the feed-forward block, h = act(g) · u: SwiGLU (act = silu: Llama, Qwen, Mistral) and
GeGLU (act = tanh-approximated GELU: Gemma). Each has its plain-torch reference and hand-derived backward (the
spec), the torch path (in place where a buffer can be reused) and the Triton launch (kernels/triton/lora.py).
The fused MLP op (kernels/lora.py) calls `gated` in forward and recomputes it in backward instead of saving h.

`gated_halves` takes g and u as the two halves of one fused projection's output gu = [g | u] (Phi-3's
gate_up_proj): its Triton kernels read each half where it lies and write the gradient in gu's layout, so
neither forward nor backward copies the halves apart or back together, and only gu is saved.
"""

import torch
import torch.nn.functional as F

from qtune.kernels.dispatch import autocast_off, use_triton


def reference_swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h = silu(g) · u."""
    return F.silu(g) * u


def reference_swiglu_backward(dh, g, u) -> tuple[torch.Tensor, torch.Tensor]:
    """dg = dh · u · σ(g) · (1 + g · (1 - σ(g))),  du = dh · silu(g)."""
    sig = torch.sigmoid(g)
    return dh * u * sig * (1 + g * (1 - sig)), dh * g * sig


GELU_C = (2.0 / torch.pi) ** 0.5  # √(2/π) of the tanh approximation


def reference_geglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h = gelu_tanh(g) · u, gelu_tanh(g) = ½ g (1 + tanh(√(2/π) (g + 0.044715 g³)))."""
    return F.gelu(g, approximate="tanh") * u


def reference_geglu_backward(dh, g, u) -> tuple[torch.Tensor, torch.Tensor]:
    """dg = dh · u · (½ (1 + t) + ½ g (1 − t²) √(2/π) (1 + 3 · 0.044715 g²)), du = dh · gelu_tanh(g),
    with t = tanh(√(2/π) (g + 0.044715 g³))."""
    t = torch.tanh(GELU_C * (g + 0.044715 * g ** 3))
    dgelu = 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * GELU_C * (1 + 3 * 0.044715 * g * g)
    return dh * u * dgelu, dh * 0.5 * g * (1 + t)


GATED = {"silu": (reference_swiglu, reference_swiglu_backward), "gelu_pytorch_tanh": (reference_geglu,
                                                                                      reference_geglu_backward)}


def reference_gated_halves(gu: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """h (..., I) = act(g) · u for gu (..., 2I) = [g | u]."""
    g, u = gu.chunk(2, dim=-1)
    return GATED[activation][0](g, u)


def swiglu(g: torch.Tensor, u: torch.Tensor, triton_path: bool) -> torch.Tensor:
    """h = silu(g) · u."""
    if triton_path:
        return _kernels().launch_swiglu(g, u)
    return F.silu(g).mul_(u)  # one (N, I) buffer instead of reference_swiglu's two


def geglu(g: torch.Tensor, u: torch.Tensor, triton_path: bool) -> torch.Tensor:
    """h = gelu_tanh(g) · u."""
    if triton_path:
        return _kernels().launch_geglu(g, u)
    return F.gelu(g, approximate="tanh").mul_(u)


def geglu_backward_inplace(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, triton_path: bool):
    """Returns (dg, du), dg being `dh` overwritten in place (as in `swiglu_backward_inplace`)."""
    if triton_path:
        return _kernels().launch_geglu_backward_inplace(dh, g, u)
    dg, du = reference_geglu_backward(dh, g, u)
    return dh.copy_(dg), du


def gated(g: torch.Tensor, u: torch.Tensor, activation: str, triton_path: bool) -> torch.Tensor:
    """h = act(g) · u for `activation` (a key of GATED)."""
    return (swiglu if activation == "silu" else geglu)(g, u, triton_path)


def gated_backward_inplace(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str, triton_path: bool):
    """(dg, du) of `gated`, dg written over dh."""
    backward = swiglu_backward_inplace if activation == "silu" else geglu_backward_inplace
    return backward(dh, g, u, triton_path)


def swiglu_backward_inplace(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, triton_path: bool):
    """Returns (dg, du), dg being `dh` overwritten in place (a backward temporary nothing else reads)."""
    if triton_path:
        return _kernels().launch_swiglu_backward_inplace(dh, g, u)
    # The reference's formula with in-place steps: one (N, I) temporary besides du.
    du = F.silu(g).mul_(dh)  # dh · silu(g)
    sig = torch.sigmoid(g)
    return dh.mul_(u).mul_(sig).mul_(sig.neg_().add_(1).mul_(g).add_(1)), du  # dh · u · σ · (1 + g(1 - σ))


def _kernels():
    """kernels/triton/lora.py, imported on the first launch."""
    from qtune.kernels.triton import lora  # here, not at the top: triton is optional (absent on macOS/Windows)
    return lora


class GatedHalvesFn(torch.autograd.Function):
    """h = act(g) · u of gu = [g | u]; saves gu only, and returns dgu = [dg | du]."""

    @staticmethod
    @autocast_off
    def forward(ctx, gu, activation, triton_path):
        ctx.save_for_backward(gu)
        ctx.activation, ctx.triton_path = activation, triton_path
        if triton_path:
            return _kernels().launch_gated_halves(gu, activation)
        g, u = gu.chunk(2, dim=-1)
        return gated(g, u, activation, triton_path=False)

    @staticmethod
    @autocast_off
    def backward(ctx, dh):
        (gu,) = ctx.saved_tensors
        if ctx.triton_path:
            return _kernels().launch_gated_halves_backward(dh, gu, ctx.activation), None, None
        g, u = gu.chunk(2, dim=-1)
        return torch.cat(GATED[ctx.activation][1](dh, g, u), dim=-1), None, None


def gated_halves(gu: torch.Tensor, activation: str = "silu", kernels: str = "auto") -> torch.Tensor:
    """`reference_gated_halves` with the Triton kernels where they run (kernels: see kernels/dispatch.py)."""
    if activation not in GATED:
        raise ValueError(f"gated_halves: activation {activation!r} is not one of {', '.join(GATED)}")
    if gu.shape[-1] % 2:
        raise ValueError(f"gated_halves: the last dimension of gu ({gu.shape[-1]}) must be even, [gate | up]")
    return GatedHalvesFn.apply(gu, activation, use_triton(kernels, gu))
