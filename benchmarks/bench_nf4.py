"""NF4 benchmark: dequantization and the 4-bit linear y = x Wᵀ on Llama-7B projection shapes.

Implementations: the Triton kernels (qtune.kernels.nf4), the plain-torch reference, torch.compile of
the reference, and bitsandbytes (`dequantize_4bit`, `matmul_4bit`). Rows (median, min, max ms; on
CUDA also achieved GB/s, its fraction of the peak DRAM bandwidth and peak memory) are appended to
benchmarks/results.csv; the last stdout line is one JSON object.

    python benchmarks/bench_nf4.py --device cuda
    python benchmarks/bench_nf4.py --device cpu      # reference vs compile vs bitsandbytes, few repeats
    python benchmarks/bench_nf4.py --interpret       # tiny shapes through the Triton interpreter (smoke)

On CPU the Triton kernels can only run in the interpreter, which says nothing about speed, so the CPU
run times the three CPU implementations: all projection shapes for dequantization, the 4096x4096
projection for the matmul at every M, and forward+backward at the largest M.
"""

import argparse
import importlib
import os

import torch

from common import append_rows, device_name, print_json, sync, time_ms

SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): q/k/v/o, gate/up, down
ROWS = [1, 16, 64, 512]
TINY_SHAPES = [(48, 96), (40, 130)]
TINY_ROWS = [1, 16, 80]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--interpret", action="store_true", help="tiny shapes, Triton kernels run by the interpreter")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="activation / dequantized dtype (default bfloat16; float32 with --interpret)")
    p.add_argument("--repeat", type=int, default=None, help="timed repeats (default 20 on CUDA, 3 on CPU)")
    args = p.parse_args()
    if args.interpret:
        args.device = "cpu"
    args.dtype = getattr(torch, args.dtype or ("float32" if args.interpret else "bfloat16"))
    args.repeat = args.repeat or (20 if args.device == "cuda" else 3)
    return args


def peak_bandwidth_gbps(device: str) -> float | None:
    """DRAM peak: bus width (bytes) x 2 transfers per memory clock (double data rate)."""
    if device != "cuda":
        return None
    props = torch.cuda.get_device_properties(0)
    bus_bits, clock_khz = getattr(props, "memory_bus_width", 0), getattr(props, "memory_clock_rate", 0)
    return 2 * bus_bits / 8 * clock_khz * 1e3 / 1e9 if bus_bits and clock_khz else None


class Recorder:
    """Times implementations of one case and turns the timings into CSV rows and a JSON summary."""

    def __init__(self, args, peak_gbps):
        self.args, self.peak_gbps = args, peak_gbps
        self.rows, self.summary = [], {}

    def time(self, case: str, impl: str, fn, nbytes: int | None = None) -> None:
        device = self.args.device
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        warmup = 3 if device == "cuda" else 1
        t = time_ms(fn, device, warmup=warmup, repeat=self.args.repeat)
        rows = [(k, t[k], "ms") for k in ("median_ms", "min_ms", "max_ms")]
        if nbytes and device == "cuda":
            gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
            rows.append(("gbps", gbps, "GB/s"))
            if self.peak_gbps:
                rows.append(("fraction_of_peak_bw", gbps / self.peak_gbps, ""))
        if device == "cuda":
            rows.append(("peak_mem_mb", (torch.cuda.max_memory_allocated() - base) / 2**20, "MiB"))
        self.rows += [{"case": case, "impl": impl, "metric": m, "value": f"{v:.6g}", "unit": u} for m, v, u in rows]
        self.summary.setdefault(case, {})[impl] = round(t["median_ms"], 4)
        print(f"{case:45s} {impl:14s} {t['median_ms']:10.3f} ms  [{t['min_ms']:.3f}, {t['max_ms']:.3f}]", flush=True)


def bench_dequantize(rec: Recorder, nf4, BF, q, bnb_state, shape, impls) -> None:
    dtype = rec.args.dtype
    case = f"dequantize {shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')}"
    nbytes = q.nbytes + q.numel * dtype.itemsize
    packed, state = bnb_state
    state.dtype = dtype
    candidates = {
        "triton": lambda: nf4.dequantize_nf4(q, dtype),
        "torch": lambda: nf4.reference_dequantize_nf4(q, dtype),
        "torch.compile": lambda: impls["compiled_dequantize"](q, dtype),
        "bitsandbytes": lambda: BF.dequantize_4bit(packed, state),
    }
    for impl in impls["enabled"]:
        rec.time(case, impl, candidates[impl], nbytes)


