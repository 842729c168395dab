"""The GPU lane: the CPU kernel tests mirrored on a CUDA device with compiled Triton kernels, two training steps
of tiny Llama- and Qwen2-shaped NF4 + LoRA models (Triton vs torch), greedy decoding (CUDA vs CPU fp32) and an
SFT, reward and DPO step through the CLI.

Every test is marked `gpu`; tests/conftest.py skips them, saying why, where no CUDA device is present (and only
there sets TRITON_INTERPRET=1, so here the kernels compile). 16-bit results are held to the house rule: error
against an fp32 reference within 2x of torch's own error in the same dtype. Test ids name what is compared.
"""

import json
import math

import pytest
import torch
import torch.utils.checkpoint

from qtune.kernels import lora
from qtune.kernels.lora import LoraParams, lora_linear, lora_mlp, lora_qkv
from qtune.kernels.logprobs import (
    cross_entropy_sum, reference_token_entropy, reference_token_logprobs, token_logprobs_and_entropy,
)
from qtune.kernels.nf4 import dequantize_nf4, nf4_matmul, reference_dequantize_nf4, reference_nf4_matmul
from qtune.weights.nf4 import quantize_nf4

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SEED = 99  # the explicit dropout seed of every dropout test


def within_2x_of_torch(found, torch_same_dtype, exact, what):
    """found and torch's own result in one dtype, both against the fp32 result `exact` (fp32: 1e-5 scale floor)."""
    found, torch_same_dtype, exact = found.float(), torch_same_dtype.float(), exact.float()
    floor = 1e-5 * exact.abs().max().item() + 1e-12
    err, torch_err = (found - exact).abs().max().item(), (torch_same_dtype - exact).abs().max().item()
    assert err <= 2 * torch_err + floor, f"{what}: error {err:.3e} vs torch's own {torch_err:.3e}"


def params(out_features, in_features, rank=8, bias=False, adapter=True, double_quant=True, gen=None):
    """An NF4 base (on the device) with a trainable fp32 adapter whose B is non-zero."""
    w = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    q = quantize_nf4(w.to(DEVICE), double_quant=double_quant)
    b = (torch.randn(out_features, generator=gen) * 0.1).to(DEVICE) if bias else None
    if not adapter:
        return LoraParams(q, b)
    a = (torch.randn(rank, in_features, generator=gen) / in_features**0.5).to(DEVICE).requires_grad_()
    b_lora = (torch.randn(out_features, rank, generator=gen) / rank**0.5).to(DEVICE).requires_grad_()
    return LoraParams(q, b, a, b_lora, 0.5)


def dense(p: LoraParams) -> LoraParams:
    """The same projection with its NF4 base dequantized to fp32 (the reference's weight)."""
    return p._replace(weight=reference_dequantize_nf4(p.weight, torch.float32))


def outputs_and_grads(fn, x32, dtype, blocks):
    """fn(x, *blocks) with x in `dtype`: its outputs and the gradients of x and every adapter, as fp32."""
    x = x32.to(dtype).requires_grad_()
    out = fn(x, *blocks)
    outs = list(out) if isinstance(out, tuple) else [out]
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    loss = sum((o.float() * torch.randn(o.shape, device=DEVICE, generator=gen)).sum() for o in outs)
    tensors = [x, *(t for p in blocks for t in (p.lora_a, p.lora_b) if t is not None)]
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return [o.float() for o in outs] + [g.float() for g in grads if g is not None]


def keep_masks(shapes, dtype, p=0.1):
    """The keep masks the compiled Philox kernels draw for seed SEED + i."""
    return [lora.dropout_keep_mask(SEED + i, s, p, DEVICE, "triton", dtype) for i, s in enumerate(shapes)]


OPS = ["lora_linear", "lora_qkv", "lora_mlp"]


