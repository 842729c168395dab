"""Fused cross-entropy from hidden states vs the full-logits reference: time and peak memory, forward+backward.

Variants (each in a fresh spawned process, so every peak-memory figure starts from a clean slate):
  fused     qtune.kernels.logprobs.cross_entropy_sum (Triton on CUDA, the chunked torch path on CPU,
            the interpreted Triton kernels with --interpret)
  naive     -reference_token_logprobs(...).sum(): log_softmax over the full (N, V) logits, then gather
  compiled  torch.compile of the naive loss
  liger     Liger-Kernel's fused linear cross-entropy, when installed (CUDA only)

Peak memory is the growth above what the inputs already hold, while the timed iterations run:
  CUDA  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() before.
  CPU   resident set size read from /proc/self/status: VmHWM (the peak) minus VmRSS before the timed
        iterations, after resetting VmHWM by writing "5" to /proc/self/clear_refs. The children run with
        MALLOC_MMAP_THRESHOLD_=65536 so glibc serves every large tensor with mmap and returns it to the OS
        when freed: the resident size then follows the live tensors instead of a heap that never shrinks.

The lm_head is frozen by default (QLoRA trains adapters, not lm_head), so the backward pass computes
dL/dhidden only; --train-lm-head adds dL/dW, whose (V, D) fp32 buffer then dominates both variants.

    python benchmarks/bench_logprobs.py --device cpu                # 2048 tokens, D=4096, V=32000
    python benchmarks/bench_logprobs.py --device cuda               # also the 128256-vocabulary case
    python benchmarks/bench_logprobs.py --device cpu --interpret    # Triton kernels interpreted, tiny case

The last stdout line is JSON with every figure plus fused_peak_bytes / naive_peak_bytes of the first case.
"""

import argparse
import importlib.util
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, print_json, time_ms  # noqa: E402

CASES = {  # name: (tokens, hidden size, vocabulary)
    "7b": (2048, 4096, 32000),  # Llama-2 7B lm_head
    "128k": (2048, 4096, 128256),  # Llama-3 8B lm_head
    "tiny": (256, 128, 2048),  # small enough for the Triton interpreter
}
VARIANTS = ("fused", "naive", "compiled", "liger")


def rss_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def loss_function(variant: str, chunk_size: int):
    """(h, W, y) -> scalar loss for one variant."""
    from qtune.kernels.logprobs import cross_entropy_sum, reference_token_logprobs

    if variant == "fused":
        kernels = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "auto"
        return lambda h, w, y: cross_entropy_sum(h, w, y, chunk_size=chunk_size, kernels=kernels)[0]
    if variant == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")
        return lambda h, w, y: liger(w, h, y)

    def naive(h, w, y):
        return -reference_token_logprobs(h, w, y).sum()

    return torch.compile(naive) if variant == "compiled" else naive


def measure(case: str, variant: str, device: str, repeat: int, chunk_size: int, train_lm_head: bool) -> dict:
    """Runs in a fresh process: median/min/max of forward+backward and the peak memory above the inputs."""
    N, D, V = CASES[case]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, D, device=device, dtype=dtype, generator=gen).requires_grad_()
    weight = (torch.randn(V, D, device=device, dtype=dtype, generator=gen) * D**-0.5).requires_grad_(train_lm_head)
    targets = torch.randint(0, V, (N,), device=device, generator=gen)
    targets[: N // 4] = -100  # a masked prompt, as in SFT
    loss_fn = loss_function(variant, chunk_size)

    def step():
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, targets).backward()

    # One untimed step compiles torch.compile / Triton kernels; eager CPU steps need none (they take seconds).
    if device == "cuda" or variant == "compiled" or os.environ.get("TRITON_INTERPRET") == "1":
        step()
    hidden.grad = weight.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        before = rss_bytes("VmRSS")
    timing = time_ms(step, device, warmup=0, repeat=repeat)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss_bytes("VmHWM")
    return {**timing, "peak_bytes": peak - before}


def available_variants(device: str) -> list[str]:
    variants = ["fused", "naive", "compiled"]
    if device == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        variants.append("liger")
    return variants


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--interpret", action="store_true", help="run the Triton kernels in the interpreter (CPU)")
    parser.add_argument("--case", choices=(*CASES, "all"), help="default: tiny with --interpret, 7b on CPU, "
                        "7b and 128k on CUDA (the 128k case takes minutes per variant on a CPU)")
    parser.add_argument("--repeat", type=int, help="timed iterations (default 2 on CPU, 10 on CUDA)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--train-lm-head", action="store_true", help="also compute dL/dW")
    parser.add_argument("--no-csv", action="store_true", help="do not append to benchmarks/results.csv")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.interpret and args.device == "cuda":
        parser.error("--interpret runs the Triton kernels on the CPU: use it with --device cpu")
    default_cases = ["tiny"] if args.interpret else ["7b"] if args.device == "cpu" else ["7b", "128k"]
    cases = list(CASES) if args.case == "all" else [args.case] if args.case else default_cases
    repeat = args.repeat or (2 if args.device == "cpu" else 10)

    # Inherited by the spawned children: the interpreter switch, and glibc returning large blocks on free.
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"

    results, rows = {}, []
    print(f"{'case':>6} {'variant':>9} {'median ms':>11} {'min ms':>10} {'max ms':>10} {'peak MiB':>10}", flush=True)
    for case in cases:
        for variant in [v for v in available_variants(args.device) if v in args.variants.split(",")]:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                r = pool.submit(measure, case, variant, args.device, repeat, args.chunk_size,
                                args.train_lm_head).result()
            results[f"{case}/{variant}"] = r
            print(f"{case:>6} {variant:>9} {r['median_ms']:>11.1f} {r['min_ms']:>10.1f} {r['max_ms']:>10.1f} "
                  f"{r['peak_bytes'] / 2**20:>10.1f}", flush=True)
            rows += [{"case": case, "impl": variant, "metric": "fwd_bwd_median", "value": r["median_ms"], "unit": "ms"},
                     {"case": case, "impl": variant, "metric": "peak_memory", "value": r["peak_bytes"],
                      "unit": "bytes"}]
    if not args.no_csv:
        append_rows("logprobs", args.device, rows)
    first = cases[0]
    fused, naive = results[f"{first}/fused"]["peak_bytes"], results[f"{first}/naive"]["peak_bytes"]
    print(f"{first}: fused peak memory is {100 * fused / naive:.1f}% of naive", flush=True)
    print_json({"benchmark": "logprobs", "device": args.device, "interpret": args.interpret, "repeat": repeat,
                "chunk_size": args.chunk_size, "train_lm_head": args.train_lm_head, "case": first,
                "fused_peak_bytes": fused, "naive_peak_bytes": naive, "peak_ratio": fused / naive,
                "results": results})


if __name__ == "__main__":
    main()
