import os

# Triton reads this when kernels are defined: the CPU test lane runs every kernel in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
