"""Fused log-probs / cross-entropy / entropy vs the naive full-logits reference, outputs and all gradients.

CPU lane: fp32 inputs, references computed in fp64 from the same values, both the Triton kernels (run by the
interpreter, see conftest.py) and the chunked plain-torch path. Errors are measured norm-wise,
max|actual - expected| <= 1e-5 * max|expected|, because elementwise relative error is meaningless for the
many gradient entries that are close to zero.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qtune.kernels.logprobs import (
    VOCAB_CHUNK, cross_entropy_sum, reference_token_entropy, reference_token_logprobs, token_logprobs,
    token_logprobs_and_entropy,
)

KERNELS = ["torch", "triton"]
# (N, D, V, chunk_size): odd sizes; V=2500 spans three fp32 vocabulary splits of the kernel and
# V=VOCAB_CHUNK+4 a torch vocabulary chunk of 4 columns; chunk sizes split the tokens unevenly.
SHAPES = [(37, 40, 301, 1024), (70, 48, 2500, 16), (5, 16, VOCAB_CHUNK + 4, 3)]


def assert_rel_close(actual, expected, rtol=1e-5, what=""):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-30)
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:g} x max |expected| {scale:.3e}"


def make_inputs(N, D, V, seed=0, masked_every=3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen) * 0.5
    weight = torch.randn(V, D, generator=gen) * 0.5
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::masked_every] = -100  # masked rows, including the first
    return hidden, weight, targets


def grads(fn, hidden, weight, dtype=None):
    """fn(h, w) -> scalar; returns (value, dL/dh, dL/dw) evaluated at copies cast to `dtype`."""
    h = hidden.detach().to(dtype or hidden.dtype, copy=True).requires_grad_()
    w = weight.detach().to(dtype or weight.dtype, copy=True).requires_grad_()
    out = fn(h, w)
    out.backward()
    return out.detach(), h.grad, w.grad


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-D{}-V{}-chunk{}".format(*s))
def test_outputs_and_gradients_match_reference(shape, kernels):
    N, D, V, chunk = shape
    hidden, weight, targets = make_inputs(N, D, V)
    gen = torch.Generator().manual_seed(1)
    weight_logp, weight_entropy = torch.randn(N, generator=gen), torch.randn(N, generator=gen)

    logp, entropy = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=chunk, kernels=kernels)
    h64, w64 = hidden.double(), weight.double()
    assert logp.dtype == entropy.dtype == torch.float32
    assert_rel_close(logp, reference_token_logprobs(h64, w64, targets), what="logp")
    assert_rel_close(entropy, reference_token_entropy(h64, w64, targets), what="entropy")
    assert (logp[targets == -100] == 0).all() and (entropy[targets == -100] == 0).all()

    objectives = {  # name: (ours, reference), each (h, w) -> scalar
        "logp": (lambda h, w: (token_logprobs(h, w, targets, chunk_size=chunk, kernels=kernels) * weight_logp).sum(),
                 lambda h, w: (reference_token_logprobs(h, w, targets) * weight_logp.double()).sum()),
        "entropy": (lambda h, w: (token_logprobs_and_entropy(h, w, targets, chunk_size=chunk, kernels=kernels)[1]
                                  * weight_entropy).sum(),
                    lambda h, w: (reference_token_entropy(h, w, targets) * weight_entropy.double()).sum()),
        "cross_entropy_sum": (lambda h, w: cross_entropy_sum(h, w, targets, chunk_size=chunk, kernels=kernels)[0],
                              lambda h, w: F.cross_entropy(h @ w.T, targets, ignore_index=-100, reduction="sum")),
    }
    for name, (ours, reference) in objectives.items():
        value, grad_h, grad_w = grads(ours, hidden, weight)
        ref_value, ref_grad_h, ref_grad_w = grads(reference, hidden, weight, torch.float64)
        assert_rel_close(value, ref_value, what=f"{name} value")
        assert_rel_close(grad_h, ref_grad_h, what=f"{name} dL/dhidden")
        assert_rel_close(grad_w, ref_grad_w, what=f"{name} dL/dweight")


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "N{}-D{}-V{}-chunk{}".format(*s))
def test_soft_capped_logits_match_reference(shape, kernels):
    """Gemma 2's final-logit soft-capping c = cap · tanh(z / cap) inside the fused ops: outputs and gradients
    against the capped full-logits reference, which differs clearly from the uncapped one."""
    N, D, V, chunk = shape
    cap = 1.5  # the random logits reach about ±10 here, so tanh bends most of them
    hidden, weight, targets = make_inputs(N, D, V, seed=2)
    gen = torch.Generator().manual_seed(3)
    weight_logp, weight_entropy = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    h64, w64 = hidden.double(), weight.double()
    logp, entropy = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=chunk, kernels=kernels, softcap=cap)
    assert_rel_close(logp, reference_token_logprobs(h64, w64, targets, softcap=cap), what="logp")
    assert_rel_close(entropy, reference_token_entropy(h64, w64, targets, softcap=cap), what="entropy")
    assert (logp - reference_token_logprobs(h64, w64, targets)).abs().max() > 1.0

    def ours(h, w):
        lp, ent = token_logprobs_and_entropy(h, w, targets, chunk_size=chunk, kernels=kernels, softcap=cap)
        return (lp * weight_logp).sum() + (ent * weight_entropy).sum()

    def reference(h, w):
        return ((reference_token_logprobs(h, w, targets, softcap=cap) * weight_logp.double()).sum()
                + (reference_token_entropy(h, w, targets, softcap=cap) * weight_entropy.double()).sum())

    def ce_reference(h, w):
        return F.cross_entropy(torch.tanh(h @ w.T / cap) * cap, targets, ignore_index=-100, reduction="sum")

    for name, mine, ref in (("logp + entropy", ours, reference), ("cross_entropy_sum", lambda h, w: cross_entropy_sum(
            h, w, targets, chunk_size=chunk, kernels=kernels, softcap=cap)[0], ce_reference)):
        value, grad_h, grad_w = grads(mine, hidden, weight)
        ref_value, ref_grad_h, ref_grad_w = grads(ref, hidden, weight, torch.float64)
        assert_rel_close(value, ref_value, what=f"{name} value")
        assert_rel_close(grad_h, ref_grad_h, what=f"{name} dL/dhidden")
        assert_rel_close(grad_w, ref_grad_w, what=f"{name} dL/dweight")
    # a frozen weight (QLoRA's lm_head): on the torch path the one-pass cross-entropy, dL/dh weighted by dc/dz
    # during the forward (two products per logit tile, none in backward)
    h = hidden.clone().requires_grad_()
    with CountMatmuls() as forward:
        loss = cross_entropy_sum(h, weight, targets, chunk_size=chunk, kernels=kernels, softcap=cap)[0]
    with CountMatmuls() as backward:
        (0.37 * loss).backward()
    if kernels == "torch":
        assert forward.count == 2 * -(-V // VOCAB_CHUNK) * -(-N // chunk) and backward.count == 0
    assert_rel_close(loss, ce_reference(h64, w64), what="frozen-weight loss")
    assert_rel_close(h.grad, 0.37 * grads(ce_reference, hidden, weight, torch.float64)[1],
                     what="frozen-weight dL/dhidden")
    assert not h.grad[targets == -100].any()


def test_temperature_on_capped_logits_is_a_rescaled_cap():
    """PPO samples from capped logits / T: with h / T and cap / T the op computes exactly that
    ((cap / T) tanh((z / T) / (cap / T)) = cap tanh(z / cap) / T), which train/ppo.py relies on."""
    hidden, weight, targets = make_inputs(9, 16, 50, seed=4)
    cap, temperature = 2.0, 0.7
    want = torch.log_softmax(torch.tanh(hidden.double() @ weight.double().T / cap) * cap / temperature, -1)
    want = torch.where(targets != -100, want.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    got = token_logprobs(hidden / temperature, weight, targets, kernels="torch", softcap=cap / temperature)
    assert_rel_close(got, want, what="logp at temperature")


@pytest.mark.parametrize("kernels", KERNELS)
def test_cross_entropy_count_and_all_masked_batch(kernels):
    hidden, weight, targets = make_inputs(9, 16, 50)
    _, count = cross_entropy_sum(hidden, weight, targets, kernels=kernels)
    assert count.item() == 6  # rows 0, 3, 6 are masked

    targets = torch.full((9,), -100)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, count = cross_entropy_sum(h, w, targets, kernels=kernels)
    logp, entropy = token_logprobs_and_entropy(h, w, targets, kernels=kernels)
    assert loss.item() == 0.0 and count.item() == 0
    assert not logp.any() and not entropy.any()
    (loss + logp.sum() + entropy.sum()).backward()
    assert h.grad is not None and not h.grad.any() and w.grad is not None and not w.grad.any()


@pytest.mark.parametrize("kernels", KERNELS)
def test_leading_dims_and_frozen_weight(kernels):
    """(B, T, D) hidden states give (B, T) outputs; a frozen lm_head (QLoRA) gets no gradient."""
    hidden, weight, targets = make_inputs(12, 24, 70)
    h = hidden.reshape(3, 4, 24).clone().requires_grad_()
    logp = token_logprobs(h, weight, targets.reshape(3, 4), kernels=kernels)
    assert logp.shape == (3, 4)
    assert_rel_close(logp.reshape(-1), reference_token_logprobs(hidden.double(), weight.double(), targets))
    logp.sum().backward()
    ref_h = hidden.double().requires_grad_()
    reference_token_logprobs(ref_h, weight.double(), targets).sum().backward()
    assert_rel_close(h.grad.reshape(12, 24), ref_h.grad, what="dL/dhidden")


INTERPRETER_BF16 = pytest.mark.skip(reason="Triton 3.9's interpreter multiplies bf16 dot operands as raw uint16 "
                                          "bits; the GPU lane covers bf16 kernels")


@pytest.mark.parametrize("kernels, dtype", [("torch", torch.bfloat16), ("torch", torch.float16),
                                            ("triton", torch.float16),
                                            pytest.param("triton", torch.bfloat16, marks=INTERPRETER_BF16)])
def test_16bit_inputs_accumulate_in_fp32(kernels, dtype):
    """16-bit hidden and weight: the logits are summed in fp32, so outputs match fp64 on the same 16-bit
    values to fp32 accuracy, far below the inputs' own rounding (4e-3 for bf16)."""
    hidden, weight, targets = make_inputs(21, 32, 200)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    logp, entropy = token_logprobs_and_entropy(hidden, weight, targets, kernels=kernels)
    assert_rel_close(logp, reference_token_logprobs(hidden.double(), weight.double(), targets), what="logp")
    assert_rel_close(entropy, reference_token_entropy(hidden.double(), weight.double(), targets), what="entropy")


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op (forward or backward) returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_torch_path_never_holds_full_logits():
    N, D, V, chunk = 512, 8, 3 * VOCAB_CHUNK, 64
    hidden, weight, targets = make_inputs(N, D, V)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    with LargestTensor() as mode:
        loss, _ = cross_entropy_sum(h, w, targets, chunk_size=chunk, kernels="torch")
        loss.backward()
    # the (chunk, VOCAB_CHUNK) logit tile and the (V, D) weight gradient are the largest tensors, not (N, V)
    assert mode.largest == max(chunk * VOCAB_CHUNK, V * D) < N * V // 4