def op_and_reference(op, x_shape, dropout, dtype, double_quant, gen):
    """(fused op, plain-autograd reference with the fused op's masks, the projections) for one op."""
    n, d = x_shape
    if op == "lora_linear":
        blocks = [params(333, d, bias=True, double_quant=double_quant, gen=gen)]
        masks = keep_masks([x_shape], dtype) if dropout else [None]
        fused = lambda x, p: lora_linear(x, *p._replace(dropout=dropout), kernels="triton", seed=SEED)  # noqa: E731
        ref = lambda x, p: lora.reference_lora_linear(x, *p._replace(dropout=dropout), keep_mask=masks[0])  # noqa: E731
    elif op == "lora_qkv":  # Qwen2-like: biases, narrower k / v, k without an adapter
        blocks = [params(d, d, bias=True, double_quant=double_quant, gen=gen),
                  params(d // 4, d, bias=True, adapter=False, double_quant=double_quant, gen=gen),
                  params(d // 4, d, bias=True, double_quant=double_quant, gen=gen)]
        masks = keep_masks([x_shape] * 3, dtype) if dropout else [None] * 3
        fused = lambda x, *ps: lora_qkv(x, *ps, dropout=dropout, kernels="triton", seed=SEED)  # noqa: E731
        ref = lambda x, *ps: lora.reference_lora_qkv(x, *ps, dropout=dropout, keep_masks=masks)  # noqa: E731
    else:
        inter = 3 * d + 7
        blocks = [params(inter, d, double_quant=double_quant, gen=gen), params(inter, d, double_quant=double_quant,
                                                                               gen=gen),
                  params(d, inter, double_quant=double_quant, gen=gen)]
        masks = keep_masks([x_shape, x_shape, (n, inter)], dtype) if dropout else [None] * 3
        fused = lambda x, *ps: lora_mlp(x, *ps, dropout=dropout, kernels="triton", seed=SEED)  # noqa: E731
        ref = lambda x, *ps: lora.reference_lora_mlp(x, *ps, dropout=dropout, keep_masks=masks)  # noqa: E731
    return fused, ref, blocks


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "philox-dropout-0.1"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda t: f"{t}-vs-fp32-ref")
@pytest.mark.parametrize("rows", [7, 301], ids=["7-rows-fused-nf4-matmul", "301-rows-dequantize-matmul"])
@pytest.mark.parametrize("op", OPS)
def test_lora_op_outputs_and_all_grads_vs_reference(op, rows, dtype, dropout, double_quant):
    gen = torch.Generator().manual_seed(rows)
    x32 = torch.randn(rows, 136, generator=gen).to(DEVICE)
    fused, ref, blocks = op_and_reference(op, (rows, 136), dropout, DTYPES[dtype], double_quant, gen)
    dense_blocks = [dense(p) for p in blocks]
    exact = outputs_and_grads(ref, x32, torch.float32, dense_blocks)
    torch_own = outputs_and_grads(ref, x32, DTYPES[dtype], dense_blocks)
    found = outputs_and_grads(fused, x32, DTYPES[dtype], blocks)
    assert len(found) == len(exact)
    for i, (f, t, e) in enumerate(zip(found, torch_own, exact)):
        within_2x_of_torch(f, t, e, f"{op} tensor {i}")


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_lora_mlp_checkpoint_recompute_without_rng_state_equals_plain_bf16(reentrant):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(301, 136, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    blocks = [params(415, 136, gen=gen), params(415, 136, gen=gen), params(136, 415, gen=gen)]
    tensors = [x, *(t for p in blocks for t in (p.lora_a, p.lora_b))]
    run = lambda h: lora_mlp(h, *blocks, dropout=0.1, kernels="triton", seed=SEED)  # noqa: E731
    direction = torch.randn(301, 136, generator=gen).to(DEVICE, torch.bfloat16)
    results = []
    for checkpointed in (False, True):
        out = torch.utils.checkpoint.checkpoint(run, x, preserve_rng_state=False, use_reentrant=reentrant) \
            if checkpointed else run(x)
        (out * direction).sum().backward()
        results.append([out.detach()] + [t.grad.clone() for t in tensors])
        for t in tensors:
            t.grad = None
    for plain, recomputed in zip(*results):  # a redrawn mask would differ by O(1); float noise is far below 1e-3
        assert (plain.float() - recomputed.float()).abs().max() <= 1e-3 * plain.float().abs().max()


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda t: f"{t}-bit-equal-to-torch-decode")
def test_nf4_dequantize_kernel_bit_equal_to_reference(dtype, double_quant):
    q = quantize_nf4(torch.randn(333, 4099, device=DEVICE), double_quant=double_quant)
    assert torch.equal(dequantize_nf4(q, DTYPES[dtype]), reference_dequantize_nf4(q, DTYPES[dtype]))


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda t: f"{t}-vs-fp32-ref")
@pytest.mark.parametrize("rows", [1, 13, 64, 65], ids=lambda m: f"M{m}")
def test_nf4_matmul_output_and_input_grad_vs_reference(rows, dtype):
    q = quantize_nf4(torch.randn(1031, 517, device=DEVICE) / 517**0.5)
    w32 = reference_dequantize_nf4(q, torch.float32)
    x32 = torch.randn(rows, 517, device=DEVICE)
    dy32 = torch.randn(rows, 1031, device=DEVICE)
    x = x32.to(DTYPES[dtype]).requires_grad_()
    y = nf4_matmul(x, q)
    (dx,) = torch.autograd.grad(y, x, dy32.to(DTYPES[dtype]))
    within_2x_of_torch(y, reference_nf4_matmul(x.detach(), q), x32 @ w32.T, "y")
    within_2x_of_torch(dx, dy32.to(DTYPES[dtype]) @ w32.to(DTYPES[dtype]), dy32 @ w32, "dx")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda t: f"{t}-vs-fp32-ref")
