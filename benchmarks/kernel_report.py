"""Compile every shipped Triton kernel configuration for real GPUs, ahead of time, on a machine without one.

Each kernel module lists its configurations in `compile_specs()` (see `kernels/__init__.py`). For every
configuration and every target below, this script runs Triton's full pipeline down to a cubin, then runs
the `ptxas` bundled with Triton with `-v` on the generated PTX (same flags as Triton's own cubin step) to
read registers, spill bytes and stack per thread; shared memory per block comes from Triton's metadata.

It fails (exit status 1) when a configuration does not compile, spills registers to local memory, or needs
more than 99 KB of shared memory (the per-block limit of sm_86 / sm_89: a kernel over it launches on an
A100 or H100 but not on an RTX 3090 / 4090). Modules that do not exist yet are listed as missing.

Each configuration is compiled in the two variants the JIT builds at the extremes: "unaligned" (no
`tt.divisibility` hints: odd sizes, the highest register pressure) and "aligned" (every pointer and integer
argument divisible by 16, as in every real model: Triton then vectorizes and pipelines loads through shared
memory). Compile options the launcher passes (`enable_fp_fusion=False` for NF4) are passed here too, and a
configuration launched only on some compute capabilities (KernelSpec.capabilities) is compiled for those.
sm_120 needs the ptxas of CUDA 12.8 or later (Triton 3.9 bundles 13.4, which compiled everything here).

    python benchmarks/kernel_report.py                 # every configuration on every target
    python benchmarks/kernel_report.py --subset        # each kernel on each target, each configuration once

Prints a table, then one JSON line: {"kernels": {name: {"sm_80": {...}, ...}}, "missing": [...], ...}.
"""

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_json  # noqa: E402

MODULES = ("qtune.kernels.nf4", "qtune.kernels.lora", "qtune.kernels.logprobs", "qtune.kernels.experts")
TARGETS = {75: "T4 / RTX 20xx", 80: "A100", 86: "RTX 3090", 89: "RTX 4090", 90: "H100", 120: "RTX 50xx"}
VARIANTS = ("unaligned", "aligned")
MAX_SHARED_BYTES = 99 * 1024
WARP_SIZE = 32


def load_specs(module_names):
    """({module: specs}, missing modules, {module: import error}); only absent modules count as missing."""
    specs, missing, broken = {}, [], {}
    for name in module_names:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                broken[name] = f"{type(e).__name__}: {e}"
            else:
                missing.append(name)
            continue
        except Exception as e:  # a module that exists but does not import is a failure, not a gap
            broken[name] = f"{type(e).__name__}: {e}"
            continue
        if not hasattr(module, "compile_specs"):
            broken[name] = "has no compile_specs() (see kernels/__init__.py)"
            continue
        specs[name] = module.compile_specs()
    return specs, missing, broken


def spec_targets(spec, targets):
    """The targets a configuration is launched on: all of `targets`, or those among its capabilities."""
    spans = getattr(spec, "capabilities", ((0, 1000),))
    return [cap for cap in targets if any(low <= cap < high for low, high in spans)]


def plan_jobs(specs, targets, subset):
    """(module, spec index, capability, variant) tuples. The subset compiles every kernel function on every
    target in both variants and every configuration once (rotating configurations across targets)."""
    jobs = []
    for module, module_specs in specs.items():
        if not subset:
            jobs += [(module, i, cap, v) for i, spec in enumerate(module_specs) for cap in spec_targets(spec, targets)
                     for v in VARIANTS]
            continue
        by_fn = {}
        for i, spec in enumerate(module_specs):
            by_fn.setdefault(getattr(spec.fn, "__name__", spec.name), []).append(i)
        for indices in by_fn.values():
            pairs = set()
            for j, cap in enumerate(targets):  # each target sees the kernel through a configuration launched there
                launched = [i for i in indices if cap in spec_targets(module_specs[i], targets)]
                if launched:
                    pairs.add((launched[j % len(launched)], cap))
            for k, idx in enumerate(indices):  # each configuration compiles at least once
                own = spec_targets(module_specs[idx], targets)
                if own and not any(i == idx for i, _ in pairs):
                    pairs.add((idx, own[k % len(own)]))
            jobs += [(module, i, cap, v) for i, cap in sorted(pairs) for v in VARIANTS]
    return jobs


def divisibility_hints(spec) -> dict:
    """The aligned variant's attributes: every pointer and integer argument divisible by 16."""
    names = list(spec.signature)
    return {(names.index(name),): [["tt.divisibility", 16]] for name, ty in spec.signature.items()
            if ty.startswith("*") or ty in ("i32", "i64")}


