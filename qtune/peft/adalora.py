"""AdaLoRA (Zhang et al. 2023, arXiv:2303.10512): LoRA in SVD form whose rank budget is pruned while training.

    y = x Wᵀ + b + s · dropout(x) (A ⊙ E)ᵀ Bᵀ          A = Q (r, in), E = Λ (r, 1), B = P (out, r)
    s = alpha / (init_r + 1e-5)                       (PEFT's scaling: it divides by the initial rank, always)

Training adds the orthogonality regulariser R(P, Q) = mean over matrices of ‖Q Qᵀ − I‖_F and ‖Pᵀ P − I‖_F
(weight `orth_reg_weight`), and after every optimizer step scores each singular triplet (P_i, λ_i, Q_i):

    I(w) = |w · ∂L/∂w|, Ī ← β₁ Ī + (1 − β₁) I, Ū ← β₂ Ū + (1 − β₂) |I − Ī|, score(w) = Ī · Ū
    S_i = score(λ_i) + mean_j score(Q_ij) + mean_j score(P_ji)

and, every `delta_t` steps between `tinit` and total_step − tfinal, zeroes the λ_i of the lowest scores so that
the total rank follows the cubic schedule b(t) = b_T + (b_0 − b_T) (1 − (t − tinit) / (T − tfinal − tinit))³.
From total_step − tfinal on the final pattern stays fixed. Names, layout, step numbering (0-based) and file
format are PEFT's (`lora_A`, `lora_E`, `lora_B`, `rank_pattern`), so each side loads what the other saves.

The regulariser's gradient is added once per optimizer step (what PEFT's per-forward term amounts to under
accumulation), by the hook the training driver registers on the optimizer: after gradient clipping, so the
clip bounds the task loss's gradient alone, and the logged loss is the task loss.
"""

import math
from pathlib import Path

import torch
from torch import nn

from qtune.lora.adapters import _check_new_name, _wrap, adapter_hosts, decoder_linears, set_active_adapter, target_matches
from qtune.lora.layer import LoraConfig, LoRALinear
from qtune.lora.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_PREFIX, AdapterError
from qtune.peft.base import PeftMethod, StepHook, lora_config

RANK_EPS = 1e-5  # PEFT's ranknum + 1e-5
CONFIG_KEYS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


