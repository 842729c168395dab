"""Attaching LoRA adapters to a `CausalLM`'s linear layers, switching between them, choosing what trains.

A starts like PEFT's (Kaiming-uniform, a = sqrt(5)) and B at zero, so a fresh adapter leaves the
model's output unchanged. A layer can carry several *named* adapters of different ranks; one is active
at a time (PPO keeps its policy, value and reward adapters on one 4-bit base) and `adapters_disabled`
runs the bare base (DPO's reference model).
"""

import math
import re
from contextlib import contextmanager

import torch
from torch import nn

from qtune.lora.host import AdapterHost
from qtune.lora.layer import LoraConfig, LoRALinear
from qtune.weights.nf4_linear import NF4Linear

BASE_LINEARS = (nn.Linear, NF4Linear)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA-wrapped layer of `model`, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_hosts(model: nn.Module) -> dict[str, AdapterHost]:
    """Every module of `model` that carries adapters (of any PEFT method), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterHost)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present on `model`, in the order they were added."""
    names: dict[str, None] = {}
    for host in adapter_hosts(model).values():
        names.update(dict.fromkeys(host.methods))
    return list(names)


def adapter_method(model: nn.Module, name: str) -> str:
    """The PEFT method adapter `name` uses ("lora", "dora", "prefix", ...)."""
    methods = {host.methods[name] for host in adapter_hosts(model).values() if name in host.methods}
    if not methods:
        raise ValueError(f"no adapter {name!r} on this model (adapters: {adapter_names(model)})")
    if len(methods) > 1:
        raise ValueError(f"adapter {name!r} mixes methods {sorted(methods)}; one adapter has one method")
    return methods.pop()


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name (None when adapters are disabled or there are none)."""
    return next((host.active for host in adapter_hosts(model).values()), None)


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers inside the decoder layers (wrapped or not), by name: what LoRA may target."""
    inside_wrappers = tuple(f"{n}." for n in lora_layers(model))
    return {n: m for n, m in model.named_modules()
            if n.startswith("model.layers.") and isinstance(m, (*BASE_LINEARS, LoRALinear))
            and not n.startswith(inside_wrappers)}


def target_matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """PEFT's matching rule: "all-linear", a regular expression over the full name, or name suffixes.
    "all-linear" leaves a mixture of experts' experts and router alone (as PEFT does on transformers' MoE
    models, whose experts are not linear modules); naming their projections adapts them."""
    if targets == "all-linear":
        return ".experts." not in name and not name.endswith((".mlp.gate", ".block_sparse_moe.gate"))
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _wrap(model: nn.Module, name: str, host: type = LoRALinear) -> AdapterHost:
    """Module `name` wrapped in a `host` (LoRALinear, or another method's host of a linear layer), once."""
    module = model.get_submodule(name)
    if isinstance(module, host):
        return module
    layer = host(module)
    model.set_submodule(name, layer)
    return layer


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name {name!r} must be a non-empty string without dots")
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}; pick another name")


def add_lora(model: nn.Module, cfg: LoraConfig, name: str = "default", seed: int = 0) -> list[str]:
    """Attach a fresh adapter `name` to the layers `cfg.target_modules` selects; returns their names.

    A is drawn from a `torch.Generator` seeded with `seed` (the global RNG is neither used nor advanced),
    B is zero. The base stays frozen, the new adapter's parameters require grad and it becomes active.
    """
    _check_new_name(model, name)
    linears = decoder_linears(model)
    targets = [n for n in linears if target_matches(n, cfg.target_modules)]
    if not targets:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"target_modules={cfg.target_modules!r} matches no linear layer inside the decoder "
                         f"layers; they are named {kinds} (or use 'all-linear')")
    generator = torch.Generator().manual_seed(seed)
    for target in targets:
        layer = _wrap(model, target)
        lora_a = torch.empty(cfg.r, layer.in_features)
        # PEFT's init (kaiming_uniform_, a = sqrt(5)): A ~ U(-1/sqrt(in), 1/sqrt(in))
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
        layer.add_adapter(name, cfg, lora_a, torch.zeros(layer.out_features, cfg.r))
    set_active_adapter(model, name)
    return targets


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` active in every layer (a layer without it runs its base); None disables all."""
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"no adapter named {name!r} on this model; it has {adapter_names(model)}")
    for host in adapter_hosts(model).values():
        host.active = name


@contextmanager
def _swapped_active(model: nn.Module, name: str | None):
    hosts = list(adapter_hosts(model).values())
    saved = [host.active for host in hosts]
    set_active_adapter(model, name)
    try:
        yield model
    finally:
        for host, active in zip(hosts, saved):
            host.active = active


def adapters_disabled(model: nn.Module):
    """`with adapters_disabled(model):` runs the bare base model; the previous state returns on exit."""
    return _swapped_active(model, None)


def use_adapter(model: nn.Module, name: str):
    """`with use_adapter(model, "value"):` temporarily makes adapter `name` the active one."""
    if name is None:
        raise ValueError("use_adapter needs an adapter name; use adapters_disabled(model) for the base model")
    return _swapped_active(model, name)


def adapter_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """Every tensor adapter `name` (default: the active adapter) trains, whatever its method: A and B of each
    LoRA layer, a prefix's embeddings, IA3's vectors ..."""
    name = name if name is not None else active_adapter(model)
    if name is None or name not in adapter_names(model):
        raise ValueError(f"no adapter {name!r} on this model (adapters: {adapter_names(model)}); "
                         "name one or activate one with set_active_adapter")
    return [p for host in adapter_hosts(model).values() for p in host.adapter_parameters(name)]


def lora_b_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The B matrices of adapter `name`'s LoRA layers (LoRA+ trains them at their own learning rate)."""
    return [layer.lora_B[name].weight for layer in lora_layers(model).values() if name in layer.lora_B]


def mark_trainable(model: nn.Module, name: str) -> None:
    """Only adapter `name`'s parameters require grad; every other parameter of `model` is frozen."""
    params = adapter_parameters(model, name)
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
