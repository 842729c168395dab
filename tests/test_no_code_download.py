"""qtune never makes bitsandbytes fetch code from a model hub.

bitsandbytes 0.50's CPU backend, on CPUs with AVX-512 BF16, calls `kernels.get_kernel(...)` while it is
imported whenever a package named `kernels` is installed: that downloads compiled code from the Hugging Face
Hub and runs it. Each check runs in a fresh interpreter (bitsandbytes is imported once per process) in which
`kernels` is a stand-in whose `get_kernel` records its calls, and the CPU is made to report AVX-512 BF16 so
that the path is reachable on any machine. A control run shows that a plain `import bitsandbytes` there does
reach it, so the check can fail.
"""

import json
import subprocess
import sys

SETUP = r'''
import importlib, importlib.abc, json, sys, types

calls = []
stand_in = types.ModuleType("kernels")
def get_kernel(*args, **kwargs):
    calls.append(list(args))
    raise RuntimeError("kernels.get_kernel reached: this would download code from a hub")
stand_in.get_kernel = get_kernel
sys.modules["kernels"] = stand_in


class ReportAvx512Bf16(importlib.abc.MetaPathFinder):
    """Just before bitsandbytes' CPU backend loads, its AVX-512 BF16 probe answers yes."""
    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes.backends.cpu.ops":
            importlib.import_module("bitsandbytes.functional").has_avx512bf16 = lambda: True
        return None


sys.meta_path.insert(0, ReportAvx512Bf16())
'''

QTUNE_CALLS = SETUP + r'''
import torch
from qtune.train.common import build_optimizer
from qtune.weights.nf4 import quantize_nf4

w = torch.randn(64, 128)
q = quantize_nf4(w)
exact = torch.equal(q.dequantize(torch.float32), q.dequantize_torch(torch.float32))  # bitsandbytes' CPU kernel
p = torch.nn.Parameter(torch.randn(64, 256))
for name in ("adamw8bit", "paged_adamw", "paged_adamw8bit"):
    opt = build_optimizer([p], name, lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
print(json.dumps({"calls": calls, "bnb_loaded": "bitsandbytes" in sys.modules, "exact": exact,
                  "kernels_restored": sys.modules.get("kernels") is stand_in}))
'''

CONTROL = SETUP + r'''
import bitsandbytes
print(json.dumps({"calls": calls}))
'''


def run_fresh(code: str, tmp_path) -> dict:
    # Run outside the repository: its `kernels/` folder would otherwise shadow the `kernels` name.
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_qtune_bitsandbytes_calls_never_reach_the_hub_kernel_loader(tmp_path):
    control = run_fresh(CONTROL, tmp_path)
    assert control["calls"] == [["kernels-community/quantization-bitsandbytes"]]  # the path exists
    got = run_fresh(QTUNE_CALLS, tmp_path)
    assert got == {"calls": [], "bnb_loaded": True, "exact": True, "kernels_restored": True}

