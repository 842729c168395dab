"""The gated activations of the feed-forward block, h = act(g) · u: SwiGLU (act = silu: Llama, Qwen, Mistral) and
GeGLU (act = tanh-approximated GELU: Gemma). Each has its plain-torch reference and hand-derived backward (the
spec), the torch path (in place where a buffer can be reused) and the Triton launch (kernels/triton/lora.py).
The fused MLP op (kernels/lora.py) calls `gated` in forward and recomputes it in backward instead of saving h.
"""

import torch
import torch.nn.functional as F


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
