"""LoRA adapters on the frozen (dense or NF4) linear layers of a `CausalLM`, saved in PEFT's format.

LoRA (Hu et al. 2021, arXiv:2106.09685) keeps a weight W (out, in) frozen and learns a low-rank update:

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ          A (r, in), B (out, r)
    s = alpha / r,  or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732), which keeps
    the update's size from shrinking as the rank grows.

A starts like PEFT's (Kaiming-uniform, a = sqrt(5)) and B at zero, so a fresh adapter leaves the
model's output unchanged. A layer can carry several *named* adapters of different ranks; one is active
at a time (PPO keeps its policy, value and reward adapters on one 4-bit base) and `adapters_disabled`
runs the bare base (DPO's reference model).

On disk an adapter is a PEFT directory: `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, so `peft.PeftModel.from_pretrained` loads
what qtune saves and the other way round.
"""

import json
import math
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from qtune.lora_linear import LoraConfig, LoRALinear
from qtune.quant import NF4Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXTRA_WEIGHTS = "extra_tensors.safetensors"  # heads that travel with an adapter (reward, value); not PEFT's
KEY_PREFIX = "base_model.model."
KEY_PATTERN = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
BASE_LINEARS = (nn.Linear, NF4Linear)
# PEFT features qtune does not implement: an adapter using any of them is refused rather than misread.
UNSUPPORTED_PEFT_FIELDS = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
                           "rank_pattern", "alpha_pattern", "layer_replication", "trainable_token_indices",
                           "target_parameters", "use_qalora", "alora_invocation_tokens", "exclude_modules")


class AdapterError(ValueError):
    """An adapter directory qtune cannot use; the message names the file and what is wrong."""


# ----------------------------------------------------------------------------- attaching and switching

def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA-wrapped layer of `model`, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present on `model`, in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.lora_A))
    return list(names)


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name (None when adapters are disabled or there are none)."""
    return next((layer.active for layer in lora_layers(model).values()), None)


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers inside the decoder layers (wrapped or not), by name: what LoRA may target."""
    inside_wrappers = tuple(f"{n}." for n in lora_layers(model))
    return {n: m for n, m in model.named_modules()
            if n.startswith("model.layers.") and isinstance(m, (*BASE_LINEARS, LoRALinear))
            and not n.startswith(inside_wrappers)}


def target_matches(name: str, targets: tuple[str, ...] | str) -> bool:
    """PEFT's matching rule: "all-linear", a regular expression over the full name, or name suffixes."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _wrap(model: nn.Module, name: str) -> LoRALinear:
    module = model.get_submodule(name)
    if isinstance(module, LoRALinear):
        return module
    layer = LoRALinear(module)
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
    for layer in lora_layers(model).values():
        layer.active = name


@contextmanager
def _swapped_active(model: nn.Module, name: str | None):
    layers = list(lora_layers(model).values())
    saved = [layer.active for layer in layers]
    set_active_adapter(model, name)
    try:
        yield model
    finally:
        for layer, active in zip(layers, saved):
            layer.active = active


def adapters_disabled(model: nn.Module):
    """`with adapters_disabled(model):` runs the bare base model; the previous state returns on exit."""
    return _swapped_active(model, None)


def use_adapter(model: nn.Module, name: str):
    """`with use_adapter(model, "value"):` temporarily makes adapter `name` the active one."""
    if name is None:
        raise ValueError("use_adapter needs an adapter name; use adapters_disabled(model) for the base model")
    return _swapped_active(model, name)


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """A and B of every layer carrying adapter `name` (default: the active adapter)."""
    name = name if name is not None else active_adapter(model)
    if name is None or name not in adapter_names(model):
        raise ValueError(f"no adapter {name!r} on this model (adapters: {adapter_names(model)}); "
                         "name one or activate one with set_active_adapter")
    return [p for layer in lora_layers(model).values() if name in layer.lora_A
            for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)]


def mark_trainable(model: nn.Module, name: str) -> None:
    """Only adapter `name`'s parameters require grad; every other parameter of `model` is frozen."""
    params = lora_parameters(model, name)
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


# ----------------------------------------------------------------------------- PEFT on-disk format

def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's on-disk keys (`base_model.model.<module>.lora_A.weight`)."""
    lora_parameters(model, name)  # fails clearly on an unknown name
    tensors = {}
    for module_name, layer in lora_layers(model).items():
        if name in layer.lora_A:
            tensors[f"{KEY_PREFIX}{module_name}.lora_A.weight"] = layer.lora_A[name].weight.detach().cpu().contiguous()
            tensors[f"{KEY_PREFIX}{module_name}.lora_B.weight"] = layer.lora_B[name].weight.detach().cpu().contiguous()
    return tensors


