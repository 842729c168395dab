"""`qtune estimate`'s activation terms of DoRA and IA3 (qtune/memory/estimate.py) against the tracer's replay of the
same step with fake tensors (qtune/memory/tracer.py), as tests/test_memory.py checks LoRA's: the peak within 10%,
on the same shapes, dtypes and checkpointing settings; and what each method adds to or saves against LoRA's
step, where every layer's activations count (no checkpointing), within 10% of the traced difference."""

import pytest
import torch
from test_memory import TRACE_CASES, small_cfg

from qtune.memory.estimate import StepShape, estimate
from qtune.memory.step import trace_step
from qtune.recipe.peft import PeftSection


def traced_and_estimated(method: str, changes: dict, batch: int, seq: int, dtype: str, ckpt: bool) -> tuple[int, int]:
    cfg = small_cfg(**changes)
    traced = trace_step(cfg, batch, seq, getattr(torch, dtype), gradient_checkpointing=ckpt, method=method)
    shape = StepShape(cfg, batch, seq, dtype, gradient_checkpointing=ckpt, method=method,
                      peft=PeftSection(method=method))
    predicted = estimate(shape)
    assert sum(predicted.parts.values()) == predicted.peak_bytes
    return traced.peak_bytes, predicted.peak_bytes


@pytest.mark.parametrize("method", ["dora", "ia3"])
@pytest.mark.parametrize("changes,batch,seq,dtype,ckpt", TRACE_CASES)
def test_estimate_within_10_percent_of_tracer(method, changes, batch, seq, dtype, ckpt):
    traced, predicted = traced_and_estimated(method, changes, batch, seq, dtype, ckpt)
    assert abs(predicted / traced - 1) < 0.10


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_what_the_method_adds_to_loras_step_matches_the_tracer(method):
    """No checkpointing, three layers: each layer's saved tensors stay until the loss, so a missing or doubled
    per-token term shows at its full size (DoRA: +2 outputs per adapted linear; IA3: no LoRA inputs)."""
    case = ({"num_hidden_layers": 3}, 1, 256, "float32", False)
    traced, predicted = traced_and_estimated(method, *case)
    lora_traced, lora_predicted = traced_and_estimated("lora", *case)
    assert abs((predicted - lora_predicted) / (traced - lora_traced) - 1) < 0.10
