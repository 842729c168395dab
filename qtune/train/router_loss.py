"""The router's auxiliary load-balancing loss of a mixture of experts (Mixtral, Qwen3-MoE).

Switch Transformer (Fedus et al. 2021, eqs. 4-6), over all L MoE layers pooled as Mixtral trains with it
(transformers' `load_balancing_loss_func`): with p = softmax(router logits) per token, over the N real tokens
of every layer,

    f_e = (1 / L N) Σ_layers Σ_tokens [e ∈ top-k(p)]      the fraction of routing slots expert e receives
    P_e = (1 / L N) Σ_layers Σ_tokens p_e                  the mean probability the router gives expert e
    aux = E · Σ_e f_e · P_e

aux is k when routing is uniform and grows as it concentrates on few experts. f is a count (no gradient);
the gradient flows through P into the router logits, so into whatever upstream is trainable: the router's own
LoRA when `lora.target_modules` names "gate", and the adapters of earlier layers through the hidden states
the router reads (as with transformers + PEFT). A frozen router weight receives nothing.
"""

from contextlib import contextmanager
from typing import Iterator

import torch

from qtune.feed_forward import SparseMoE


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """aux (a 0-d fp32 tensor) from each MoE layer's router logits (N, E), N = the batch's B·T positions;
    `attention_mask` (B, T): positions where it is 0 (padding) are left out."""
    probs = [torch.softmax(logits.float(), dim=-1) for logits in router_logits]  # L x (N, E)
    n_experts = probs[0].shape[-1]
    keep = torch.ones(probs[0].shape[0], device=probs[0].device)
    if attention_mask is not None:
        keep = (attention_mask.reshape(-1) != 0).to(probs[0].device, torch.float32)  # segment ids: 0 = padding
    slots = torch.zeros(n_experts, device=keep.device)
    mass = torch.zeros(n_experts, device=keep.device)
    for p in probs:
        chosen = p.topk(top_k, dim=-1).indices  # (N, k)
        slots = slots.scatter_add(0, chosen.reshape(-1), keep.repeat_interleave(top_k))
        mass = mass + (p * keep[:, None]).sum(0)
    rows = keep.sum() * len(probs)
    return n_experts * torch.sum((slots / rows) * (mass / rows))


def moe_routers(model) -> list[torch.nn.Module]:
    """The router (`gate`, LoRA-wrapped or not) of every mixture-of-experts layer, first layer first."""
    return [layer.ffn.gate for layer in model.model.layers if isinstance(layer.ffn, SparseMoE)]


@contextmanager
def recorded_router_logits(model, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Collect each router's logits (N, E) from the forward passes run inside the block, in layer order.

    A forward hook on the router reads its output; the hooks are gone when the block ends, so the recomputation
    that gradient checkpointing runs during backward records nothing.
    """
    logits: list[torch.Tensor] = []
    handles = [router.register_forward_hook(lambda _m, _x, out: logits.append(out))
               for router in (moe_routers(model) if enabled else [])]
    try:
        yield logits
    finally:
        for handle in handles:
            handle.remove()
