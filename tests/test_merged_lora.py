"""The fp32 merged-weight LoRA path vs the unmerged reference, and what a checkpoint recomputes with it.

References: `reference_lora_linear` (y = x Wᵀ + b + s · x Aᵀ Bᵀ in plain autograd) evaluated in fp64 on
the same values, and the same model run without checkpointing.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qtune.config import ModelConfig
from qtune.kernels.lora import reference_lora_linear
from qtune.lora import LoraConfig, add_lora, lora_layers, adapter_parameters, mark_trainable
from qtune.memory.build import random_model
from qtune.kernels.cpu.merged_lora import merged_lora_linear
from qtune.weights.nf4 import quantize_nf4


def assert_close(actual, expected, what, rtol=2e-6):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:g} x {scale:.3e}"


@pytest.mark.parametrize("base", ["nf4", "dense"])
@pytest.mark.parametrize("shape", [(5, 128, 192, 16), (7, 64, 40, 3)], ids=lambda s: "N{}-in{}-out{}-r{}".format(*s))
def test_output_and_gradients_equal_the_unmerged_reference(base, shape):
    N, d_in, d_out, r = shape
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(d_out, d_in, generator=gen) * 0.1
    if base == "nf4":
        weight = quantize_nf4(weight)
    bias = torch.randn(d_out, generator=gen)
    x = torch.randn(2, N, d_in, generator=gen)
    a = torch.randn(r, d_in, generator=gen) * 0.1
    b = torch.randn(d_out, r, generator=gen) * 0.1  # non-zero, as after some training
    g = torch.randn(2, N, d_out, generator=gen)
    scale = 16 / r

    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    y = merged_lora_linear(leaves[0], weight, bias, leaves[1], leaves[2], scale)
    (y * g).sum().backward()
    refs = [t.double().requires_grad_() for t in (x, a, b)]
    w64 = weight.double() if isinstance(weight, torch.Tensor) else weight.dequantize(torch.float64)
    y_ref = reference_lora_linear(refs[0], w64, bias.double(), refs[1], refs[2], scale)
    (y_ref * g.double()).sum().backward()

    assert y.shape == (2, N, d_out) and y.dtype == torch.float32
    assert_close(y, y_ref, "output")
    for name, ours, ref in zip(("dX", "dA", "dB"), leaves, refs):
        assert_close(ours.grad, ref.grad, name)


def tiny_lora_model(dropout: float):
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = random_model(cfg, torch.float32)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"), seed=0)
    mark_trainable(model, "default")
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return model.train()


class CountProducts(TorchDispatchMode):
    """Counts matrix products by (rows, inner, columns)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            mat1, mat2 = args[-2], args[-1]
            self.shapes.append((mat1.shape[0], mat1.shape[1], mat2.shape[1]))
        elif func.overloadpacket == torch.ops.mkldnn._linear_pointwise:  # x (..., in), w (out, in)
            x, weight = args[0], args[1]
            self.shapes.append((x.numel() // x.shape[-1], x.shape[-1], weight.shape[0]))
        return func(*args, **(kwargs or {}))


def test_training_layers_take_the_merged_path_and_dropout_does_not():
    x = torch.randn(3, 64)
    for dropout, merged in ((0.0, True), (0.1, False)):
        layer = lora_layers(tiny_lora_model(dropout))["model.layers.0.mlp.down_proj"]
        y = layer(torch.randn(3, 128, requires_grad=True))
        nodes = [y.grad_fn, *(f for f, _ in y.grad_fn.next_functions)]  # the product sits under a reshape
        assert any(type(f).__name__ == "MergedProductFnBackward" for f in nodes) == merged, (dropout, nodes)
    with torch.no_grad():  # inference keeps the unmerged form (cheaper for a few rows)
        assert lora_layers(tiny_lora_model(0.0))["model.layers.0.self_attn.q_proj"](x).grad_fn is None


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["merged", "unmerged-dropout"])
def test_checkpoint_recomputes_everything_but_the_down_product(dropout):
    """Gradients with checkpointing equal those without, and backward with checkpointing reruns six of
    each layer's seven base products: not the MLP's down product, whose output feeds only the residual sum.
    Both LoRA paths run the adapter's saving ops before the frozen NF4 product, which saves nothing."""
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    rank, layers = 4, 2
    grads, base_products = {}, {}
    for checkpointing in (False, True):
        model = tiny_lora_model(dropout)
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(3)  # the same dropout masks in both runs (checkpointing replays the RNG state)
        loss = model(ids).float().logsumexp(-1).sum()
        with CountProducts() as counter:
            loss.backward()
        grads[checkpointing] = [p.grad.clone() for p in adapter_parameters(model)]
        base_products[checkpointing] = sum(rank not in shape for shape in counter.shapes)  # adapters' have r
    assert base_products[True] - base_products[False] == 6 * layers
    for with_ckpt, without in zip(grads[True], grads[False]):
        torch.testing.assert_close(with_ckpt, without, rtol=1e-5, atol=1e-7)


def test_in_place_update_before_backward_is_an_error():
    layer = lora_layers(tiny_lora_model(0.0))["model.layers.0.self_attn.o_proj"]
    y = layer(torch.randn(3, 64, requires_grad=True))
    with torch.no_grad():
        layer.lora_A["default"].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_fused_gpu_ops_also_recompute_everything_but_the_down_product(dropout, monkeypatch):
    """The GPU path's fused QLoRA ops, run here by the Triton interpreter: the MLP block is three autograd
    nodes (gate/up, SwiGLU with down's adapter, down's frozen product), so a checkpoint's recomputation
    stops before the down product there too, and the gradients equal those without checkpointing."""
    import qtune.kernels.lora as kl

    calls, original = [], kl._base_forward

    def counting(x, p, triton_path):  # counts the frozen products, then runs the real one
        assert triton_path
        calls.append(tuple(p.weight.shape))
        return original(x, p, triton_path)

    monkeypatch.setattr(kl, "_base_forward", counting)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    layers, recomputed, grads = 2, {}, {}
    for checkpointing in (False, True):
        model = tiny_lora_model(dropout)
        model.set_kernels("triton")
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(3)
        loss = model(ids).float().logsumexp(-1).sum()
        forward_calls = len(calls)
        calls.clear()
        loss.backward()
        recomputed[checkpointing] = list(calls)
        grads[checkpointing] = [p.grad.clone() for p in adapter_parameters(model)]
        assert forward_calls == 7 * layers
    assert recomputed[False] == []
    assert len(recomputed[True]) == 6 * layers and (64, 128) not in recomputed[True]  # down is (64, 128)
    for with_ckpt, without in zip(grads[True], grads[False]):
        torch.testing.assert_close(with_ckpt, without, rtol=1e-5, atol=1e-7)
