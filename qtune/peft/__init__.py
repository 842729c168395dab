"""Parameter-efficient fine-tuning methods beyond plain LoRA, and what every method shares: attaching a fresh
adapter as a recipe's `[peft]` section says, saving and loading adapter directories, merging.

    method      what trains                                              folds into W
    lora        B A per linear layer (qtune/lora/)                        yes
    dora        B A and a magnitude per output row (qtune/lora/layer.py)  yes
    ia3         a vector rescaling keys, values, feed-forward inputs      yes

`registry.py` lists the methods; `io.py` writes and reads adapter directories (PEFT's format wherever PEFT
has the method); `merge.py` folds an adapter into its base for `qtune merge`.
"""

# ruff: noqa: F401  (the package's public names, re-exported)
from qtune.peft.registry import METHODS, PeftMethod, attach, lora_config, method_for_config, method_named
from qtune.peft.io import (EXTRA_WEIGHTS, adapter_dir_method, load_adapter, load_extra_tensors, read_config,
                           save_adapter)
from qtune.peft.merge import merge_adapter_into_dir

