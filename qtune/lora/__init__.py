"""LoRA adapters on the frozen (dense or NF4) linear layers of a `CausalLM`, saved in PEFT's format.

LoRA (Hu et al. 2021, arXiv:2106.09685) keeps a weight W (out, in) frozen and learns a low-rank update:

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ          A (r, in), B (out, r)
    s = alpha / r,  or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732), which keeps
    the update's size from shrinking as the rank grows.

A starts like PEFT's (Kaiming-uniform, a = sqrt(5)) and B at zero, so a fresh adapter leaves the
model's output unchanged. A layer can carry several *named* adapters of different ranks; one is active
at a time (PPO keeps its policy, value and reward adapters on one 4-bit base) and `adapters_disabled`
runs the bare base (DPO's reference model).

Saving and loading an adapter of any method, merging and the other methods are in qtune/peft/.
On disk an adapter is a PEFT directory: `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, so `peft.PeftModel.from_pretrained` loads
what qtune saves and the other way round.

The layer is in `layer.py`; attaching, switching and training in `adapters.py`; PEFT files in
`peft.py`; folding into the weights in `merge.py`; what every adapter-carrying module has in `host.py`;
PiSSA / LoftQ initialisation (the base made a residual) in `init.py`; DoRA's magnitudes live in the layer.
This package re-exports their public names.
"""

# ruff: noqa: F401  (the package's public names, re-exported)
from qtune.lora.layer import (LoraConfig, LoRALinear)
from qtune.lora.host import AdapterHost
from qtune.lora.adapters import (BASE_LINEARS, lora_layers, adapter_hosts, adapter_names, adapter_method,
                                 active_adapter, decoder_linears,
                                 target_matches, add_lora, set_active_adapter, adapters_disabled, use_adapter,
                                 adapter_parameters, lora_b_parameters, mark_trainable)
from qtune.lora.peft import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_PREFIX, KEY_PATTERN, UNSUPPORTED_PEFT_FIELDS,
                             AdapterError, adapter_state_dict, peft_config_dict, read_adapter_config,
                             read_adapter_weights)
from qtune.lora.merge import merged_state_dict
