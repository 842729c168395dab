"""Fused QLoRA SwiGLU MLP vs plain autograd vs peft vs torch.compile at Llama-7B shapes.

    python benchmarks/bench_lora.py --device cuda                 # tokens 512 1024 2048
    python benchmarks/bench_lora.py --device cpu                  # fewer tokens and repeats
    python benchmarks/bench_lora.py --device cpu --interpret      # the Triton kernels in the interpreter

The interpreter checks that the Triton path runs at real shapes and what it saves; its times say
nothing about a GPU, so it defaults to 16 tokens and one timed step.

Implementations of out = down(silu(gate(x)) * up(x)), each projection base + s · dropout(x) Aᵀ Bᵀ:
- fused:    qtune.kernels.lora.lora_mlp (saves x, g, u and rank-r tensors; recomputes the rest)
- autograd: reference_lora_mlp, every op a separate autograd node (base weights as parameters, or
            NF4 dequantized inside the graph with --base nf4)
- peft:     transformers' LlamaMLP with peft's LoRA layers injected (dense base only)
- compiled: torch.compile(reference_lora_mlp)

Saved activation bytes are measured with `torch.autograd.graph.saved_tensors_hooks`: the unique
storages autograd keeps for backward, parameters excluded. Peak memory is the high-water mark above
the step's start (CUDA allocator stats, or torch.profiler's allocation timeline on CPU). Rows go to
benchmarks/results.csv; the last stdout line is JSON.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, print_json, sync  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--interpret", action="store_true", help="run the Triton kernels on CPU in the interpreter")
    ap.add_argument("--tokens", type=int, nargs="+",
                    help="token counts (default: 512 1024 2048 on cuda, 64 on cpu, 16 with --interpret)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--base", choices=("dense", "nf4"), default="dense")
    ap.add_argument("--repeat", type=int, help="timed steps (default: 10 on cuda, 3 on cpu, 1 with --interpret)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = ap.parse_args()
    if args.interpret:
        if args.device != "cpu":
            ap.error("--interpret runs the kernels on CPU tensors; use it with --device cpu")
        # Must be set before the kernels are defined, i.e. before qtune.kernels.lora is imported.
        os.environ["TRITON_INTERPRET"] = "1"
    args.tokens = args.tokens or ([512, 1024, 2048] if args.device == "cuda" else [16] if args.interpret else [64])
    args.repeat = args.repeat or (10 if args.device == "cuda" else 1 if args.interpret else 3)
    return args


def make_blocks(args, dtype):
    """gate, up, down as LoraParams with adapters that require grad (B non-zero so dA is exercised)."""
    import torch

    from qtune.kernels.lora import LoraParams
    from qtune.weights.nf4 import quantize_nf4

    h, i, r = args.hidden, args.intermediate, args.rank
    blocks = []
    for out_f, in_f in ((i, h), (i, h), (h, i)):
        w = torch.randn(out_f, in_f, device=args.device, dtype=dtype) / in_f**0.5
        weight = quantize_nf4(w) if args.base == "nf4" else w
        a = (torch.randn(r, in_f, device=args.device, dtype=dtype) / in_f**0.5).requires_grad_()
        b = (torch.randn(out_f, r, device=args.device, dtype=dtype) * 0.01).requires_grad_()
        blocks.append(LoraParams(weight, None, a, b, 2.0))
    return blocks


def make_peft_mlp(args, blocks, dtype):
    """transformers' LlamaMLP with peft LoRA, carrying the same base weights and adapters."""
    import peft
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=1,
                         head_dim=2, hidden_act="silu")
    with torch.device("meta"):
        mlp = peft.inject_adapter_in_model(
            peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout,
                            target_modules=["gate_proj", "up_proj", "down_proj"]), LlamaMLP(config))
    mlp = mlp.to_empty(device=args.device).to(dtype)
    with torch.no_grad():
        for name, p in zip(("gate_proj", "up_proj", "down_proj"), blocks):
            layer = getattr(mlp, name)
            layer.base_layer.weight.copy_(p.weight)
            layer.lora_A["default"].weight.copy_(p.lora_a)
            layer.lora_B["default"].weight.copy_(p.lora_b)
    return mlp.train()


def saved_bytes(step, params) -> int:
    """Bytes of the unique non-parameter storages autograd saves for backward during step()."""
    import torch

    excluded = {t.untyped_storage().data_ptr() for t in params}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(storages.values())


