"""Triton kernels of `qtune.kernels.lora`: LoRA dropout (mask regenerated from a seed) and SwiGLU.

The references, the torch path, the autograd functions and the public ops are in kernels/lora.py; this
module is imported only when a kernel is launched.
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per program of the elementwise kernels
NUM_WARPS = 4


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _keep(seed, offs, p):
    # Philox counter = element index: the same (seed, index) gives the same uniform in forward and backward.
    return tl.rand(seed, offs) >= p


@triton.jit
def lora_dropout_kernel(x_ptr, out_ptr, n_elements, seed, p, BLOCK: tl.constexpr):
    """out = x · keep / (1 - p), keep regenerated from (seed, index)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n_elements
    x = tl.load(x_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    out = tl.where(_keep(seed, offs, p), x / (1.0 - p), 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def lora_dropout_accumulate_inplace_kernel(acc_ptr, x_ptr, n_elements, seed, p, BLOCK: tl.constexpr):
    """acc += x · keep / (1 - p): adds the adapter's input gradient into the shared dX buffer."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n_elements
    acc = tl.load(acc_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    acc += tl.where(_keep(seed, offs, p), x / (1.0 - p), 0.0)
    tl.store(acc_ptr + offs, acc.to(acc_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, n_elements, BLOCK: tl.constexpr):
    """h = silu(g) · u = g · σ(g) · u."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n_elements
    g = tl.load(g_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def swiglu_backward_inplace_kernel(dh_ptr, g_ptr, u_ptr, du_ptr, n_elements, BLOCK: tl.constexpr):
    """dg = dh · u · σ(g) · (1 + g · (1 - σ(g))) written over dh; du = dh · silu(g).

    dh is a temporary of the MLP backward that nothing reads afterwards, so overwriting it with dg
    saves one (N, I) buffer at the backward's memory peak.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n_elements
    dh = tl.load(dh_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    du = dh * g * sig
    tl.store(dh_ptr + offs, dg.to(dh_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _tanh(x):
    """tanh(x) = 2 σ(2x) − 1 (the interpreter and every Triton version have sigmoid)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def geglu_forward_kernel(g_ptr, u_ptr, h_ptr, n_elements, BLOCK: tl.constexpr):
    """h = gelu_tanh(g) · u = ½ g (1 + tanh(√(2/π) (g + 0.044715 g³))) · u."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n_elements
    g = tl.load(g_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
    h = 0.5 * g * (1.0 + t) * u
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def geglu_backward_inplace_kernel(dh_ptr, g_ptr, u_ptr, du_ptr, n_elements, BLOCK: tl.constexpr):
    """dg = dh · u · (½ (1 + t) + ½ g (1 − t²) √(2/π) (1 + 3 · 0.044715 g²)) written over dh (a temporary
    nothing reads afterwards, as in the SwiGLU kernel); du = dh · gelu_tanh(g)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n_elements
    dh = tl.load(dh_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
    dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    tl.store(dh_ptr + offs, (dh * u * dgelu).to(dh_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(du_ptr + offs, (dh * 0.5 * g * (1.0 + t)).to(du_ptr.dtype.element_ty), mask=in_bounds)


# ----------------------------------------------------------------------------- launchers

def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def launch_lora_dropout(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """x · keep / (1 - p) into a new tensor, keep regenerated from `seed`."""
    x = x.contiguous()
    out = torch.empty_like(x)
    lora_dropout_kernel[_grid(x.numel())](x, out, x.numel(), seed, p, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def launch_lora_dropout_accumulate_inplace(acc: torch.Tensor, x: torch.Tensor, seed: int, p: float) -> None:
    """acc += x · keep / (1 - p), in place on `acc`."""
    assert acc.is_contiguous() and x.is_contiguous() and acc.shape == x.shape
    lora_dropout_accumulate_inplace_kernel[_grid(x.numel())](acc, x, x.numel(), seed, p, BLOCK=BLOCK,
                                                             num_warps=NUM_WARPS)


def _launch_gated(kernel, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h = act(g) · u into a new tensor, `kernel` being the activation's forward kernel."""
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    kernel[_grid(g.numel())](g, u, h, g.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return h


def _launch_gated_backward_inplace(kernel, dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """(dg, du) of h = act(g) · u, dg written over `dh` by the activation's backward `kernel`."""
    assert dh.is_contiguous() and g.is_contiguous() and u.is_contiguous()
    du = torch.empty_like(u)
    kernel[_grid(g.numel())](dh, g, u, du, g.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dh, du


def launch_swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h = silu(g) · u into a new tensor."""
    return _launch_gated(swiglu_forward_kernel, g, u)


def launch_swiglu_backward_inplace(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """(dg, du), dg written over `dh`."""
    return _launch_gated_backward_inplace(swiglu_backward_inplace_kernel, dh, g, u)


def launch_geglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """h = gelu_tanh(g) · u into a new tensor."""
    return _launch_gated(geglu_forward_kernel, g, u)


def launch_geglu_backward_inplace(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
    """(dg, du), dg written over `dh`."""
    return _launch_gated_backward_inplace(geglu_backward_inplace_kernel, dh, g, u)
