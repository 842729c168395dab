"""The grouped mixture-of-experts op vs its plain-autograd reference: output, input gradient and routing-weight
gradient, dense and NF4 experts, SwiGLU and GeGLU, odd shapes, an expert no token chooses, and a checkpointed
call (whose recomputation skips the down products). The Triton route runs its gated kernels in the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1)."""

import pytest
import torch
import torch.utils.checkpoint

from qtune.kernels.experts import grouped_experts, reference_grouped_experts, route
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
