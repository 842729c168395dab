"""What every adapter-carrying module has, whatever its PEFT method: named adapters, one active at a time.

LoRA's `LoRALinear` is one such host; the other methods (qtune/peft/) add their own. The functions that
switch, list and train adapters (qtune/lora/adapters.py) walk a model's hosts, so `adapters_disabled`
gives DPO its reference and `use_adapter` switches PPO's adapters for every method alike.
"""

from torch import nn


class AdapterHost(nn.Module):
    """A module carrying named adapters. Subclasses record each adapter's method in `methods` when they add
    it and return its trainable tensors from `adapter_parameters`; `active` names the adapter in use
    (None: the module behaves as the bare base)."""

    def __init__(self):
        super().__init__()
        self.active: str | None = None
        self.methods: dict[str, str] = {}
        """Adapter name -> its method ("lora", "dora", "ia3", ...), in the order they were added."""

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The tensors adapter `name` trains in this module ([] when this module does not carry it)."""
        raise NotImplementedError(f"{type(self).__name__} must say which parameters its adapters train")
