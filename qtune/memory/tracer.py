"""Peak live tensor bytes of a training step, replayed without the memory: a tensor-lifetime tracer.

`LiveBytes` is a `TorchDispatchMode`: every aten op's outputs add their storage's bytes when they appear,
and a storage's bytes are subtracted once it has died (checked before each op through a weak reference
to the storage, so views and in-place ops never count twice). The peak, and what was live at it, is what
a caching GPU allocator must hold at least (its reserved memory adds fragmentation on top).

Run over fake tensors (`FakeTensorMode`: CPU tensors with shapes, dtypes and strides but no data), the
7B-shaped QLoRA step takes no memory and runs in about a minute, through exactly the code the CPU runs (the
fused attention kernel included, which the meta device would replace by the math path), and with GPU
semantics chosen by the dtypes: bf16 activations, NF4 weights. Fake tensors have no values, so the tracer
answers data-dependent questions with the worst case for memory: every boolean mask is all true (all
tokens carry a loss), a boolean check is false (no input error), any other scalar is 1.

Host memory is counted apart: storages created while qtune.offload allocates its host copies of offloaded
checkpoints (`on_host()`) go to `host_peak_bytes`, not to the device's peak.
"""

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from qtune.offload import on_host

aten = torch.ops.aten
INDEX_OPS = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)
QUERIES = (torch.ops.prim.device.default, aten.sym_size.default, aten.sym_stride.default, aten.sym_numel.default,
           aten.sym_storage_offset.default, aten.is_contiguous.default, aten.dim.default)


@dataclass
class Entry:
    """One live storage: its bytes, the phase and op that created it, and the creating op's output shape."""

    nbytes: int
    phase: str
    op: str
    shape: tuple
    dtype: torch.dtype


@dataclass
class TraceReport:
    """The peak of live bytes and its composition (bytes per phase / op) at that moment."""

    peak_bytes: int
    start_bytes: int  # live when the traced region began (weights, adapters, optimizer state)
    end_bytes: int
    peak_phase: str
    at_peak: dict[str, int] = field(default_factory=dict)  # "phase: op" -> bytes
    largest_at_peak: list[tuple[str, tuple, str, int]] = field(default_factory=list)  # (op, shape, dtype, bytes)
    seconds: float = 0.0
    host_peak_bytes: int = 0  # peak of the pinned host copies of offloaded checkpoints

    def as_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "host_peak_bytes": self.host_peak_bytes, "start_bytes": self.start_bytes, "end_bytes": self.end_bytes,
                "peak_phase": self.peak_phase, "at_peak": self.at_peak,
                "largest_at_peak": [[op, list(shape), dtype, n] for op, shape, dtype, n in self.largest_at_peak]}


def _all_true_indices(mask: torch.Tensor) -> list[torch.Tensor]:
    """The long indices a boolean mask selects, assuming every element is selected (one per mask dim)."""
    return [torch.empty(mask.numel(), dtype=torch.long, device=mask.device) for _ in range(max(mask.dim(), 1))]


def _expand_bool_indices(indices):
    out = []
    for idx in indices:
        if isinstance(idx, FakeTensor) and idx.dtype == torch.bool:
            out.extend(_all_true_indices(idx))
        else:
            out.append(idx)
    return out


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages alive on `device` op by op; `peak_bytes` is their maximum.

    Tensors that exist before tracing (weights, adapters) are counted once `register`ed. `phase(name)`
    labels what is created inside it, and the report groups the peak's contents by phase and op.
    """

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.device_type = torch.device(device).type
        self.pinned: dict[StorageWeakRef, Entry] = {}  # registered before tracing
        self.live: dict[StorageWeakRef, Entry] = {}  # created while tracing
        self.current = 0
        self.peak = 0
        self.start = 0
        self.peak_phase = ""
        self.peak_entries: list[Entry] = []
        self.current_phase = "setup"
        self.host: dict[StorageWeakRef, int] = {}  # host copies of offloaded checkpoints: bytes
        self.host_current = self.host_peak = 0

    # ---- bookkeeping -------------------------------------------------------------------------------
    def register(self, tensors, phase: str = "resident") -> None:
        """Count tensors that already exist (parameters, buffers, optimizer state) as live."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self._add(t, self.pinned, phase, "existing")
        self.start = self.peak = self.current

    def register_module(self, module: torch.nn.Module) -> None:
        self.register(module.parameters(), "parameters")
        self.register(module.buffers(), "buffers")

    def _add(self, t: torch.Tensor, table: dict, phase: str, op: str) -> None:
        storage = t.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref in self.live or ref in self.pinned or ref in self.host:
            return
        if on_host():
            self.host[ref] = storage.nbytes()
            self.host_current += storage.nbytes()
            return
        entry = Entry(storage.nbytes(), phase, op, tuple(t.shape), t.dtype)
        table[ref] = entry
        self.current += entry.nbytes

    def _drop_dead(self) -> None:
        dead = [ref for ref in self.live if ref.expired()]
        for ref in dead:
            self.current -= self.live.pop(ref).nbytes
        for ref in [ref for ref in self.host if ref.expired()]:
            self.host_current -= self.host.pop(ref)

    def _note_peak(self) -> None:
        """Dead storages are swept only when the count, dead ones included, exceeds a peak: the true count is
        never above it, so no peak is missed, and the sweep (a walk over every live storage) runs rarely
        instead of once per op. A dead storage's address cannot be reused meanwhile: its weak reference
        keeps the storage's record allocated."""
        if self.current <= self.peak and self.host_current <= self.host_peak:
            return
        self._drop_dead()
        self.host_peak = max(self.host_peak, self.host_current)
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.current_phase
            self.peak_entries = list(self.live.values())

    @contextmanager
    def phase(self, name: str):
        """Label the storages created inside the block (e.g. "forward", "backward", "optimizer")."""
        saved, self.current_phase = self.current_phase, name
        try:
            yield
        finally:
            self.current_phase = saved

    # ---- the dispatch hook -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in QUERIES:  # half the ops of a replay: they create no tensor
            return func(*args, **kwargs)
        out = self._run(func, args, kwargs)
        outputs = (out,) if isinstance(out, torch.Tensor) else out if isinstance(out, (tuple, list)) else ()
        for t in (outputs if all(isinstance(t, torch.Tensor) for t in outputs) else tree_flatten(out)[0]):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self._add(t, self.live, self.current_phase, str(func.overloadpacket.__name__))
        self._note_peak()
        return out

    def _run(self, func, args, kwargs):
        """func on fake tensors, answering the questions about their (absent) values, or for real."""
        if func is aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            # No data: a bool check (an input error?) is False, any other scalar 1.
            return False if args[0].dtype == torch.bool else (1.0 if args[0].is_floating_point() else 1)
        if func is aten.nonzero.default and isinstance(args[0], FakeTensor):
            x = args[0]
            return torch.empty((x.numel(), x.dim()), dtype=torch.long, device=x.device)  # all true
        if func in INDEX_OPS:
            args = (args[0], _expand_bool_indices(args[1]), *args[2:])
        return func(*args, **kwargs)

    # ---- the result ----------------------------------------------------------------------------------
    def report(self, top: int = 8) -> TraceReport:
        self._drop_dead()
        at_peak: dict[str, int] = defaultdict(int)
        for e in self.pinned.values():
            at_peak[e.phase] += e.nbytes
        for e in self.peak_entries:
            at_peak[f"{e.phase}: {e.op}"] += e.nbytes
        largest = sorted(self.peak_entries, key=lambda e: -e.nbytes)[:top]
        return TraceReport(self.peak, self.start, self.current, self.peak_phase,
                           dict(sorted(at_peak.items(), key=lambda kv: -kv[1])),
                           [(e.op, e.shape, str(e.dtype).removeprefix("torch."), e.nbytes) for e in largest],
                           host_peak_bytes=self.host_peak)


def trace(fn, *tensors_to_register, device: str = "cpu") -> TraceReport:
    """Run `fn(tracer)` under a `LiveBytes` that first registers `tensors_to_register`; returns its report."""
    tracer = LiveBytes(device)
    tracer.register(tensors_to_register)
    t0 = time.perf_counter()
    with tracer:
        fn(tracer)
    rep = tracer.report()
    rep.seconds = time.perf_counter() - t0
    return rep


def nbytes_of(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storages counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            ref = StorageWeakRef(t.untyped_storage())
            if ref not in seen:
                seen.add(ref)
                total += t.untyped_storage().nbytes()
    return total


def fmt_bytes(n: float) -> str:
    """1.23 GB style (powers of 1024, as GPU memory is quoted)."""
    if n < 1024:
        return f"{n:.0f} B"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** exp:.2f} {['B', 'KB', 'MB', 'GB', 'TB'][exp]}"
