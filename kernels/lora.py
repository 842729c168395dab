"""QLoRA linear layers: a frozen (dense or NF4) base weight plus a trainable low-rank adapter.

    y = x Wᵀ + bias + s · dropout(x) Aᵀ Bᵀ          W (out, in) frozen, A (r, in), B (out, r), s = alpha / r

Three ops share one forward/backward recipe per projection:
- `lora_linear`: one projection.
- `lora_qkv`: q, k, v projections of the same input; x is saved once.
- `lora_mlp`: the gated MLP down(act(gate(x)) * up(x)) with act = silu (SwiGLU: Llama, Qwen, Mistral) or
  tanh-approximated GELU (GeGLU: Gemma); saves x, g = gate(x), u = up(x).

What backward keeps and what it recomputes (the point of fusing):
- The base weight is never saved in a dequantized form: backward dequantizes it again (on the
  Triton path through qtune.kernels.nf4, whose nf4_matmul also serves the forward).
- Adapter gradients stay in rank-r order, never forming an (out, in) product:
      dB = s · dYᵀ (x_d Aᵀ)     with x_d Aᵀ (N, r) saved from the forward
      dA = s · (dY B)ᵀ x_d
      dX = dY W + s · dropout'((dY B) A)        accumulated into one buffer
- LoRA dropout masks are not stored at all. Each call takes a seed (the `seed` argument, else one drawn
  from torch's default generator, so `torch.manual_seed` makes runs reproducible) and backward regenerates
  the mask from it: Philox via `tl.rand(seed, element_index)` on the Triton path, Bernoulli draws from a
  `torch.Generator` seeded with it on the plain-torch path (so the two paths draw different masks;
  `dropout_keep_mask` reproduces either). Projection i of a fused block uses seed + i, giving every
  adapter its own mask as separate dropout modules would, and its own p (`LoraParams.dropout`, unless
  the call passes one p for all). A checkpointed call recomputes the same masks only if it gets the same
  seed: pass `seed` where the checkpoint does not restore the RNG state (`preserve_rng_state=False`).
- The MLP recomputes h = act(g) * u in backward instead of saving it (the activations: kernels/gated.py).

The `@triton.jit` kernels and their launchers live in kernels/triton/lora.py, imported only when one
runs: triton is optional, and this file imports without it.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from qtune.kernels import KernelSpec
from qtune.kernels.dispatch import autocast_off, compute_dtype, use_triton
from qtune.kernels.gated import GATED, gated, gated_backward_inplace
from qtune.kernels.nf4 import dequantize_into_workspace, nf4_matmul


class LoraParams(NamedTuple):
    """One projection: frozen base weight (+ bias) and an optional trainable adapter."""

    weight: object  # (out, in) torch.Tensor or qtune.weights.nf4.NF4Weight; frozen
    bias: torch.Tensor | None = None  # (out,) frozen (Qwen2 q/k/v carry one)
    lora_a: torch.Tensor | None = None  # (r, in) trainable, None for a projection without adapter
    lora_b: torch.Tensor | None = None  # (out, r) trainable
    scale: float = 1.0  # s = lora_alpha / r
    dropout: float = 0.0  # LoRA dropout p of this projection (what lora_qkv / lora_mlp use with dropout=None)


def fused_path(mode: str, x, *projections) -> bool:
    """Use a fused QLoRA block when the Triton kernels run for x and some projection is quantized or adapted
    (offers `fused_params`), unless a projection says it is not `fusable` (an adapter the fused ops lack)."""
    return (use_triton(mode, x) and any(hasattr(p, "fused_params") for p in projections)
            and all(getattr(p, "fusable", True) for p in projections))


def fused_params(projection: torch.nn.Module) -> LoraParams:
    """A projection as the fused ops take it: an adapted or quantized layer describes itself (frozen weight,
    bias, active adapter A / B, scale, dropout p); a plain `nn.Linear` is its weight and bias."""
    if hasattr(projection, "fused_params"):
        return projection.fused_params()
    return LoraParams(projection.weight, projection.bias)


# ----------------------------------------------------------------------------- references (the spec)

def dense_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) base weight in `dtype`: a dense tensor as is, an NF4Weight dequantized."""
    return weight.to(dtype) if isinstance(weight, torch.Tensor) else weight.dequantize(dtype)


