"""What a parameter-efficient method is (`PeftMethod`, and `StepHook` for methods that act at every optimizer
step), and the LoRA family the others build on (LoRA, DoRA). The table of methods is registry.py.

A method attaches a fresh adapter to a model, describes it for `adapter_config.json`, lists its tensors
under the on-disk keys, and attaches a saved adapter again. Everything else (which adapter is active,
what trains, DPO's "adapters off" reference, checkpoints, resume) is the same for every method and lives
in qtune/lora/adapters.py and the training driver.
"""

from pathlib import Path

import torch
from torch import nn

from qtune.lora.layer import LoraConfig
from qtune.lora import peft as lora_format
from qtune.lora.adapters import add_lora
from qtune.lora.init import initialise


class PeftMethod:
    """One method. Subclasses set the class attributes and implement the four methods."""

    name: str = ""
    """The recipe's `[peft] method` value."""
    peft_type: str = ""
    """`adapter_config.json`'s `peft_type` for this method (PEFT's name, or qtune's own where PEFT lacks it)."""
    not_foldable: str = ""
    """Empty when `qtune merge` can fold the adapter into the weights; otherwise why not, and what to do."""

    def attach(self, model: nn.Module, recipe, name: str, seed: int) -> None:
        """Attach a fresh adapter `name` as the recipe's `[peft]` and `[lora]` sections describe it, leaving the
        model's output unchanged where the method allows (LoRA's B = 0) and the adapter active."""
        raise NotImplementedError

    def config_dict(self, model: nn.Module, name: str) -> dict:
        """`adapter_config.json` for adapter `name`, as PEFT writes it for this method."""
        raise NotImplementedError

    def state_dict(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors under the on-disk keys (PEFT's where PEFT has the method)."""
        raise NotImplementedError

    def extra_positions(self, recipe) -> int:
        """Positions the method adds in front of every sequence (the virtual tokens of prompt / prefix tuning)."""
        return 0

    def load(self, model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], path: Path, name: str):
        """Attach the saved adapter (`config` from `adapter_config.json`, `tensors` from the weights file in
        directory `path`) as adapter `name` and return its settings (the method's config object); refuse with an
        AdapterError naming the file when it does not fit."""
        raise NotImplementedError

    def step_hook(self, model: nn.Module, name: str, recipe, total_steps: int) -> "StepHook | None":
        """What adapter `name` needs done around every optimizer step of a `total_steps` run (AdaLoRA's rank
        budget), or None (most methods); raises ValueError when the recipe's settings do not fit the run."""
        return None


class StepHook:
    """A method's work around each optimizer step, registered on the optimizer by the training driver so that
    every loop (SFT, reward, DPO) runs it: `before_step` once the step's gradients are complete and clipped,
    `after_step` after the update, before the gradients are cleared. Its state travels with checkpoints."""

    def before_step(self) -> None:
        """Add the method's own gradient terms (a regulariser's) to the accumulated gradients."""

    def after_step(self) -> None:
        """Act on the updated parameters and the step's gradients."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps so that a resumed run goes on exactly as an uninterrupted one."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`."""

    def summary(self) -> dict:
        """Entries for the run's summary.json."""
        return {}

    def register(self, optimizer: torch.optim.Optimizer) -> None:
        """Run `before_step` / `after_step` around every `optimizer.step()` (a skipped step skips them too)."""
        optimizer.register_step_pre_hook(lambda *_: self.before_step())
        optimizer.register_step_post_hook(lambda *_: self.after_step())


def lora_config(lora, use_dora: bool = False) -> LoraConfig:
    """The `LoraConfig` a recipe's [lora] section (or anything with its fields) describes."""
    return LoraConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                      rslora=lora.rslora, use_dora=use_dora, init=getattr(lora, "init", "default"))


class LoRAMethod(PeftMethod):
    """LoRA (Hu et al. 2021) with rsLoRA scaling; the recipe's `[lora]` section."""

    name, peft_type = "lora", "LORA"

    def attach(self, model, recipe, name, seed):
        cfg = lora_config(recipe.lora, use_dora=self.name == "dora")
        targets = add_lora(model, cfg, name=name, seed=seed)
        if cfg.init != "default":
            layers = {n: model.get_submodule(n) for n in targets}
            err = initialise(model, layers, name, cfg.init, recipe.lora.loftq_iter)
            # the initial error the method exists to shrink, printed where the run's log shows it
            print(f"lora.init = {cfg.init}: ||W - (base + s B A)|| = {err['init_error']:.4g} over the adapted "
                  f"weights; plain QLoRA's ||W - NF4(W)|| = {err['qlora_error']:.4g}", flush=True)

    def config_dict(self, model, name):
        return lora_format.peft_config_dict(*lora_format.adapter_config(model, name))

    def state_dict(self, model, name):
        return lora_format.adapter_state_dict(model, name)

    def load(self, model, config, tensors, path, name):
        return lora_format.attach_saved_lora(model, config, tensors, path, name)


class DoRAMethod(LoRAMethod):
    """DoRA (Liu et al. 2024): LoRA's `[lora]` adapter plus a trained magnitude per output row; saved as PEFT saves
    it (a LORA config with `use_dora`, whose loading `LoRAMethod` does)."""

    name = "dora"
