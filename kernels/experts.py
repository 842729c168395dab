"""A mixture of experts' feed-forward with the tokens grouped by expert (Mixtral, Qwen3-MoE).

    out[n] = Σ_j w[n, j] · down_e(act(gate_e(x_n)) · up_e(x_n)),     e = chosen[n, j], j < k

for N tokens, each routed to k experts with weights w (N, k); act is silu (SwiGLU) or tanh-GELU (GeGLU).
The N·k (token, expert) slots are sorted by expert once (`route`): each expert then reads one contiguous
block of the gathered inputs and writes one contiguous block of the outputs, and a slot goes back to its
token by one gather (the inverse permutation) and a sum over k. No index_add, no per-expert gather, no
per-expert autograd graph: the two autograd nodes below carry every expert of the layer.

- `ExpertsGatedFn`: x (N, D) -> w_slot · act(g) · u (N·k, I), g = gate_e(x), u = up_e(x). Saves g, u and
  the slot weights; backward recomputes act(g) · u for the weight gradient,
      dw_slot = Σ_i dh · act(g) · u,    (dg, du) = gated'(w_slot · dh),    dx_slot = dg W_gate + du W_up,
  and sums each token's k slots.
- `ExpertsDownFn`: h (N·k, I) -> Σ over each token's slots of h W_downᵀ (N, D). Saves no tensor (the
  routing is a plain reference, W_down is dequantized again in backward), so a non-reentrant checkpoint
  stops recomputing the layer after `ExpertsGatedFn` and skips every down product, as the dense MLP does
  (kernels/lora.py). The routing weight is applied before the down product (it is linear) for that reason.

The experts' base weights are frozen, dense or NF4 (dequantized for each product, never kept); experts
with adapters take the model's per-expert modules instead.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from qtune.kernels.cpu.linear import linear, matmul
from qtune.kernels.dispatch import autocast_off, use_triton
from qtune.kernels.gated import GATED, gated, gated_backward_inplace
from qtune.kernels.lora import dense_weight, frozen_weight


def reference_grouped_experts(x, weights, chosen, experts, activation: str = "silu") -> torch.Tensor:
    """out (N, D) for x (N, D), weights / chosen (N, k) and experts[e] = (W_gate, W_up, W_down), in plain torch
    autograd: one product per expert over the tokens routed to it, as transformers computes it."""
    out = torch.zeros_like(x)
    for e in chosen.unique().tolist():
        token, slot = torch.where(chosen == e)
        w_gate, w_up, w_down = (dense_weight(w, x.dtype) for w in experts[e])
        h = GATED[activation][0](F.linear(x[token], w_gate), F.linear(x[token], w_up))
        out = out.index_add(0, token, F.linear(h, w_down) * weights[token, slot, None])
    return out


class Routing(NamedTuple):
    """The N·k (token, expert) slots sorted by expert; slot n·k + j is token n's j-th choice."""

    order: torch.Tensor  # (N·k,) the slots in expert order (stable: tokens ascending within an expert)
    tokens: torch.Tensor  # (N·k,) the token of each sorted slot
    inverse: torch.Tensor  # (N·k,) where slot n·k + j sits in the sorted order
    counts: tuple[int, ...]  # how many slots each expert has, expert 0 first
    top_k: int


