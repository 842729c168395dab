"""Dropout for LoRA inputs on a CPU, from 16-bit uniform draws: about 6x faster than `F.dropout` there.

On a CPU `F.dropout` draws one Bernoulli sample per element from torch's sequential Mersenne-Twister
generator: 4.4 ms for a (1024, 576) input, 10 ms for (1024, 1536). A checkpointed SmolLM2-135M step with
LoRA dropout on every linear draws about 300 million of them (forward and recomputation), which cost 2.2 s
of a 7.5 s step. Here one 64-bit draw gives four 16-bit uniforms u, and an element is kept when
u >= t with t = round(p · 65536):

    keep probability  1 − t / 65536   (p = 0.1: t = 6554, 0.89999 instead of 0.9)
    output            x · keep / (1 − t / 65536)      so E[output] = x exactly

0.75 ms for the (1024, 576) input. The draws come from torch's default CPU generator, like `F.dropout`'s,
so `torch.manual_seed` reproduces a run and a checkpoint's recomputation (which restores the generator's
state) regenerates the same mask. Autograd keeps the boolean mask (one byte per element), as for
`F.dropout`.
"""

import torch

LEVELS = 1 << 16


def keep_threshold(p: float) -> int:
    """t: an element is dropped when its 16-bit uniform draw (0 .. 65535) is below t."""
    return round(p * LEVELS)


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of x with drop probability p (rounded to a multiple of 2⁻¹⁶), unbiased."""
    t = keep_threshold(p)
    if t == 0:
        return x
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(1 << 63), (1 << 63) - 1)
    keep = bits.view(torch.int16)[:n].view(x.shape) >= t - LEVELS // 2  # the int16 value u - 32768
    return (x * keep).mul_(LEVELS / (LEVELS - t))
