"""QLoRA linear, QKV and SwiGLU MLP ops vs plain-autograd references: outputs and every gradient.

The CPU lane runs the Triton kernels in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
and the plain-torch path, fp32, small odd shapes. The dropout mask the op drew is reproduced from the
seed it took from torch's default generator and handed to the reference.
"""

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from qtune.kernels import gated, lora
from qtune.kernels.lora import LoraParams, lora_linear, lora_mlp, lora_qkv
from qtune.weights.nf4 import quantize_nf4

KERNELS = ("triton", "torch")
SEED = 1234  # torch.manual_seed before each op call, so the op's dropout seed can be drawn again


def close(actual, expected, rtol=1e-5):
    """fp32 agreement: relative 1e-5 with an absolute floor at 1e-5 of the tensor's scale."""
    assert actual is not None and expected is not None
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item() + 1e-12)


def make_params(out_features, in_features, rank=5, bias=False, adapter=True, nf4=False, scale=0.75):
    """A frozen base (dense or NF4) with a trainable adapter whose B is non-zero (so dA is non-zero)."""
    w = torch.randn(out_features, in_features) / in_features**0.5
    weight = quantize_nf4(w) if nf4 else w
    b = torch.randn(out_features) if bias else None
    if not adapter:
        return LoraParams(weight, b, None, None, scale)
    a = (torch.randn(rank, in_features) / in_features**0.5).requires_grad_()
    b_lora = (torch.randn(out_features, rank) / rank**0.5).requires_grad_()
    return LoraParams(weight, b, a, b_lora, scale)


def drawn_masks(kernels, shapes, p):
    """The keep masks the op drew after torch.manual_seed(SEED): projection i uses seed + i."""
    if p == 0.0:
        return [None] * len(shapes)
    torch.manual_seed(SEED)
    seed = lora.new_dropout_seed()
    return [lora.dropout_keep_mask(seed + i, shape, p, "cpu", kernels) for i, shape in enumerate(shapes)]


def grads(outputs, tensors):
    """Gradients of a fixed random projection of the outputs w.r.t. tensors (None where unused)."""
    gen = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outputs)
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def adapters(*params):
    return [t for p in params for t in (p.lora_a, p.lora_b) if t is not None]


def check_same(fused_out, ref_out, inputs):
    for a, e in zip(fused_out, ref_out):
        close(a, e)
    for a, e in zip(grads(fused_out, inputs), grads(ref_out, inputs)):
        close(a, e)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("nf4", [False, True])
def test_lora_linear_matches_reference(kernels, dropout, bias, nf4):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 19, requires_grad=True)  # (B, T, in)
    p = make_params(23, 19, bias=bias, nf4=nf4)
    torch.manual_seed(SEED)
    y = lora_linear(x, *p._replace(dropout=dropout), kernels=kernels)
    (mask,) = drawn_masks(kernels, [x.shape], dropout)
    y_ref = lora.reference_lora_linear(x, *p._replace(dropout=dropout), keep_mask=mask)
    assert y.shape == (2, 7, 23)
    check_same([y], [y_ref], [x, p.lora_a, p.lora_b])


@pytest.mark.parametrize("kernels", KERNELS)
def test_lora_linear_eval_has_no_dropout(kernels):
    torch.manual_seed(0)
    x = torch.randn(9, 19, requires_grad=True)
    p = make_params(11, 19)
    y = lora_linear(x, *p._replace(dropout=0.5), training=False, kernels=kernels)
    y_ref = lora.reference_lora_linear(x, *p._replace(dropout=0.5), training=False)
    check_same([y], [y_ref], [x, p.lora_a, p.lora_b])