def route(chosen: torch.Tensor, num_experts: int) -> Routing:
    """The sorted slots of chosen (N, k) expert indices."""
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = tuple(torch.bincount(flat, minlength=num_experts).tolist())
    return Routing(order, order // chosen.shape[1], inverse, counts, chosen.shape[1])


def _blocks(routing: Routing):
    """(expert, start, end) of every expert that has slots."""
    start = 0
    for e, count in enumerate(routing.counts):
        if count:
            yield e, start, start + count
        start += count


def _token_sum(slots: torch.Tensor, routing: Routing) -> torch.Tensor:
    """(N·k, C) per sorted slot -> (N, C): each token's k slots summed."""
    return slots.index_select(0, routing.inverse).view(-1, routing.top_k, slots.shape[-1]).sum(1)


class ExpertsGatedFn(torch.autograd.Function):
    """x (N, D), slot weights (N·k,) -> w_slot · act(x W_gateᵀ) · (x W_upᵀ) per sorted slot (N·k, I)."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, slot_weights, routing, gates, ups, activation, triton_path):
        xs = x.index_select(0, routing.tokens)  # (N·k, D)
        g = torch.empty(xs.shape[0], gates[0].shape[0], dtype=x.dtype, device=x.device)
        u = torch.empty_like(g)
        for e, start, end in _blocks(routing):  # each product right after its weight's dequantization (the
            # Triton path's workspace holds one weight per shape)
            g[start:end] = linear(xs[start:end], frozen_weight(gates[e], x.dtype, triton_path))
            u[start:end] = linear(xs[start:end], frozen_weight(ups[e], x.dtype, triton_path))
        ctx.save_for_backward(g, u, slot_weights)
        ctx.routing, ctx.gates, ctx.ups, ctx.activation, ctx.triton_path = routing, gates, ups, activation, triton_path
        ctx.in_features = x.shape[-1]
        return gated(g, u, activation, triton_path).mul_(slot_weights[:, None])

    @staticmethod
    @autocast_off
    def backward(ctx, dh):
        g, u, slot_weights = ctx.saved_tensors
        routing, activation, triton_path = ctx.routing, ctx.activation, ctx.triton_path
        dh = dh.contiguous()
        d_weights = (dh * gated(g, u, activation, triton_path)).sum(-1) if ctx.needs_input_grad[1] else None
        if not ctx.needs_input_grad[0]:
            return None, d_weights, None, None, None, None, None
        dg, du = gated_backward_inplace(dh * slot_weights[:, None], g, u, activation, triton_path)
        dxs = dg.new_empty(dg.shape[0], ctx.in_features)
        for e, start, end in _blocks(routing):
            block = matmul(dg[start:end], frozen_weight(ctx.gates[e], dg.dtype, triton_path))
            dxs[start:end] = block.addmm_(du[start:end], frozen_weight(ctx.ups[e], dg.dtype, triton_path))
        return _token_sum(dxs, routing), d_weights, None, None, None, None, None


class ExpertsDownFn(torch.autograd.Function):
    """h (N·k, I) per sorted slot -> Σ over each token's slots of h W_downᵀ (N, D); saves no tensor."""

    @staticmethod
    @autocast_off
    def forward(ctx, h, routing, downs, triton_path):
        ys = h.new_empty(h.shape[0], downs[0].shape[0])
        for e, start, end in _blocks(routing):
            ys[start:end] = linear(h[start:end], frozen_weight(downs[e], h.dtype, triton_path))
        ctx.routing, ctx.downs, ctx.triton_path = routing, downs, triton_path
        ctx.intermediate = h.shape[-1]
        return _token_sum(ys, ctx.routing)

    @staticmethod
    @autocast_off
    def backward(ctx, d_out):
        d_slots = d_out.contiguous().index_select(0, ctx.routing.tokens)  # (N·k, D)
        dh = d_slots.new_empty(d_slots.shape[0], ctx.intermediate)
        for e, start, end in _blocks(ctx.routing):
            dh[start:end] = matmul(d_slots[start:end], frozen_weight(ctx.downs[e], d_slots.dtype, ctx.triton_path))
        return dh, None, None, None


def grouped_experts(x, weights, chosen, experts, activation: str = "silu", kernels: str = "auto") -> torch.Tensor:
    """`reference_grouped_experts` with the slots sorted by expert and two autograd nodes for all experts.

    experts[e] = (W_gate, W_up, W_down), each a frozen tensor or NF4Weight; x (N, D); weights (N, k), which
    may take gradients (the router's); chosen (N, k) expert indices."""
    if activation not in GATED:
        raise ValueError(f"grouped_experts: activation {activation!r} is not one of {', '.join(GATED)}")
    routing = route(chosen, len(experts))
    triton_path = use_triton(kernels, x)
    gates, ups, downs = (tuple(expert[i] for expert in experts) for i in range(3))
    slot_weights = weights.reshape(-1)[routing.order].to(x.dtype)  # (N·k,)
    h = ExpertsGatedFn.apply(x, slot_weights, routing, gates, ups, activation, triton_path)
    return ExpertsDownFn.apply(h, routing, downs, triton_path)