def reference_dropout(x: torch.Tensor, keep_mask: torch.Tensor | None, p: float) -> torch.Tensor:
    """Inverted dropout with a given mask: x · keep / (1 - p)."""
    return x if keep_mask is None else x * keep_mask / (1.0 - p)


def reference_lora_linear(x, weight, bias, lora_a, lora_b, scale: float, dropout: float = 0.0,
                          training: bool = True, keep_mask: torch.Tensor | None = None) -> torch.Tensor:
    """y = x Wᵀ + bias + s · dropout(x) Aᵀ Bᵀ in plain torch autograd.

    `keep_mask` (same shape as x, bool) fixes the dropout mask; without it `F.dropout` draws one.
    """
    y = F.linear(x, dense_weight(weight, x.dtype), None if bias is None else bias.to(x.dtype))
    if lora_a is None:
        return y
    if not training or dropout == 0.0:
        x_d = x
    elif keep_mask is None:
        x_d = F.dropout(x, dropout, training=True)
    else:
        x_d = reference_dropout(x, keep_mask, dropout)
    return y + scale * F.linear(F.linear(x_d, lora_a.to(x.dtype)), lora_b.to(x.dtype))


def _reference_projection(x, p: LoraParams, dropout, training, keep_mask):
    """One projection with p = `dropout`, or its own p.dropout when `dropout` is None."""
    p_drop = p.dropout if dropout is None else dropout
    return reference_lora_linear(x, p.weight, p.bias, p.lora_a, p.lora_b, p.scale, p_drop, training, keep_mask)


def reference_lora_mlp(x, gate: LoraParams, up: LoraParams, down: LoraParams, dropout: float | None = None,
                       training: bool = True, keep_masks=(None, None, None), activation: str = "silu") -> torch.Tensor:
    """out = down(act(gate(x)) · up(x)), act one of GATED; keep_masks fixes the (gate, up, down) dropout masks.

    `dropout` None: each projection's own p.dropout; a float: that p for all three."""
    g = _reference_projection(x, gate, dropout, training, keep_masks[0])
    u = _reference_projection(x, up, dropout, training, keep_masks[1])
    return _reference_projection(GATED[activation][0](g, u), down, dropout, training, keep_masks[2])


def reference_lora_qkv(x, q: LoraParams, k: LoraParams, v: LoraParams, dropout: float | None = None,
                       training: bool = True, keep_masks=(None, None, None)):
    """(q(x), k(x), v(x)), each a LoRA linear; keep_masks fixes the three dropout masks; `dropout` as in
    `reference_lora_mlp`."""
    return tuple(_reference_projection(x, p, dropout, training, m) for p, m in zip((q, k, v), keep_masks))


# ----------------------------------------------------------------------------- the torch path and the Triton launches

def _kernels():
    """kernels/triton/lora.py, imported on the first launch."""
    from qtune.kernels.triton import lora  # here, not at the top: triton is optional (absent on macOS/Windows)
    return lora


def _torch_keep(seed: int, like: torch.Tensor, p: float) -> torch.Tensor:
    """keep ~ Bernoulli(1 - p) as 0./1. shaped like `like`, drawn by a generator seeded with `seed`."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    return torch.empty_like(like, memory_format=torch.contiguous_format).bernoulli_(1.0 - p, generator=gen)


def lora_dropout(x: torch.Tensor, seed: int, p: float, triton_path: bool) -> torch.Tensor:
    """x · keep / (1 - p) with the mask regenerated from `seed` (nothing stored)."""
    if triton_path:
        return _kernels().launch_lora_dropout(x, seed, p)
    return _torch_keep(seed, x, p).mul_(x).div_(1.0 - p)  # the mask's buffer becomes the output


def lora_dropout_accumulate_inplace(acc: torch.Tensor, x: torch.Tensor, seed: int, p: float, triton_path: bool):
    """acc += x · keep / (1 - p), in place on `acc` (the dX buffer being accumulated)."""
    if triton_path:
        _kernels().launch_lora_dropout_accumulate_inplace(acc, x, seed, p)
    else:
        acc += _torch_keep(seed, x, p).mul_(x).div_(1.0 - p)


def dropout_keep_mask(seed: int, shape, p: float, device, kernels: str = "auto",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The bool keep mask the ops draw for `seed` over a tensor of this shape and dtype (for checks)."""
    ones = torch.ones(shape, device=device, dtype=dtype)
    return lora_dropout(ones, seed, p, use_triton(kernels, ones)) != 0


