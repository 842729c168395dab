"""Adapter directories, whatever the method: `adapter_config.json` (its `peft_type` says the method),
`adapter_model.safetensors`, optionally `extra_tensors.safetensors` (heads that travel with an adapter: a
reward or value head; not PEFT's) and `qtune-manifest.json` (each file's SHA-256, checked on every read).

PEFT loads what qtune writes for the methods PEFT has, and qtune loads what PEFT writes.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qtune.config import read_json
from qtune.lora.adapters import adapter_method, adapter_parameters, set_active_adapter
from qtune.lora.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, read_adapter_tensors
from qtune.peft.base import PeftMethod
from qtune.peft.registry import METHODS, method_for_config
from qtune.weights.checkpoint import atomic_dir, commit_dir
from qtune.weights.integrity import verify_files, write_manifest

EXTRA_WEIGHTS = "extra_tensors.safetensors"


def save_adapter(model: nn.Module, out_dir, name: str = "default", base_model_name_or_path: str = "",
                 extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter `name` as a PEFT directory (+ `extra_tensors.safetensors` when `extra_tensors` is given).

    The directory is assembled under a temporary name, listed in a manifest and renamed into place at the
    end, so an interrupted save leaves an existing adapter at `out_dir` intact. A failed write (a full disk)
    leaves nothing behind and is an AdapterError.
    """
    out_dir = Path(out_dir)
    method = METHODS[adapter_method(model, name)]
    config = {**method.config_dict(model, name), "base_model_name_or_path": base_model_name_or_path or None}
    tensors = {k: v.detach().cpu().contiguous() for k, v in method.state_dict(model, name).items()}
    tmp = atomic_dir(out_dir)
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if extra_tensors:
            extra = {k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}
            save_file(extra, str(tmp / EXTRA_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        write_manifest(tmp)
        commit_dir(tmp, out_dir)
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"{out_dir}: cannot write the adapter ({getattr(e, 'strerror', None) or e}); nothing "
                           "was written there: free space or choose another directory, then try again") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_config(adapter_dir) -> dict:
    """`adapter_config.json` of an adapter directory as a dict (checked against the manifest)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    verify_files(adapter_dir, AdapterError, [ADAPTER_CONFIG])
    d = read_json(path, AdapterError, f"missing; an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    if not isinstance(d, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def adapter_dir_method(adapter_dir) -> PeftMethod:
    """The method the adapter in `adapter_dir` uses, from its `adapter_config.json`."""
    return method_for_config(read_config(adapter_dir), Path(adapter_dir) / ADAPTER_CONFIG)


def load_adapter(model: nn.Module, adapter_dir, name: str = "default", trainable: bool = False):
    """Attach the adapter in `adapter_dir` (any method qtune has) as adapter `name`, made active, and return
    its settings (a `LoraConfig` for LoRA). Its parameters require grad only with `trainable=True` (to continue
    training it)."""
    adapter_dir = Path(adapter_dir)
    config = read_config(adapter_dir)
    method = method_for_config(config, adapter_dir / ADAPTER_CONFIG)
    settings = method.load(model, config, read_adapter_tensors(adapter_dir), adapter_dir, name)
    set_active_adapter(model, name)
    for p in adapter_parameters(model, name):
        p.requires_grad_(trainable)
    return settings


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