class SVDLinear(LoRALinear):
    """A frozen base linear plus AdaLoRA adapters: LoRA's A and B with the singular values E (r, 1) between them.

    `rank_pattern[name]` is the allocator's mask over the initial rank (None until it first prunes); a loaded
    adapter keeps the pattern it was saved with and only the rows it kept.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_E = nn.ParameterDict()
        self.rank_pattern: dict[str, list[bool] | None] = {}
        self.settings: dict[str, dict] = {}

    def add_svd_adapter(self, name: str, cfg: LoraConfig, a: torch.Tensor, e: torch.Tensor, b: torch.Tensor,
                        settings: dict, rank_pattern: list[bool] | None = None) -> None:
        """Attach AdaLoRA adapter `name`: A (r, in), E (r, 1), B (out, r); `settings` = the CONFIG_KEYS values."""
        self.add_adapter(name, cfg, a, b)
        self.lora_E[name] = nn.Parameter(e.to(device=self.lora_A[name].weight.device, dtype=torch.float32))
        init_r = settings["init_r"]
        self.scaling[name] = (cfg.alpha if cfg.alpha > 0 else init_r) / (init_r + RANK_EPS)
        self.settings[name], self.rank_pattern[name] = dict(settings), rank_pattern
        self.methods[name] = "adalora"

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [*super().adapter_parameters(name), self.lora_E[name]] if name in self.lora_E else \
            super().adapter_parameters(name)

    def adapter_weights(self, name: str):
        a, b, scale = super().adapter_weights(name)
        if name in self.lora_E:
            a = a * self.lora_E[name]  # A ⊙ E: row i of Q scaled by λ_i
        return a, b, scale

    def kept_rows(self, name: str) -> torch.Tensor:
        """Indices of the triplets this adapter keeps (all rows before any pruning)."""
        pattern, rows = self.rank_pattern.get(name), self.lora_E[name].shape[0]
        if pattern is None or sum(pattern) == rows != len(pattern):  # none yet, or already cut to the kept rows
            return torch.arange(rows)
        return torch.tensor([i for i, keep in enumerate(pattern) if keep], dtype=torch.long)


def svd_layers(model: nn.Module, name: str) -> dict[str, SVDLinear]:
    """The layers carrying AdaLoRA adapter `name`, by module name, in model order."""
    return {n: m for n, m in adapter_hosts(model).items() if isinstance(m, SVDLinear) and name in m.lora_E}


def add_adalora(model: nn.Module, cfg: LoraConfig, settings: dict, name: str = "default", seed: int = 0) -> list[str]:
    """Attach a fresh AdaLoRA adapter of rank settings["init_r"] to the layers `cfg.target_modules` selects.

    PEFT's initialisation: E = 0 (so the model starts as the base), A and B ~ N(0, 0.02²), drawn from a generator
    seeded with `seed` (the global RNG is left alone).
    """
    _check_new_name(model, name)
    targets = [n for n in decoder_linears(model) if target_matches(n, cfg.target_modules)]
    if not targets:
        raise ValueError(f"lora.target_modules={cfg.target_modules!r} matches no linear layer inside the decoder "
                         "layers (or use 'all-linear')")
    generator, r = torch.Generator().manual_seed(seed), settings["init_r"]
    for target in targets:
        layer = _wrap_svd(model, target)
        a = torch.randn(r, layer.in_features, generator=generator) * 0.02
        b = torch.randn(layer.out_features, r, generator=generator) * 0.02
        layer.add_svd_adapter(name, cfg, a, torch.zeros(r, 1), b, settings)
    set_active_adapter(model, name)
    return targets


def _wrap_svd(model: nn.Module, module_name: str) -> SVDLinear:
    module = model.get_submodule(module_name)
    if isinstance(module, SVDLinear):
        return module
    if isinstance(module, LoRALinear):
        raise ValueError(f"{module_name} already carries LoRA adapters; AdaLoRA needs a layer of its own")
    layer = SVDLinear(module)
    model.set_submodule(module_name, layer)
    return layer


def orthogonality_regulariser(layers: dict[str, SVDLinear], name: str) -> torch.Tensor:
    """R = (Σ_layers ‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F) / (2 · layers): P and Q kept near-orthogonal (paper eq. 4)."""
    total = 0.0
    for layer in layers.values():
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        for cov in (a @ a.T, b.T @ b):
            total = total + torch.linalg.matrix_norm(cov - torch.eye(len(cov), device=cov.device), "fro")
    return total / (2 * len(layers))


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int,
                    delta_t: int) -> tuple[int, bool]:
    """(total rank allowed at 0-based `step`, whether this step prunes): the initial budget up to tinit, then
    cubic decay to the target by total_step − tfinal (pruning every delta_t steps), then the target."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * remaining ** 3 + target_budget), step % delta_t == 0


