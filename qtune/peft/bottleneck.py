"""Bottleneck adapters (Houlsby et al. 2019; the parallel variant of He et al. 2022) in each decoder layer's
adapter slot (`DecoderLayer.adapter`, qtune/model.py):

    serial    y = f(h) + s · up(act(down(f(h))))          after the sub-block f, before the residual add
    parallel  y = f(h) + s · up(act(down(h)))             beside it, on the sub-block's (normalised) input h
    down: D -> m with bias, up: m -> D with bias, up = 0 at the start (the model starts as its base)

PEFT has no such method, so the files are qtune's own ("QTUNE_BOTTLENECK"):

    adapter_config.json        {"peft_type": "QTUNE_BOTTLENECK", "task_type": "CAUSAL_LM", "hidden_size": D,
                                "size": m, "placement": "serial" | "parallel",
                                "after": "both" | "attention" | "feed_forward", "activation": "relu" | "gelu" |
                                "silu", "scale": s, "layers": [0, 1, ...], "base_model_name_or_path": ...}
    adapter_model.safetensors  model.layers.<i>.adapter.<attention | feed_forward>.<down | up>.<weight | bias>
                               (down.weight (m, D), down.bias (m,), up.weight (D, m), up.bias (D,); fp32)

The adapter adds layers of its own between the weights, so `qtune merge` refuses it: serve it with --adapter.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qtune.lora.adapters import _check_new_name, set_active_adapter
from qtune.lora.host import AdapterHost
from qtune.lora.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError
from qtune.peft.base import PeftMethod

PLACES = {"both": ("attention", "feed_forward"), "attention": ("attention",), "feed_forward": ("feed_forward",)}
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
SETTINGS = ("size", "placement", "after", "activation", "scale")


class Bottleneck(nn.Module):
    """down (D -> m), the non-linearity, up (m -> D), in fp32; computed in the input's dtype."""

    def __init__(self, hidden: int, size: int):
        super().__init__()
        self.down = nn.Linear(hidden, size, device="meta")
        self.up = nn.Linear(size, hidden, device="meta")

    def forward(self, x: torch.Tensor, activation: str) -> torch.Tensor:  # (..., D) -> (..., D)
        h = F.linear(x, self.down.weight.to(x.dtype), self.down.bias.to(x.dtype))  # (..., m)
        return F.linear(ACTIVATIONS[activation](h), self.up.weight.to(x.dtype), self.up.bias.to(x.dtype))


class BottleneckAdapters(AdapterHost):
    """One decoder layer's bottleneck adapters, by adapter name, each with one bottleneck per adapted sub-block."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.settings: dict[str, dict] = {}

    def add(self, name: str, hidden: int, settings: dict, tensors: dict[str, torch.Tensor], device) -> None:
        """Attach adapter `name` with `settings` (SETTINGS' values) and its tensors ("attention.down.weight", ...)."""
        blocks = nn.ModuleDict({where: Bottleneck(hidden, settings["size"]) for where in PLACES[settings["after"]]})
        for key, tensor in tensors.items():
            where, linear, kind = key.split(".")
            setattr(getattr(blocks[where], linear), kind, nn.Parameter(tensor.to(device=device, dtype=torch.float32)))
        self.adapters[name], self.settings[name] = blocks, dict(settings)
        self.methods[name] = "adapter"

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.adapters[name].parameters()) if name in self.adapters else []

    def forward(self, where: str, block_input: torch.Tensor, block_output: torch.Tensor) -> torch.Tensor:
        name = self.active
        if name is None or name not in self.adapters or where not in self.adapters[name]:
            return block_output
        s = self.settings[name]
        source = block_output if s["placement"] == "serial" else block_input
        return block_output + s["scale"] * self.adapters[name][where](source, s["activation"])


