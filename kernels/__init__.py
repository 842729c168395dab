"""Triton kernels, each beside the plain-torch reference it must equal. Installed as `qtune.kernels`.

Every kernel module lists the configurations it ships in `compile_specs()`, so that
`benchmarks/kernel_report.py` can compile each of them ahead of time for real GPU targets.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelSpec:
    """One shipped configuration of one `@triton.jit` kernel, enough to compile it ahead of time."""

    name: str  # readable name including the configuration, e.g. "nf4_dequantize[BLOCK=1024]"
    fn: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type string ("*fp32", "*bf16", "*u8", "i32", "fp32", "constexpr")
    constexprs: dict = field(default_factory=dict)  # argument name -> value for constexpr arguments
    num_warps: int = 4
    num_stages: int = 3