@pytest.mark.parametrize("shape", [(37, 136, 301, 16), (700, 264, 32003, 256)], ids=["tiny-odd", "vocab-32003"])
def test_logprobs_entropy_outputs_and_grads_vs_reference(shape, dtype):
    N, D, V, chunk = shape
    gen = torch.Generator().manual_seed(N)
    h32 = torch.randn(N, D, generator=gen).to(DEVICE)
    w32 = (torch.randn(V, D, generator=gen) * D**-0.5).to(DEVICE)
    targets = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    targets[::5] = -100
    g_logp, g_ent = torch.randn(2, N, generator=gen).to(DEVICE)

    def run(fn, dt):
        h, w = h32.to(dt).requires_grad_(), w32.to(dt).requires_grad_()
        logp, ent = fn(h, w)
        (logp.float() * g_logp + ent.float() * g_ent).sum().backward()
        return logp, ent, h.grad, w.grad

    fused = lambda h, w: token_logprobs_and_entropy(h, w, targets, chunk_size=chunk, kernels="triton")  # noqa: E731
    naive = lambda h, w: (reference_token_logprobs(h, w, targets), reference_token_entropy(h, w, targets))  # noqa: E731
    exact, own, found = run(naive, torch.float32), run(naive, DTYPES[dtype]), run(fused, DTYPES[dtype])
    for name, f, t, e in zip(("logp", "entropy", "dL/dh", "dL/dW"), found, own, exact):
        within_2x_of_torch(f, t, e, name)


def test_cross_entropy_sum_frozen_lm_head_bf16_vs_reference():
    gen = torch.Generator().manual_seed(1)
    h32 = torch.randn(1000, 512, generator=gen).to(DEVICE)
    w32 = (torch.randn(32000, 512, generator=gen) * 512**-0.5).to(DEVICE)
    targets = torch.randint(0, 32000, (1000,), generator=gen).to(DEVICE)

    def run(fn, dt):
        h = h32.to(dt).requires_grad_()
        loss = fn(h, w32.to(dt))
        (loss / 1000).backward()
        return loss, h.grad

    def naive(h, w):
        return torch.nn.functional.cross_entropy((h @ w.T).float(), targets, reduction="sum")

    fused = lambda h, w: cross_entropy_sum(h, w, targets, kernels="triton")[0]  # noqa: E731
    for name, f, t, e in zip(("loss", "dL/dh"), run(fused, torch.bfloat16), run(naive, torch.bfloat16),
                             run(naive, torch.float32)):
        within_2x_of_torch(f, t, e, name)


# ----------------------------------------------------------------------------- models

def two_steps(model_dir, kernels: str, dtype: str):
    """Two AdamW steps: the losses and every adapter gradient of each step (fp32)."""
    from qtune.train.common import lm_loss_sum
    from test_kernels_train import nf4_lora_model

    model, params = nf4_lora_model(model_dir, kernels, dtype, DEVICE)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(3, 160, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :9] = -100
    batch = {k: v.to(DEVICE) for k, v in {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                                           "position_ids": torch.arange(40).expand(2, 40)}.items()}
    model.train()
    losses, grads = [], []
    for _ in range(2):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss_sum, n = lm_loss_sum(model, batch)
        (loss_sum / n).backward()
        losses.append(torch.tensor(loss_sum.item() / n))
        grads += [p.grad.float().clone() for p in params]
        opt.step()
        opt.zero_grad()
    return [*losses, *grads]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_two_nf4_lora_steps_triton_bf16_vs_torch_bf16_vs_fp32(kind, tmp_path):
    from tiny import save_tiny

    model_dir = save_tiny(kind, tmp_path / kind, seed=3)
    exact = two_steps(model_dir, "torch", "float32")
    own = two_steps(model_dir, "torch", "bfloat16")
    found = two_steps(model_dir, "triton", "bfloat16")
    for i, (f, t, e) in enumerate(zip(found, own, exact)):
        within_2x_of_torch(f, t, e, f"{kind} loss/grad {i}")


def test_greedy_decoding_cuda_fp32_equals_cpu_fp32(tmp_path):
    from qtune.generate import generate
    from qtune.weights.checkpoint import load_model
    from tiny import save_tiny

    model_dir = save_tiny("llama", tmp_path / "llama", seed=5)
    prompts = [[5, 17, 33, 9], [40, 41], [7, 8, 9, 10, 11, 12, 13]]
    got = {}
    for device in ("cpu", DEVICE):
        model = load_model(model_dir, quantize="none", dtype="float32", device=device)
        got[device] = [g.token_ids for g in generate(model, prompts, max_new_tokens=12, greedy=True, stop_ids=set())]
    assert got[DEVICE] == got["cpu"]


@pytest.mark.parametrize("case", ["sft", "reward", "dpo"])
def test_cli_step_on_cuda_matches_cpu_reference_first_loss(case, tmp_path):
    """The shipped recipe through `qtune <verb>` on the tiny model, on CUDA (bf16, compiled kernels): every
    logged loss finite, the first (before any update) within bf16 accuracy of the committed fp32 CPU value."""
    from regression.cases import CASES, run_case

    got = run_case(case, tmp_path)
    want = json.loads(CASES[case].reference.read_text())
    assert got["loss"] and all(math.isfinite(v) for v in got["loss"])
    assert got["loss"][0] == pytest.approx(want["loss"][0], rel=3e-2)
