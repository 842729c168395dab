"""One QLoRA training step end to end: the Triton kernels vs the plain-torch path (vs torch.compile of it).

The same NF4 base, all-linear LoRA adapter and batch for each implementation; reports the median and
spread of forward+backward+optimizer step time, tokens/s and peak memory (CUDA: max allocated; CPU:
resident set). On a CPU-only machine the Triton path only runs in the interpreter, so `--interpret`
runs a tiny model as a smoke test; real comparisons need `--device cuda`.

    python benchmarks/bench_train.py [--device cpu|cuda] [--interpret] [--model smollm2-135m] [--batch 4 --seq 256]
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args():
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--interpret", action="store_true", help="tiny shapes, Triton in its CPU interpreter")
    ap.add_argument("--model", default="smollm2-135m", help="model directory or alias (ignored with --interpret)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    return ap.parse_args()


def tiny_model_dir() -> Path:
    """A small random Llama checkpoint for the interpreter smoke run (written once under /tmp)."""
    import json

    import torch
    from safetensors.torch import save_file

    out = Path("/tmp/qtune-bench-train-tiny")
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    (out / "config.json").write_text(json.dumps(cfg))
    from qtune.config import ModelConfig
    from qtune.model import CausalLM

    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_dict(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "rope_inv_freq"}, str(out / "model.safetensors"))
    return out


def step_fn(model_dir, kernels, device, batch, seq, rank, compiled=False):
    import torch

    from qtune.weights.checkpoint import load_model
    from qtune.lora import LoraConfig, add_lora, adapter_parameters, mark_trainable
    from qtune.train.common import lm_loss_sum

    model = load_model(model_dir, quantize="nf4", kernels=kernels, device=device)
    model.gradient_checkpointing = True
    add_lora(model, LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"), seed=0)
    mark_trainable(model, "default")
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-4)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    b = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    loss_fn = torch.compile(lm_loss_sum) if compiled else lm_loss_sum

    def step():
        loss_sum, n = loss_fn(model, b)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args = parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        args.batch, args.seq, args.rank, args.repeats = 2, 16, 4, 1
    import torch
    from common import append_rows, device_name, print_json, time_ms

    from qtune.train.common import peak_memory_bytes

    model_dir = tiny_model_dir() if args.interpret else args.model
    impls = {"torch": ("torch", False)}
    if args.device == "cuda" or args.interpret:
        impls["triton"] = ("triton", False)
    if not args.interpret:
        impls["torch.compile"] = ("torch", True)
    if args.device == "cpu" and not args.interpret:
        print("note: the Triton path needs CUDA (or --interpret); comparing the plain-torch path with its compiled form")
    results, rows, tokens = {}, [], args.batch * args.seq
    for name, (kernels, compiled) in impls.items():
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step = step_fn(model_dir, kernels, args.device, args.batch, args.seq, args.rank, compiled)
        t = time_ms(step, args.device, warmup=1, repeat=args.repeats)
        peak = peak_memory_bytes(args.device)
        results[name] = {**{k: round(v, 1) for k, v in t.items()}, "tokens_per_s": round(tokens / t["median_ms"] * 1e3, 1),
                         "peak_bytes": peak}
        print(f"{name:>14}: {t['median_ms']:9.1f} ms/step (min {t['min_ms']:.1f}, max {t['max_ms']:.1f})  "
              f"{results[name]['tokens_per_s']:8.1f} tok/s  peak {peak / 2**20:.0f} MiB", flush=True)
        rows.append({"case": f"b{args.batch}x{args.seq}_r{args.rank}", "impl": name, "metric": "step_ms",
                     "value": t["median_ms"], "unit": "ms"})
        del step
    append_rows("train", args.device, rows)
    out = {"benchmark": "train", "device": device_name(args.device), "batch": args.batch, "seq": args.seq,
           "rank": args.rank, "interpret": args.interpret, "results": results}
    if "triton" in results:
        out["triton_speedup"] = round(results["torch"]["median_ms"] / results["triton"]["median_ms"], 3)
    print_json(out)


if __name__ == "__main__":
    main()
