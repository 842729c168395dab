"""Folding an adapter into its base: each adapted linear layer's weight becomes the weight the adapter makes
it (W + s · B A for LoRA), as Hugging Face-named tensors. Writing the merged directory is qtune/peft/merge.py."""

import torch
from torch import nn

from qtune.lora.adapters import active_adapter, adapter_hosts
from qtune.weights.nf4_linear import NF4Linear


def merged_state_dict(model: nn.Module, name: str | None = None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Hugging Face-named tensors in `dtype` with adapter `name` (default: the active one) folded in.

    Each adapted weight becomes what the adapter's host layer says (`merged_weight`: W + s · B A for LoRA); NF4
    weights are written dequantized. Hosts that wrap a linear layer (`base_layer`) and can fold say so by
    having `merged_weight`; a method without such hosts cannot be merged (`not_foldable` in qtune/peft/base.py).
    """
    name = name if name is not None else active_adapter(model)
    wrappers = {n: m for n, m in adapter_hosts(model).items() if hasattr(m, "base_layer")}
    inside_wrappers = tuple(f"{n}." for n in wrappers)
    tensors = {}
    for module_name, module in model.named_modules():
        if module_name.startswith(inside_wrappers):
            continue
        prefix = f"{module_name}." if module_name else ""
        if module_name in wrappers or isinstance(module, NF4Linear):
            wrapper = module_name in wrappers
            merged = module.merged_weight(name) if wrapper else module.dequantize(torch.float32)
            # a host whose adapter changes the bias too (IA3's output scaling) says so with `merged_bias`
            bias = (module.merged_bias(name) if hasattr(module, "merged_bias") else module.base_layer.bias) \
                if wrapper else module.bias
            tensors[prefix + "weight"] = merged.to(dtype)
            if bias is not None:
                tensors[prefix + "bias"] = bias.detach().to(dtype)
        else:
            for p_name, p in module.named_parameters(recurse=False):
                tensors[prefix + p_name] = p.detach().to(dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return tensors
