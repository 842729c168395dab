"""Triton kernels, each beside the plain-torch reference it must equal. Installed as `qtune.kernels`."""
