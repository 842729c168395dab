"""IA3 (Liu et al. 2022, arXiv:2205.05638, "(IA)³"): learned vectors that rescale activations.

A targeted linear layer y = x Wᵀ + b gets a vector l, one value per output for keys, values and the other
layers named in `target_modules`, one per input for the feed-forward layers (`feedforward_modules`, whose input
is the feed-forward block's inner activation):

    output scaling      y = (x Wᵀ + b) ⊙ l          l (out,)     folds as W ← diag(l) W, b ← l ⊙ b
    input scaling       y = (x ⊙ l) Wᵀ + b          l (in,)      folds as W ← W diag(l)

The vectors start at 1, so a fresh adapter leaves the model unchanged. On disk it is PEFT's format: a config
with `peft_type` "IA3", `target_modules` and `feedforward_modules`, and one tensor per layer,
`base_model.model.<module>.ia3_l`, shaped (out, 1) or (1, in) as PEFT stores it.
"""

import re
from pathlib import Path

import torch
from torch import nn

from qtune.lora.adapters import _check_new_name, _wrap, decoder_linears, set_active_adapter, target_matches
from qtune.lora.host import AdapterHost
from qtune.lora.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_PREFIX, AdapterError
from qtune.peft.base import PeftMethod
from qtune.weights.nf4_linear import NF4Linear

KEY_PATTERN = re.compile(r"base_model\.model\.(.+)\.ia3_l")
# PEFT IA3 features qtune does not implement: such an adapter is refused rather than misread.
UNSUPPORTED_FIELDS = ("fan_in_fan_out", "modules_to_save", "exclude_modules")


class IA3Linear(AdapterHost):
    """A frozen linear layer (`nn.Linear` or `NF4Linear`) whose output or input is rescaled by adapter vectors.

    Always the plain torch path: the fused QLoRA ops know no rescaling, so the layer is not `fusable`.
    """

    fusable = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}
        """Adapter name -> whether it scales the input (a feed-forward layer) rather than the output."""

    def add_adapter(self, name: str, scaling: torch.Tensor, feedforward: bool) -> None:
        """Attach adapter `name` with vector `scaling`: (in,) when `feedforward`, else (out,); stored in fp32."""
        want = self.in_features if feedforward else self.out_features
        if tuple(scaling.shape) != (want,):
            raise ValueError(f"IA3 vector of shape {tuple(scaling.shape)}, this layer needs ({want},)")
        device = next(t for t in (*self.base_layer.parameters(), *self.base_layer.buffers())).device
        self.ia3_l[name] = nn.Parameter(scaling.to(device=device, dtype=torch.float32).clone())
        self.feedforward[name] = feedforward
        self.methods[name] = "ia3"

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.ia3_l[name]] if name in self.ia3_l else []

    def merged_weight(self, name: str | None) -> torch.Tensor:
        """W with adapter `name` folded in, fp32 (out, in): rows times l (output scaling) or columns (input)."""
        if isinstance(self.base_layer, NF4Linear):
            w = self.base_layer.dequantize(torch.float32)
        else:
            w = self.base_layer.weight.detach().float()
        if name not in self.ia3_l:
            return w
        scaling = self.ia3_l[name].detach()
        return w * scaling if self.feedforward[name] else w * scaling.unsqueeze(1)

    def merged_bias(self, name: str | None) -> torch.Tensor | None:
        """The bias with adapter `name` folded in: output scaling scales it too (l ⊙ b)."""
        bias = self.base_layer.bias
        if bias is None or name not in self.ia3_l or self.feedforward[name]:
            return bias
        return bias.detach().float() * self.ia3_l[name].detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        name = self.active
        if name not in self.ia3_l:
            return self.base_layer(x)
        scaling = self.ia3_l[name].to(x.dtype)
        if self.feedforward[name]:
            return self.base_layer(x * scaling)
        return self.base_layer(x) * scaling

    def extra_repr(self) -> str:
        return f"adapters={list(self.ia3_l)}, active={self.active!r}"


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    """Every IA3-wrapped layer of `model`, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder layers' linear layers IA3 may target (those already wrapped by IA3 included)."""
    inside = tuple(f"{n}." for n in ia3_layers(model))
    found = {n: m for n, m in decoder_linears(model).items() if not n.startswith(inside)}
    return {**found, **ia3_layers(model)}


