"""The compute dtype a CUDA device gets, and fp16 loss scaling in the shared optimizer step (pre-Ampere cards).

Both are pure CPU checks: the dtype choice is a function of the compute capability, and the step's scaling
logic runs with a CPU GradScaler exactly as with the CUDA one the loops create for an fp16 model.
"""

import math

import pytest
import torch

from qtune.train import common
from qtune.weights.checkpoint import cuda_compute_dtype, default_dtype


@pytest.mark.parametrize("capability, dtype", [
    ((7, 0), torch.float16),   # V100
    ((7, 5), torch.float16),   # T4, RTX 20xx: no bf16 tensor cores
    ((8, 0), torch.bfloat16),  # A100
    ((8, 6), torch.bfloat16),  # RTX 30xx
    ((8, 9), torch.bfloat16),  # RTX 40xx
    ((9, 0), torch.bfloat16),  # H100
    ((12, 0), torch.bfloat16),  # RTX 50xx
], ids=lambda v: f"sm_{v[0]}{v[1]}" if isinstance(v, tuple) else str(v).removeprefix("torch."))
def test_cuda_dtype_is_bf16_from_ampere_and_fp16_below(capability, dtype):
    assert cuda_compute_dtype(capability) == dtype


def test_cpu_computes_in_fp32_and_scaler_is_off_off_cuda():
    assert default_dtype("cpu") == torch.float32
    assert not common.grad_scaler("cpu", torch.float16).is_enabled()
    assert not common.grad_scaler("cuda", torch.bfloat16).is_enabled()


def scaled_step(grad_value: float):
    """One SGD step (lr 0.5) on w = [1, 2] with gradient grad_value · [1, 1], through a loss scale of 2^10."""
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = torch.optim.SGD([w], lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    common.backward(grad_value * w.sum(), scaler)
    norm, lr = common.optimizer_step([w], optimizer, scheduler, 0.0, 1.0, scaler)
    return w.detach(), norm, scaler.get_scale(), scheduler.last_epoch


def test_scaled_step_applies_the_unscaled_gradient():
    w, norm, scale, steps = scaled_step(3.0)
    assert torch.equal(w, torch.tensor([1.0 - 1.5, 2.0 - 1.5]))  # lr · 3, not lr · 3 · 2^10
    assert norm == pytest.approx(3.0 * math.sqrt(2))
    assert scale == 2.0**10 and steps == 1


def test_overflowing_scaled_step_is_skipped_and_the_scale_halved():
    w, norm, scale, steps = scaled_step(float("inf"))
    assert torch.equal(w, torch.tensor([1.0, 2.0]))  # nothing applied
    assert norm == 0.0 and scale == 2.0**9 and steps == 0