def _base_forward(x: torch.Tensor, p: LoraParams, triton_path: bool) -> torch.Tensor:
    """x Wᵀ + bias (N, out); an NF4 weight goes through nf4_matmul, which skips dequantizing for few rows."""
    if triton_path and not isinstance(p.weight, torch.Tensor):
        return nf4_matmul(x, p.weight, p.bias)
    return F.linear(x, dense_weight(p.weight, x.dtype), None if p.bias is None else p.bias.to(x.dtype))


def frozen_weight(weight, dtype: torch.dtype, triton_path: bool) -> torch.Tensor:
    """W (out, in) for the backward's dY W, to be used at once.

    On the Triton path an NF4 weight is dequantized into qtune.kernels.nf4's shared workspace, which
    stays valid only until the next dequantization of that shape.
    """
    if triton_path and not isinstance(weight, torch.Tensor):
        return dequantize_into_workspace(weight, dtype)
    return dense_weight(weight, dtype)


MAX_SEED = 2**31 - 8  # seed + i of every projection stays an int32 kernel argument


def new_dropout_seed() -> int:
    """A dropout seed drawn from torch's default generator (what the ops draw on each training call)."""
    return int(torch.randint(0, MAX_SEED, ()).item())


# ----------------------------------------------------------------------------- one projection, forward and backward

class _Run(NamedTuple):
    """How one call runs: each projection's effective dropout (0 when off), the seed of projection 0,
    Triton or torch."""

    dropouts: tuple[float, ...]
    seed: int
    triton_path: bool
    activation: str = "silu"  # the MLP's gate activation (a key of GATED)


def _dropped(x: torch.Tensor, run: _Run, i: int) -> torch.Tensor:
    """x_d = dropout(x) for projection i (seed + i), regenerated identically in forward and backward."""
    if run.dropouts[i] == 0.0:
        return x
    return lora_dropout(x, run.seed + i, run.dropouts[i], run.triton_path)


def _projection_forward(x: torch.Tensor, p: LoraParams, run: _Run, i: int):
    """y = x Wᵀ + bias + s · x_d Aᵀ Bᵀ  ->  y (N, out) and xa = x_d Aᵀ (N, r), kept for dB."""
    y = _base_forward(x, p, run.triton_path)  # (N, out); a dequantized W is dropped on return
    if p.lora_a is None:
        return y, None
    xa = _dropped(x, run, i) @ p.lora_a.to(x.dtype).t()  # (N, r)
    y.addmm_(xa, p.lora_b.to(x.dtype).t(), alpha=p.scale)  # y is our own fresh output
    return y, xa


def _adapter_backward(dy, x, xa, p: LoraParams, run: _Run, i: int):
    """An adapter's gradients in rank-r order: dB = s · dYᵀ xa, dA = s · (dY B)ᵀ x_d; also returns dY B."""
    dyb = dy @ p.lora_b.to(dy.dtype)  # (N, r)
    d_b = (dy.t() @ xa).mul_(p.scale).to(p.lora_b.dtype)
    d_a = (dyb.t() @ _dropped(x, run, i)).mul_(p.scale).to(p.lora_a.dtype)
    return dyb, d_a, d_b


