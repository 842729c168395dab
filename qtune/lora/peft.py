"""LoRA adapters on disk in PEFT's format.

An adapter is a PEFT directory: `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, so `peft.PeftModel.from_pretrained` loads
what qtune saves and the other way round. Writing and reading a directory, whatever the method, is
qtune/peft/io.py; this module is LoRA's part of it. qtune adds `qtune-manifest.json` (each file's SHA-256), which
PEFT ignores; every read of a file qtune wrote checks it (see qtune/weights/integrity.py).
"""

import dataclasses
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from qtune.config import read_json
from qtune.lora.adapters import (_check_new_name, _wrap, adapter_names, adapter_parameters, decoder_linears, lora_layers,
                                 target_matches)
from qtune.lora.init import restore_residual_bases
from qtune.lora.layer import LoraConfig
from qtune.weights.integrity import verify_files

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
KEY_PATTERN = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
MAGNITUDE_PATTERN = re.compile(r"base_model\.model\.(.+)\.lora_magnitude_vector")  # DoRA's m, one per layer

# PEFT features qtune does not implement: an adapter using any of them is refused rather than misread.
UNSUPPORTED_PEFT_FIELDS = ("lora_bias", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
                           "rank_pattern", "alpha_pattern", "layer_replication", "trainable_token_indices",
                           "target_parameters", "use_qalora", "alora_invocation_tokens", "exclude_modules")


class AdapterError(ValueError):
    """An adapter directory qtune cannot use; the message names the file and what is wrong."""


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's on-disk keys (`base_model.model.<module>.lora_A.weight`)."""
    adapter_parameters(model, name)  # fails clearly on an unknown name
    tensors = {}
    for module_name, layer in lora_layers(model).items():
        if name in layer.lora_A:
            a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
            if name in layer.residual:  # PEFT's conversion to a rank-2r LoRA on the original weights
                a_res, b_res = layer.residual[name]
                a, b = torch.cat([a, a_res.to(a.device)]), torch.cat([b, -b_res.to(b.device)], dim=1)
            tensors[f"{KEY_PREFIX}{module_name}.lora_A.weight"] = a.cpu().contiguous()
            tensors[f"{KEY_PREFIX}{module_name}.lora_B.weight"] = b.cpu().contiguous()
            if name in layer.lora_magnitude_vector:
                magnitude = layer.lora_magnitude_vector[name].detach().cpu()
                tensors[f"{KEY_PREFIX}{module_name}.lora_magnitude_vector"] = magnitude
    return tensors


def adapter_config(model: nn.Module, name: str) -> tuple[LoraConfig, list[str]]:
    """A LoRA adapter's config and the names of the layers carrying it."""
    carriers = {n: layer for n, layer in lora_layers(model).items() if name in layer.lora_A}
    if not carriers:
        raise ValueError(f"no adapter {name!r} on this model (adapters: {adapter_names(model)})")
    return next(iter(carriers.values())).configs[name], list(carriers)


def peft_config_dict(cfg: LoraConfig, module_names: list[str]) -> dict:
    """The `adapter_config.json` PEFT writes for a plain LoRA adapter on a causal LM; a PiSSA / LoftQ adapter as
    PEFT converts one (rank 2r, alpha raised to keep s), with qtune's keys to split it again (PEFT ignores them).
    `base_model_name_or_path` is left None here: saving (qtune/peft/io.py) fills it in for every method."""
    if cfg.init != "default":
        widened = dict(r=2 * cfg.r, alpha=cfg.alpha * (math.sqrt(2) if cfg.rslora else 2), init="default")
        return {**peft_config_dict(dataclasses.replace(cfg, **widened), module_names),
                "qtune_init": cfg.init, "qtune_residual_rank": cfg.r}
    targets = cfg.target_modules
    if targets == "all-linear":
        # Written out as the layer kinds actually adapted, which PEFT matches by suffix just as we do.
        targets = sorted({n.rsplit(".", 1)[-1] for n in module_names})
    elif not isinstance(targets, str):
        targets = list(targets)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "revision": None, "inference_mode": True, "r": cfg.r,
        "lora_alpha": int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": targets, "use_rslora": cfg.rslora, "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": cfg.use_dora, "lora_bias": False,
    }


def lora_config_from_dict(d, path: Path) -> LoraConfig:
    """The LoraConfig an `adapter_config.json` (read from `path`) describes, refusing PEFT features qtune does
    not implement."""
    if not isinstance(d, dict) or d.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type is {d.get('peft_type') if isinstance(d, dict) else d!r}; "
                           "only LoRA adapters (peft_type 'LORA') are supported here")
    for key in UNSUPPORTED_PEFT_FIELDS:
        if d.get(key):
            raise AdapterError(f"{path}: {key}={d[key]!r} is a PEFT feature qtune does not support "
                               "(train the adapter without it)")
    if d.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={d['bias']!r}; only adapters without trained biases (bias 'none') load")
    if str(d.get("init_lora_weights")).startswith(("pissa", "olora", "corda", "loftq")):
        raise AdapterError(f"{path}: init_lora_weights={d['init_lora_weights']!r}; PEFT saved this adapter for its "
                           "residual base model, which qtune does not have: save it from PEFT with "
                           "path_initial_model_for_weight_conversion (a LoRA on the original weights)")
    try:
        cfg = LoraConfig(r=d["r"], alpha=float(d.get("lora_alpha", 8)), dropout=float(d.get("lora_dropout", 0.0)),
                         target_modules=d.get("target_modules") or (), rslora=bool(d.get("use_rslora", False)),
                         use_dora=bool(d.get("use_dora", False)))
        if d.get("qtune_residual_rank"):  # qtune's PiSSA / LoftQ adapter, saved as PEFT's rank-2r conversion
            r = int(d["qtune_residual_rank"])
            if cfg.r != 2 * r:
                raise ValueError(f"r={cfg.r} is not twice qtune_residual_rank={r}")
            cfg = dataclasses.replace(cfg, r=r, alpha=cfg.alpha / (math.sqrt(2) if cfg.rslora else 2),
                                      init=d.get("qtune_init", "pissa"))
        return cfg
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{path}: invalid LoRA settings ({e})") from e


