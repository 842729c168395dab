"""Parameter-efficient fine-tuning methods beyond plain LoRA, and what every method shares: attaching a fresh
adapter as a recipe's `[peft]` section says, saving and loading adapter directories, merging.

    method      what trains                                              folds into W
    lora        B A per linear layer (qtune/lora/)                        yes
    dora        B A and a magnitude per output row (qtune/lora/layer.py)  yes
    ia3         a vector rescaling keys, values, feed-forward inputs      yes
    adalora     P Λ Q per linear layer, ranks pruned while training       yes
    adapter     a bottleneck MLP after (or beside) each sub-block         no
    prompt      N virtual-token embeddings before the input (prompt.py)   no: serve with --adapter
    p_tuning    the same, made by an MLP / LSTM prompt encoder (prompt.py) no: serve with --adapter
    prefix      N keys / values before every layer's own (prefix.py)      no: serve with --adapter

`base.py` says what a method is (and holds the LoRA family); `registry.py` lists the methods; `io.py` writes and reads adapter directories (PEFT's format wherever PEFT
has the method); `merge.py` folds an adapter into its base for `qtune merge`.
"""

# ruff: noqa: F401  (the package's public names, re-exported)
from qtune.peft.base import PeftMethod, StepHook, lora_config
from qtune.peft.registry import METHODS, attach, method_for_config, method_named, step_hook
from qtune.peft.io import (EXTRA_WEIGHTS, adapter_dir_method, load_adapter, load_extra_tensors, read_config,
                           save_adapter)
from qtune.peft.merge import merge_adapter_into_dir

