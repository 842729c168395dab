"""NF4Linear: a frozen 4-bit linear layer, y = x Wᵀ (+ bias) with W stored as NF4 (qtune/weights/nf4.py)."""

import weakref

import torch
from torch import nn

from qtune.kernels.cpu.linear import frozen_linear
from qtune.kernels.dispatch import check_mode, use_triton
from qtune.kernels.lora import LoraParams
from qtune.kernels.nf4 import nf4_matmul
from qtune.weights.nf4 import NF4Weight, quantize_nf4
from qtune.weights.nf4_decode import BnbGemvNF4Linear, bnb_gemv_applies


class NF4Linear(nn.Module):
    """A frozen 4-bit linear layer: y = x @ W^T (+ bias), W stored as NF4.

    The quantized tensors are buffers, so `.to(device)` and `state_dict()` carry them. `kernels`
    chooses the implementation per call ("auto" | "triton" | "torch", see kernels/dispatch.py).
    """

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-d (out_features, in_features) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"NF4Linear bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self.weight_dtype = weight.dtype
        self.blocksize = weight.blocksize
        self.nested_blocksize = weight.nested_blocksize
        self.kernels = "auto"
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        self.register_buffer("nested_absmax", weight.nested_absmax)
        self.register_buffer("nested_code", weight.nested_code)
        self.register_buffer("offset", weight.offset)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._gemv_stand_in = None  # (its sources, the BnbGemvNF4Linear) kept by `decoding_module`

    @classmethod
    def from_linear(cls, linear: nn.Linear, double_quant: bool = True) -> "NF4Linear":
        """Quantize an `nn.Linear` (its weight dtype becomes the default compute dtype)."""
        return cls(quantize_nf4(linear.weight.detach(), double_quant=double_quant), linear.bias)

    def nf4_weight(self) -> NF4Weight:
        """The buffers viewed as an `NF4Weight` (no copy)."""
        return NF4Weight(packed=self.packed, absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                         dtype=self.weight_dtype, blocksize=self.blocksize, nested_absmax=self.nested_absmax,
                         nested_code=self.nested_code, offset=self.offset, nested_blocksize=self.nested_blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.nf4_weight().dequantize(dtype)

    def decoding_module(self, kernel: str, dtype: torch.dtype) -> nn.Module:
        """A stand-in for no-grad decoding on the CPU: bitsandbytes' 4-bit kernel in bf16 (kernel="bitsandbytes",
        where `bnb_gemv_applies`), else an `nn.Linear` holding the exact dense weight in `dtype`."""
        q = self.nf4_weight()
        if kernel == "bitsandbytes" and bnb_gemv_applies(q):
            # kept between calls (the relayout costs as much as a short generation; it is as small as the NF4
            # weight): valid while the buffers are the same tensors, unmodified
            source = [(weakref.ref(t), t._version) for t in (self.packed, self.absmax, self.bias) if t is not None]
            cached = self._gemv_stand_in
            if cached is None or [(r(), v) for r, v in cached[0]] != [(r(), v) for r, v in source]:
                self._gemv_stand_in = cached = (source, BnbGemvNF4Linear(q, self.bias))
            return cached[1]
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        dense.weight = nn.Parameter(q.dequantize(dtype), requires_grad=False)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return dense

    def fused_params(self) -> LoraParams:
        """This layer as the fused QLoRA ops take it: the NF4 weight (dequantized inside the op) and bias."""
        return LoraParams(self.nf4_weight(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_features) -> (..., out_features)
        if use_triton(check_mode(self.kernels), x):
            return nf4_matmul(x, self.nf4_weight(), self.bias)
        return frozen_linear(x, self.nf4_weight(), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"double_quant={self.nested_absmax is not None}, kernels={self.kernels!r}")
