"""benchmarks/kernel_report.py compiles the shipped kernels for real GPUs without one, and fails loudly.

The script runs in a subprocess without TRITON_INTERPRET (the test session sets it for the CPU lane), so
Triton builds real PTX and cubins for sm_75 / sm_80 / sm_86 / sm_89 / sm_90 / sm_120, each configuration in
the unaligned and the 16-aligned variant the JIT builds.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "kernel_report.py"
KERNEL_MODULES = ("qtune.kernels.nf4", "qtune.kernels.lora", "qtune.kernels.logprobs", "qtune.kernels.experts")
TARGETS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_120")
MAX_SHARED_BYTES = 99 * 1024

# A kernel module written for this test: one configuration that needs 128 KB of shared memory for its
# dot operands (fp16 tiles of 256x128 and 128x256), one whose signature lacks an argument.
OVERSIZED_MODULE = textwrap.dedent('''
    import triton
    import triton.language as tl
    from qtune.kernels import KernelSpec

    @triton.jit
    def big_dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr):
        m, k = tl.arange(0, M), tl.arange(0, K)
        a = tl.load(a_ptr + m[:, None] * K + k[None, :])
        b = tl.load(b_ptr + k[:, None] * M + m[None, :])
        tl.store(c_ptr + m[:, None] * M + m[None, :], tl.dot(a, b))

    def compile_specs():
        sig = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "M": "constexpr", "K": "constexpr"}
        return [KernelSpec("big_dot[M=256,K=128]", big_dot_kernel, sig, {"M": 256, "K": 128}, 8, 1),
                KernelSpec("big_dot[no c_ptr]", big_dot_kernel, {k: v for k, v in sig.items() if k != "c_ptr"},
                           {"M": 16, "K": 16}, 4, 1)]
''')


def run_report(*args, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr[-3000:]}"
    return proc, json.loads(lines[-1])


def test_every_kernel_compiles_for_every_target_without_spills():
    proc, report = run_report("--subset")
    assert proc.returncode == 0 and report["ok"], f"{report['failures']}\n{proc.stdout[-3000:]}"
    absent = [m for m in KERNEL_MODULES if importlib.util.find_spec(m) is None]
    assert report["missing"] == absent
    assert report["targets"] == list(TARGETS)
    kernels = report["kernels"]
    logprobs = {name: figs for name, figs in kernels.items() if name.startswith(("logsumexp_partials[", "logit_grad["))}
    # two kernels x two variants x (uncapped: fp32 / fp16 / bf16 tiles + Turing's fp16 / bf16 + sm_120's fp32;
    # soft-capped: the same but one fp32 tile everywhere)
    assert len(logprobs) == 2 * 2 * (6 + 5)
    capped = [name for name in logprobs if "SOFTCAP=30.0]" in name]
    assert len(capped) == 2 * 2 * 5
    assert sum(name.split("[")[1].startswith("fp32,") for name in capped) == 2 * 2
    turing = [name for name in logprobs if name.split("[")[1].startswith(("bf16,", "fp16,")) and "BLOCK_V=64," in name]
    assert len(turing) == 2 * 2 * 2 * 2
    assert turing and all(set(logprobs[name]) == {"sm_75"} for name in turing)  # Turing tiles only where they run
    blackwell = [name for name in logprobs if name.split("[")[1].startswith("fp32,") and "stages=1" in name]
    assert len(blackwell) == 2 * 2 and all(set(logprobs[name]) == {"sm_120"} for name in blackwell)
    for kernel in ("logsumexp_partials[", "logit_grad[", "nf4_dequantize[", "nf4_matmul_small_m[", "lora_dropout[",
                   "swiglu_halves_forward[", "swiglu_halves_backward[", "geglu_halves_forward[", "geglu_halves_backward[", "grouped_nf4_matmul[",
                   "grouped_nf4_matmul_transposed["):
        for variant in ("unaligned", "aligned"):  # each kernel in both variants on every target
            covered = {t for name, figs in kernels.items() if name.startswith(kernel) and name.endswith(variant)
                       for t in figs}
            assert covered == set(TARGETS), (kernel, variant, covered)
    for name, per_target in report["kernels"].items():
        for target, figs in per_target.items():
            assert 0 < figs["registers"] <= 255, (name, target, figs)
            assert figs["spill_store_bytes"] == figs["spill_load_bytes"] == 0, (name, target, figs)
            assert figs["shared_bytes"] <= MAX_SHARED_BYTES, (name, target, figs)


def test_oversized_or_broken_configs_fail_the_report(tmp_path):
    package = tmp_path / "report_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "oversized.py").write_text(OVERSIZED_MODULE)
    proc, report = run_report("--targets", "86", "--modules", "report_probe.oversized,report_probe.absent",
                              pythonpath=tmp_path)
    assert proc.returncode == 1 and not report["ok"]
    assert report["missing"] == ["report_probe.absent"]
    big = report["kernels"]["big_dot[M=256,K=128] unaligned"]["sm_86"]
    assert big["shared_bytes"] > MAX_SHARED_BYTES
    assert "error" in report["kernels"]["big_dot[no c_ptr] aligned"]["sm_86"]
    failures = "\n".join(report["failures"])
    assert "big_dot[M=256,K=128] unaligned on sm_86: shared memory" in failures
    assert "big_dot[no c_ptr] aligned on sm_86:" in failures


def test_report_compiles_what_the_launchers_pass():
    """The NF4 launchers pass enable_fp_fusion=False; their KernelSpecs must carry it so the report compiles
    that code, not the fused-multiply-add variant."""
    from qtune.kernels import nf4

    specs = nf4.compile_specs()
    assert specs and all(spec.options.get("enable_fp_fusion") is False for spec in specs)

