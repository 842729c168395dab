"""One LoRA-wrapped linear layer: a frozen base (`nn.Linear` or `NF4Linear`) plus named low-rank adapters.

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ          A (r, in), B (out, r)

`LoRALinear.forward` picks the implementation per call: the fused Triton op on CUDA
(kernels/lora.py), one product with the merged weight W + s · B A on the CPU in fp32 without
dropout (kernels/cpu/merged_lora.py), and otherwise the base product plus the rank-r branch in plain torch.
Attaching adapters to a model, switching them and their files are in qtune/lora/.

DoRA (Liu et al. 2024, arXiv:2402.09353) splits the adapted weight into a trained magnitude m (out,) and a
direction, the rows of W + s B A normalised (PEFT's `weight_norm`, over the input dimension):

    y = m / ||W + s B A||_row ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b

with the norm treated as a constant in backward (the paper's section 4.3, as PEFT does) and, on an NF4 base,
taken over the dequantized W. DoRA always runs the plain torch path (the fused Triton ops and the CPU
merged-weight product know no magnitude), so a DoRA layer tells the model it is not `fusable`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qtune.kernels.cpu.dropout import cpu_dropout
from qtune.kernels.cpu.linear import frozen_linear
from qtune.kernels.cpu.merged_lora import merged_lora_linear, merged_path_applies
from qtune.kernels.dispatch import use_triton
from qtune.kernels.lora import LoraParams, lora_linear
from qtune.lora.host import AdapterHost
from qtune.weights.nf4_linear import NF4Linear


@dataclass
class LoraConfig:
    """What `add_lora` attaches, and what `adapter_config.json` records."""

    r: int = 8
    """Rank of the update B @ A."""
    alpha: float = 16.0
    """Scale numerator: s = alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training."""
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    """Module names (matched on the last name components, as PEFT does), one regular expression matched
    against the full name, or "all-linear": every linear in the decoder layers (never lm_head)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""
    use_dora: bool = False
    """DoRA: a trained magnitude per output row times the normalised direction W + s B A."""
    init: str = "default"
    """How A and B start: "default" (B = 0), "pissa" or "loftq" (qtune/lora/init.py; the base becomes a residual)."""

    def __post_init__(self):
        if isinstance(self.target_modules, (list, set)):
            self.target_modules = tuple(sorted(self.target_modules))
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty; name layers such as ('q_proj', 'v_proj') or 'all-linear'")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


