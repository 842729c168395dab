"""Which implementation runs an op: the Triton kernels or the plain-torch reference.

`kernels = "auto" | "triton" | "torch"` is a recipe switch. "auto" uses Triton on CUDA tensors and
plain torch elsewhere; "triton" forces the kernels (on a CPU that needs `TRITON_INTERPRET=1` set before
the kernels are defined, i.e. before the first Triton call imports `qtune.kernels.triton`; that is how the
tests run them); "torch" forces the reference path. triton itself is optional: without it every op takes
the plain-torch path and "triton" is refused with a message.
"""

import functools
import importlib.util
import os
from contextlib import contextmanager

import torch

KERNEL_MODES = ("auto", "triton", "torch")
_replaying = False  # inside `memory_replay`: tile loops run their representative tiles only


@functools.cache
def triton_importable() -> bool:
    """True when `import triton` works (asked once per process, then cached).

    find_spec alone is not enough: a triton that is installed but broken (or a stand-in that raises on
    import, as tests/test_no_triton.py puts one) is found but cannot be imported.
    """
    if importlib.util.find_spec("triton") is None:
        return False  # the cheap common answer off Linux: no import attempted
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install fails in many ways (ImportError, OSError, ...): each means no Triton
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels with its numpy interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_mode(mode: str) -> str:
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels={mode!r} is not one of {', '.join(KERNEL_MODES)}")
    return mode


def use_triton(mode: str, tensor: torch.Tensor) -> bool:
    """Decide per call: should the op on `tensor` run the Triton kernel?"""
    check_mode(mode)
    if mode == "torch":
        return False
    if mode == "auto":
        return tensor.is_cuda and triton_importable()
    if not triton_importable():
        raise RuntimeError("kernels='triton' but the triton package is not installed (pip install triton)")
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            "kernels='triton' on a CPU tensor needs TRITON_INTERPRET=1 in the environment before qtune "
            "is imported; use kernels='auto' or 'torch' to run the plain-torch path instead"
        )
    return True


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op on `x` computes in: autocast's dtype where autocast is on for x's device, else x.dtype.

    The ops cast their inputs to it once and run with autocast off (`autocast_off`), so every product inside
    sees one explicit dtype instead of autocast lowering some of them (`@`, F.linear) and not others
    (`addmm_` in place), which fails with mixed dtypes.
    """
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def autocast_off(method):
    """Run an autograd Function's forward or backward with autocast disabled on its tensors' device.

    The public op has already cast the inputs to `compute_dtype`; backward may run where the caller's autocast
    is still active (on a CPU, `loss.backward()` inside the autocast block runs in that thread).
    """

    @functools.wraps(method)
    def run(ctx, *args):
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        with torch.autocast(device_type=device, enabled=False):
            return method(ctx, *args)

    return run


@contextmanager
def memory_replay(enabled: bool = True):
    """Within it (when `enabled`), `tile_starts` gives the representative tiles of a loop only.

    For the memory tracer's replay on fake tensors, which have no values: a loop whose tiles each allocate
    and free the same temporaries and write their results in place into buffers made before the loop holds
    the same bytes in every full tile, so its first two tiles (the second one meets the first one's
    temporaries, as every later tile does), and the last (a partial tile is smaller), reach its peak. Never
    for real tensors: the skipped tiles' results would be missing.
    """
    global _replaying
    saved, _replaying = _replaying, enabled
    try:
        yield
    finally:
        _replaying = saved


def tile_starts(stop: int, step: int):
    """range(0, stop, step), the starts of a tile loop; inside `memory_replay`, its first two and last only."""
    starts = range(0, stop, step)
    return starts if not _replaying or len(starts) <= 3 else (starts[0], starts[1], starts[-1])
