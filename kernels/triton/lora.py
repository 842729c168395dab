"""Triton kernels of `qtune.kernels.lora` and `qtune.kernels.gated`: LoRA dropout (mask regenerated from a seed)
and the gated activations SwiGLU and GeGLU, on two tensors or on the two halves of a fused gate_up output.

The references, the torch path, the autograd functions and the public ops are in kernels/lora.py and
kernels/gated.py; this module is imported only when a kernel is launched.
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
def _swiglu(g, u):
    """h = silu(g) · u = g · σ(g) · u."""
    return g * tl.sigmoid(g) * u


@triton.jit
def _swiglu_grads(dh, g, u):
    """(dg, du) = (dh · u · σ(g) · (1 + g · (1 - σ(g))), dh · silu(g))."""
    sig = tl.sigmoid(g)
    return dh * u * sig * (1.0 + g * (1.0 - sig)), dh * g * sig


@triton.jit
def _tanh(x):
    """tanh(x) = 2 σ(2x) − 1 (the interpreter and every Triton version have sigmoid)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _geglu(g, u):
    """h = gelu_tanh(g) · u = ½ g (1 + tanh(√(2/π) (g + 0.044715 g³))) · u."""
    t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
    return 0.5 * g * (1.0 + t) * u


@triton.jit
def _geglu_grads(dh, g, u):
    """(dg, du) = (dh · u · (½ (1 + t) + ½ g (1 − t²) √(2/π) (1 + 3 · 0.044715 g²)), dh · gelu_tanh(g)),
    t = tanh(√(2/π) (g + 0.044715 g³))."""
    t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
    dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    return dh * u * dgelu, dh * 0.5 * g * (1.0 + t)