@pytest.mark.parametrize("kernels", KERNELS)
def test_lora_linear_without_adapter_or_input_grad(kernels):
    torch.manual_seed(0)
    x = torch.randn(9, 19, requires_grad=True)
    p = make_params(11, 19, bias=True, adapter=False)
    y = lora_linear(x, *p, kernels=kernels)
    check_same([y], [F.linear(x, p.weight, p.bias)], [x])
    # x without grad (e.g. the first layer over frozen embeddings): only the adapters get gradients.
    p = make_params(11, 19)
    x = x.detach()
    torch.manual_seed(SEED)
    y = lora_linear(x, *p._replace(dropout=0.2), kernels=kernels)
    (mask,) = drawn_masks(kernels, [x.shape], 0.2)
    check_same([y], [lora.reference_lora_linear(x, *p._replace(dropout=0.2), keep_mask=mask)], [p.lora_a, p.lora_b])


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("nf4", [False, True])
def test_lora_qkv_matches_reference(kernels, dropout, nf4):
    """Qwen2-like: biased q/k/v, grouped k/v narrower than q, and k without an adapter."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 21, requires_grad=True)  # (B, T, D)
    q = make_params(24, 21, bias=True, nf4=nf4)
    k = make_params(10, 21, bias=True, nf4=nf4, adapter=False)
    v = make_params(10, 21, bias=True, nf4=nf4, scale=2.0)
    torch.manual_seed(SEED)
    out = lora_qkv(x, q, k, v, dropout=dropout, kernels=kernels)
    masks = drawn_masks(kernels, [x.shape] * 3, dropout)
    ref = lora.reference_lora_qkv(x, q, k, v, dropout=dropout, keep_masks=masks)
    assert [o.shape for o in out] == [(3, 5, 24), (3, 5, 10), (3, 5, 10)]
    check_same(out, ref, [x, *adapters(q, k, v)])


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_lora_mlp_matches_reference(kernels, dropout, nf4, activation):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 19, requires_grad=True)  # (B, T, H)
    gate, up, down = make_params(37, 19, nf4=nf4), make_params(37, 19, nf4=nf4), make_params(19, 37, nf4=nf4)
    torch.manual_seed(SEED)
    out = lora_mlp(x, gate, up, down, dropout=dropout, kernels=kernels, activation=activation)
    masks = drawn_masks(kernels, [x.shape, x.shape, (14, 37)], dropout)
    masks[2] = None if masks[2] is None else masks[2].view(2, 7, 37)
    ref = lora.reference_lora_mlp(x, gate, up, down, dropout=dropout, keep_masks=masks, activation=activation)
    check_same([out], [ref], [x, *adapters(gate, up, down)])


def per_projection_masks(kernels, shapes, ps):
    """The keep masks drawn after torch.manual_seed(SEED) when projection i drops with its own ps[i]."""
    torch.manual_seed(SEED)
    seed = lora.new_dropout_seed()
    return [None if p == 0.0 else lora.dropout_keep_mask(seed + i, shape, p, "cpu", kernels)
            for i, (shape, p) in enumerate(zip(shapes, ps))]


@pytest.mark.parametrize("kernels", KERNELS)
def test_each_projection_drops_with_its_own_p(kernels):
    """dropout=None: projection i uses its LoraParams.dropout (0, 0.1, 0.3 here) with mask seed + i."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 19, requires_grad=True)  # (B, T, D)
    ps = (0.0, 0.1, 0.3)
    q, k, v = (make_params(out, 19)._replace(dropout=p) for out, p in zip((24, 10, 10), ps))
    torch.manual_seed(SEED)
    out = lora_qkv(x, q, k, v, kernels=kernels)
    ref = lora.reference_lora_qkv(x, q, k, v, keep_masks=per_projection_masks(kernels, [x.shape] * 3, ps))
    check_same(out, ref, [x, *adapters(q, k, v)])

    ps = (0.3, 0.0, 0.1)  # gate, up, down
    gate, up, down = (make_params(o, i)._replace(dropout=p) for (o, i), p in zip(((37, 19), (37, 19), (19, 37)), ps))
    torch.manual_seed(SEED)
    out = lora_mlp(x, gate, up, down, kernels=kernels)
    masks = per_projection_masks(kernels, [x.shape, x.shape, (14, 37)], ps)
    masks[2] = masks[2].view(2, 7, 37)
    ref = lora.reference_lora_mlp(x, gate, up, down, keep_masks=masks)
    check_same([out], [ref], [x, *adapters(gate, up, down)])


@pytest.mark.parametrize("kernels", KERNELS)
def test_lora_mlp_partial_adapters_and_eval(kernels):
    torch.manual_seed(0)
    x = torch.randn(13, 19, requires_grad=True)
    gate, up, down = make_params(37, 19), make_params(37, 19, adapter=False), make_params(19, 37, adapter=False)
    out = lora_mlp(x, gate, up, down, dropout=0.3, training=False, kernels=kernels)
    ref = lora.reference_lora_mlp(x, gate, up, down, dropout=0.3, training=False)
    check_same([out], [ref], [x, *adapters(gate, up, down)])