class RankAllocator(StepHook):
    """AdaLoRA's per-step work for adapter `name`: the regulariser's gradient before each optimizer step, the
    importance scores and the pruning after it (where PEFT calls `update_and_allocate`)."""

    def __init__(self, model: nn.Module, name: str, total_step: int):
        self.layers, self.name = svd_layers(model, name), name
        first = next(iter(self.layers.values())).settings[name]
        self.s = {**first, "total_step": total_step}
        for layer in self.layers.values():
            layer.settings[name]["total_step"] = total_step
        self.init_budget = sum(layer.lora_E[name].shape[0] for layer in self.layers.values())
        self.target_budget = self.s["target_r"] * len(self.layers)
        self.step = 0  # PEFT's global_step: 0 at the first optimizer step
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def triplets(self):
        """(key, parameter) of every A, B and E of the adapter."""
        for module, layer in self.layers.items():
            yield f"{module}.A", layer.lora_A[self.name].weight
            yield f"{module}.B", layer.lora_B[self.name].weight
            yield f"{module}.E", layer.lora_E[self.name]

    def before_step(self) -> None:
        if self.s["orth_reg_weight"] > 0:
            with torch.enable_grad():
                (self.s["orth_reg_weight"] * orthogonality_regulariser(self.layers, self.name)).backward()

    def after_step(self) -> None:
        step, final = self.step, self.s["total_step"] - self.s["tfinal"]
        self.step += 1
        if step < final:
            self.update_importance()
            budget, prune = self.budget(step)
            if prune:
                self.mask_to_budget(budget)
        elif step == final:
            self.mask_to_budget(self.budget(step)[0])
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}  # the pattern is final: scores are no longer needed
        else:
            self.apply_pattern()

    def budget(self, step: int) -> tuple[int, bool]:
        s = self.s
        return budget_schedule(step, self.init_budget, self.target_budget, s["tinit"], s["tfinal"], s["total_step"],
                               s["deltaT"])

    @torch.no_grad()
    def update_importance(self) -> None:
        """Ī and Ū of every entry from this step's gradients (sensitivity |w · g| and its two smoothings)."""
        b1, b2 = self.s["beta1"], self.s["beta2"]
        for key, p in self.triplets():
            ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            avg = b1 * self.exp_avg_ipt.get(key, torch.zeros_like(p)) + (1 - b1) * ipt
            self.exp_avg_unc[key] = b2 * self.exp_avg_unc.get(key, torch.zeros_like(p)) + (1 - b2) * (ipt - avg).abs()
            self.exp_avg_ipt[key] = avg

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i of every triplet, (r,) per layer: score(λ_i) + mean over Q_i's entries + mean over P_i's."""
        score = {k: self.exp_avg_ipt[k] * self.exp_avg_unc[k] for k in self.exp_avg_ipt}
        return {m: score[f"{m}.E"].view(-1) + torch.cat([score[f"{m}.A"].mean(1, keepdim=True),
                                                         score[f"{m}.B"].mean(0).view(-1, 1)], 1).sum(1)
                for m in self.layers}

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Zero the singular values of the lowest-scored triplets, keeping `budget` in total (ties pruned too)."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k)[0].item() if k > 0 else -math.inf
        for module, layer in self.layers.items():
            pruned = scores[module] <= threshold
            layer.lora_E[self.name].masked_fill_(pruned.view(-1, 1), 0.0)
            layer.rank_pattern[self.name] = (~pruned).tolist()

    @torch.no_grad()
    def apply_pattern(self) -> None:
        for layer in self.layers.values():
            if (pattern := layer.rank_pattern[self.name]) is not None:
                keep = torch.tensor(pattern, device=layer.lora_E[self.name].device).view(-1, 1)
                layer.lora_E[self.name].masked_fill_(~keep, 0.0)

    def ranks(self) -> dict[str, int]:
        """Each adapted matrix's rank now: the triplets its pattern keeps (all of them before any pruning)."""
        return {m: len(layer.kept_rows(self.name)) for m, layer in self.layers.items()}

    def state_dict(self) -> dict:
        return {"step": self.step, "exp_avg_ipt": dict(self.exp_avg_ipt), "exp_avg_unc": dict(self.exp_avg_unc),
                "rank_pattern": {m: layer.rank_pattern[self.name] for m, layer in self.layers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.exp_avg_ipt, self.exp_avg_unc = dict(state["exp_avg_ipt"]), dict(state["exp_avg_unc"])
        for module, pattern in state["rank_pattern"].items():
            self.layers[module].rank_pattern[self.name] = pattern

    def summary(self) -> dict:
        ranks = self.ranks()
        return {"adalora_ranks": ranks, "adalora_total_rank": sum(ranks.values())}


def adalora_settings(recipe) -> dict:
    """The CONFIG_KEYS values a recipe's [peft.adalora] gives (total_step: train.max_steps until the run knows)."""
    a = recipe.peft.adalora
    return {"init_r": a.init_r, "target_r": a.target_r, "tinit": a.tinit, "tfinal": a.tfinal, "deltaT": a.delta_t,
            "beta1": a.beta1, "beta2": a.beta2, "orth_reg_weight": a.orth_reg_weight,
            "total_step": recipe.train.max_steps or None}


class AdaLoRAMethod(PeftMethod):
    """AdaLoRA: `[peft.adalora]` for the ranks and their schedule, `[lora]` for alpha, dropout and target_modules."""

    name, peft_type = "adalora", "ADALORA"

    def attach(self, model, recipe, name, seed):
        cfg = lora_config(recipe.lora)
        add_adalora(model, LoraConfig(r=recipe.peft.adalora.init_r, alpha=cfg.alpha, dropout=cfg.dropout,
                                      target_modules=cfg.target_modules), adalora_settings(recipe), name, seed)

    def step_hook(self, model, name, recipe, total_steps):
        a = recipe.peft.adalora
        if a.tinit >= total_steps - a.tfinal:
            raise ValueError(f"peft.adalora.tinit ({a.tinit}) + tfinal ({a.tfinal}) leave no step of the {total_steps} "
                             "to prune ranks in; lower them or train longer (PEFT refuses such an adapter)")
        return RankAllocator(model, name, total_steps)

    def config_dict(self, model, name):
        layers = svd_layers(model, name)
        first = next(iter(layers.values()))
        cfg, targets = first.configs[name], first.configs[name].target_modules
        if targets == "all-linear":
            targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
        patterns = {f"{m}.lora_E": layer.rank_pattern[name] for m, layer in layers.items()}
        return {"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "inference_mode": True, "r": cfg.r,
                "lora_alpha": int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha,
                "lora_dropout": cfg.dropout, "target_modules": targets if isinstance(targets, str) else list(targets),
                "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True,
                "use_rslora": False, "use_dora": False, **first.settings[name],
                "rank_pattern": None if any(p is None for p in patterns.values()) else patterns}

    def state_dict(self, model, name):
        tensors = {}
        for module, layer in svd_layers(model, name).items():
            rows = layer.kept_rows(name)
            base = f"{KEY_PREFIX}{module}"
            tensors[f"{base}.lora_A"] = layer.lora_A[name].weight.detach()[rows].cpu()
            tensors[f"{base}.lora_E"] = layer.lora_E[name].detach()[rows].cpu()
            tensors[f"{base}.lora_B"] = layer.lora_B[name].weight.detach()[:, rows].cpu()
        return tensors

    def load(self, model, config, tensors, path, name):
        where = path / ADAPTER_CONFIG
        try:
            settings = {k: config[k] for k in CONFIG_KEYS}
            cfg = LoraConfig(r=int(settings["init_r"]), alpha=float(config.get("lora_alpha", 8)) or settings["init_r"],
                             dropout=float(config.get("lora_dropout", 0.0)),
                             target_modules=config.get("target_modules") or ())
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterError(f"{where}: invalid AdaLoRA settings ({e})") from e
        for key in ("use_dora", "modules_to_save", "layers_to_transform"):
            if config.get(key):
                raise AdapterError(f"{where}: {key}={config[key]!r} is a PEFT feature qtune does not support")
        triplets = _triplets(tensors, path / ADAPTER_WEIGHTS)
        patterns = config.get("rank_pattern") or {}
        linears = decoder_linears(model)
        _check_new_name(model, name)
        for module, (a, e, b) in triplets.items():
            if module not in linears or a.shape[1] != linears[module].in_features \
                    or b.shape[0] != linears[module].out_features:
                raise AdapterError(f"adapter {path / ADAPTER_WEIGHTS} does not match this base model ({module}: "
                                   f"lora_A {list(a.shape)}, lora_B {list(b.shape)})")
        for module, (a, e, b) in triplets.items():
            pattern = patterns.get(f"{module}.lora_E")
            _wrap_svd(model, module).add_svd_adapter(name, cfg, a, e, b, settings, pattern)
        return cfg


def _triplets(tensors: dict, path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{module: (A, E, B)} from PEFT's AdaLoRA keys (`base_model.model.<module>.lora_A` / `lora_E` / `lora_B`)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, kind = key.removeprefix(KEY_PREFIX).rpartition(".")
        if not key.startswith(KEY_PREFIX) or kind not in ("lora_A", "lora_E", "lora_B"):
            raise AdapterError(f"{path}: unexpected tensor {key!r}; an AdaLoRA adapter holds only "
                               f"'{KEY_PREFIX}<module>.lora_A' / '.lora_E' / '.lora_B' keys")
        parts.setdefault(module, {})[kind] = tensor
    for module, found in parts.items():
        if len(found) != 3:
            raise AdapterError(f"{path}: {module} has {sorted(found)}, not all of lora_A, lora_E and lora_B")
    return {m: (p["lora_A"], p["lora_E"], p["lora_B"]) for m, p in parts.items()}