def _adapter_config(model: nn.Module, name: str) -> tuple[LoraConfig, list[str]]:
    """The adapter's config and the names of the layers carrying it."""
    carriers = {n: layer for n, layer in lora_layers(model).items() if name in layer.lora_A}
    if not carriers:
        raise ValueError(f"no adapter {name!r} on this model (adapters: {adapter_names(model)})")
    return next(iter(carriers.values())).configs[name], list(carriers)


def peft_config_dict(cfg: LoraConfig, module_names: list[str], base_model_name_or_path: str = "") -> dict:
    """The `adapter_config.json` PEFT writes for a plain LoRA adapter on a causal LM."""
    targets = cfg.target_modules
    if targets == "all-linear":
        # Written out as the layer kinds actually adapted, which PEFT matches by suffix just as we do.
        targets = sorted({n.rsplit(".", 1)[-1] for n in module_names})
    elif not isinstance(targets, str):
        targets = list(targets)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
        "revision": None, "inference_mode": True, "r": cfg.r,
        "lora_alpha": int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": targets, "use_rslora": cfg.rslora, "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False,
    }


def save_adapter(model: nn.Module, out_dir, name: str = "default", base_model_name_or_path: str = "",
                 extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter `name` as a PEFT directory (+ `extra_tensors.safetensors` when `extra_tensors` is given).

    The directory is assembled under a temporary name and renamed into place at the end, so an
    interrupted save leaves an existing adapter at `out_dir` intact.
    """
    from qtune.checkpoint import atomic_dir, commit_dir

    out_dir = Path(out_dir)
    cfg, module_names = _adapter_config(model, name)
    tmp = atomic_dir(out_dir)
    try:
        save_file(adapter_state_dict(model, name), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if extra_tensors:
            extra = {k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}
            save_file(extra, str(tmp / EXTRA_WEIGHTS), metadata={"format": "pt"})
        config = peft_config_dict(cfg, module_names, base_model_name_or_path)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        commit_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_adapter_config(adapter_dir) -> LoraConfig:
    """Parse `adapter_config.json`, refusing PEFT features qtune does not implement."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.exists():
        raise AdapterError(f"{path}: missing; a LoRA adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict) or d.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type is {d.get('peft_type') if isinstance(d, dict) else d!r}; "
                           "only LoRA adapters (peft_type 'LORA') are supported")
    for key in UNSUPPORTED_PEFT_FIELDS:
        if d.get(key):
            raise AdapterError(f"{path}: {key}={d[key]!r} is a PEFT feature qtune does not support "
                               "(train the adapter without it)")
    if d.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={d['bias']!r}; only adapters without trained biases (bias 'none') load")
    try:
        return LoraConfig(r=d["r"], alpha=float(d.get("lora_alpha", 8)), dropout=float(d.get("lora_dropout", 0.0)),
                          target_modules=d.get("target_modules") or (), rslora=bool(d.get("use_rslora", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{path}: invalid LoRA settings ({e})") from e


def read_adapter_weights(adapter_dir) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} from `adapter_model.safetensors`; never reads pickles."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.exists():
        pickle = " (only the pickle adapter_model.bin is there; qtune reads safetensors only)" \
            if (Path(adapter_dir) / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{path}: missing{pickle}")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                m = KEY_PATTERN.fullmatch(key)
                if m is None:
                    raise AdapterError(f"{path}: unexpected tensor {key!r}; a LoRA adapter holds only "
                                       f"'{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' keys")
                pairs.setdefault(m[1], {})[m[2]] = f.get_tensor(key)
    except SafetensorError as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from e
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{path}: {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
    return {module: (pair["A"], pair["B"]) for module, pair in pairs.items()}


def _check_fits(model, path: Path, cfg: LoraConfig, weights: dict, base_name) -> None:
    """Every adapted module exists with the right shapes, and every targeted module has weights."""
    linears = decoder_linears(model)
    mismatch = f"adapter {path} does not match this base model"
    hint = f"; it was trained on {base_name!r}" if base_name else ""
    for module, (a, b) in weights.items():
        if module not in linears:
            raise AdapterError(f"{mismatch} (it adapts {module!r}, which is not a linear layer inside this "
                               f"model's decoder layers{hint})")
        layer = linears[module]
        want_a, want_b = (cfg.r, layer.in_features), (layer.out_features, cfg.r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise AdapterError(f"{mismatch} ({module}: lora_A {list(a.shape)} / lora_B {list(b.shape)}, but rank "
                               f"r={cfg.r} on this layer needs {list(want_a)} / {list(want_b)}{hint})")
    missing = [n for n in linears if target_matches(n, cfg.target_modules) and n not in weights]
    if missing:
        raise AdapterError(f"{mismatch} (its target_modules cover {missing[:3]}"
                           f"{' and more' if len(missing) > 3 else ''}, which have no weights in the file{hint})")


def load_adapter(model: nn.Module, adapter_dir, name: str = "default", trainable: bool = False) -> LoraConfig:
    """Attach the PEFT adapter in `adapter_dir` as adapter `name` (made active) and return its config.

    Its parameters require grad only with `trainable=True` (to continue training it).
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir)
    base_name = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    _check_fits(model, adapter_dir / ADAPTER_WEIGHTS, cfg, weights, base_name)
    _check_new_name(model, name)
    for module, (a, b) in weights.items():
        _wrap(model, module).add_adapter(name, cfg, a, b)
    set_active_adapter(model, name)
    for p in lora_parameters(model, name):
        p.requires_grad_(trainable)
    return cfg


def load_extra_tensors(adapter_dir) -> dict[str, torch.Tensor]:
    """The tensors `save_adapter(..., extra_tensors=...)` stored beside the adapter ({} when none)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / EXTRA_WEIGHTS
    return load_file(str(path)) if path.exists() else {}


# ----------------------------------------------------------------------------- merging

def merged_state_dict(model: nn.Module, name: str | None = None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Hugging Face-named tensors in `dtype` with adapter `name` (default: the active one) folded in.

    Each adapted weight becomes W + s · B A; NF4 weights are written dequantized.
    """
    name = name if name is not None else active_adapter(model)
    inside_wrappers = tuple(f"{n}." for n in lora_layers(model))
    tensors = {}
    for module_name, module in model.named_modules():
        if module_name.startswith(inside_wrappers):
            continue
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, (LoRALinear, NF4Linear)):
            merged = module.merged_weight(name) if isinstance(module, LoRALinear) else module.dequantize(torch.float32)
            bias = module.base_layer.bias if isinstance(module, LoRALinear) else module.bias
            tensors[prefix + "weight"] = merged.to(dtype)
            if bias is not None:
                tensors[prefix + "bias"] = bias.detach().to(dtype)
        else:
            for p_name, p in module.named_parameters(recurse=False):
                tensors[prefix + p_name] = p.detach().to(dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return tensors


def merge_lora_into_dir(model_dir, adapter_dir, out_dir, from_original: bool = False, dtype=None,
                        double_quant: bool = True) -> Path:
    """Write base + adapter as one plain Hugging Face directory (`qtune merge`).

    Default: W_merged = dequant(NF4(W)) + s · B A, the weights the adapter was trained against (NF4 with
    `double_quant` as in training). `from_original`: W + s · B A from the 16-bit weights. `dtype` of
    the output defaults to the base checkpoint's torch_dtype (bfloat16 when it has none).
    """
    from qtune.checkpoint import (DTYPES, atomic_dir, commit_dir, copy_tokenizer_files, load_model, parse_dtype,
                                  resolve, save_state_dict_sharded)
    from qtune.config import ModelConfig

    model_dir = resolve(model_dir)
    cfg = ModelConfig.from_json(model_dir)
    if from_original and "quantization_config" in cfg.extra:
        raise AdapterError(f"{model_dir / 'config.json'}: this is a 4-bit checkpoint (quantization_config); "
                           "merging from the original weights needs the 16-bit model it was quantized from")
    stored = cfg.torch_dtype if cfg.torch_dtype in DTYPES else None
    out_dtype = parse_dtype(dtype or stored or "bfloat16")
    # Loaded in the stored dtype so quantization sees the same values as it did in training.
    model = load_model(model_dir, quantize="none" if from_original else "nf4", dtype=parse_dtype(stored or "float32"),
                       double_quant=double_quant)
    load_adapter(model, adapter_dir, name="merged")
    tensors = merged_state_dict(model, "merged", out_dtype)
    del model
    config = cfg.to_dict()
    config.pop("quantization_config", None)
    dtype_name = str(out_dtype).removeprefix("torch.")
    config["torch_dtype"] = dtype_name
    if "dtype" in config:  # transformers >= 5 writes `dtype`
        config["dtype"] = dtype_name
    out_dir = Path(out_dir)
    tmp = atomic_dir(out_dir)
    try:
        save_state_dict_sharded(tensors, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(model_dir, tmp)
        commit_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