def _add_adapter_dx(dx, dyb, p: LoraParams, run: _Run, i: int):
    """dX += s · dropout'((dY B) A): the adapter's share of the input gradient, added in place."""
    if run.dropouts[i] == 0.0:
        return dx.addmm_(dyb, p.lora_a.to(dx.dtype), alpha=p.scale)
    # dropout' applies the same mask again: dX += keep · (s · dyb A) / (1 - p)
    lora_dropout_accumulate_inplace(dx, (dyb @ p.lora_a.to(dx.dtype)).mul_(p.scale), run.seed + i, run.dropouts[i],
                                    run.triton_path)
    return dx


def _projection_backward(dy, x, xa, p: LoraParams, run: _Run, i: int, dx, need_dx: bool):
    """Gradients of one projection in rank-r order; adds its input gradient into `dx`.

        dB = s · dYᵀ xa               (out, r)
        dA = s · (dY B)ᵀ x_d          (r, in)
        dX += dY W + s · dropout'((dY B) A)
    Returns (dx, dA, dB); dx is allocated by the first projection and None when not needed.
    """
    d_a = d_b = None
    if p.lora_a is not None:
        # Adapter gradients first: the recomputed x_d is freed before dX is allocated.
        dyb, d_a, d_b = _adapter_backward(dy, x, xa, p, run, i)
    if not need_dx:
        return dx, d_a, d_b
    w = frozen_weight(p.weight, dy.dtype, run.triton_path)  # dequantized again rather than saved
    dx = dy @ w if dx is None else dx.addmm_(dy, w)  # (N, in)
    if p.lora_a is not None:
        _add_adapter_dx(dx, dyb, p, run, i)
    return dx, d_a, d_b


def _with_adapters(frozen, adapters) -> list[LoraParams]:
    """Re-attach the (lora_a, lora_b) pairs to the frozen projections."""
    return [p._replace(lora_a=adapters[2 * i], lora_b=adapters[2 * i + 1]) for i, p in enumerate(frozen)]


# ----------------------------------------------------------------------------- autograd functions

