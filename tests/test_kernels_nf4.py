"""NF4 Triton kernels vs bitsandbytes and the plain-torch references.

CPU lane: TRITON_INTERPRET=1 (tests/conftest.py), fp32, small odd shapes. GPU lane: bf16 at 7B sizes.
"""

import os
import subprocess
import sys

import pytest
import torch

from qtune.kernels.dispatch import interpreting
from qtune.kernels import nf4
from qtune.kernels.nf4 import dequantize_nf4, nf4_matmul, reference_dequantize_nf4, reference_nf4_matmul
from qtune.kernels.triton import nf4 as triton_nf4
from qtune.weights.nf4 import quantize_nf4
from qtune.weights.nf4_linear import NF4Linear
from test_quant import DTYPES, bnb_dequantize, bnb_quantize, eager_bitsandbytes  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not (interpreting() or torch.cuda.is_available()),
                                reason="needs TRITON_INTERPRET=1 or a CUDA device to run the kernels")

SHAPES = [(1,), (7, 9), (5, 3, 11), (37, 130), (9, 200), (3, 1100)]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_kernel_equals_bnb(shape, double_quant):
    torch.manual_seed(len(shape))
    w = torch.randn(shape)
    packed, state = bnb_quantize(w, double_quant)
    q = quantize_nf4(w, double_quant=double_quant)
    for dtype in DTYPES:
        out = dequantize_nf4(q, dtype)
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(out, bnb_dequantize(packed, state, dtype)), dtype


def test_dequantize_kernel_rounds_bf16_to_nearest_even():
    # weights whose fp32 dequantized value lies exactly half-way between two bf16 numbers
    w = torch.tensor([1.0] * 63 + [1 + 2**-8]).repeat(4)
    q = quantize_nf4(w, double_quant=False)
    q.absmax[:] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 3.0])
    assert torch.equal(dequantize_nf4(q, torch.bfloat16), reference_dequantize_nf4(q, torch.bfloat16))


def check_matmul(M_shape, N, K, double_quant=True, bias=True):
    torch.manual_seed(N * K)
    q = quantize_nf4(torch.randn(N, K) * 0.1, double_quant=double_quant)
    x = torch.randn(*M_shape, K, requires_grad=True)
    b = torch.randn(N, requires_grad=True) if bias else None
    y = nf4_matmul(x, q, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    x_ref = x.detach().clone().requires_grad_()
    b_ref = b.detach().clone().requires_grad_() if bias else None
    y_ref = reference_nf4_matmul(x_ref, q, b_ref)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M_shape, N, K", [((1,), 37, 129), ((3,), 64, 64), ((2, 5), 33, 200), ((17,), 20, 71),
                                           ((64,), 40, 96)])
def test_fused_small_m_matmul_and_grad(M_shape, N, K):
    check_matmul(M_shape, N, K)


@pytest.mark.parametrize("M_shape, N, K, double_quant, bias", [((65,), 37, 129, True, True),
                                                               ((3, 30), 24, 64, False, False)])
def test_large_m_workspace_matmul_and_grad(M_shape, N, K, double_quant, bias):
    check_matmul(M_shape, N, K, double_quant, bias)


def test_fused_matmul_without_double_quant_or_bias():
    check_matmul((5,), 19, 67, double_quant=False, bias=False)


def test_workspace_is_shared_per_shape_and_overwritten():
    q1, q2 = quantize_nf4(torch.randn(16, 64)), quantize_nf4(torch.randn(16, 64))
    w1 = nf4.dequantize_into_workspace(q1, torch.float32)
    assert torch.equal(w1, reference_dequantize_nf4(q1, torch.float32))
    w2 = nf4.dequantize_into_workspace(q2, torch.float32)
    assert w2.data_ptr() == w1.data_ptr() and torch.equal(w1, reference_dequantize_nf4(q2, torch.float32))
    nf4.clear_dequantize_workspaces()
    assert not nf4._DEQUANTIZE_WORKSPACES


@pytest.mark.parametrize("rows", [4, 70])
def test_nf4_linear_triton_equals_torch(rows):
    torch.manual_seed(rows)
    layer = NF4Linear.from_linear(torch.nn.Linear(48, 24))
    x = torch.randn(rows, 48, requires_grad=True)
    outs, grads = [], []
    for mode in ("torch", "triton"):
        layer.kernels = mode
        x.grad = None
        y = layer(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(x.grad.clone())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


def test_matmul_rejects_bad_input():
    q = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"input \(..., 32\) does not match weight \(8, 64\)"):
        nf4_matmul(torch.randn(2, 32), q)
    with pytest.raises(ValueError, match="torch.float64"):
        nf4_matmul(torch.randn(2, 64, dtype=torch.float64), q)


COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from qtune.kernels.nf4 import compile_specs
for spec in compile_specs():
    if "bf16" in spec.name and "double_quant=True" in spec.name:
        src = triton.compiler.ASTSource(spec.fn, spec.signature, constexprs=spec.constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", 89, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        assert k.metadata.shared <= 99 * 1024, (spec.name, k.metadata.shared)
        print(spec.name, k.metadata.shared)
"""


def test_shipped_bf16_configs_compile_for_sm89():
    # A real GPU compile (no device needed) catches what the interpreter lets through.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("\n") == 1 + len(triton_nf4.MATMUL_BLOCK_MS[torch.bfloat16])


def test_compile_specs_cover_every_launch_configuration():
    names = [s.name for s in nf4.compile_specs()]
    assert len(names) == len(set(names))
    for dtype, tt in nf4.TRITON_DTYPES.items():
        for block_m in triton_nf4.MATMUL_BLOCK_MS[dtype]:
            assert any(tt in n and f"BLOCK_M={block_m}," in n for n in names)
        assert sum(n.startswith(f"nf4_dequantize[{tt},") for n in names) == 2


# ----------------------------------------------------------------------------- GPU lane

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 16, 64, 512])
@pytest.mark.parametrize("N, K", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_gpu_bf16_matmul_at_7b_sizes(M, N, K):
    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02)
    assert torch.equal(dequantize_nf4(q, torch.bfloat16), reference_dequantize_nf4(q, torch.bfloat16))
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w32 = reference_dequantize_nf4(q, torch.float32)
    y = nf4_matmul(x, q)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    y32, dx32 = x.detach().float() @ w32.T, dy.float() @ w32
    # error within 2x of torch's own bf16 matmul against fp32
    torch_err = (reference_nf4_matmul(x.detach(), q).float() - y32).abs().max()
    torch_dx_err = ((dy @ w32.bfloat16()).float() - dx32).abs().max()
    assert (y.float() - y32).abs().max() <= 2 * torch_err + 1e-6
    assert (dx.float() - dx32).abs().max() <= 2 * torch_dx_err + 1e-6
