"""qtune imports and trains where `import triton` fails (macOS, Windows, a broken install).

Each test runs a subprocess whose PYTHONPATH starts with a stand-in `triton` package that raises
ImportError, so `find_spec("triton")` still finds one (the case the dispatcher must not trust) while every
import of it fails: the ops take their torch paths and refuse kernels="triton" with a message, and a short
`qtune sft` on a tiny model trains with TRITON_INTERPRET unset, as on a user's machine.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tiny import save_tiny_with_tokenizer

REPO = Path(__file__).resolve().parents[1]
# Runs the real CLI, then reports (at exit, after click's sys.exit) what the process imported.
CHILD = """
import atexit, json, sys

def report():
    from qtune.kernels.dispatch import triton_importable
    imported = sorted(m for m in sys.modules if m.split(".")[0] == "triton" or m.startswith("qtune.kernels.triton"))
    print("IMPORTS " + json.dumps({"triton_modules": imported, "triton_importable": triton_importable()}),
          file=sys.stderr)

atexit.register(report)
from qtune.cli import main
main()
"""


# The ops without triton, even with TRITON_INTERPRET=1 left set: the torch paths run, "triton" is refused.
OPS = """
import torch
from qtune.kernels.dispatch import triton_importable, use_triton
from qtune.kernels.lora import LoraParams, lora_mlp
from qtune.kernels.nf4 import dequantize_nf4, reference_dequantize_nf4
from qtune.weights.nf4 import quantize_nf4

assert not triton_importable()
q = quantize_nf4(torch.randn(16, 64))
assert torch.equal(dequantize_nf4(q, torch.float32), reference_dequantize_nf4(q, torch.float32))
x = torch.randn(5, 64, requires_grad=True)
a, b = torch.randn(4, 64, requires_grad=True), torch.randn(16, 4)
block = [LoraParams(q, None, a, b, 0.5, 0.1), LoraParams(q, None), LoraParams(torch.randn(64, 16), None)]
lora_mlp(x, *block).sum().backward()
assert x.grad is not None and a.grad is not None
try:
    use_triton("triton", x)
except RuntimeError as e:
    print(e)
"""


def stand_in_env(tmp_path) -> dict:
    """The environment of a process where `import triton` finds a package that raises ImportError."""
    stand_in = tmp_path / "no_triton" / "triton"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text('raise ImportError("triton is not installed here (test stand-in)")\n')
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(stand_in.parent), str(REPO)]), OMP_NUM_THREADS="1")
    return env


def test_ops_take_the_torch_path_and_refuse_triton(tmp_path):
    env = {**stand_in_env(tmp_path), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", OPS], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kernels='triton' but the triton package is not installed" in proc.stdout


def test_sft_runs_where_triton_cannot_be_imported(tmp_path):
    env = stand_in_env(tmp_path)
    tiny_dir = save_tiny_with_tokenizer("llama", tmp_path / "tiny", seed=0)
    out = tmp_path / "run"
    args = ["sft", "quickstart", f"model.path={tiny_dir}", f"output.dir={out}", "data.cache_dir=",
            "data.path=qtune:checkable-tasks?count=48&seed=0", "data.val_size=8",
            "eval.exact_match=0", "train.max_steps=2", "train.save_every=0", "train.log_every=1"]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), steps
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # the run's last stdout line
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"]), summary
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("IMPORTS ")]
    imports = json.loads(line.removeprefix("IMPORTS "))
    assert imports == {"triton_modules": [], "triton_importable": False}