def ptxas_usage(ptx: str, capability: int) -> dict:
    """Registers, spill stores/loads and stack bytes per thread, from `ptxas -v` on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        try:
            tool = get_ptxas(capability)  # Triton 3.3 and 3.5+: one ptxas per architecture family
        except TypeError:
            tool = get_ptxas()  # Triton 3.4: one ptxas for all
        path = getattr(tool, "path", None) or tool[0]  # Triton 3.3 returns (path, version), later a tool object
        cmd = [path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(Path(tmp) / "kernel.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    spills = [tuple(map(int, m)) for m in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return {
        "registers": max(int(r) for r in re.findall(r"Used (\d+) registers", log)),
        "spill_store_bytes": sum(s for s, _ in spills),
        "spill_load_bytes": sum(load for _, load in spills),
        "stack_bytes": sum(int(s) for s in re.findall(r"(\d+) bytes stack frame", log)),
    }


def compile_job(job):
    """Compile one configuration for one target (runs in a worker process). Returns (job, figures or error)."""
    import triton
    from triton.backends.compiler import GPUTarget

    module, index, capability, variant = job
    spec = importlib.import_module(module).compile_specs()[index]
    attrs = divisibility_hints(spec) if variant == "aligned" else None
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **getattr(spec, "options", {})}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Triton's notice about its future fp-fusion default
            src = triton.compiler.ASTSource(spec.fn, spec.signature, constexprs=spec.constexprs, attrs=attrs)
            kernel = triton.compile(src, target=GPUTarget("cuda", capability, WARP_SIZE), options=options)
        figures = {"shared_bytes": kernel.metadata.shared, **ptxas_usage(kernel.asm["ptx"], capability)}
    except Exception as e:
        return job, {"error": f"{type(e).__name__}: {str(e).strip()[:2000]}"}
    figures["compile_s"] = round(time.perf_counter() - start, 2)
    return job, figures


def problems(figures) -> list[str]:
    if "error" in figures:
        return [figures["error"]]
    found = []
    if figures["spill_store_bytes"] or figures["spill_load_bytes"]:
        found.append(f"spills {figures['spill_store_bytes']} B stores / {figures['spill_load_bytes']} B loads")
    if figures["shared_bytes"] > MAX_SHARED_BYTES:
        found.append(f"shared memory {figures['shared_bytes']} B > {MAX_SHARED_BYTES} B")
    return found


def print_table(console, report, targets):
    table = Table(title="Triton kernels compiled ahead of time: registers / spill bytes / shared KB per block")
    table.add_column("kernel configuration", overflow="fold")
    for cap in targets:
        table.add_column(f"sm_{cap} ({TARGETS.get(cap, '?')})", justify="right")
    for name, per_target in report.items():
        cells = []
        for cap in targets:
            fig = per_target.get(f"sm_{cap}")
            if fig is None:
                cells.append("-")
            elif "error" in fig:
                cells.append("[red]FAILED[/red]")
            else:
                spill = fig["spill_store_bytes"] + fig["spill_load_bytes"]
                text = f"{fig['registers']} / {spill} / {fig['shared_bytes'] / 1024:.1f}"
                cells.append(f"[red]{text}[/red]" if problems(fig) else text)
        table.add_row(escape(name), *cells)  # names hold [..] that rich would read as markup
    console.print(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--modules", default=",".join(MODULES), help="kernel modules to compile")
    parser.add_argument("--subset", action="store_true", help="each kernel on each target, each config once")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = parser.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")]

    # Real GPU code is compiled here: the interpreter must be off before any kernel module is imported, and
    # the workers (spawned, so they start clean) inherit this environment and a throwaway cache.
    os.environ.pop("TRITON_INTERPRET", None)
    cache = tempfile.TemporaryDirectory(prefix="qtune-kernel-report-")
    os.environ["TRITON_CACHE_DIR"] = cache.name

    specs, missing, broken = load_specs(args.modules.split(","))
    jobs = plan_jobs(specs, targets, args.subset)
    start = time.perf_counter()
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=get_context("spawn")) as pool:
        results = list(pool.map(compile_job, jobs))
    cache.cleanup()

    report, failures = {}, [f"{name}: {error}" for name, error in broken.items()]
    for (module, index, cap, variant), figures in results:
        name = f"{specs[module][index].name} {variant}"
        report.setdefault(name, {})[f"sm_{cap}"] = figures
        failures += [f"{name} on sm_{cap}: {p}" for p in problems(figures)]

    console = Console(width=160)
    print_table(console, report, targets)
    for name in missing:
        console.print(f"[yellow]missing[/yellow] {name}: module not found, nothing compiled")
    for failure in failures:
        console.print(f"[red]FAIL[/red] {escape(failure)}")
    console.print(f"{len(jobs)} compilations in {time.perf_counter() - start:.1f} s, {len(failures)} failure(s)")
    print_json({"kernels": report, "missing": missing, "failures": failures, "targets": [f"sm_{c}" for c in targets],
                "subset": args.subset, "ok": not failures})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
