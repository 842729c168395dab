"""NF4 weight quantization in plain torch, byte-identical to bitsandbytes.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores each frozen weight as 4-bit NormalFloat codes:
the flat weight is cut into blocks of 64 values, each block is divided by its absolute maximum, and
every value becomes the index of the nearest of 16 levels (quantiles of N(0, 1) scaled to [-1, 1]).
Two codes share a byte, element 2j in the high nibble and 2j+1 in the low one.

Double quantization stores the fp32 per-block absmax values in 8 bits: their mean (the offset) is
subtracted and the centred values are quantized in blocks of 256 with the signed 8-bit dynamic map
(Dettmers 2015, arXiv:1511.04561), leaving one fp32 "nested" absmax per 256 blocks.

Every rounding step follows bitsandbytes' CPU backend so that packed bytes, absmax codes, nested
absmax, offset and dequantized values all equal `bitsandbytes.functional.quantize_4bit(w,
quant_type="nf4", compress_statistics=...)` bit for bit; tests/test_quant.py checks this.
"""

import functools
import logging
import math
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from qtune.kernels.nf4 import NF4_CODE  # the 16 NF4 levels (QLoRA appendix E), shared with the kernels

# A value goes to level i when it lies above midpoint i-1 and at or below midpoint i (ties go down).
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # (15,)

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_CHUNK = 1 << 22  # elements quantized per step (a multiple of every valid block size)
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def signed_dynamic_map() -> torch.Tensor:
    """The 256-entry signed 8-bit dynamic map that quantizes the absmax values (sorted, fp32).

    For exponent e = 0..6 it holds 2^e linearly spaced fractions in (0.1, 1], scaled by 10^(e-6),
    with both signs; plus 0 and 1. Built with the same fp32 steps as bitsandbytes'
    `create_dynamic_map(signed=True)`, so the values are identical.
    """
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        centres = (10.0 ** (e - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += centres.tolist() + (-centres).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)  # (256,)


def _nf4_codes(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax (n_blocks,) fp32 and the 4-bit level index of every element (n,) int64."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Full blocks are scaled by the reciprocal of absmax, the ragged tail by a division, and only the
    # tail's stored absmax is clamped: all three as bitsandbytes does, so ties round the same way.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, flat[full:] / tail_absmax])
    codes = torch.bucketize(scaled.clamp(-1, 1), NF4_MIDPOINTS.to(flat.device))
    return absmax, codes


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(n,) codes in 0..15 -> (ceil(n/2),) uint8, element 2j in the high nibble."""
    if codes.numel() % 2:
        # bitsandbytes pads with a scaled value of 0.0, whose level is the exact zero (index 7).
        codes = F.pad(codes, (0, 1), value=7)
    return ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)


# byte -> (level of its high nibble, level of its low nibble): one gather decodes two weights
NF4_BYTE_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # (256, 2)


def _nf4_levels(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """(ceil(n/2),) uint8 -> (n,) fp32 NF4 levels in element order."""
    return NF4_BYTE_PAIRS.to(packed.device).index_select(0, packed.int()).view(-1)[:numel]


# bitsandbytes' CPU backend rounds x / absmax onto a grid of 65536 points spanning [-1, 1] and looks
# each grid point's nearest code entry up in a table, instead of searching the code for x itself.
# Near a midpoint between two entries this can pick the farther one; we reproduce it exactly. (bnb's
# CUDA kernels search exactly, so a bnb quantization made on a GPU can differ in such rare codes.)
LUT_STEPS = 65536


def _grid_nearest_code(code: torch.Tensor) -> torch.Tensor:
    """(65536,) int64: for grid point i (value -1 + 2i/65535) the index of the nearest code entry."""
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    grid = -1.0 + (2.0 * torch.arange(LUT_STEPS, dtype=torch.float32, device=code.device)) / (LUT_STEPS - 1)
    return torch.searchsorted(midpoints, grid)  # how many midpoints lie strictly below the grid point


def quantize_blockwise_dynamic(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of a flat fp32 tensor, as bitsandbytes' CPU `quantize_blockwise`.

    v = clamp(x * (1 / absmax), -1, 1); grid index = trunc(((v + 1) * 0.5) * 65535 + 0.5), every
    step rounded to fp32; the code index is the grid point's nearest entry. A block whose absmax is 0
    gets code index 0. Returns (uint8 codes (n,), fp32 absmax (ceil(n/blocksize),)).
    """
    n = x.numel()
    n_blocks = math.ceil(n / blocksize)
    padded = F.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # (n_blocks,) the zero padding never raises a maximum
    empty = (absmax == 0).repeat_interleave(blocksize)[:n]  # (n,) all-zero blocks
    inv_absmax = (1.0 / absmax).repeat_interleave(blocksize)[:n]
    v = torch.where(empty, 0.0, x * inv_absmax).clamp(-1.0, 1.0)
    grid_index = (((v + 1.0) * 0.5) * (LUT_STEPS - 1) + 0.5).long()
    idx = torch.where(empty, 0, _grid_nearest_code(code)[grid_index])
    return idx.to(torch.uint8), absmax


@dataclass
class NF4Weight:
    """One NF4-quantized tensor: packed 4-bit codes plus the (optionally double-quantized) absmax."""

    packed: torch.Tensor  # uint8 (ceil(numel/2),), element 2j in the high nibble
    absmax: torch.Tensor  # double quant: uint8 codes (n_blocks,); else fp32 (n_blocks,)
    shape: torch.Size  # original shape, (out_features, in_features) for linears
    dtype: torch.dtype  # dtype to dequantize to by default (the original weight's dtype)
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None  # fp32 (ceil(n_blocks/256),)
    nested_code: torch.Tensor | None = None  # fp32 (256,) the signed dynamic map
    offset: torch.Tensor | None = None  # fp32 scalar: mean of the fp32 absmax
    nested_blocksize: int = 256

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.numel / self.blocksize)

    @property
    def nbytes(self) -> int:
        """All stored bytes: packed codes, absmax and the double-quant statistics."""
        tensors = (self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block absmax (n_blocks,) fp32, decoded from 8 bits when double-quantized."""
        if not self.double_quant:
            return self.absmax.float()
        # absmax = nested_code[c] * nested_absmax[block // 256] + offset, rounded after each op
        scale = self.nested_absmax.repeat_interleave(self.nested_blocksize)[: self.absmax.numel()]
        return self.nested_code[self.absmax.long()] * scale + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in `dtype` (default: the original dtype), shape `self.shape`.

        w = NF4_CODE[code] * absmax[block], computed in fp32 and rounded once to `dtype`.
        """
        dtype = dtype or self.dtype
        if _use_bnb_kernel(self, dtype):
            # bitsandbytes' C++ CPU kernel: ~10x faster than the torch ops, the same values
            return _bnb_ops().dequantize_4bit(self.packed.view(-1, 1), self.absmax_fp32(), self.blocksize, "nf4",
                                              list(self.shape), dtype).view(self.shape)
        return self.dequantize_torch(dtype)

    def dequantize_torch(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`dequantize` in plain torch ops, on any device and shape."""
        n, padded_n = self.numel, self.n_blocks * self.blocksize
        values = _nf4_levels(self.packed, n)  # (n,)
        if padded_n > n:
            values = F.pad(values, (0, padded_n - n))
        w = (values.view(self.n_blocks, self.blocksize) * self.absmax_fp32().view(-1, 1)).view(-1)[:n]
        return w.to(dtype or self.dtype).view(self.shape)

    def to(self, device) -> "NF4Weight":
        """A copy with every tensor on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, packed=move(self.packed), absmax=move(self.absmax),
                       nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code),
                       offset=move(self.offset))


def bnb_cpu_kernel_is_exact(shape, blocksize: int) -> bool:
    """Whether bitsandbytes' CPU dequantization kernel decodes this layout exactly.

    The kernel walks (rows, columns) and is exact only for 64-value blocks that never straddle a row (the
    last dimension a multiple of 64): other block sizes and widths decode wrongly in bitsandbytes 0.50 on
    some CPUs (seen with AVX-512; an AVX2-only one decodes them right), so they keep to the torch ops on
    every CPU. Every linear of the supported models fits.
    """
    return blocksize == 64 and shape[-1] % 64 == 0


def _use_bnb_kernel(q: "NF4Weight", dtype: torch.dtype) -> bool:
    return (q.packed.device.type == "cpu" and bnb_cpu_kernel_is_exact(q.shape, q.blocksize)
            and dtype in FLOAT_DTYPES.values() and _bnb_ops() is not None)


@functools.cache
def _bnb_ops():
    """torch.ops.bitsandbytes once bitsandbytes is imported, or None if it cannot be."""
    try:
        import_bitsandbytes()  # registers the ops
        return torch.ops.bitsandbytes
    except Exception:  # an install without a working bitsandbytes falls back to the torch ops
        return None


def import_bitsandbytes():
    """The bitsandbytes module, imported so that it cannot download code (qtune's only way to import it).

    On CPUs with AVX-512 BF16, bitsandbytes 0.50's CPU backend calls `kernels.get_kernel(...)` while it is
    imported whenever a package named `kernels` is installed, which fetches compiled code from the Hugging
    Face Hub and runs it. qtune uses none of those kernels, so during that first import `kernels` is made
    unimportable (bitsandbytes then keeps its bundled library) and restored right after.
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    hidden = sys.modules.get("kernels", _ABSENT)
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)  # it warns that the hub kernel did not load: qtune never wanted it
    try:
        import bitsandbytes

        return bitsandbytes
    finally:
        log.setLevel(level)
        if hidden is _ABSENT:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = hidden


_ABSENT = object()


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize `w` (fp32, bf16 or fp16, any shape) to NF4 exactly as bitsandbytes' `quantize_4bit`."""
    if w.dtype not in FLOAT_DTYPES.values():
        raise ValueError(f"quantize_nf4: weight dtype {w.dtype} is not float32, bfloat16 or float16")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize={blocksize} is not one of {VALID_BLOCKSIZES}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4: weight of shape {tuple(w.shape)} is empty")
    flat = w.detach().reshape(-1)  # (n,)
    # Chunks of whole blocks (and an even count, so bytes never straddle chunks) bound the fp32 and int64
    # temporaries to ~100 MB whatever the tensor's size: quantize-on-load stays near one tensor's size.
    absmax_parts, packed_parts = [], []
    for start in range(0, flat.numel(), QUANT_CHUNK):
        part_absmax, codes = _nf4_codes(flat[start:start + QUANT_CHUNK].float(), blocksize)
        absmax_parts.append(part_absmax)
        packed_parts.append(_pack_nibbles(codes))
        del codes
    absmax = torch.cat(absmax_parts)
    q = NF4Weight(packed=torch.cat(packed_parts), absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if double_quant:
        nested_code = signed_dynamic_map().to(w.device)
        offset = absmax.mean()
        q.absmax, q.nested_absmax = quantize_blockwise_dynamic(absmax - offset, nested_code, q.nested_blocksize)
        q.nested_code, q.offset = nested_code, offset
    return q


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dequantized weight of `q` in `dtype` (default: the original dtype)."""
    return q.dequantize(dtype)
