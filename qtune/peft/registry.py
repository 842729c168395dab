"""The parameter-efficient methods qtune trains, one `PeftMethod` (base.py) each, by the name a recipe's
`[peft] method` uses, and how a saved adapter directory says which one it holds (`adapter_config.json`'s
`peft_type`)."""

from pathlib import Path

from torch import nn

from qtune.lora.adapters import adapter_method, mark_trainable
from qtune.lora.peft import AdapterError
from qtune.peft.adalora import AdaLoRAMethod
from qtune.peft.base import DoRAMethod, LoRAMethod, PeftMethod, StepHook
from qtune.peft.bottleneck import BottleneckMethod
from qtune.peft.ia3 import IA3Method
from qtune.peft.prefix import PrefixTuningMethod
from qtune.peft.prompt import PromptTuningMethod, PTuningMethod

METHODS: dict[str, PeftMethod] = {m.name: m for m in (LoRAMethod(), DoRAMethod(), AdaLoRAMethod(), IA3Method(),
                                                      BottleneckMethod(), PromptTuningMethod(), PTuningMethod(),
                                                      PrefixTuningMethod())}
"""Every method, by its recipe name."""


def method_named(name: str) -> PeftMethod:
    """The method a recipe's `[peft] method` names."""
    if name not in METHODS:
        raise ValueError(f"[peft] method {name!r} is not one qtune trains; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def method_for_config(config: dict, path: Path) -> PeftMethod:
    """The method that reads an adapter whose `adapter_config.json` (at `path`) is `config`."""
    peft_type = config.get("peft_type", "LORA")
    for method in METHODS.values():
        if method.peft_type == peft_type:
            return method
    known = sorted({m.peft_type for m in METHODS.values()})
    raise AdapterError(f"{path}: peft_type is {peft_type!r}; qtune reads adapters of type {', '.join(known)}")


def step_hook(model: nn.Module, name: str, recipe, total_steps: int) -> StepHook | None:
    """The per-step hook adapter `name`'s method needs during a `total_steps` run, or None."""
    return METHODS[adapter_method(model, name)].step_hook(model, name, recipe, total_steps)


def attach(model: nn.Module, recipe, name: str, seed: int) -> PeftMethod:
    """Attach a fresh adapter `name` of the recipe's `[peft] method` (shaped by its `[peft]` and `[lora]`
    sections), active and the only thing that trains; returns the method."""
    method = method_named(recipe.peft.method)
    method.attach(model, recipe, name, seed)
    mark_trainable(model, name)
    return method