class LoRALinear(AdapterHost):
    """A frozen base linear (`nn.Linear` or `NF4Linear`) plus named low-rank adapters, one active at a time.

    Attribute names follow PEFT's (`base_layer`, `lora_A[name]`, `lora_B[name]`), each adapter matrix an
    fp32 `nn.Linear` without bias; the update is computed in the input's dtype.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.residual: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """Adapter name -> (A_r, B_r) of a PiSSA / LoftQ adapter: the base is W - s B_r A_r (qtune/lora/init.py)."""
        self.scaling: dict[str, float] = {}
        self.configs: dict[str, LoraConfig] = {}
        self.kernels = getattr(base_layer, "kernels", "auto")

    def add_adapter(self, name: str, cfg: LoraConfig, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    magnitude: torch.Tensor | None = None) -> None:
        """Attach adapter `name` with A (r, in) and B (out, r), stored in fp32 on the base layer's device; a DoRA
        adapter's magnitude (out,) defaults to ||W + s B A||_row, which leaves the layer's output unchanged."""
        if self.residual:
            raise ValueError(f"adapter {name!r}: this layer's base is the residual of PiSSA / LoftQ adapter "
                             f"{next(iter(self.residual))!r}, which another adapter would run on; attach it to a "
                             "fresh model")
        device = next(t for t in (*self.base_layer.parameters(), *self.base_layer.buffers())).device
        self.lora_A[name] = _bias_free_linear(lora_a.to(device=device, dtype=torch.float32))
        self.lora_B[name] = _bias_free_linear(lora_b.to(device=device, dtype=torch.float32))
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.scale
        self.configs[name] = cfg
        self.methods[name] = "dora" if cfg.use_dora else "lora"
        if cfg.use_dora:
            self.set_magnitude(name, magnitude)

    def set_magnitude(self, name: str, magnitude: torch.Tensor | None = None) -> None:
        """Set DoRA adapter `name`'s magnitude m (out,) to `magnitude`, or to ||W + s B A||_row when None."""
        if magnitude is None:
            magnitude = self.direction_norm(name)
        device = self.lora_A[name].weight.device
        self.lora_magnitude_vector[name] = nn.Parameter(magnitude.to(device=device, dtype=torch.float32).clone())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        if name not in self.lora_A:
            return []
        magnitude = [self.lora_magnitude_vector[name]] if name in self.lora_magnitude_vector else []
        return [self.lora_A[name].weight, self.lora_B[name].weight, *magnitude]

    def adapter_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Adapter `name` as the product s · B A that every route computes: (A (r, in), B (out, r), s). Subclasses
        that parameterise A or B differently (AdaLoRA's A scaled by its singular values) compose them here."""
        return self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]

    def base_weight(self):
        """The frozen weight as `qtune.kernels.lora.lora_linear` takes it: a dense tensor or an NF4Weight."""
        if isinstance(self.base_layer, NF4Linear):
            return self.base_layer.nf4_weight()
        return self.base_layer.weight

    def dropout_p(self, name: str) -> float:
        """Adapter `name`'s dropout probability (0 without dropout)."""
        return getattr(self.lora_dropout[name], "p", 0.0)

    @property
    def fusable(self) -> bool:
        """Whether the fused QLoRA ops can compute this layer (not with an active DoRA adapter)."""
        return self.active not in self.lora_magnitude_vector

    def fused_params(self) -> LoraParams:
        """This layer as the fused QLoRA ops take it: the frozen weight and bias, and the active adapter's
        A, B, scale and dropout p (with no adapter active: a residual base's pair, or none)."""
        frozen = LoraParams(self.base_weight(), self.base_layer.bias)
        name = self.active
        if name is None or name not in self.lora_A:
            residual = self.switched_off_pair()
            return frozen if residual is None else frozen._replace(lora_a=residual[0], lora_b=residual[1],
                                                                   scale=residual[2], dropout=0.0)
        a, b, scale = self.adapter_weights(name)
        return frozen._replace(lora_a=a, lora_b=b, scale=scale, dropout=self.dropout_p(name))

    def switched_off_pair(self):
        """(A_r, B_r, s) that a PiSSA / LoftQ residual base adds back with its adapter switched off, so that the
        layer then runs the model the initialisation started from; None for a plain base."""
        name = next(iter(self.residual), None)
        return None if name is None else (*self.residual[name], self.scaling[name])

    def dense_weight(self) -> torch.Tensor:
        """The frozen W in fp32 (out, in), dequantized for an NF4 base."""
        if isinstance(self.base_layer, NF4Linear):
            return self.base_layer.dequantize(torch.float32)
        return self.base_layer.weight.detach().float()

    def merged_weight(self, name: str | None) -> torch.Tensor:
        """W + s · B A in fp32 (out, in), times m / ||W + s B A||_row for DoRA; W is the dequantized weight for an
        NF4 base. No adapter: W."""
        w = self.dense_weight()
        if name is None or name not in self.lora_A:
            return w
        a, b, scale = self.adapter_weights(name)
        w = w + scale * (b.detach() @ a.detach())
        if name in self.lora_magnitude_vector:
            w = w * (self.lora_magnitude_vector[name].detach() / w.norm(dim=1)).unsqueeze(1)
        return w

    @torch.no_grad()
    def direction_norm(self, name: str) -> torch.Tensor:
        """||W + s B A|| over each output row (out,), fp32, outside autograd (DoRA's section 4.3)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return (self.dense_weight().to(a.device) + self.scaling[name] * (b @ a)).norm(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        name = self.active
        if name is None or name not in self.lora_A:
            residual = self.switched_off_pair()
            if residual is None:
                return self.base_forward(x)
            a, b, scale, p = *residual, 0.0
        elif name in self.lora_magnitude_vector:
            return self.dora_forward(x, name)
        else:
            a, b, scale = self.adapter_weights(name)
            p = self.dropout_p(name)
        if use_triton(self.kernels, x):
            # The fused op dequantizes the NF4 weight again in backward instead of keeping it.
            return lora_linear(x, self.base_weight(), self.base_layer.bias, a, b, scale, p, self.training, self.kernels)
        dropout_active = self.training and p > 0
        if merged_path_applies(x, a, b, dropout_active):
            return merged_lora_linear(x, self.base_weight(), self.base_layer.bias, a, b, scale)
        # y = base(x) + s · dropout(x) Aᵀ Bᵀ, the rank-r product first. The adapter branch runs before the
        # frozen product, which saves nothing for backward on an NF4 base: a checkpoint's recomputation
        # stops after the last saved tensor, so it skips the product where nothing reads its output.
        x_d = self.dropped_input(x, name) if dropout_active else x
        lora = F.linear(F.linear(x_d, a.to(x.dtype)), b.to(x.dtype))  # (..., out)
        return self.base_forward(x).add_(lora, alpha=scale)  # the base output is a fresh tensor

    def dropped_input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x with adapter `name`'s dropout applied (x itself outside training or without dropout)."""
        dropout = self.lora_dropout[name]
        if not (self.training and self.dropout_p(name) > 0):
            return x
        return cpu_dropout(x, dropout.p) if not x.is_cuda else dropout(x)

    def dora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:  # (..., in) -> (..., out)
        """y = base(x) + (g - 1) ⊙ x_d Wᵀ + g ⊙ s · x_d Aᵀ Bᵀ, g = m / ||W + s B A||_row, x_d = dropout(x), as
        PEFT computes DoRA; without dropout this is g ⊙ (x Wᵀ + s · x Aᵀ Bᵀ) + b."""
        a, b, scale = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        g = (self.lora_magnitude_vector[name] / self.direction_norm(name)).to(x.dtype)  # (out,)
        x_d = self.dropped_input(x, name)
        lora = F.linear(F.linear(x_d, a.to(x.dtype)), b.to(x.dtype)) * scale  # (..., out)
        base = self.base_forward(x)
        direction = base if x_d is x else self.base_forward(x_d)  # x_d Wᵀ + b
        if self.base_layer.bias is not None:
            direction = direction - self.base_layer.bias.to(x.dtype)
        return base + (g - 1) * direction + g * lora

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone. A dense one goes through `frozen_linear`, the product the merged path
        uses, so that switching the adapter off (a DPO reference) computes what B = 0 computes."""
        if isinstance(self.base_layer, nn.Linear):
            return frozen_linear(x, self.base_layer.weight, self.base_layer.bias)
        return self.base_layer(x)

    def extra_repr(self) -> str:
        ranks = {n: self.lora_A[n].out_features for n in self.lora_A}
        return f"adapters={ranks}, active={self.active!r}, kernels={self.kernels!r}"


def _bias_free_linear(weight: torch.Tensor) -> nn.Linear:
    """An `nn.Linear` holding `weight` (out, in), built on the meta device so no RNG is consumed."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight.contiguous())
    return layer