class CountMatmuls(TorchDispatchMode):
    """Counts matrix products (mm, addmm and their in-place forms, oneDNN's linear) run while active."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_,
                                   torch.ops.mkldnn._linear_pointwise):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-D{}-V{}-chunk{}".format(*s))
def test_cross_entropy_frozen_weight_gradient_in_one_pass(shape):
    """A frozen weight on the torch path: dL/dh comes from the forward walk (two matmuls per logit tile,
    none in backward) and equals the fp64 full-logits reference, masked rows included."""
    N, D, V, chunk = shape
    hidden, weight, targets = make_inputs(N, D, V)
    h = hidden.clone().requires_grad_()
    with CountMatmuls() as forward:
        loss, count = cross_entropy_sum(h, weight, targets, chunk_size=chunk, kernels="torch")
    with CountMatmuls() as backward:
        (0.37 * loss).backward()
    tiles = -(-V // VOCAB_CHUNK) * -(-N // chunk)
    assert forward.count == 2 * tiles and backward.count == 0
    h64 = hidden.double().requires_grad_()
    reference = F.cross_entropy(h64 @ weight.double().T, targets, ignore_index=-100, reduction="sum")
    (0.37 * reference).backward()
    assert count.item() == (targets != -100).sum().item()
    assert_rel_close(loss, reference, what="loss")
    assert_rel_close(h.grad, h64.grad, what="dL/dhidden")
    assert not h.grad[targets == -100].any()


def test_cross_entropy_one_pass_holds_no_full_logits_and_matches_the_two_pass_path():
    N, D, V, chunk = 512, 8, 3 * VOCAB_CHUNK, 64
    hidden, weight, targets = make_inputs(N, D, V)
    h = hidden.clone().requires_grad_()
    with LargestTensor() as mode:
        loss, _ = cross_entropy_sum(h, weight, targets, chunk_size=chunk, kernels="torch")
        loss.backward()
    assert mode.largest == chunk * VOCAB_CHUNK < N * V // 4  # one logit tile, never (N, V)
    h2 = hidden.clone().requires_grad_()
    (-token_logprobs(h2, weight, targets, chunk_size=chunk, kernels="torch").sum()).backward()  # recomputing path
    assert_rel_close(h.grad, h2.grad, what="one pass vs recomputing backward")


def test_bad_inputs_are_explained():
    hidden, weight, targets = make_inputs(4, 8, 10)
    with pytest.raises(ValueError, match="target 10 at position"):
        token_logprobs(hidden, weight, torch.tensor([1, 2, 10, -100]))
    with pytest.raises(ValueError, match="must match hidden"):
        token_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match="cast one so they match"):
        token_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="kernels="):
        token_logprobs(hidden, weight, targets, kernels="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("V", [32000, 128256])
def test_gpu_bf16_error_within_twice_torch_bf16(V):
    """Llama sizes in bf16: the Triton path's error against fp32 is at most 2x the naive bf16 torch error."""
    N, D = 1024, 4096
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(N, D, device="cuda", generator=gen)
    weight = torch.randn(V, D, device="cuda", generator=gen) * D**-0.5
    targets = torch.randint(0, V, (N,), device="cuda", generator=gen)
    targets[:100] = -100

    def naive(h, w):
        return (reference_token_logprobs(h, w, targets).float() + reference_token_entropy(h, w, targets).float()).sum()

    def fused(h, w):
        logp, entropy = token_logprobs_and_entropy(h, w, targets, chunk_size=512, kernels="triton")
        return (logp + entropy).sum()

    exact = grads(naive, hidden, weight)
    torch_bf16 = grads(naive, hidden, weight, torch.bfloat16)
    ours = grads(fused, hidden, weight, torch.bfloat16)
    for name, e, t, o in zip(("value", "dL/dhidden", "dL/dweight"), exact, torch_bf16, ours):
        torch_err = (t.float() - e).abs().max().item()
        our_err = (o.float() - e).abs().max().item()
        assert our_err <= 2 * torch_err, f"{name}: error {our_err:.3e} vs torch bf16 {torch_err:.3e}"


