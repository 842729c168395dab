"""tests/conftest.py picks the lane: the Triton interpreter only where no CUDA device is present.

The check runs conftest's decision in a fresh interpreter with CUDA reported present or absent, since this
process has already made its choice.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

PROBE = """
import os, runpy, sys, torch
torch.cuda.is_available = lambda: {cuda}
runpy.run_path({path!r})
print(os.environ.get("TRITON_INTERPRET", "unset"))
"""


@pytest.mark.parametrize("cuda, expected", [(True, "unset"), (False, "1")], ids=["cuda-present-compiles",
                                                                                    "no-cuda-interprets"])
def test_triton_interpret_only_without_cuda(cuda, expected):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(cuda=cuda, path=str(CONFTEST))], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == expected
