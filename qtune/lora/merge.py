"""Folding an adapter into its base: W + s · B A per adapted layer, written as a plain Hugging Face directory."""

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from qtune.config import ModelConfig
from qtune.lora.adapters import active_adapter, lora_layers
from qtune.lora.layer import LoRALinear
from qtune.lora.peft import AdapterError, load_adapter
from qtune.weights.checkpoint import (DTYPES, atomic_dir, commit_dir, copy_tokenizer_files, load_model, parse_dtype,
                                      resolve, save_state_dict_sharded)
from qtune.weights.integrity import verify_files
from qtune.weights.nf4_linear import NF4Linear


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
    verify_files(adapter_dir, AdapterError)  # before the base model loads (load_adapter checks again as it reads)
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
