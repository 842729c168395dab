"""LoRA adapters on disk in PEFT's format.

An adapter is a PEFT directory: `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, so `peft.PeftModel.from_pretrained` loads
what qtune saves and the other way round. qtune adds `qtune-manifest.json` (each file's SHA-256), which
PEFT ignores; every read of a file qtune wrote checks it (see qtune/weights/integrity.py).
"""

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qtune.config import read_json
from qtune.lora.adapters import (_check_new_name, _wrap, adapter_names, decoder_linears, lora_layers, lora_parameters,
                                 set_active_adapter, target_matches)
from qtune.lora.layer import LoraConfig
from qtune.weights.checkpoint import atomic_dir, commit_dir
from qtune.weights.integrity import verify_files, write_manifest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXTRA_WEIGHTS = "extra_tensors.safetensors"  # heads that travel with an adapter (reward, value); not PEFT's
KEY_PREFIX = "base_model.model."
KEY_PATTERN = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")

# PEFT features qtune does not implement: an adapter using any of them is refused rather than misread.
UNSUPPORTED_PEFT_FIELDS = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
                           "rank_pattern", "alpha_pattern", "layer_replication", "trainable_token_indices",
                           "target_parameters", "use_qalora", "alora_invocation_tokens", "exclude_modules")


class AdapterError(ValueError):
    """An adapter directory qtune cannot use; the message names the file and what is wrong."""


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

    The directory is assembled under a temporary name, listed in a manifest (`qtune-manifest.json`, the
    SHA-256 of each file, checked whenever qtune reads the adapter) and renamed into place at the end, so
    an interrupted save leaves an existing adapter at `out_dir` intact. A failed write (a full disk) leaves
    nothing behind and is an AdapterError.
    """
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
        write_manifest(tmp)
        commit_dir(tmp, out_dir)
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"{out_dir}: cannot write the adapter ({getattr(e, 'strerror', None) or e}); nothing "
                           "was written there: free space or choose another directory, then try again") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_adapter_config(adapter_dir) -> LoraConfig:
    """Parse `adapter_config.json`, refusing PEFT features qtune does not implement."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    verify_files(adapter_dir, AdapterError, [ADAPTER_CONFIG])
    d = read_json(path, AdapterError, f"missing; a LoRA adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
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
    verify_files(adapter_dir, AdapterError, [ADAPTER_WEIGHTS])
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
    path = Path(adapter_dir) / EXTRA_WEIGHTS
    verify_files(adapter_dir, AdapterError, [EXTRA_WEIGHTS])
    if not path.exists():
        return {}
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from None