class LoraProjectionsFn(torch.autograd.Function):
    """Projections of one shared input x (N, in): outputs x Wᵢᵀ + bᵢ + sᵢ · dropoutᵢ(x) Aᵢᵀ Bᵢᵀ.

    Saves x once, each (N, r) xa, and the adapters. `frozen` holds the projections without adapters,
    `adapters` the flat (lora_a, lora_b, ...) pairs so that autograd sees them as inputs.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, x, frozen, run, *adapters):
        params = _with_adapters(frozen, adapters)
        ys, xas = zip(*(_projection_forward(x, p, run, i) for i, p in enumerate(params)))
        ctx.save_for_backward(x, *xas, *adapters)
        ctx.frozen, ctx.run = frozen, run
        return ys

    @staticmethod
    @autocast_off
    def backward(ctx, *dys):
        x, *rest = ctx.saved_tensors
        n = len(ctx.frozen)
        xas, params = rest[:n], _with_adapters(ctx.frozen, rest[n:])
        dx, grads = None, []
        for i, (dy, xa, p) in enumerate(zip(dys, xas, params)):
            dx, d_a, d_b = _projection_backward(dy, x, xa, p, ctx.run, i, dx, ctx.needs_input_grad[0])
            grads += [d_a, d_b]
        return dx, None, None, *grads


class GatedDownTapFn(torch.autograd.Function):
    """The gated MLP's middle: h = act(g) · u, and the down adapter's "tap".

    Saves g, u and down's (N, r) xa = dropout(h) A_downᵀ (not h: backward recomputes it from g and u).
    Returns h and, when down has an adapter, the adapter's output s · xa B_downᵀ, which `BaseProductFn`
    adds to the base product; dY of the block thus reaches this node's backward, which forms down's dA
    and dB, adds the adapter's share s · dropout'(dY B A) to dh (the base share dY W comes from
    `BaseProductFn`) and returns dg and du.

    The down product is a separate node that saves nothing: once this node's tensors are saved, a
    non-reentrant checkpoint has regenerated every tensor the block saved and stops recomputing, so the
    recomputation skips the down product (a third of the block's products).
    """

    @staticmethod
    @autocast_off
    def forward(ctx, g, u, frozen_down, run, *adapter):
        down = _with_adapters((frozen_down,), adapter)[0] if adapter else frozen_down
        h = gated(g, u, run.activation, run.triton_path)  # (N, I)
        xa = None if down.lora_a is None else _dropped(h, run, 2) @ down.lora_a.to(h.dtype).t()  # (N, r)
        ctx.save_for_backward(g, u, *([] if xa is None else [xa]), *adapter)
        ctx.frozen, ctx.run = frozen_down, run
        tap = None if xa is None else (xa @ down.lora_b.to(h.dtype).t()).mul_(down.scale)  # s · xa Bᵀ (N, out)
        return h, tap

    @staticmethod
    @autocast_off
    def backward(ctx, dh, dout):
        g, u, *rest = ctx.saved_tensors
        run = ctx.run
        grads = []
        if rest:
            xa, lora_a, lora_b = rest
            down = ctx.frozen._replace(lora_a=lora_a, lora_b=lora_b)
            h = gated(g, u, run.activation, run.triton_path)  # recomputed for dA only
            dyb, d_a, d_b = _adapter_backward(dout.contiguous(), h, xa, down, run, 2)
            del h
            _add_adapter_dx(dh, dyb, down, run, 2)  # dh is BaseProductFn's fresh dY W, read by nothing else
            grads = [d_a, d_b]
        dg, du = gated_backward_inplace(dh.contiguous(), g, u, run.activation, run.triton_path)  # (N, I) each
        return dg, du, None, None, *grads


class BaseProductFn(torch.autograd.Function):
    """y = h Wᵀ + bias + adapter_out of a frozen projection; saves no tensor (W is dequantized again in
    backward) and passes dY on to the adapter's output when there is one."""

    @staticmethod
    @autocast_off
    def forward(ctx, h, adapter_out, frozen, run):
        ctx.frozen, ctx.run = frozen, run
        y = _base_forward(h, frozen, run.triton_path)  # a fresh (N, out)
        return y if adapter_out is None else y.add_(adapter_out)

    @staticmethod
    @autocast_off
    def backward(ctx, dy):
        dh = None
        if ctx.needs_input_grad[0]:
            dh = dy @ frozen_weight(ctx.frozen.weight, dy.dtype, ctx.run.triton_path)  # (N, I)
        return dh, dy if ctx.needs_input_grad[1] else None, None, None


# ----------------------------------------------------------------------------- public ops

def _shape(weight) -> tuple[int, int]:
    return tuple(weight.shape)


def _check_projection(op: str, name: str, p: LoraParams, in_features: int) -> None:
    """Clear errors for mismatched shapes and for base tensors that would silently get no gradient."""
    out_features, w_in = _shape(p.weight)
    if w_in != in_features:
        raise ValueError(f"{op}: {name}.weight is {(out_features, w_in)} but its input has {in_features} features")
    if p.bias is not None and tuple(p.bias.shape) != (out_features,):
        raise ValueError(f"{op}: {name}.bias has shape {tuple(p.bias.shape)}, expected ({out_features},)")
    if (p.lora_a is None) != (p.lora_b is None):
        raise ValueError(f"{op}: {name} has only one of lora_a / lora_b; pass both or neither")
    if p.lora_a is not None:
        r = p.lora_a.shape[0]
        if tuple(p.lora_a.shape) != (r, in_features) or tuple(p.lora_b.shape) != (out_features, r):
            raise ValueError(f"{op}: {name}.lora_a {tuple(p.lora_a.shape)} / lora_b {tuple(p.lora_b.shape)} do not "
                             f"fit weight {(out_features, in_features)}: expected ({r}, {in_features}) / "
                             f"({out_features}, {r})")
    frozen = [t for t in (p.weight, p.bias) if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in frozen):
        raise ValueError(f"{op}: {name}.weight/bias require grad but the base layer is frozen here; "
                         f"call .requires_grad_(False) on them")


def _prepare(op: str, params, dropout: float | None, training: bool, kernels: str, x: torch.Tensor,
             seed: int | None):
    """Validate the call and split it into frozen projections, the run settings and the adapter tensors.

    `dropout` None: each projection's own p.dropout; a float: that p for every projection. `seed` None: one
    drawn from torch's default generator when some projection drops."""
    dropouts = tuple(p.dropout for p in params) if dropout is None else (dropout,) * len(params)
    for p_drop in dropouts:
        if not 0.0 <= p_drop < 1.0:
            raise ValueError(f"{op}: dropout={p_drop} must be in [0, 1)")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < MAX_SEED):
        raise ValueError(f"{op}: seed={seed!r} must be an int in [0, {MAX_SEED})")
    p_eff = dropouts if training else (0.0,) * len(params)
    if any(p_drop > 0.0 for p_drop in p_eff):
        seed = new_dropout_seed() if seed is None else seed
    run = _Run(p_eff, seed or 0, use_triton(kernels, x))
    frozen = tuple(p._replace(lora_a=None, lora_b=None) for p in params)
    adapters = [t for p in params for t in (p.lora_a, p.lora_b)]
    return frozen, run, adapters


