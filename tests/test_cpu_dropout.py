"""cpu_dropout: its statistics against the binomial law, its gradient, and its use by LoRA layers on a CPU."""

import math

import pytest
import torch

from qtune.kernels.cpu.dropout import LEVELS, cpu_dropout, keep_threshold
from qtune.lora import LoraConfig, LoRALinear


def within(observed: float, expected: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n) + 1e-12


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_rate_scale_and_independence(p):
    torch.manual_seed(0)
    n = 1 << 22
    y = cpu_dropout(torch.ones(n), p)
    q = keep_threshold(p) / LEVELS  # the drop probability after rounding to 2^-16
    assert abs(q - p) <= 0.5 / LEVELS
    dropped = y == 0
    assert within(dropped.float().mean().item(), q, n)
    assert torch.all(y[~dropped] == LEVELS / (LEVELS - keep_threshold(p)))  # kept values are scaled up
    lanes = dropped.view(-1, 4)  # the four values from one 64-bit draw
    for lane in range(4):
        assert within(lanes[:, lane].float().mean().item(), q, n // 4)
    for a, b in ((0, 1), (1, 2), (3, 0)):  # pairs inside a draw and across neighbouring draws
        both = (lanes[:, a] & lanes.roll(-1 if b < a else 0, dims=0)[:, b]).float().mean().item()
        assert within(both, q * q, n // 4)


def test_unbiased_gradient_and_reproducible():
    x = torch.randn(300, 70, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    y = cpu_dropout(x, 0.2)
    torch.manual_seed(5)
    torch.testing.assert_close(cpu_dropout(x, 0.2), y, rtol=0, atol=0)  # the default generator decides
    assert not torch.equal(cpu_dropout(x, 0.2), y)  # and moves on
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, y.detach() / x.detach(), rtol=1e-12, atol=0)  # keep · scale, elementwise
    assert cpu_dropout(x, 0.0) is x


def test_lora_layer_uses_it_in_training_on_cpu(monkeypatch):
    base = torch.nn.Linear(64, 32, bias=False).requires_grad_(False)
    layer = LoRALinear(base)
    cfg = LoraConfig(r=4, alpha=8, dropout=0.25, target_modules="all-linear")
    layer.add_adapter("default", cfg, torch.randn(4, 64), torch.randn(32, 4))
    layer.active = "default"
    x = torch.randn(8, 64)
    calls = []
    monkeypatch.setattr("qtune.lora.layer.cpu_dropout", lambda t, p: calls.append(p) or cpu_dropout(t, p))
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = base(x) + layer.scaling["default"] * (cpu_dropout(x, 0.25) @ a.t() @ b.t())
    assert calls == [0.25]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + layer.scaling["default"] * (x @ a.t() @ b.t()),
                               rtol=1e-5, atol=1e-4)