def peak_bytes(step_and_backward, device) -> int:
    """High-water mark of allocated memory above the start of one forward + backward."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step_and_backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile  # the allocation timeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step_and_backward()
    current = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        current += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, current)
    return peak

def time_steps(forward, device, repeat) -> dict:
    """Median and spread (ms) of forward, backward and the two together, one warm-up step first."""
    times = {"forward": [], "backward": [], "full": []}
    for k in range(repeat + 1):
        sync(device)
        t0 = time.perf_counter()
        out = forward()
        sync(device)
        t1 = time.perf_counter()
        out.backward(out.detach())  # a fixed, non-trivial upstream gradient
        sync(device)
        t2 = time.perf_counter()
        if k:
            for name, ms in (("forward", t1 - t0), ("backward", t2 - t1), ("full", t2 - t0)):
                times[name].append(ms * 1e3)
    return {name: (statistics.median(v), min(v), max(v)) for name, v in times.items()}


def implementations(args, blocks, dtype):
    """name -> forward(x) for every implementation that can run here."""
    import torch

    from qtune.kernels.lora import lora_mlp, reference_lora_mlp

    kernels = "triton" if args.device == "cuda" or args.interpret else "torch"
    impls = {
        "fused": lambda x: lora_mlp(x, *blocks, dropout=args.dropout, kernels=kernels),
        "autograd": lambda x: reference_lora_mlp(x, *blocks, dropout=args.dropout),
    }
    if args.base == "dense":
        impls["peft"] = make_peft_mlp(args, blocks, dtype)
    if not args.no_compile:
        compiled = torch.compile(reference_lora_mlp)
        impls["compiled"] = lambda x: compiled(x, *blocks, dropout=args.dropout)
    return impls


def main():
    args = parse_args()
    import torch

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    blocks = make_blocks(args, dtype)
    impls = implementations(args, blocks, dtype)
    rows, summary = [], {"device": args.device, "interpret": args.interpret, "base": args.base,
                         "dtype": str(dtype), "hidden": args.hidden, "intermediate": args.intermediate,
                         "rank": args.rank, "dropout": args.dropout}
    for tokens in args.tokens:
        case = f"T={tokens},H={args.hidden},I={args.intermediate},r={args.rank},p={args.dropout},{args.base}"
        x = torch.randn(tokens, args.hidden, device=args.device, dtype=dtype, requires_grad=True)
        for name, fn in impls.items():
            params = [p for p in fn.parameters()] if name == "peft" else \
                [t for b in blocks for t in (b.weight, b.lora_a, b.lora_b) if isinstance(t, torch.Tensor)]
            try:
                t = time_steps(lambda: fn(x), args.device, args.repeat)
            except Exception as err:  # torch.compile may lack a working toolchain here
                print(f"{case} {name}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
                continue
            # Under --interpret the kernels' buffers live in numpy and the profiler would record every
            # interpreted op: no peak there.
            profile_peak = not (args.interpret and name == "fused")
            stats = {"saved_bytes": saved_bytes(lambda: fn(x), params) if name != "compiled" else None,
                     "peak_bytes": peak_bytes(lambda: fn(x).sum().backward(), args.device) if profile_peak else None}
            for phase, (med, lo, hi) in t.items():
                rows += [{"case": case, "impl": name, "metric": f"{phase}_median", "value": f"{med:.3f}", "unit": "ms"},
                         {"case": case, "impl": name, "metric": f"{phase}_spread", "value": f"{lo:.3f}-{hi:.3f}",
                          "unit": "ms"}]
            rows += [{"case": case, "impl": name, "metric": k, "value": v, "unit": "bytes"}
                     for k, v in stats.items() if v is not None]
            saved, peak = (("-" if v is None else f"{v / 2**20:.1f} MiB") for v in stats.values())
            print(f"{case} {name:9s} fwd {t['forward'][0]:9.2f} ms  bwd {t['backward'][0]:9.2f} ms  "
                  f"full {t['full'][0]:9.2f} ms ({t['full'][1]:.1f}-{t['full'][2]:.1f})  saved {saved}  "
                  f"peak {peak}", flush=True)
            summary[f"{name}_full_ms_T{tokens}"] = round(t["full"][0], 3)
            summary[f"{name}_peak_bytes_T{tokens}"] = stats["peak_bytes"]  # None when not measured
            if stats["saved_bytes"] is not None:
                summary[f"{name}_saved_bytes"] = stats["saved_bytes"]  # the last (largest) token count
    append_rows("lora_mlp", args.device, rows)
    if "fused_saved_bytes" in summary and "autograd_saved_bytes" in summary:
        summary["saved_ratio"] = round(summary["fused_saved_bytes"] / summary["autograd_saved_bytes"], 4)
    print_json(summary)


if __name__ == "__main__":
    main()
