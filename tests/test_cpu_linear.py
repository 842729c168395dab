"""Frozen-weight products through oneDNN (kernels/cpu/linear.py) vs fp64 products, and where they must agree.

References: the same product in fp64; torch's own F.linear autograd for gradients; the invariant that a
LoRA layer whose B is zero computes bit for bit what the layer computes with its adapter switched off.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtune.kernels.cpu.linear import frozen_linear, linear, matmul, onednn_applies
from qtune.lora import LoraConfig, LoRALinear
from qtune.weights.nf4_linear import NF4Linear


def rel_err(actual, expected) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def layouts():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 96, generator=gen)
    w = torch.randn(136, 96, generator=gen)
    b = torch.randn(136, generator=gen)
    yield "contiguous", x, w, None
    yield "bias", x, w, b
    yield "3-d input", x.view(1, 37, 96).expand(2, 37, 96), w, b
    yield "input columns strided", torch.randn(96, 37, generator=gen).t(), w, None
    yield "input rows strided", torch.randn(74, 96, generator=gen)[::2], w, b
    yield "weight a transposed view", x, torch.randn(96, 136, generator=gen).t(), None


@pytest.mark.parametrize("case", list(layouts()), ids=lambda c: c[0])
def test_linear_equals_the_fp64_product(case):
    _, x, w, b = case
    y = linear(x, w, b)
    ref = x.double() @ w.double().t() + (0 if b is None else b.double())
    assert y.shape == ref.shape and y.dtype == torch.float32
    # fp32 sums of 96 terms: torch's own F.linear is about 3e-7 off here
    assert rel_err(y, ref) < 5e-6
    assert rel_err(matmul(x, w.t()), x.double() @ w.double().t()) < 5e-6


def test_linear_stays_differentiable_where_autograd_records():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 32, generator=gen, requires_grad=True)
    w = torch.randn(24, 32, generator=gen, requires_grad=True)
    assert not onednn_applies(x, w)  # would have no gradient formula: F.linear serves
    linear(x, w).square().sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.linear(x2, w2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-5) and torch.allclose(w.grad, w2.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert onednn_applies(x, w) == torch.backends.mkldnn.is_available()


def test_frozen_linear_gradient_is_dy_times_w():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 48, generator=gen, dtype=torch.float64).float().requires_grad_()
    w, b = torch.randn(40, 48, generator=gen), torch.randn(40, generator=gen)
    g = torch.randn(2, 11, 40, generator=gen)
    y = frozen_linear(x, w, b)
    (y * g).sum().backward()
    assert rel_err(y, x.detach().double() @ w.double().t() + b.double()) < 5e-6
    assert rel_err(x.grad, g.double() @ w.double()) < 5e-6
    assert not w.requires_grad and w.grad is None


def lora_layer(base: str) -> LoRALinear:
    """A LoRA-wrapped layer with B = 0, as right after `add_lora`, its A trainable."""
    torch.manual_seed(3)
    dense = nn.Linear(80, 72, bias=True).requires_grad_(False)
    layer = LoRALinear(NF4Linear.from_linear(dense) if base == "nf4" else dense)
    layer.add_adapter("default", LoraConfig(r=4, alpha=8), torch.randn(4, 80) * 0.1, torch.zeros(72, 4))
    layer.active = "default"
    return layer


@pytest.mark.parametrize("base", ["nf4", "dense"])
def test_zero_adapter_equals_the_base_bit_for_bit(base):
    """A DPO policy starts equal to its reference (the same model, adapter off): the first loss is ln 2
    exactly only if both forwards run the same products, with and without gradients."""
    layer = lora_layer(base).train()
    x = torch.randn(3, 10, 80)
    policy = layer(x.clone().requires_grad_())  # a training forward: the merged-weight product
    layer.active = None
    with torch.no_grad():
        reference = layer(x)
    assert policy.grad_fn is not None
    assert torch.equal(policy.detach(), reference)
