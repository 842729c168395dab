"""The ops qtune's model and losses run: Triton kernels and CPU fast paths, each beside its plain-torch reference.

This folder sits at the repository's top level (`kernels/`) but installs as the package `qtune.kernels`:
pyproject.toml remaps it (`[tool.setuptools.package-dir]`), so import it as `qtune.kernels.<op>`. Tools
that map module names to paths (grep for `qtune/kernels`, IDE jumps, import linters) cannot follow the
remap; look here.

- `<op>.py` (nf4, lora, logprobs): the plain-torch reference, the torch path, the autograd functions,
  the public op and `compile_specs()`; they import without triton.
- `triton/<op>.py`: that op's `@triton.jit` kernels and launchers, imported only on the Triton path
  (triton is optional: it is absent on macOS and Windows).
- `cpu/`: the CPU fp32 fast paths, each beside its plain reference; `dispatch.py`: which path runs.
Nothing here imports from qtune outside `qtune.kernels`.

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
    options: dict = field(default_factory=dict)  # further compile options the launcher passes (enable_fp_fusion)
    capabilities: tuple = ((0, 1000),)  # launched on compute capabilities in these [low, high) ranges (10·major + minor)