def lora_linear(x, weight, bias, lora_a, lora_b, scale: float, dropout: float = 0.0, training: bool = True,
                kernels: str = "auto", seed: int | None = None) -> torch.Tensor:
    """y = x Wᵀ + bias + scale · dropout(x) Aᵀ Bᵀ over x (..., in) -> (..., out).

    weight (out, in) is a frozen tensor or NF4Weight (dequantized on the fly, never saved);
    lora_a (r, in) / lora_b (out, r) are trainable or both None. `kernels`: see qtune.kernels.dispatch.
    `seed` fixes the dropout mask (else drawn from torch's generator; see the module docstring).
    """
    p = LoraParams(weight, bias, lora_a, lora_b, scale, dropout)
    _check_projection("lora_linear", "", p, x.shape[-1])
    x = x.to(compute_dtype(x))
    frozen, run, adapters = _prepare("lora_linear", (p,), dropout, training, kernels, x, seed)
    (y,) = LoraProjectionsFn.apply(x.reshape(-1, x.shape[-1]), frozen, run, *adapters)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def lora_qkv(x, q: LoraParams, k: LoraParams, v: LoraParams, dropout: float | None = None, training: bool = True,
             kernels: str = "auto", seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q(x), k(x), v(x)) for x (..., D): three LoRA linears over one input, which is saved once.

    A projection without an adapter has lora_a = lora_b = None (e.g. adapting only q and v). `dropout`
    None gives each projection its own p.dropout; a float applies that p to all three. Projection i drops
    with seed + i (`seed` as in `lora_linear`).
    """
    for name, p in zip("qkv", (q, k, v)):
        _check_projection("lora_qkv", name, p, x.shape[-1])
    x = x.to(compute_dtype(x))
    frozen, run, adapters = _prepare("lora_qkv", (q, k, v), dropout, training, kernels, x, seed)
    ys = LoraProjectionsFn.apply(x.reshape(-1, x.shape[-1]), frozen, run, *adapters)
    return tuple(y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys)


def lora_mlp(x, gate: LoraParams, up: LoraParams, down: LoraParams, dropout: float | None = None,
             training: bool = True, kernels: str = "auto", activation: str = "silu",
             seed: int | None = None) -> torch.Tensor:
    """Gated MLP down(act(gate(x)) · up(x)) over x (..., H) with LoRA on each projection; activation "silu"
    (SwiGLU) or "gelu_pytorch_tanh" (GeGLU).

    `dropout` None gives each projection its own p.dropout; a float applies that p to all three. `seed` as in
    `lora_qkv`."""
    if activation not in GATED:
        raise ValueError(f"lora_mlp: activation {activation!r} is not one of {', '.join(GATED)}")
    hidden = x.shape[-1]
    _check_projection("lora_mlp", "gate", gate, hidden)
    _check_projection("lora_mlp", "up", up, hidden)
    intermediate = _shape(gate.weight)[0]
    if _shape(up.weight)[0] != intermediate:
        raise ValueError(f"lora_mlp: gate.weight is {_shape(gate.weight)} but up.weight is {_shape(up.weight)}")
    _check_projection("lora_mlp", "down", down, intermediate)
    x = x.to(compute_dtype(x))
    frozen, run, adapters = _prepare("lora_mlp", (gate, up, down), dropout, training, kernels, x, seed)
    run = run._replace(activation=activation)
    # three nodes so that a checkpoint's recomputation stops before the down product (GatedDownTapFn)
    g, u = LoraProjectionsFn.apply(x.reshape(-1, hidden), frozen[:2], run, *adapters[:4])  # saves x and xa
    down_adapter = [] if down.lora_a is None else adapters[4:]
    h, tap = GatedDownTapFn.apply(g, u, frozen[2], run, *down_adapter)  # saves g, u and down's xa
    out = BaseProductFn.apply(h, tap, frozen[2], run)  # saves nothing
    return out.reshape(*x.shape[:-1], out.shape[-1])


# ----------------------------------------------------------------------------- shipped configurations

def compile_specs() -> list[KernelSpec]:
    """Every kernel in every dtype the ops launch it with (fp32 / fp16 / bf16 activations), kernels/gated.py's
    included."""
    k = _kernels()
    n, warps = k.BLOCK, k.NUM_WARPS
    specs = []
    for ty in ("fp32", "fp16", "bf16"):
        ptr, scalars = f"*{ty}", {"n_elements": "i32"}
        block = {"BLOCK": n}
        dropout_args = {"n_elements": "i32", "seed": "i32", "p": "fp32", "BLOCK": "constexpr"}
        specs += [
            KernelSpec(f"lora_dropout[{ty},BLOCK={n}]", k.lora_dropout_kernel,
                       {"x_ptr": ptr, "out_ptr": ptr, **dropout_args}, block, warps),
            KernelSpec(f"lora_dropout_accumulate_inplace[{ty},BLOCK={n}]", k.lora_dropout_accumulate_inplace_kernel,
                       {"acc_ptr": ptr, "x_ptr": ptr, **dropout_args}, block, warps),
            KernelSpec(f"swiglu_forward[{ty},BLOCK={n}]", k.swiglu_forward_kernel,
                       {"g_ptr": ptr, "u_ptr": ptr, "h_ptr": ptr, **scalars, "BLOCK": "constexpr"}, block, warps),
            KernelSpec(f"swiglu_backward_inplace[{ty},BLOCK={n}]", k.swiglu_backward_inplace_kernel,
                       {"dh_ptr": ptr, "g_ptr": ptr, "u_ptr": ptr, "du_ptr": ptr, **scalars, "BLOCK": "constexpr"},
                       block, warps),
            KernelSpec(f"geglu_forward[{ty},BLOCK={n}]", k.geglu_forward_kernel,
                       {"g_ptr": ptr, "u_ptr": ptr, "h_ptr": ptr, **scalars, "BLOCK": "constexpr"}, block, warps),
            KernelSpec(f"geglu_backward_inplace[{ty},BLOCK={n}]", k.geglu_backward_inplace_kernel,
                       {"dh_ptr": ptr, "g_ptr": ptr, "u_ptr": ptr, "du_ptr": ptr, **scalars, "BLOCK": "constexpr"},
                       block, warps),
        ]
        halves = {"n_elements": "i32", "intermediate": "i32", "BLOCK": "constexpr"}
        for act in ("swiglu", "geglu"):
            specs += [
                KernelSpec(f"{act}_halves_forward[{ty},BLOCK={n}]", getattr(k, f"{act}_halves_forward_kernel"),
                           {"gu_ptr": ptr, "h_ptr": ptr, **halves}, block, warps),
                KernelSpec(f"{act}_halves_backward[{ty},BLOCK={n}]", getattr(k, f"{act}_halves_backward_kernel"),
                           {"dh_ptr": ptr, "gu_ptr": ptr, "dgu_ptr": ptr, **halves}, block, warps),
            ]
    return specs
