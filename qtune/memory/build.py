"""Random-weight models of a given shape, quantized tensor by tensor, for memory and speed measurements.

A 7B-shaped QLoRA model is built without ever holding its 16-bit weights: the model is created on the
meta device, then each decoder linear gets a random weight that is quantized to NF4 at once and dropped,
so the build peaks at the final size plus the quantization temporaries of one tensor. Under a
`FakeTensorMode` the same code gives a model of the right shapes and dtypes that owns no memory (for the
tracer).
"""

from dataclasses import replace

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from qtune.config import ModelConfig
from qtune.lora import adapter_parameters
from qtune.memory.tracer import nbytes_of
from qtune.model import CausalLM
from qtune.recipe.peft import PeftSection
from qtune.recipe.sections import LoRASection, TrainRecipe
from qtune.train.common import ADAPTER, attach_adapter
from qtune.weights.nf4 import NF4Weight, quantize_nf4
from qtune.weights.nf4_linear import NF4Linear

INIT_STD = 0.02  # the Llama initializer_range


def _is_decoder_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("_proj")


def random_model(cfg: ModelConfig, dtype: torch.dtype, device="cpu", quantize: str = "nf4", double_quant: bool = True,
                 seed: int = 0, draw_on_device: bool = False) -> CausalLM:
    """A frozen `CausalLM` of shape `cfg` with N(0, 0.02) weights (norms at 1), in eval mode.

    quantize="nf4" turns every decoder linear into an `NF4Linear` as soon as its weight is drawn.
    draw_on_device: draw with a generator on `device` (seconds for an 8B shape on a GPU, where the CPU draw
    takes minutes); the weights then depend on the device.
    """
    if quantize not in ("nf4", "none"):
        raise ValueError(f"quantize={quantize!r} is not one of nf4, none")
    on_device = draw_on_device and torch.device(device).type != "meta"
    generator = torch.Generator(device=device if on_device else "cpu").manual_seed(seed)
    with torch.device("meta"):
        model = CausalLM(cfg)
    for name, module in list(model.named_modules()):
        if name == "lm_head" and cfg.tie_word_embeddings:
            continue  # shares the embedding, tied again below
        for p_name, p in list(module.named_parameters(recurse=False)):
            if p_name == "weight" and name.endswith("norm"):
                value = torch.ones(p.shape, dtype=dtype, device=device)
            else:
                value = _random(p.shape, dtype, device, generator)
            if quantize == "nf4" and p_name == "weight" and _is_decoder_linear(name):
                q = _quantize(value, double_quant)
                del value
                bias = None if module.bias is None else _random(module.bias.shape, dtype, device, generator)
                model.set_submodule(name, NF4Linear(q, bias))
                break
            setattr(module, p_name, nn.Parameter(value, requires_grad=False))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.set_rope_tables(device)
    return model.requires_grad_(False).eval()


def _quantize(w: torch.Tensor, double_quant: bool) -> NF4Weight:
    """quantize_nf4(w); a fake weight gets fake tensors of the shapes quantize_nf4 gives a meta tensor.

    (quantize_nf4 builds its lookup tables from real values, which do not exist under a FakeTensorMode.)
    """
    if not isinstance(w, FakeTensor):
        return quantize_nf4(w, double_quant=double_quant)
    with unset_fake_temporarily():
        q = quantize_nf4(torch.empty(w.shape, dtype=w.dtype, device="meta"), double_quant=double_quant)
    fake = lambda t: None if t is None else torch.empty(t.shape, dtype=t.dtype, device=w.device)
    return replace(q, packed=fake(q.packed), absmax=fake(q.absmax), nested_absmax=fake(q.nested_absmax),
                   nested_code=fake(q.nested_code), offset=fake(q.offset))


def _random(shape, dtype, device, generator) -> torch.Tensor:
    if torch.device(device).type == "meta":
        return torch.empty(shape, dtype=dtype, device=device)
    # Drawn in fp32 on the generator's device (the CPU unless draw_on_device): a CPU draw gives the same
    # weights on every device and dtype.
    return (torch.randn(shape, generator=generator, device=generator.device) * INIT_STD).to(device=device, dtype=dtype)


def add_trainable_lora(model: CausalLM, r: int, targets="all-linear", alpha: float = 16.0, dropout: float = 0.0,
                       seed: int = 0, method: str = "lora") -> list[nn.Parameter]:
    """Attach one fp32 LoRA adapter (B = 0) to `targets`, make only it trainable, return its parameters; `method`
    another [peft] method with its default settings ("dora" reads r and targets too)."""
    if isinstance(targets, list):
        targets = tuple(targets)  # in the order given (a list would be sorted)
    lora = LoRASection(r=r, alpha=alpha, dropout=dropout, target_modules=targets)
    attach_adapter(model, TrainRecipe(peft=PeftSection(method=method), lora=lora), seed)
    return adapter_parameters(model, ADAPTER)


def random_batch(cfg: ModelConfig, batch_size: int, seq_len: int, device="cpu", seed: int = 0) -> dict:
    """Token ids and labels (every position trained) of the given shape."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=generator).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


def training_state_bytes(cfg: ModelConfig, regime: str, r: int = 16, targets="all-linear",
                         optimizer: str = "adamw") -> dict[str, int]:
    """Bytes of what training keeps besides activations, counted on a `cfg`-shaped model built on the meta device.

    regime "full": bf16 weights and gradients, fp32 master weights and AdamW state (created by running
    AdamW once); "lora16": bf16 base + fp32 adapter, its gradients and optimizer state; "qlora": the same
    adapter on NF4 (double-quantized) decoder linears with the other layers in bf16.
    """
    model = random_model(cfg, torch.bfloat16, "meta", quantize="nf4" if regime == "qlora" else "none")
    counts = dict.fromkeys(("weights", "quant_constants", "gradients", "optimizer", "adapters"), 0)
    if regime == "full":
        params = list(model.parameters())
        grads = [torch.empty_like(p) for p in params]
        masters = [p.detach().float().requires_grad_() for p in params]
        opt = torch.optim.AdamW(masters, lr=1e-4)
        for m in masters:
            m.grad = torch.empty_like(m)  # the fp32 gradient copy is transient, one tensor at a time
        opt.step()
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.is_meta]
        counts.update(weights=nbytes_of(params), gradients=nbytes_of(grads), optimizer=nbytes_of(masters + state))
        return counts
    adapter = add_trainable_lora(model, r, targets)
    opt = build_optimizer_for_count(adapter, optimizer)
    ids = {id(p) for p in adapter}
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    codes = [m.packed for m in nf4] + [m.bias for m in nf4 if m.bias is not None]  # biases stay 16-bit buffers
    constants = [t for m in nf4 for t in (m.absmax, m.nested_absmax, m.nested_code, m.offset) if t is not None]
    base = [p for p in model.parameters() if id(p) not in ids]
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.is_meta]
    grads = [torch.empty_like(p) for p in adapter]
    counts.update(weights=nbytes_of(base + codes), quant_constants=nbytes_of(constants),
                  adapters=nbytes_of(adapter) + nbytes_of(grads) + nbytes_of(state))
    return counts


def build_optimizer_for_count(params, optimizer: str):
    """AdamW over meta `params` with its state created (one step on empty gradients)."""
    if optimizer not in ("adamw", "paged_adamw"):
        raise ValueError(f"counting optimizer state on the meta device supports adamw only, not {optimizer!r}")
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.empty_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt
