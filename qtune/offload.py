"""Gradient checkpoints kept in host memory: a long sequence's layer inputs leave the GPU during the forward.

With gradient checkpointing each decoder layer keeps only its input, L x N x D values (32 x 100,000 x 4096 in
bf16 is 26 GB for Llama-3.1-8B at 100K tokens: more than a 24 GB card). `offloaded_checkpoint` keeps that input
in pinned host memory instead:

    forward   y = layer(x) without saving activations; x is copied to a pinned host buffer on a side stream
              (the copy waits for x to be ready and overlaps the next layers' compute), and the device x is
              released once the copy is done (`record_stream` keeps the allocator from reusing it earlier)
    backward  layer i's input comes back to the device on the side stream; when it arrives, layer i-1's
              input is requested at once, so its copy runs while layer i is recomputed and differentiated;
              then y = layer(x) is recomputed with the RNG state of the forward and differentiated

The device then holds about two layer inputs at a time instead of L, and the host holds L (`host_bytes`).

On a CPU the same hooks run with plain (unpinned) host copies and no streams, so the exactness of the path is
testable anywhere: the loss and every gradient equal those of `torch.utils.checkpoint`.

The host copies are made inside `host_allocation()`, which a memory tracer reads (`on_host()`) to count them
as host memory rather than device memory.
"""

from contextlib import contextmanager
from contextvars import ContextVar

import torch

_HOST_ALLOCATION: ContextVar[bool] = ContextVar("qtune_host_allocation", default=False)


def on_host() -> bool:
    """True while the offload is allocating its host buffers (a tracer counts those bytes as host memory)."""
    return _HOST_ALLOCATION.get()


@contextmanager
def host_allocation():
    """Mark the tensors created inside as host memory (see `on_host`)."""
    token = _HOST_ALLOCATION.set(True)
    try:
        yield
    finally:
        _HOST_ALLOCATION.reset(token)


class HostCheckpoints:
    """The host copies of one forward pass's layer inputs, in layer order, and the copies coming back.

    One instance lives for one forward / backward pass; each layer's autograd node holds its index. On CUDA
    the copies run on `stream` (one side stream per device); elsewhere they are synchronous clones.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.host: list[torch.Tensor | None] = []
        self.copied: list = []  # per layer: the CUDA event marking its host copy done (None on a CPU)
        self.fetched: dict[int, tuple[torch.Tensor, object]] = {}  # layer -> (device tensor, event) in flight

    def store(self, x: torch.Tensor) -> int:
        """Start copying x to the host; return its index."""
        with host_allocation():
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.stream is not None)
        if self.stream is None:
            host.copy_(x)
            event = None
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # x is written by then
            with torch.cuda.stream(self.stream):
                host.copy_(x, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            x.record_stream(self.stream)  # the allocator keeps x's memory until the copy has read it
        self.host.append(host)
        self.copied.append(event)
        return len(self.host) - 1

    def prefetch(self, index: int) -> None:
        """Start bringing layer `index`'s input back to the device (no-op if already on its way)."""
        if index < 0 or index in self.fetched or self.host[index] is None:
            return
        host = self.host[index]
        if self.stream is None:
            self.fetched[index] = (host.clone(), None)  # a distinct copy: the device memory it stands for
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.copied[index])
            x = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.fetched[index] = (x, event)

    def take(self, index: int) -> torch.Tensor:
        """Layer `index`'s input on the device, ready for the current stream; its host copy is released."""
        self.prefetch(index)
        x, event = self.fetched.pop(index)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            x.record_stream(current)  # made on the side stream, used and freed on the current one
        self.host[index] = None
        return x


class OffloadedCheckpointFn(torch.autograd.Function):
    """y = layer(x, *args) with x kept on the host between forward and backward (see the module docstring).

    Only x needs a gradient among the inputs (cos, sin and the mask are constants of the pass); the layer's
    trainable parameters are passed as `params` so that their gradients flow through this node.
    """

    @staticmethod
    def forward(ctx, x, layer, store, args, *params):
        ctx.layer, ctx.store, ctx.args = layer, store, args
        ctx.rng = _rng_state(x.device)
        with torch.no_grad():
            y = layer(x, *args)
        ctx.index = store.store(x)
        ctx.n_params = len(params)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        store = ctx.store
        x = store.take(ctx.index).detach().requires_grad_(True)
        store.prefetch(ctx.index - 1)  # the next layer down comes back while this one recomputes
        params = [p for p in ctx.layer.parameters() if p.requires_grad]
        now = _rng_state(x.device)
        _set_rng_state(x.device, ctx.rng)  # dropout draws the forward's masks again
        with torch.enable_grad():
            y = ctx.layer(x, *ctx.args)
        _set_rng_state(x.device, now)
        grads = torch.autograd.grad(y, [x, *params], grad_y, allow_unused=True)
        return grads[0], None, None, None, *grads[1:]


def offloaded_checkpoint(layer: torch.nn.Module, x: torch.Tensor, store: HostCheckpoints, *args) -> torch.Tensor:
    """layer(x, *args), checkpointed with x in host memory (`store` holds the pass's host copies)."""
    params = [p for p in layer.parameters() if p.requires_grad]
    return OffloadedCheckpointFn.apply(x, layer, store, args, *params)


def _rng_state(device: torch.device):
    cpu = torch.get_rng_state()
    return (cpu, torch.cuda.get_rng_state(device)) if device.type == "cuda" else (cpu, None)


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