def bench_matmul(rec: Recorder, nf4, bnb, q, bnb_state, shape, m, impls, backward: bool) -> None:
    dtype, device = rec.args.dtype, rec.args.device
    N, K = shape
    case = f"{'fwd+bwd' if backward else 'forward'} M={m} {N}x{K} {str(dtype).removeprefix('torch.')}"
    x = torch.randn(m, K, device=device, dtype=dtype, requires_grad=backward)
    dy = torch.randn(m, N, device=device, dtype=dtype)
    packed, state = bnb_state
    state.dtype = dtype
    # bytes an ideal kernel moves: the 4-bit weight once, x and y (and dy, dx in backward)
    nbytes = q.nbytes + (m * K + m * N) * dtype.itemsize * (2 if backward else 1)
    candidates = {
        "triton": lambda: nf4.nf4_matmul(x, q),
        "torch": lambda: nf4.reference_nf4_matmul(x, q),
        "torch.compile": lambda: impls["compiled_matmul"](x, q),
        "bitsandbytes": lambda: bnb.matmul_4bit(x, packed.t(), state),
    }
    for impl in impls["enabled"]:
        if backward and impl == "torch.compile":
            continue
        fn = candidates[impl]
        run = (lambda f=fn: f().backward(dy)) if backward else fn
        with torch.set_grad_enabled(backward):
            rec.time(case, impl, run, nbytes)


def plan(args) -> dict:
    """Which shapes, row counts and implementations this device can meaningfully time."""
    if args.interpret:
        return {"shapes": TINY_SHAPES, "dequant_shapes": TINY_SHAPES, "matmul_shapes": TINY_SHAPES,
                "rows": TINY_ROWS, "backward_rows": TINY_ROWS, "enabled": ["triton", "torch"]}
    if args.device == "cuda":
        return {"shapes": SHAPES_7B, "dequant_shapes": SHAPES_7B, "matmul_shapes": SHAPES_7B, "rows": ROWS,
                "backward_rows": ROWS, "enabled": ["triton", "torch", "torch.compile", "bitsandbytes"]}
    return {"shapes": SHAPES_7B, "dequant_shapes": SHAPES_7B, "matmul_shapes": SHAPES_7B[:1], "rows": ROWS,
            "backward_rows": ROWS[-1:], "enabled": ["torch", "torch.compile", "bitsandbytes"]}


def main() -> None:
    args = parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, so before importing them
    nf4 = importlib.import_module("qtune.kernels.nf4")
    from qtune.weights.nf4 import quantize_nf4
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; use --device cpu or --interpret")
    torch.manual_seed(0)
    p = plan(args)
    impls = {"enabled": p["enabled"],
             "compiled_dequantize": torch.compile(nf4.reference_dequantize_nf4, dynamic=False),
             "compiled_matmul": torch.compile(nf4.reference_nf4_matmul, dynamic=False)}
    rec = Recorder(args, peak_bandwidth_gbps(args.device))
    for shape in p["shapes"]:
        w = torch.randn(shape, device=args.device, dtype=torch.bfloat16) * 0.02
        q = quantize_nf4(w)
        bnb_state = BF.quantize_4bit(w, compress_statistics=True, quant_type="nf4")
        del w
        if shape in p["dequant_shapes"]:
            bench_dequantize(rec, nf4, BF, q, bnb_state, shape, impls)
        if shape in p["matmul_shapes"]:
            for m in p["rows"]:
                bench_matmul(rec, nf4, bnb, q, bnb_state, shape, m, impls, backward=False)
            for m in p["backward_rows"]:
                bench_matmul(rec, nf4, bnb, q, bnb_state, shape, m, impls, backward=True)
        sync(args.device)
    benchmark = "nf4_interpret" if args.interpret else "nf4"
    append_rows(benchmark, args.device, rec.rows)
    print_json({"benchmark": benchmark, "device": device_name(args.device), "dtype": str(args.dtype),
                "peak_bw_gbps": rec.peak_gbps, "median_ms": rec.summary})


if __name__ == "__main__":
    main()