@pytest.mark.parametrize("kernels, dtype", [("torch", torch.bfloat16), ("torch", torch.float16),
                                            ("triton", torch.float16)])
def test_autocast_computes_in_its_dtype_like_explicitly_cast_inputs(kernels, dtype):
    """fp32 hidden and weight under torch.autocast(dtype): the same outputs and gradients (returned in fp32)
    as inputs cast to `dtype` by hand, so every product inside runs in one explicit dtype."""
    hidden, weight, targets = make_inputs(21, 32, 200)

    def loss(h, w):
        logp, entropy = token_logprobs_and_entropy(h, w, targets, chunk_size=8, kernels=kernels)
        ce, _ = cross_entropy_sum(h, w.detach(), targets, chunk_size=8, kernels=kernels)
        return (logp * 0.3 + entropy).sum() + ce

    with torch.autocast("cpu", dtype=dtype):
        value, grad_h, grad_w = grads(loss, hidden, weight)
    cast_value, cast_h, cast_w = grads(loss, hidden, weight, dtype)
    assert grad_h.dtype == grad_w.dtype == torch.float32
    assert_rel_close(value, cast_value, what="value")
    assert_rel_close(grad_h, cast_h.float(), rtol=1e-2, what="dL/dh")  # cast_h carries one 16-bit rounding
    assert_rel_close(grad_w, cast_w.float(), rtol=1e-2, what="dL/dw")