def lora_pairs(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} from an adapter's tensors under PEFT's keys (read from `path`); DoRA's magnitudes
    are read by `magnitudes`."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = KEY_PATTERN.fullmatch(key)
        if m is None:
            if MAGNITUDE_PATTERN.fullmatch(key):
                continue
            raise AdapterError(f"{path}: unexpected tensor {key!r}; a LoRA adapter holds only "
                               f"'{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' keys (and DoRA's "
                               "'.lora_magnitude_vector')")
        pairs.setdefault(m[1], {})[m[2]] = tensor
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{path}: {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
    return {module: (pair["A"], pair["B"]) for module, pair in pairs.items()}


def magnitudes(tensors: dict[str, torch.Tensor], cfg: LoraConfig, modules, path: Path) -> dict[str, torch.Tensor]:
    """{module name: DoRA magnitude} for a `use_dora` adapter (read from `path`), which needs one per adapted
    module; {} for plain LoRA, which must have none."""
    found = {m[1]: t for key, t in tensors.items() if (m := MAGNITUDE_PATTERN.fullmatch(key))}
    if not cfg.use_dora:
        if found:
            raise AdapterError(f"{path}: holds lora_magnitude_vector tensors but use_dora is not set in "
                               f"{ADAPTER_CONFIG}; set \"use_dora\": true or remove them")
        return {}
    missing = [m for m in modules if m not in found]
    stray = [m for m in found if m not in modules]
    if missing or stray:
        raise AdapterError(f"{path}: a DoRA adapter needs one lora_magnitude_vector per adapted layer "
                           f"(missing for {missing[:3]}, without lora_A / lora_B: {stray[:3]})")
    return found


def read_adapter_config(adapter_dir) -> LoraConfig:
    """Parse a LoRA directory's `adapter_config.json` (checked against its manifest)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    verify_files(adapter_dir, AdapterError, [ADAPTER_CONFIG])
    d = read_json(path, AdapterError, f"missing; an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    return lora_config_from_dict(d, path)


def read_adapter_tensors(adapter_dir) -> dict[str, torch.Tensor]:
    """Every tensor of `adapter_model.safetensors` (checked against the manifest); never reads pickles."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    verify_files(adapter_dir, AdapterError, [ADAPTER_WEIGHTS])
    if not path.exists():
        pickle = " (only the pickle adapter_model.bin is there; qtune reads safetensors only)" \
            if (Path(adapter_dir) / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{path}: missing{pickle}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from e


def read_adapter_weights(adapter_dir) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} from a LoRA directory's `adapter_model.safetensors`."""
    return lora_pairs(read_adapter_tensors(adapter_dir), Path(adapter_dir) / ADAPTER_WEIGHTS)


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


def attach_saved_lora(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], path: Path,
                      name: str) -> LoraConfig:
    """Attach the LoRA adapter saved in directory `path` (its `adapter_config.json` as `config`, its tensors) as
    adapter `name`, after checking it fits the model."""
    cfg = lora_config_from_dict(config, path / ADAPTER_CONFIG)
    weights = lora_pairs(tensors, path / ADAPTER_WEIGHTS)
    magnitude = magnitudes(tensors, cfg, weights, path / ADAPTER_WEIGHTS)
    residual = {}
    if cfg.init != "default":  # [A; A_r], [B, -B_r]: the adapter and its base's residual pair
        residual = {m: (a[cfg.r:], -b[:, cfg.r:]) for m, (a, b) in weights.items()}
        weights = {m: (a[:cfg.r], b[:, :cfg.r]) for m, (a, b) in weights.items()}
    _check_fits(model, path / ADAPTER_WEIGHTS, cfg, weights, config.get("base_model_name_or_path"))
    for module, m in magnitude.items():
        if tuple(m.shape) != (weights[module][1].shape[0],):
            raise AdapterError(f"{path / ADAPTER_WEIGHTS}: {module}.lora_magnitude_vector has shape {list(m.shape)}; "
                               f"DoRA needs one value per output row ({weights[module][1].shape[0]})")
    _check_new_name(model, name)
    for module, (a, b) in weights.items():
        _wrap(model, module).add_adapter(name, cfg, a, b, magnitude.get(module))
    if residual:
        restore_residual_bases(model, name, residual)
    return cfg