@triton.jit
def _load_pair(g_ptr, u_ptr, offs, in_bounds):
    g = tl.load(g_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    return g, u


@triton.jit
def swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, n_elements, BLOCK: tl.constexpr):
    """h = silu(g) · u."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n_elements
    g, u = _load_pair(g_ptr, u_ptr, offs, in_bounds)
    tl.store(h_ptr + offs, _swiglu(g, u).to(h_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def swiglu_backward_inplace_kernel(dh_ptr, g_ptr, u_ptr, du_ptr, n_elements, BLOCK: tl.constexpr):
    """dg written over dh, and du, of h = silu(g) · u.

    dh is a temporary of the MLP backward that nothing reads afterwards, so overwriting it with dg
    saves one (N, I) buffer at the backward's memory peak.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n_elements
    dh = tl.load(dh_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    g, u = _load_pair(g_ptr, u_ptr, offs, in_bounds)
    dg, du = _swiglu_grads(dh, g, u)
    tl.store(dh_ptr + offs, dg.to(dh_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def geglu_forward_kernel(g_ptr, u_ptr, h_ptr, n_elements, BLOCK: tl.constexpr):
    """h = gelu_tanh(g) · u."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n_elements
    g, u = _load_pair(g_ptr, u_ptr, offs, in_bounds)
    tl.store(h_ptr + offs, _geglu(g, u).to(h_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def geglu_backward_inplace_kernel(dh_ptr, g_ptr, u_ptr, du_ptr, n_elements, BLOCK: tl.constexpr):
    """dg written over dh (a temporary nothing reads afterwards, as in the SwiGLU kernel), and du, of
    h = gelu_tanh(g) · u."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n_elements
    dh = tl.load(dh_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    g, u = _load_pair(g_ptr, u_ptr, offs, in_bounds)
    dg, du = _geglu_grads(dh, g, u)
    tl.store(dh_ptr + offs, dg.to(dh_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=in_bounds)


# The fused projection's output gu (N, 2I) holds gate rows then up rows per token (Phi-3's gate_up_proj). The
# kernels below read g and u where they lie, over the flat index i = n·I + c of h: g at n·2I + c = i + n·I,
# u I further; no (N, I) copies of the two halves.

@triton.jit
def _halves_offsets(pid, n_elements, intermediate, BLOCK: tl.constexpr):
    """(flat offsets into h, their in-bounds mask, offsets of their g in gu)."""
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n_elements, offs + (offs // intermediate) * intermediate


@triton.jit
def swiglu_halves_forward_kernel(gu_ptr, h_ptr, n_elements, intermediate, BLOCK: tl.constexpr):
    """h = silu(g) · u with g, u the two halves of each row of gu."""
    offs, in_bounds, g_offs = _halves_offsets(tl.program_id(0), n_elements, intermediate, BLOCK)
    g, u = _load_pair(gu_ptr, gu_ptr + intermediate, g_offs, in_bounds)
    tl.store(h_ptr + offs, _swiglu(g, u).to(h_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def swiglu_halves_backward_kernel(dh_ptr, gu_ptr, dgu_ptr, n_elements, intermediate, BLOCK: tl.constexpr):
    """dgu = (dg, du) laid out as gu, for h = silu(g) · u."""
    offs, in_bounds, g_offs = _halves_offsets(tl.program_id(0), n_elements, intermediate, BLOCK)
    dh = tl.load(dh_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    g, u = _load_pair(gu_ptr, gu_ptr + intermediate, g_offs, in_bounds)
    dg, du = _swiglu_grads(dh, g, u)
    tl.store(dgu_ptr + g_offs, dg.to(dgu_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(dgu_ptr + intermediate + g_offs, du.to(dgu_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def geglu_halves_forward_kernel(gu_ptr, h_ptr, n_elements, intermediate, BLOCK: tl.constexpr):
    """h = gelu_tanh(g) · u with g, u the two halves of each row of gu."""
    offs, in_bounds, g_offs = _halves_offsets(tl.program_id(0), n_elements, intermediate, BLOCK)
    g, u = _load_pair(gu_ptr, gu_ptr + intermediate, g_offs, in_bounds)
    tl.store(h_ptr + offs, _geglu(g, u).to(h_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def geglu_halves_backward_kernel(dh_ptr, gu_ptr, dgu_ptr, n_elements, intermediate, BLOCK: tl.constexpr):
    """dgu = (dg, du) laid out as gu, for h = gelu_tanh(g) · u."""
    offs, in_bounds, g_offs = _halves_offsets(tl.program_id(0), n_elements, intermediate, BLOCK)
    dh = tl.load(dh_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32)
    g, u = _load_pair(gu_ptr, gu_ptr + intermediate, g_offs, in_bounds)
    dg, du = _geglu_grads(dh, g, u)
    tl.store(dgu_ptr + g_offs, dg.to(dgu_ptr.dtype.element_ty), mask=in_bounds)
    tl.store(dgu_ptr + intermediate + g_offs, du.to(dgu_ptr.dtype.element_ty), mask=in_bounds)


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


HALVES_KERNELS = {"silu": (swiglu_halves_forward_kernel, swiglu_halves_backward_kernel),
                  "gelu_pytorch_tanh": (geglu_halves_forward_kernel, geglu_halves_backward_kernel)}


def launch_gated_halves(gu: torch.Tensor, activation: str) -> torch.Tensor:
    """h (..., I) = act(g) · u of gu (..., 2I) = [g | u] into a new tensor."""
    gu = gu.contiguous()
    intermediate = gu.shape[-1] // 2
    h = gu.new_empty(*gu.shape[:-1], intermediate)
    HALVES_KERNELS[activation][0][_grid(h.numel())](gu, h, h.numel(), intermediate, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return h


def launch_gated_halves_backward(dh: torch.Tensor, gu: torch.Tensor, activation: str) -> torch.Tensor:
    """dgu (..., 2I) = [dg | du] of h = act(g) · u, gu = [g | u]."""
    dh, gu = dh.contiguous(), gu.contiguous()
    dgu = torch.empty_like(gu)
    HALVES_KERNELS[activation][1][_grid(dh.numel())](dh, gu, dgu, dh.numel(), gu.shape[-1] // 2, BLOCK=BLOCK,
                                                    num_warps=NUM_WARPS)
    return dgu