def fp64_grads(hidden, weight, targets, upstream):
    """dL/dh and dL/dW of L = sum(upstream · logp) in fp64 from the same (16-bit) values."""
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    (reference_token_logprobs(h, w, targets) * upstream.double()).sum().backward()
    return h.grad, w.grad


def test_trained_lm_head_gradient_sums_chunks_in_fp32():
    """256 chunks of one token each in fp16: dL/dW is summed in fp32 and rounded once, so it stays within one
    fp16 rounding of the fp64 sum (a 16-bit running sum, rounded once per chunk, erred 4.5e-3)."""
    hidden, weight, targets = make_inputs(256, 32, 300, masked_every=1000)
    hidden, weight = hidden.half(), weight.half()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (token_logprobs(h, w, targets, chunk_size=1, kernels="triton")).sum().backward()
    _, ref_w = fp64_grads(hidden, weight, targets, torch.ones(256))
    assert_rel_close(w.grad, ref_w, rtol=1e-3, what="dL/dW")


def test_fp16_logit_gradients_do_not_underflow():
    """A loss averaged over 10^4 tokens gives per-token upstream gradients ~1e-4 and, over a 32000-word
    vocabulary, logit gradients g · p ~ 3e-9: below fp16's smallest normal (6e-5) and subnormal (6e-8). dL/dh
    must still be exact to fp16 accuracy (unscaled 16-bit logit gradients erred 11%)."""
    hidden, weight, targets = make_inputs(24, 32, 32000)
    hidden, weight = hidden.half(), weight.half()
    upstream = torch.full((24,), 1e-4)
    h = hidden.clone().requires_grad_()
    (token_logprobs(h, weight, targets, kernels="triton") * upstream).sum().backward()
    ref_h, _ = fp64_grads(hidden, weight, targets, upstream)
    assert_rel_close(h.grad, ref_h, rtol=1e-3, what="dL/dh")


class NewTensorsOfSize(TorchDispatchMode):
    """Counts buffers of `numel` elements that ops allocate (outputs sharing no input's storage)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() == self.numel and t.untyped_storage().data_ptr() not in inputs:
                self.count += 1
        return out


def test_cross_entropy_one_pass_holds_one_token_by_hidden_buffer():
    """The one-pass loss keeps a single (N, D) fp32 buffer: the forward gathers the target rows of the lm_head
    chunk by chunk (not all N at once) and the backward scales the gradient in place (no second copy)."""
    N, D, V, chunk = 512, 8, 3 * VOCAB_CHUNK, 64
    hidden, weight, targets = make_inputs(N, D, V)
    h = hidden.clone().requires_grad_()
    with NewTensorsOfSize(N * D) as forward:
        loss, _ = cross_entropy_sum(h, weight, targets, chunk_size=chunk, kernels="torch")
    with NewTensorsOfSize(N * D) as backward:
        (0.5 * loss).backward()
    assert forward.count == 1 and backward.count == 0