@pytest.mark.parametrize("kernels", KERNELS)
def test_activation_checkpointing_replays_the_same_dropout(kernels):
    """torch.utils.checkpoint restores the RNG state before recomputing, so the op redraws its seed."""
    torch.manual_seed(0)
    x = torch.randn(11, 19, requires_grad=True)
    gate, up, down = make_params(37, 19), make_params(37, 19), make_params(19, 37)
    tensors = [x, *adapters(gate, up, down)]
    torch.manual_seed(SEED)
    plain = grads([lora_mlp(x, gate, up, down, dropout=0.2, kernels=kernels)], tensors)
    torch.manual_seed(SEED)
    out = torch.utils.checkpoint.checkpoint(lora_mlp, x, gate, up, down, 0.2, kernels=kernels, use_reentrant=False)
    for a, e in zip(grads([out], tensors), plain):
        close(a, e)


def test_lora_mlp_matches_peft_on_transformers_llama_mlp():
    """Independent reference: peft's LoRA layers injected into transformers' LlamaMLP."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=19, intermediate_size=37, num_attention_heads=1, head_dim=2,
                                 hidden_act="silu"))
    config = peft.LoraConfig(r=4, lora_alpha=6, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"])
    mlp = peft.inject_adapter_in_model(config, mlp)
    names = ("gate_proj", "up_proj", "down_proj")
    for name in names:
        torch.nn.init.normal_(getattr(mlp, name).lora_B["default"].weight)
    x = torch.randn(2, 5, 19, requires_grad=True)

    def params(name):
        layer = getattr(mlp, name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        return LoraParams(layer.base_layer.weight.detach(), None, a, b, layer.scaling["default"])

    ours = lora_mlp(x, *(params(n) for n in names), kernels="triton")
    tensors = [x, *adapters(*(params(n) for n in names))]
    check_same([ours], [mlp(x)], tensors)


@pytest.mark.parametrize("kernels", KERNELS)
def test_dropout_mask_rate_scale_and_independence(kernels):
    p, shape = 0.1, (201, 199)
    keep = lora.dropout_keep_mask(5, shape, p, "cpu", kernels)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.0075  # 40k draws: 5 sigma is 0.0075
    assert torch.equal(keep, lora.dropout_keep_mask(5, shape, p, "cpu", kernels))
    other = lora.dropout_keep_mask(6, shape, p, "cpu", kernels)
    assert abs((keep != other).float().mean().item() - 2 * p * (1 - p)) < 0.0075  # independent masks
    x = torch.randn(shape)
    close(lora.lora_dropout(x, 5, p, kernels == "triton"), x * keep / (1 - p))


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_gated_activation_kernels_match_autograd(activation):
    """SwiGLU and GeGLU (Gemma's MLP): torch's own activation through autograd is the reference."""
    torch.manual_seed(0)
    g, u, dh = (torch.randn(7, 131) * 3 for _ in range(3))
    g.requires_grad_(), u.requires_grad_()
    h = (F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")) * u
    dg_ref, du_ref = torch.autograd.grad(h, (g, u), dh)
    g, u = g.detach(), u.detach()
    close(gated.GATED[activation][1](dh, g, u)[0], dg_ref)
    for triton_path in (True, False):
        close(gated.gated(g, u, activation, triton_path), h.detach())
        dg, du = gated.gated_backward_inplace(dh.clone(), g, u, activation, triton_path)
        close(dg, dg_ref)
        close(du, du_ref)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_gated_halves_of_a_fused_projection_match_autograd(kernels, activation):
    """Phi-3's gate_up output gu = [g | u] (odd widths, a 3-d batch): output and dgu equal torch's activation on
    the two halves through autograd, and only gu is saved."""
    torch.manual_seed(1)
    gu = (torch.randn(2, 5, 2 * 67) * 3).requires_grad_()
    dh = torch.randn(2, 5, 67)
    g, u = gu.chunk(2, dim=-1)
    expected = (F.silu(g) if activation == "silu" else F.gelu(g, approximate="tanh")) * u
    (dgu_ref,) = torch.autograd.grad(expected, gu, dh)
    shapes = saved_shapes(lambda: gated.gated_halves(gu, activation, kernels))
    h = gated.gated_halves(gu, activation, kernels)
    (dgu,) = torch.autograd.grad(h, gu, dh)
    close(h, expected.detach())
    close(dgu, dgu_ref)
    close(gated.reference_gated_halves(gu.detach(), activation), expected.detach())
    assert shapes == [(2, 5, 134)]
    with pytest.raises(ValueError, match="must be even"):
        gated.gated_halves(gu[..., 1:], activation, kernels)


def saved_shapes(fn):
    """Shapes of the tensors autograd saves for backward while running fn()."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_lora_mlp_saves_only_x_g_u_and_rank_sized_tensors():
    torch.manual_seed(0)
    x = torch.randn(13, 19, requires_grad=True)
    gate, up, down = make_params(37, 19, rank=3), make_params(37, 19, rank=3), make_params(19, 37, rank=3)
    shapes = saved_shapes(lambda: lora_mlp(x, gate, up, down, dropout=0.1, kernels="triton"))
    big = sorted(s for s in shapes if s[0] == 13 and s[1] > 3)
    assert big == [(13, 19), (13, 37), (13, 37)]  # x, g, u; the rest is (13, 3) or adapter-sized
    assert sorted(s for s in shapes if s[0] == 13 and s[1] == 3) == [(13, 3)] * 3


def test_bad_arguments_are_named():
    x = torch.randn(4, 19)
    p = make_params(11, 19)
    with pytest.raises(ValueError, match="dropout=1.5"):
        lora_linear(x, *p._replace(dropout=1.5))
    with pytest.raises(ValueError, match="input has 18 features"):
        lora_linear(x[:, :18], *p)
    with pytest.raises(ValueError, match="only one of lora_a / lora_b"):
        lora_linear(x, p.weight, None, p.lora_a, None, 1.0)
    with pytest.raises(ValueError, match="up.lora_a"):
        lora_mlp(x, make_params(37, 19), make_params(37, 19)._replace(lora_a=torch.zeros(5, 18)), make_params(19, 37))
    with pytest.raises(ValueError, match="requires_grad_"):
        lora_qkv(x, p, p._replace(weight=p.weight.clone().requires_grad_()), p)
    with pytest.raises(ValueError, match="kernels='cuda'"):
        lora_linear(x, *p, kernels="cuda")


def gpu_errors(fn, blocks, x32, dtype, dense):
    """Output(s) and every gradient of fn(x, *blocks) in `dtype`, as fp32; NF4 bases dequantized if dense."""
    if dense:
        blocks = [p._replace(weight=lora.dense_weight(p.weight, torch.float32)) for p in blocks]
    x = x32.to(dtype).requires_grad_()
    out = fn(x, *blocks)
    outs = [o.float() for o in (out if isinstance(out, tuple) else (out,))]
    return outs + [g.float() for g in grads(outs, [x, *adapters(*blocks)])]


def check_bf16_within_2x_of_torch(fused, reference, blocks, x32):
    """The fused op in bf16 on NF4 bases errs at most 2x torch's bf16 error against fp32."""
    exact = gpu_errors(reference, blocks, x32, torch.float32, dense=True)
    torch_bf16 = gpu_errors(reference, blocks, x32, torch.bfloat16, dense=True)
    fused_bf16 = gpu_errors(fused, blocks, x32, torch.bfloat16, dense=False)
    for e, t, f in zip(exact, torch_bf16, fused_bf16):
        assert (f - e).norm() <= 2 * (t - e).norm() + 1e-6 * e.norm()


def to_cuda(p: LoraParams) -> LoraParams:
    cuda = lambda t: None if t is None else t.detach().cuda().requires_grad_(t.requires_grad)  # noqa: E731
    return LoraParams(quantize_nf4(p.weight.cuda()), cuda(p.bias), cuda(p.lora_a), cuda(p.lora_b), p.scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_mlp_bf16_on_gpu_real_sizes():
    torch.manual_seed(0)
    hidden, inter, rank, tokens = 4096, 11008, 16, 1024
    blocks = [to_cuda(make_params(o, i, rank)) for o, i in ((inter, hidden), (inter, hidden), (hidden, inter))]
    x32 = torch.randn(tokens, hidden, device="cuda")
    check_bf16_within_2x_of_torch(lambda x, *ps: lora_mlp(x, *ps, kernels="triton"), lora.reference_lora_mlp,
                                  blocks, x32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_qkv_bf16_on_gpu_real_sizes():
    """Qwen2-7B-like attention input: biased q/k/v, 4 KV heads, k without an adapter; also decode-sized."""
    torch.manual_seed(0)
    hidden, kv, rank = 3584, 512, 16
    blocks = [to_cuda(make_params(hidden, hidden, rank, bias=True)),
              to_cuda(make_params(kv, hidden, rank, bias=True, adapter=False)),
              to_cuda(make_params(kv, hidden, rank, bias=True))]
    for tokens in (2048, 7):  # 7 rows take nf4_matmul's fused 4-bit kernel in the forward
        x32 = torch.randn(tokens, hidden, device="cuda")
        check_bf16_within_2x_of_torch(lambda x, *ps: lora_qkv(x, *ps, kernels="triton"), lora.reference_lora_qkv,
                                      blocks, x32)


def bf16_close(actual, expected):
    """Agreement at bf16 precision: the two sides round their products in different orders."""
    assert actual is not None and expected is not None
    torch.testing.assert_close(actual.float(), expected.float(), rtol=3e-2, atol=3e-2 * expected.abs().max().item())


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("op", ["lora_linear", "lora_mlp"])
def test_fp32_inputs_under_bf16_autocast_match_autocast_reference(op, nf4, kernels):
    """fp32 activations and adapters under torch.autocast(bfloat16): the ops compute in bf16 like the plain
    autograd reference under the same autocast (they used to fail in addmm_ with mixed dtypes)."""
    torch.manual_seed(0)
    x = torch.randn(2, 40, 19, requires_grad=True)  # 80 rows: NF4 takes the dequantize path (interpreter-safe)
    if op == "lora_linear":
        p = make_params(23, 19, bias=True, nf4=nf4)
        blocks, inputs = [p], [x, p.lora_a, p.lora_b]
        fused = lambda: lora_linear(x, *p, kernels=kernels)  # noqa: E731
        reference = lambda: lora.reference_lora_linear(x, *p)  # noqa: E731
    else:
        blocks = [make_params(37, 19, nf4=nf4), make_params(37, 19, nf4=nf4), make_params(19, 37, nf4=nf4)]
        inputs = [x, *adapters(*blocks)]
        fused = lambda: lora_mlp(x, *blocks, kernels=kernels)  # noqa: E731
        reference = lambda: lora.reference_lora_mlp(x, *blocks)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = fused(), reference()
        assert out.dtype == ref.dtype == torch.bfloat16
        out_grads, ref_grads = grads([out.float()], inputs), grads([ref.float()], inputs)
    bf16_close(out, ref)
    for a, e, t in zip(out_grads, ref_grads, inputs):
        assert a.dtype == t.dtype  # fp32 leaves get fp32 gradients
        bf16_close(a, e)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpoint_without_rng_state_recomputes_exactly_with_explicit_seed(kernels, reentrant):
    """checkpoint(preserve_rng_state=False): the recomputation draws other random numbers, so an op given
    `seed` must drop with seed + i in forward and recomputation alike; outputs and every gradient equal the
    reference run with the masks of that seed."""
    torch.manual_seed(0)
    x = torch.randn(11, 19, requires_grad=True)
    gate, up, down = make_params(37, 19), make_params(37, 19), make_params(19, 37)
    q, k, v = make_params(24, 19), make_params(10, 19), make_params(10, 19)
    seed = 77

    def block(h):
        qo, ko, vo = lora_qkv(h, q, k, v, dropout=0.2, kernels=kernels, seed=seed)
        return lora_mlp(h, gate, up, down, dropout=0.2, kernels=kernels, seed=seed + 3) + qo[:, :19] * ko.sum()

    out = torch.utils.checkpoint.checkpoint(block, x, preserve_rng_state=False, use_reentrant=reentrant)
    keep = [lora.dropout_keep_mask(seed + i, s, 0.2, "cpu", kernels)
            for i, s in enumerate([x.shape] * 5 + [(11, 37)])]
    qr, kr, vr = lora.reference_lora_qkv(x, q, k, v, dropout=0.2, keep_masks=keep[:3])
    ref = lora.reference_lora_mlp(x, gate, up, down, dropout=0.2, keep_masks=keep[3:]) + qr[:, :19] * kr.sum()
    close(out, ref)
    tensors = [x, *adapters(gate, up, down, q, k)]  # v's output is unused: its adapter gets no gradient
    direction = torch.randn(out.shape)
    found, expected = [], []
    for result, into in ((out, found), (ref, expected)):
        (result * direction).sum().backward()  # .backward, not autograd.grad: the reentrant checkpoint needs it
        into += [t.grad.clone() for t in tensors]
        for t in tensors:
            t.grad = None
    for a, e in zip(found, expected):
        close(a, e)


def test_seed_out_of_range_is_named():
    p = make_params(11, 19)
    with pytest.raises(ValueError, match="seed=-1"):
        lora_linear(torch.randn(4, 19), *p._replace(dropout=0.1), seed=-1)
