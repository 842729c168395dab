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

Every product goes through `grouped_matmul`: on the Triton path with NF4 experts one launch covers every expert
(kernels/triton/experts.py: each row tile belongs to one expert and decodes its 4-bit codes on the fly, forward
x Wᵀ and backward dY W); elsewhere one product per expert, its weight dequantized just before and dropped after.
The experts' base weights are frozen; experts with adapters take the model's per-expert modules instead.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from qtune.kernels.cpu.linear import linear, matmul
from qtune.kernels import KernelSpec
from qtune.kernels.dispatch import autocast_off, use_triton
from qtune.kernels.gated import GATED, gated, gated_backward_inplace
from qtune.kernels.lora import dense_weight, frozen_weight
from qtune.kernels.nf4 import code_on


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


def reference_grouped_matmul(x, weights, counts, transposed: bool = False) -> torch.Tensor:
    """Each expert's block of rows of x (S, ·), in expert order (`counts` rows each), times its weight:
    x_e W_eᵀ (S, N), or x_e W_e (S, K) when `transposed`; weights[e] (N, K) dense or NF4."""
    products = []
    for block, weight in zip(x.split(list(counts)), weights):
        w = dense_weight(weight, x.dtype)
        products.append(block @ w if transposed else block @ w.t())
    return torch.cat(products)


def _kernels():
    """kernels/triton/experts.py, imported on the first launch."""
    from qtune.kernels.triton import experts  # here, not at the top: triton is optional
    return experts


def grouped_matmul(x: torch.Tensor, weights, routing: "Routing", triton_path: bool,
                   transposed: bool = False) -> torch.Tensor:
    """`reference_grouped_matmul` over the sorted slots: on the Triton path with NF4 experts one launch for every
    expert, decoding the codes on the fly; else one product per expert, its weight dequantized just before."""
    if triton_path and not any(isinstance(w, torch.Tensor) for w in weights):
        return _kernels().launch_grouped_nf4_matmul(x, weights, routing.counts, code_on(x.device), transposed)
    out = x.new_empty(x.shape[0], weights[0].shape[1] if transposed else weights[0].shape[0])
    for e, start, end in _blocks(routing):  # each product right after its weight's dequantization (the
        # Triton path's workspace holds one weight per shape)
        w = frozen_weight(weights[e], x.dtype, triton_path)
        out[start:end] = matmul(x[start:end], w) if transposed else linear(x[start:end], w)
    return out


class ExpertsGatedFn(torch.autograd.Function):
    """x (N, D), slot weights (N·k,) -> w_slot · act(x W_gateᵀ) · (x W_upᵀ) per sorted slot (N·k, I)."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, slot_weights, routing, gates, ups, activation, triton_path):
        xs = x.index_select(0, routing.tokens)  # (N·k, D)
        g, u = grouped_matmul(xs, gates, routing, triton_path), grouped_matmul(xs, ups, routing, triton_path)
        ctx.save_for_backward(g, u, slot_weights)
        ctx.routing, ctx.gates, ctx.ups, ctx.activation, ctx.triton_path = routing, gates, ups, activation, triton_path
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
        dxs = grouped_matmul(dg, ctx.gates, routing, triton_path, transposed=True)
        dxs += grouped_matmul(du, ctx.ups, routing, triton_path, transposed=True)
        return _token_sum(dxs, routing), d_weights, None, None, None, None, None


class ExpertsDownFn(torch.autograd.Function):
    """h (N·k, I) per sorted slot -> Σ over each token's slots of h W_downᵀ (N, D); saves no tensor."""

    @staticmethod
    @autocast_off
    def forward(ctx, h, routing, downs, triton_path):
        ctx.routing, ctx.downs, ctx.triton_path = routing, downs, triton_path
        return _token_sum(grouped_matmul(h, downs, routing, triton_path), routing)

    @staticmethod
    @autocast_off
    def backward(ctx, d_out):
        d_slots = d_out.contiguous().index_select(0, ctx.routing.tokens)  # (N·k, D)
        return grouped_matmul(d_slots, ctx.downs, ctx.routing, ctx.triton_path, transposed=True), None, None, None


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


def compile_specs() -> list[KernelSpec]:
    """The grouped NF4 products, forward and transposed, for fp32 / fp16 / bf16 slots (blocks of 64 weights)."""
    k = _kernels()
    tiles = {"BLOCKSIZE": 64, "BLOCK_M": k.BLOCK_M, "BLOCK_N": k.BLOCK_N, "BLOCK_K": k.BLOCK_K}
    specs = []
    for ty in ("fp32", "fp16", "bf16"):
        args = {"packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32"}
        routing = {"tile_expert_ptr": "*i32", "tile_start_ptr": "*i32", "tile_end_ptr": "*i32", "N": "i32", "K": "i32",
                   "n_bytes": "i32", "n_blocks": "i32", **{name: "constexpr" for name in tiles}}
        specs += [
            KernelSpec(f"grouped_nf4_matmul[{ty}]", k.grouped_nf4_matmul_kernel,
                       {"x_ptr": f"*{ty}", **args, "y_ptr": f"*{ty}", **routing}, tiles, k.NUM_WARPS, 1),
            KernelSpec(f"grouped_nf4_matmul_transposed[{ty}]", k.grouped_nf4_matmul_transposed_kernel,
                       {"dy_ptr": f"*{ty}", **args, "dx_ptr": f"*{ty}", **routing}, tiles, k.NUM_WARPS, 1),
        ]
    return specs
