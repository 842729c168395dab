"""The grouped mixture-of-experts op vs its plain-autograd reference: output, input gradient and routing-weight
gradient, dense and NF4 experts, SwiGLU and GeGLU, odd shapes, an expert no token chooses, and a checkpointed
call (whose recomputation skips the down products); the grouped NF4 product (forward and transposed) vs one
product per expert. The Triton route runs its kernels in the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1)."""

import pytest
import torch
import torch.utils.checkpoint

from qtune.kernels.experts import (grouped_experts, grouped_matmul, reference_grouped_experts, reference_grouped_matmul,
                                   route)
from qtune.weights.nf4 import quantize_nf4


def close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item() + 1e-12)


def make_case(n_tokens=13, hidden=24, intermediate=20, n_experts=5, top_k=2, nf4=False, seed=0):
    """x (N, D) and router weights (N, k) needing gradients, chosen experts (N, k) that leave the last expert
    unused, and the experts' frozen (gate, up, down) weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, hidden, generator=gen).requires_grad_()
    logits = torch.randn(n_tokens, n_experts - 1, generator=gen)
    weights, chosen = torch.softmax(logits, -1).topk(top_k, -1)
    weights = weights.detach().requires_grad_()

    def weight(out_features, in_features):
        w = torch.randn(out_features, in_features, generator=gen) / in_features ** 0.5
        return quantize_nf4(w) if nf4 else w

    experts = [(weight(intermediate, hidden), weight(intermediate, hidden), weight(hidden, intermediate))
               for _ in range(n_experts)]
    return x, weights, chosen, experts


def output_and_grads(fn, x, weights):
    out = fn()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    return (out, *torch.autograd.grad((out * probe).sum(), (x, weights)))


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("nf4", [False, True])
def test_grouped_experts_equal_reference(kernels, activation, nf4):
    hidden = 64 if nf4 else 24  # NF4 blocks of 64 values
    x, weights, chosen, experts = make_case(hidden=hidden, nf4=nf4)
    ours = output_and_grads(lambda: grouped_experts(x, weights, chosen, experts, activation, kernels), x, weights)
    ref = output_and_grads(lambda: reference_grouped_experts(x, weights, chosen, experts, activation), x, weights)
    for a, e in zip(ours, ref):
        close(a, e)


def test_one_expert_per_token_and_checkpointed_call():
    """k = 1, and the op inside a non-reentrant checkpoint: the same output and gradients."""
    x, weights, chosen, experts = make_case(n_tokens=7, hidden=9, intermediate=11, n_experts=3, top_k=1)
    ref = output_and_grads(lambda: reference_grouped_experts(x, weights, chosen, experts), x, weights)
    plain = output_and_grads(lambda: grouped_experts(x, weights, chosen, experts, kernels="torch"), x, weights)
    checkpointed = output_and_grads(lambda: torch.utils.checkpoint.checkpoint(
        lambda a, w: grouped_experts(a, w, chosen, experts, kernels="torch") + 0, x, weights, use_reentrant=False),
        x, weights)
    for a, b, e in zip(plain, checkpointed, ref):
        close(a, e)
        close(b, e)


def test_route_sorts_slots_by_expert():
    chosen = torch.tensor([[2, 0], [0, 1], [2, 1]])
    routing = route(chosen, 4)
    assert routing.counts == (2, 2, 2, 0)
    assert chosen.reshape(-1)[routing.order].tolist() == [0, 0, 1, 1, 2, 2]
    assert routing.tokens.tolist() == [0, 1, 1, 2, 0, 2]
    assert routing.order[routing.inverse].tolist() == list(range(6))


def test_unknown_activation_is_named():
    x, weights, chosen, experts = make_case()
    with pytest.raises(ValueError, match="'relu'"):
        grouped_experts(x, weights, chosen, experts, "relu")


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("triton_path", [True, False])
def test_grouped_nf4_matmul_equals_one_product_per_expert(transposed, triton_path):
    """Odd widths (rows that start mid-byte and mid-block), an expert with more slots than one row tile, one with
    none; every expert's own NF4 weight and its double-quantized absmax."""
    gen = torch.Generator().manual_seed(4)
    n_out, n_in, counts = 37, 45, (3, 0, 19, 1)
    weights = [quantize_nf4(torch.randn(n_out, n_in, generator=gen) * (e + 1)) for e in range(len(counts))]
    x = torch.randn(sum(counts), n_out if transposed else n_in, generator=gen)
    routing = route(torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))[:, None], len(counts))
    close(grouped_matmul(x, weights, routing, triton_path, transposed),
          reference_grouped_matmul(x, weights, counts, transposed))
