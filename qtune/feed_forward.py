"""The feed-forward blocks of the decoder: the gated MLP (SwiGLU or GeGLU; Phi-3's fused gate_up projection)
and the sparse mixture of experts (Mixtral, Qwen3-MoE). Each runs as plain modules, as one fused QLoRA op when
the Triton kernels run, and (the MLP) over chunks of tokens for long sequences (qtune/tiled_mlp.py).
"""

import torch
import torch.nn.functional as F
from torch import nn

from qtune.config import ModelConfig
from qtune.kernels.experts import grouped_experts
from qtune.kernels.gated import gated_halves
from qtune.kernels.lora import fused_params, fused_path, lora_mlp
from qtune.tiled_mlp import tiled_mlp, tiles


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fused_gate_up = cfg.fused_projections  # a flag: hasattr on a missing submodule raises inside
        if cfg.fused_projections:
            self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        else:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
            self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.activation = cfg.hidden_act
        self.kernels = "auto"  # "triton" runs the whole block as one fused QLoRA op
        self.tiling = "off"  # "on" | "auto": run long batches over chunks of tokens (qtune/tiled_mlp.py)

    def forward(self, x):
        return tiled_mlp(self, x) if tiles(self.tiling, x) else self.untiled(x)

    def untiled(self, x):
        # SwiGLU: down(silu(gate x) * up x); GeGLU: down(gelu_tanh(gate x) * up x)
        if self.fused_gate_up:  # Phi-3: gate rows, then up rows, activated where they lie
            return self.down_proj(gated_halves(self.gate_up_proj(x), self.activation, self.kernels))
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if fused_path(self.kernels, x, *projections):
            # the fused block saves x, gate x and up x only and recomputes the rest in backward
            return lora_mlp(x, *map(fused_params, projections), training=self.training, kernels=self.kernels,
                            activation=self.activation)
        return self.down_proj(gate_activation(self.gate_proj(x), self.activation) * self.up_proj(x))


def gate_activation(g: torch.Tensor, activation: str) -> torch.Tensor:
    """silu(g) = g σ(g), or GELU with the tanh approximation 0.5 g (1 + tanh(√(2/π) (g + 0.044715 g³)))."""
    return F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")


class Expert(nn.Module):
    """One expert's gated MLP; Mixtral names its projections w1 (gate), w3 (up) and w2 (down)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, I = cfg.hidden_size, cfg.moe_intermediate_size
        self.names = ("w1", "w3", "w2") if cfg.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for name, (n_out, n_in) in zip(self.names, ((I, D), (I, D), (D, I))):
            setattr(self, name, nn.Linear(n_in, n_out, bias=False))
        self.activation = cfg.hidden_act

    def forward(self, x):
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(gate_activation(gate(x), self.activation) * up(x))


class SparseMoE(nn.Module):
    """Mixture of experts: p = softmax(router(x)) in fp32; each token goes to its top-k experts, weighted by
    their p (renormalised to sum to 1 with norm_topk_prob); out = Σ_k p_k · expert_k(x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.num_experts))
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.kernels = "auto"  # "triton": the experts' gated activation runs in Triton (see kernels/dispatch.py)

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])  # (N, D)
        p = torch.softmax(self.gate(h), dim=-1, dtype=torch.float32)  # (N, E)
        weights, chosen = p.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        frozen = self.frozen_experts()
        if frozen is not None:  # tokens sorted by expert, two autograd nodes for all experts (kernels/experts.py)
            return grouped_experts(h, weights, chosen, frozen, self.experts[0].activation, self.kernels).view_as(x)
        out = torch.zeros_like(h)
        for e in chosen.unique().tolist():  # tokens grouped by expert: one product per expert, no token loop
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, self.experts[e](h[token]) * weights[token, slot, None])
        return out.view_as(x)

    def frozen_experts(self) -> list[tuple] | None:
        """Each expert's (gate, up, down) base weights when every projection is a frozen product without bias or
        active adapter (dense or quantized); None when some expert trains or is adapted (its modules then run)."""
        experts = []
        for expert in self.experts:
            weights = []
            for projection in (getattr(expert, name) for name in expert.names):
                if type(projection) is nn.Linear:
                    trains = projection.weight.requires_grad and torch.is_grad_enabled()
                    params = None if trains else fused_params(projection)
                elif hasattr(projection, "fused_params") and getattr(projection, "fusable", True):
                    params = projection.fused_params()
                else:
                    return None
                if params is None or params.bias is not None or params.lora_a is not None:
                    return None
                weights.append(params.weight)
            experts.append(tuple(weights))
        return experts
