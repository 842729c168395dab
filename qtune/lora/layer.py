"""One LoRA-wrapped linear layer: a frozen base (`nn.Linear` or `NF4Linear`) plus named low-rank adapters.

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ          A (r, in), B (out, r)

`LoRALinear.forward` picks the implementation per call: the fused Triton op on CUDA
(kernels/lora.py), one product with the merged weight W + s · B A on the CPU in fp32 without
dropout (kernels/cpu/merged_lora.py), and otherwise the base product plus the rank-r branch in plain torch.
Attaching adapters to a model, switching them and their files are in qtune/lora/.
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
        self.scaling: dict[str, float] = {}
        self.configs: dict[str, LoraConfig] = {}
        self.kernels = getattr(base_layer, "kernels", "auto")

    def add_adapter(self, name: str, cfg: LoraConfig, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Attach adapter `name` with A (r, in) and B (out, r), stored in fp32 on the base layer's device."""
        device = next(t for t in (*self.base_layer.parameters(), *self.base_layer.buffers())).device
        self.lora_A[name] = _bias_free_linear(lora_a.to(device=device, dtype=torch.float32))
        self.lora_B[name] = _bias_free_linear(lora_b.to(device=device, dtype=torch.float32))
        self.lora_dropout[name] = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling[name] = cfg.scale
        self.configs[name] = cfg
        self.methods[name] = "lora"

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.lora_A[name].weight, self.lora_B[name].weight] if name in self.lora_A else []

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

    def fused_params(self) -> LoraParams:
        """This layer as the fused QLoRA ops take it: the frozen weight and bias, and the active adapter's
        A, B, scale and dropout p (none of them when no adapter is active)."""
        frozen = LoraParams(self.base_weight(), self.base_layer.bias)
        name = self.active
        if name is None or name not in self.lora_A:
            return frozen
        a, b, scale = self.adapter_weights(name)
        return frozen._replace(lora_a=a, lora_b=b, scale=scale, dropout=self.dropout_p(name))

    def merged_weight(self, name: str | None) -> torch.Tensor:
        """W + s · B A in fp32 (out, in); W is the dequantized weight for an NF4 base. No adapter: W."""
        if isinstance(self.base_layer, NF4Linear):
            w = self.base_layer.dequantize(torch.float32)
        else:
            w = self.base_layer.weight.detach().float()
        if name is None or name not in self.lora_A:
            return w
        a, b, scale = self.adapter_weights(name)
        return w + scale * (b.detach() @ a.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        name = self.active
        if name is None or name not in self.lora_A:
            return self.base_forward(x)
        a, b, scale = self.adapter_weights(name)
        dropout = self.lora_dropout[name]
        if use_triton(self.kernels, x):
            # The fused op dequantizes the NF4 weight again in backward instead of keeping it.
            return lora_linear(x, self.base_weight(), self.base_layer.bias, a, b, scale, self.dropout_p(name),
                               self.training, self.kernels)
        dropout_active = self.training and self.dropout_p(name) > 0
        if merged_path_applies(x, a, b, dropout_active):
            return merged_lora_linear(x, self.base_weight(), self.base_layer.bias, a, b, scale)
        # y = base(x) + s · dropout(x) Aᵀ Bᵀ, the rank-r product first. The adapter branch runs before the
        # frozen product, which saves nothing for backward on an NF4 base: a checkpoint's recomputation
        # stops after the last saved tensor, so it skips the product where nothing reads its output.
        x_d = cpu_dropout(x, dropout.p) if dropout_active and not x.is_cuda else dropout(x)
        lora = F.linear(F.linear(x_d, a.to(x.dtype)), b.to(x.dtype))  # (..., out)
        return self.base_forward(x).add_(lora, alpha=scale)  # the base output is a fresh tensor

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