def add_ia3(model: nn.Module, target_modules, feedforward_modules, name: str = "default") -> list[str]:
    """Attach a fresh IA3 adapter `name` (vectors of ones) to the layers `target_modules` selects (PEFT's matching:
    name suffixes or one regular expression), input scaling on those `feedforward_modules` also selects; it
    becomes active. Returns the adapted layers' names."""
    _check_new_name(model, name)
    linears = _linears(model)
    targets = [n for n in linears if target_matches(n, _targets(target_modules))]
    if not targets:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"[peft.ia3] target_modules={target_modules!r} matches no linear layer inside the decoder "
                         f"layers; they are named {kinds}")
    for target in targets:
        layer = _wrap(model, target, IA3Linear)
        feedforward = target_matches(target, _targets(feedforward_modules))
        layer.add_adapter(name, torch.ones(layer.in_features if feedforward else layer.out_features), feedforward)
    set_active_adapter(model, name)
    return targets


def _targets(names):
    return names if isinstance(names, str) else tuple(names or ())


def ia3_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s vectors under PEFT's keys and shapes: (out, 1) for output scaling, (1, in) for input."""
    tensors = {}
    for module, layer in ia3_layers(model).items():
        if name in layer.ia3_l:
            scaling = layer.ia3_l[name].detach().cpu()
            tensors[f"{KEY_PREFIX}{module}.ia3_l"] = scaling.unsqueeze(0 if layer.feedforward[name] else 1)
    return tensors


def ia3_config_dict(model: nn.Module, name: str) -> dict:
    """The `adapter_config.json` PEFT writes for an IA3 adapter on a causal LM (the adapted layer kinds listed)."""
    carriers = {n: layer for n, layer in ia3_layers(model).items() if name in layer.ia3_l}
    kinds = lambda keep: sorted({n.rsplit(".", 1)[-1] for n, layer in carriers.items() if keep(layer)})  # noqa: E731
    return {"peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "revision": None,
            "inference_mode": True, "target_modules": kinds(lambda layer: True),
            "feedforward_modules": kinds(lambda layer: layer.feedforward[name]), "fan_in_fan_out": False,
            "init_ia3_weights": True, "modules_to_save": None, "exclude_modules": None}


def attach_saved_ia3(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], path: Path, name: str) -> dict:
    """Attach the IA3 adapter saved in directory `path` as adapter `name` after checking it fits; returns its
    settings (`target_modules`, `feedforward_modules`)."""
    where = path / ADAPTER_CONFIG
    for key in UNSUPPORTED_FIELDS:
        if config.get(key):
            raise AdapterError(f"{where}: {key}={config[key]!r} is a PEFT feature qtune does not support")
    targets, feedforward = config.get("target_modules"), config.get("feedforward_modules") or ()
    if not targets:
        raise AdapterError(f"{where}: target_modules is missing or empty; an IA3 adapter names the layers it scales")
    vectors = {}
    for key, tensor in tensors.items():
        m = KEY_PATTERN.fullmatch(key)
        if m is None:
            raise AdapterError(f"{path / ADAPTER_WEIGHTS}: unexpected tensor {key!r}; an IA3 adapter holds only "
                               f"'{KEY_PREFIX}<module>.ia3_l' keys")
        vectors[m[1]] = tensor
    linears = _linears(model)
    planned = {}
    for module, tensor in vectors.items():
        if module not in linears:
            raise AdapterError(f"adapter {path} does not match this base model (it scales {module!r}, which is not a "
                               "linear layer inside this model's decoder layers)")
        layer, ff = linears[module], target_matches(module, _targets(feedforward))
        want = (1, layer.in_features) if ff else (layer.out_features, 1)
        if tuple(tensor.shape) != want:
            raise AdapterError(f"adapter {path} does not match this base model ({module}.ia3_l has shape "
                               f"{list(tensor.shape)}, this layer needs {list(want)})")
        planned[module] = (tensor.reshape(-1), ff)
    missing = [n for n in linears if target_matches(n, _targets(targets)) and n not in vectors]
    if missing:
        raise AdapterError(f"adapter {path} does not match this base model (its target_modules cover {missing[:3]}, "
                           "which have no ia3_l in the file)")
    _check_new_name(model, name)
    for module, (scaling, ff) in planned.items():
        _wrap(model, module, IA3Linear).add_adapter(name, scaling, ff)
    return {"target_modules": targets, "feedforward_modules": list(feedforward)}


class IA3Method(PeftMethod):
    """IA3: the recipe's `[peft.ia3]` section."""

    name, peft_type = "ia3", "IA3"

    def attach(self, model, recipe, name, seed):
        section = recipe.peft.ia3
        add_ia3(model, section.target_modules, section.feedforward_modules, name=name)

    def config_dict(self, model, name):
        return ia3_config_dict(model, name)

    def state_dict(self, model, name):
        return ia3_state_dict(model, name)

    def load(self, model, config, tensors, path, name):
        return attach_saved_ia3(model, config, tensors, path, name)
