"""One QLoRA training step as `qtune sft` runs it, on a random-weight model of any shape and device.

The same code runs for real on the CPU (the measured peak) and on fake tensors under the tracer (the
replayed peak), so the two are the same tensors, with different element sizes when the dtypes differ.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from qtune.config import ModelConfig
from qtune.kernels.dispatch import memory_replay
from qtune.memory.build import add_trainable_lora, random_batch, random_model
from qtune.memory.tracer import LiveBytes, TraceReport, trace
from qtune.train.common import build_optimizer, clip_gradients, lm_loss_sum, set_long_context
from qtune.weights.nf4 import import_bitsandbytes


@dataclass
class StepSetup:
    """What one step needs: the model, its trainable parameters, the optimizer and a batch."""

    model: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    batch: dict


def build_step(cfg: ModelConfig, batch_size: int, seq_len: int, dtype: torch.dtype, device="cpu", r: int = 16,
               targets="all-linear", gradient_checkpointing: bool = True, quantize: str = "nf4",
               double_quant: bool = True, optimizer: str = "adamw", seed: int = 0, offload_checkpoints: bool = False,
               tiled_mlp: str = "off", method: str = "lora") -> StepSetup:
    """A random `cfg`-shaped model with a LoRA adapter (or `method`'s) in training mode, its optimizer and a random
    batch; offload_checkpoints and tiled_mlp as the recipe keys train.offload_checkpoints and train.tiled_mlp."""
    model = random_model(cfg, dtype, device, quantize=quantize, double_quant=double_quant, seed=seed)
    params = add_trainable_lora(model, r, targets, seed=seed, method=method)
    model.gradient_checkpointing = gradient_checkpointing
    set_long_context(model, offload_checkpoints, tiled_mlp)
    model.train()
    opt = build_optimizer(params, optimizer, lr=2e-4)
    return StepSetup(model, params, opt, random_batch(cfg, batch_size, seq_len, device, seed))


def prime_optimizer(setup: StepSetup) -> None:
    """Create the optimizer state with a zero-gradient step (which leaves the weights unchanged).

    A measured step then has the state every step after the first has, which is the steady-state peak.
    """
    for p in setup.params:
        p.grad = torch.zeros_like(p)
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)


def train_step(setup: StepSetup, max_grad_norm: float = 0.3, tracer: LiveBytes | None = None) -> torch.Tensor:
    """Forward (fused cross-entropy), backward, gradient clipping, optimizer step; returns the loss sum."""
    phase = tracer.phase if tracer is not None else (lambda name: nullcontext())
    with phase("forward"):
        loss_sum, count = lm_loss_sum(setup.model, setup.batch)
    with phase("backward"):
        (loss_sum / max(count, 1)).backward()
    with phase("optimizer"):
        clip_gradients(setup.params, max_grad_norm)
        setup.optimizer.step()
        setup.optimizer.zero_grad(set_to_none=True)
    return loss_sum.detach()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def trace_step(cfg: ModelConfig, batch_size: int, seq_len: int, dtype: torch.dtype = torch.bfloat16, r: int = 16,
               targets="all-linear", gradient_checkpointing: bool = True, quantize: str = "nf4",
               double_quant: bool = True, optimizer: str = "adamw", fake: bool = True, offload_checkpoints: bool = False,
               tiled_mlp: str = "off", method: str = "lora") -> TraceReport:
    """Replay one steady-state step (optimizer state present) and report its peak live bytes.

    fake=True builds and runs everything on fake tensors (no memory; dtype=bfloat16 gives the GPU
    semantics), with the loss's tile loops cut to their representative tiles (`memory_replay`: the same
    peak in a few ops instead of (tokens / 1024) x (vocabulary / 1024) tiles); fake=False traces a real CPU
    run of the same step.
    """
    if quantize == "nf4":
        # bitsandbytes' tables (made when it is first imported) must be real tensors made before the replay,
        # not fake ones counted in whichever replay of the process dequantizes first
        import_bitsandbytes()
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext(), memory_replay(fake):
        setup = build_step(cfg, batch_size, seq_len, dtype, "cpu", r, targets, gradient_checkpointing, quantize,
                           double_quant, optimizer, offload_checkpoints=offload_checkpoints, tiled_mlp=tiled_mlp,
                           method=method)
        setup.model.set_kernels("torch")
        prime_optimizer(setup)
        resident = [*setup.model.parameters(), *setup.model.buffers(), *optimizer_tensors(setup.optimizer),
                    *setup.batch.values()]
        return trace(lambda tracer: train_step(setup, tracer=tracer), *resident)