def fresh_tensors(hidden: int, settings: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A new adapter's tensors: down as nn.Linear initialises it (uniform ±1/sqrt(D)), up all zero."""
    size, bound = settings["size"], 1 / math.sqrt(hidden)
    tensors = {}
    for where in PLACES[settings["after"]]:
        tensors[f"{where}.down.weight"] = (torch.rand(size, hidden, generator=generator) * 2 - 1) * bound
        tensors[f"{where}.down.bias"] = (torch.rand(size, generator=generator) * 2 - 1) * bound
        tensors[f"{where}.up.weight"] = torch.zeros(hidden, size)
        tensors[f"{where}.up.bias"] = torch.zeros(hidden)
    return tensors


def _slot(layer: nn.Module) -> BottleneckAdapters:
    if layer.adapter is None:
        layer.adapter = BottleneckAdapters()
    return layer.adapter


def add_bottleneck(model: nn.Module, settings: dict, name: str = "default", seed: int = 0,
                   tensors: dict[int, dict[str, torch.Tensor]] | None = None) -> None:
    """Attach adapter `name` to every decoder layer (fresh, from a generator seeded with `seed`, or `tensors` by
    layer index), active."""
    _check_new_name(model, name)
    generator, hidden = torch.Generator().manual_seed(seed), model.config.hidden_size
    device = model.model.embed_tokens.weight.device
    for i, layer in enumerate(model.model.layers):
        own = tensors[i] if tensors is not None else fresh_tensors(hidden, settings, generator)
        _slot(layer).add(name, hidden, settings, own, device)
    set_active_adapter(model, name)


class BottleneckMethod(PeftMethod):
    """Bottleneck adapters: the recipe's `[peft.adapter]` section."""

    name, peft_type = "adapter", "QTUNE_BOTTLENECK"
    not_foldable = ("a bottleneck adapter adds a non-linear layer of its own after each sub-block, which no weight "
                    "of the base can hold; serve the base model with --adapter instead")

    def attach(self, model, recipe, name, seed):
        section = recipe.peft.adapter
        add_bottleneck(model, {k: getattr(section, k) for k in SETTINGS}, name, seed)

    def config_dict(self, model, name):
        layers = [i for i, layer in enumerate(model.model.layers)
                  if layer.adapter is not None and name in layer.adapter.adapters]
        settings = model.model.layers[layers[0]].adapter.settings[name]
        return {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "hidden_size": model.config.hidden_size,
                **settings, "layers": layers}

    def state_dict(self, model, name):
        tensors = {}
        for i, layer in enumerate(model.model.layers):
            if layer.adapter is not None and name in layer.adapter.adapters:
                for key, p in layer.adapter.adapters[name].named_parameters():
                    tensors[f"model.layers.{i}.adapter.{key}"] = p.detach().cpu()
        return tensors

    def load(self, model, config, tensors, path, name):
        where = path / ADAPTER_CONFIG
        settings = _read_settings(config, where)
        if config.get("hidden_size") != model.config.hidden_size:
            raise AdapterError(f"{where}: hidden_size {config.get('hidden_size')} does not match this base model's "
                               f"{model.config.hidden_size}; the adapter was trained on another model")
        layers = config.get("layers")
        n = len(model.model.layers)
        if not isinstance(layers, list) or layers != list(range(n)):
            raise AdapterError(f"{where}: layers {layers!r}; this base model has {n} decoder layers, each adapted")
        per_layer = _split_tensors(tensors, path / ADAPTER_WEIGHTS, settings, model.config.hidden_size, n)
        add_bottleneck(model, settings, name, tensors=per_layer)
        return settings


def _read_settings(config: dict, where: Path) -> dict:
    settings = {k: config.get(k) for k in SETTINGS}
    bad = [k for k, ok in (("size", isinstance(settings["size"], int) and settings["size"] > 0),
                           ("placement", settings["placement"] in ("serial", "parallel")),
                           ("after", settings["after"] in PLACES), ("activation", settings["activation"] in ACTIVATIONS),
                           ("scale", isinstance(settings["scale"], (int, float)))) if not ok]
    if bad:
        raise AdapterError(f"{where}: invalid bottleneck settings {', '.join(f'{k}={settings[k]!r}' for k in bad)}")
    return settings


def _split_tensors(tensors: dict, where: Path, settings: dict, hidden: int, n_layers: int) -> dict[int, dict]:
    """{layer index: {"attention.down.weight": ...}} checked against the shapes the settings call for."""
    size = settings["size"]
    shapes = {"down.weight": (size, hidden), "down.bias": (size,), "up.weight": (hidden, size), "up.bias": (hidden,)}
    want = {f"model.layers.{i}.adapter.{p}.{k}": s for i in range(n_layers) for p in PLACES[settings["after"]]
            for k, s in shapes.items()}
    if set(tensors) != set(want):
        odd = sorted(set(tensors) ^ set(want))
        raise AdapterError(f"{where}: its tensors do not fit its adapter_config.json (e.g. {odd[0]!r} is "
                           f"{'unexpected' if odd[0] in tensors else 'missing'})")
    per_layer: dict[int, dict] = {i: {} for i in range(n_layers)}
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != want[key]:
            raise AdapterError(f"{where}: {key} has shape {list(tensor.shape)}, expected {list(want[key])}")
        _, _, i, _, rest = key.split(".", 4)
        per_layer[int(i)][rest] = tensor
    return per_layer
