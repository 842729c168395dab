"""PiSSA and LoftQ: LoRA adapters that start from the weight's principal components, with the base made the
residual, so that base + s B A starts closer to the 16-bit weight W than plain QLoRA's NF4(W) does.

    PiSSA (Meng et al. 2024, arXiv:2404.02948)   U S Vᵀ = W,  B = U_r sqrt(S_r / s),  A = sqrt(S_r / s) V_rᵀ
                                                 base = W - s B A, re-quantized to NF4 on a 4-bit base
    LoftQ (Li et al. 2023, arXiv:2310.08659)     B₀ A₀ = 0;  for t = 1..T:  Q_t = NF4(W - s B_{t-1} A_{t-1}),
                                                 (B_t, A_t) = SVD_r(W - Q_t) / s;  base = Q_T, adapter (A_T, B_T)

Either way the base is NF4 (or, for PiSSA on a 16-bit base, the dense value) of R = W - s B_r A_r for a
"residual pair" (A_r, B_r): PiSSA's own initial pair, LoftQ's pair of step T - 1 (zero for T = 1). The layer keeps
that pair (`LoRALinear.residual`): with the adapter switched off it runs base + s B_r A_r (the model the
initialisation started from: W itself for PiSSA on a 16-bit base), and the saved adapter carries it
(qtune/lora/peft.py): PEFT's conversion to a rank-2r LoRA on the original weights, [A; A_r] and [B, -B_r], which qtune splits again
on load to rebuild the residual base from the original weights.
"""

import torch

from qtune.lora.layer import LoRALinear
from qtune.weights.checkpoint import read_linear_weights
from qtune.weights.nf4 import quantize_nf4
from qtune.weights.nf4_linear import NF4Linear

INITS = ("default", "pissa", "loftq")


def svd_pair(m: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s B A the best rank-r approximation of m (out, in), the singular values split evenly."""
    u, sv, vh = torch.linalg.svd(m.float(), full_matrices=False)
    root = (sv[:r] / scale).sqrt()
    return root.unsqueeze(1) * vh[:r], u[:, :r] * root


def nf4_roundtrip(w: torch.Tensor, layer) -> torch.Tensor:
    """dequant(NF4(w)) in fp32, quantized as NF4 `layer` is (its dtype, block size and double quantization), or
    as `qtune` quantizes by default for a dense layer (plain QLoRA's base)."""
    return _quantize_like(w, layer).dequantize(torch.float32)


def _quantize_like(w: torch.Tensor, layer):
    if not isinstance(layer, NF4Linear):
        return quantize_nf4(w.to(layer.weight.dtype))
    double_quant = layer.nested_absmax is not None
    return quantize_nf4(w.to(layer.weight_dtype), blocksize=layer.blocksize, double_quant=double_quant)


def init_pairs(w: torch.Tensor, layer: LoRALinear, r: int, scale: float, init: str, loftq_iter: int):
    """(A, B, A_r, B_r) for `init` on the 16-bit weight w (out, in) of `layer`: the adapter and the residual pair."""
    if init == "pissa":
        a, b = svd_pair(w, r, scale)
        return a, b, a, b
    if not isinstance(layer.base_layer, NF4Linear):
        raise ValueError("lora.init = \"loftq\" alternates NF4 quantization with SVD steps, so it needs the 4-bit base "
                         "(model.quantize = \"nf4\"); on a 16-bit base use lora.init = \"pissa\"")
    a_res = torch.zeros(r, w.shape[1], device=w.device)
    b_res = torch.zeros(w.shape[0], r, device=w.device)
    for step in range(loftq_iter):
        q = nf4_roundtrip(w - scale * (b_res @ a_res), layer.base_layer)
        a, b = svd_pair(w - q, r, scale)
        if step < loftq_iter - 1:
            a_res, b_res = a, b
    return a, b, a_res, b_res


def rebuild_base(layer: LoRALinear, w: torch.Tensor, name: str) -> None:
    """Make `layer`'s base the residual R = W - s B_r A_r of adapter `name`'s residual pair, from the 16-bit W:
    NF4(R) on a 4-bit base (quantized as the base was), R in the base's dtype on a 16-bit one."""
    a_res, b_res = layer.residual[name]
    residual = w.float().to(a_res.device) - layer.scaling[name] * (b_res @ a_res)
    base = layer.base_layer
    if isinstance(base, NF4Linear):
        rebuilt = NF4Linear(_quantize_like(residual, base), base.bias)
        rebuilt.kernels = base.kernels
        layer.base_layer = rebuilt
    else:
        with torch.no_grad():
            base.weight.copy_(residual.to(base.weight.dtype))


def originals(model, modules) -> dict[str, torch.Tensor]:
    """The 16-bit weights of `modules`: read again from the checkpoint for NF4 layers, the layer's own otherwise."""
    quantized = [n for n in modules if isinstance(model.get_submodule(n).base_layer, NF4Linear)]
    source = getattr(model, "checkpoint_dir", None)
    if quantized and source is None:
        raise ValueError("PiSSA / LoftQ on a 4-bit base need its 16-bit weights: load the model with "
                         "qtune.weights.checkpoint.load_model, which records where they are")
    found = read_linear_weights(source, quantized) if quantized else {}
    return {n: found[n] if n in found else model.get_submodule(n).base_layer.weight.detach() for n in modules}


def initialise(model, layers: dict[str, LoRALinear], name: str, init: str, loftq_iter: int = 1) -> dict[str, float]:
    """Give adapter `name` on `layers` its PiSSA / LoftQ start and make each base the residual; returns the
    initial error ||W - (base + s B A)|| over all adapted weights and plain QLoRA's ||W - NF4(W)|| beside it."""
    errors = {"init_error": 0.0, "qlora_error": 0.0}
    weights = originals(model, layers)
    for module, layer in layers.items():
        w = weights[module].float().to(layer.lora_A[name].weight.device)
        if len(layer.methods) > 1:
            raise ValueError(f"{module}: lora.init = {init!r} changes the base weights, so the layer cannot carry "
                             f"another adapter ({', '.join(layer.methods)})")
        a, b, a_res, b_res = init_pairs(w, layer, layer.configs[name].r, layer.scaling[name], init, loftq_iter)
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
        layer.residual[name] = (a_res, b_res)
        rebuild_base(layer, w, name)
        if name in layer.lora_magnitude_vector:
            layer.set_magnitude(name)  # DoRA: the magnitude of the new base + s B A
        errors["init_error"] += float((w - layer.merged_weight(name)).square().sum())  # DoRA's m / ||.|| is 1 here
        errors["qlora_error"] += float((w - nf4_roundtrip(w, layer.base_layer)).square().sum())
    return {k: v ** 0.5 for k, v in errors.items()}


def restore_residual_bases(model, name: str, residual: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """A saved PiSSA / LoftQ adapter `name` just attached: rebuild each base as the residual of its pair (A_r, B_r)
    from the original weights, as training had it."""
    weights = originals(model, residual)
    for module, (a_res, b_res) in residual.items():
        layer = model.get_submodule(module)
        if len(layer.methods) > 1:
            raise ValueError(f"{module}: a PiSSA / LoftQ adapter changes the base weights, so the layer cannot carry "
                             f"another adapter ({', '.join(layer.methods)})")
        device = layer.lora_A[name].weight.device
        layer.residual[name] = (a_res.float().to(device), b_res.float().to(device))
        rebuild_base(layer, weights[module], name)
