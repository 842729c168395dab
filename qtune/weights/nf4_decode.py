"""NF4 products for decoding on the CPU through bitsandbytes' own 4-bit kernel, on qtune's NF4 bytes.

Decoding multiplies every weight by one or a few rows per token, so its time is the time to read the weights.
bitsandbytes' CPU backend (0.50) has a compiled kernel for CPUs with AVX-512 BF16 that reads the 4-bit codes
directly, a quarter of the bytes of an fp32 copy; transformers + bitsandbytes decodes through it on such a CPU.
It computes

    y = bf16( bf16(x) · (bf16(NF4_CODE[c]) · bf16(absmax))ᵀ )      summed in fp32, returned in x's dtype

(`reference_nf4_gemv`), so its outputs carry bf16 rounding where qtune's dense fp32 copies are exact. It takes
the codes in its own layout (rows in tiles of 32, see `pack_for_bnb_gemv`) and the per-block absmax transposed
to (in / 64, out) in bf16. qtune's
packed bytes are bitsandbytes' (tests/test_quant.py); the relayout here is checked byte for byte against
bitsandbytes' own conversion.

Whether the kernel is there and right is not assumed from the CPU's name: `bnb_gemv_is_exact` runs it once per
process on a small weight against the reference (without AVX-512 BF16, or where bitsandbytes did not register
its CPU kernel, the op falls back to code that reads the standard layout and the check fails).
"""

import functools

import torch
from torch import nn

from qtune.kernels.nf4 import NF4_CODE
from qtune.weights.nf4 import NF4Weight, _bnb_ops, _nf4_levels, quantize_nf4

GEMV_TILE = 32  # output rows per tile of the kernel's layout
GEMV_BLOCKSIZE = 64  # the kernel reads one absmax per 64 inputs of a row


def gemv_layout_applies(shape, blocksize: int) -> bool:
    """Whether a (out, in) weight fits the kernel's layout: 64-value blocks inside rows, whole tiles of rows."""
    return (len(shape) == 2 and blocksize == GEMV_BLOCKSIZE and shape[1] % GEMV_BLOCKSIZE == 0
            and shape[0] % GEMV_TILE == 0)


def reference_nf4_gemv(x: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """The kernel's result in plain torch: x (..., in) -> (..., out) in x's dtype, from bf16 operands, for a
    weight of the kernel's layout (`gemv_layout_applies`)."""
    out_features, in_features = q.shape
    levels = _nf4_levels(q.packed, q.numel).bfloat16().float().view(out_features, -1, q.blocksize)
    scales = q.absmax_fp32().bfloat16().float().view(out_features, -1, 1)
    w = (levels * scales).view(out_features, in_features)  # exact in fp32: a product of two bf16 values
    y = x.bfloat16().float() @ w.t()
    return y.bfloat16().to(x.dtype)


def pack_for_bnb_gemv(q: NF4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """qtune's NF4 weight in the kernel's layout: (codes (out, in / 2) uint8, absmax (in / 64, out) bf16).

    Within a tile of 32 rows, the codes of input pair (k, k + 1) come as 64 values: row 0's two, row 1's two,
    ... row 31's two; byte i of the pair's 32 bytes holds value i in its low nibble and value 32 + i in its
    high one. The tiles follow each other along the rows, the input pairs inside a tile.
    """
    out_features, in_features = q.shape
    codes = torch.stack([q.packed >> 4, q.packed & 15], dim=-1)  # (n / 2, 2) element order
    tiles = codes.view(out_features // GEMV_TILE, GEMV_TILE, in_features // 2, 2).transpose(1, 2)
    values = tiles.reshape(-1, 2, GEMV_TILE)  # (tiles * in / 2, 2, 32): values 0..31, then 32..63
    packed = (values[:, 1] << 4) | values[:, 0]
    absmax = q.absmax_fp32().view(out_features, -1).t().bfloat16().contiguous()  # (in / 64, out)
    return packed.reshape(out_features, in_features // 2), absmax


class BnbGemvNF4Linear(nn.Module):
    """A frozen NF4 projection for no-grad decoding on the CPU: y = bitsandbytes' 4-bit kernel(x) + bias.

    Made from an NF4 weight with `from_nf4` where `bnb_gemv_applies`; it holds only the relaid codes and
    bf16 scales (as many bytes as the NF4 weight) and computes what `reference_nf4_gemv` does.
    """

    def __init__(self, q: NF4Weight, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        packed, absmax = pack_for_bnb_gemv(q)
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("code", NF4_CODE.to(packed.device))  # tells the op NF4 from FP4
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        y = _bnb_ops().gemv_4bit(x, self.packed, [self.out_features, self.in_features], self.absmax, self.code,
                                 GEMV_BLOCKSIZE)
        return y if self.bias is None else y.add_(self.bias.to(y.dtype))


def bnb_gemv_applies(q: NF4Weight) -> bool:
    """Whether `BnbGemvNF4Linear` can stand in for this weight: a CPU tensor of the kernel's layout, on a
    machine where the kernel is present and computes `reference_nf4_gemv`."""
    return q.device.type == "cpu" and gemv_layout_applies(q.shape, q.blocksize) and bnb_gemv_is_exact()


@functools.cache
def bnb_gemv_is_exact() -> bool:
    """bitsandbytes' CPU 4-bit kernel is registered and equals `reference_nf4_gemv` on a probe weight, up to
    the fp32 summation order (checked once per process)."""
    if _bnb_ops() is None:
        return False
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2 * GEMV_TILE, 3 * GEMV_BLOCKSIZE, generator=gen)
    x = torch.randn(3, w.shape[1], generator=gen)
    q = quantize_nf4(w)
    try:
        y = BnbGemvNF4Linear(q, None)(x)
    except Exception:  # a bitsandbytes without the op, or one that rejects the layout: use the dense copies
        return False
    ref = reference_nf4_gemv(x, q)
    # the outputs are bf16 values: the summation order may move one by a unit in the last place (2^-8 relative)
    return y.shape == ref.shape and bool(((y - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all())
