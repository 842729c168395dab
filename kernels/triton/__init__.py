"""The `@triton.jit` kernels and their launchers, imported only on the Triton path (triton is optional)."""
