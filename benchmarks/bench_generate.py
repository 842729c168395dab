"""Generation speed: qtune's KV-cache decoder vs transformers' `generate`, same model, same prompts, same run.

New tokens per second at batch 1 and batch 16 (64 new tokens each, greedy, no early stop), unquantized
and NF4 (double quantization), on SmolLM2-135M-Instruct. Prints a table, appends CSV rows and ends with
one JSON line holding every figure and the qtune / transformers ratios.

Compute dtypes are the same on both sides. Unquantized: fp32 throughout. NF4 on a CPU with AVX-512 BF16:
transformers + bitsandbytes multiply the 4-bit weights with bitsandbytes' CPU kernel in bf16 (whatever the
compute dtype is set to), and qtune calls that kernel on its own NF4 bytes (`nf4_cpu_kernel="bitsandbytes"`);
everything else is fp32. Without that kernel (AVX2-only CPUs) both sides multiply in fp32: bitsandbytes
dequantizes every step, qtune decodes from dense copies. The JSON line says which (`nf4_products`).

`--isa avx2` reruns the benchmark as an AVX2-only CPU runs it: torch and oneDNN restricted to AVX2
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), and neither side uses bitsandbytes' 4-bit kernel, which such a
CPU lacks; rows get an `_avx2` suffix.

    python benchmarks/bench_generate.py [--device cpu|cuda] [--new-tokens 64] [--repeats 3] [--isa native|avx2]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, device_name, print_json, sync  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Write a haiku about autumn leaves.", "Explain photosynthesis in one sentence.",
    "Give me three tips for a good night's sleep.", "Translate 'good morning' into Spanish.",
    "What is 17 times 23?", "Name a famous painting by Leonardo da Vinci.", "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?", "Suggest a name for a bakery.", "List the planets of the solar system.",
    "How do I boil an egg?", "What does a compiler do?", "Write a short motivational quote.",
    "What is the difference between weather and climate?", "Summarize the plot of Romeo and Juliet in two sentences.",
]


def encode_prompts(tok, n: int) -> list[list[int]]:
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS[:n]]
    return [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True)) for m in msgs]


def qtune_run(model, prompts, new_tokens, nf4_cpu_kernel):
    from qtune.generate import generate

    def run():
        out = generate(model, prompts, max_new_tokens=new_tokens, greedy=True, stop_ids=set(), batch_size=len(prompts),
                       nf4_cpu_kernel=nf4_cpu_kernel)
        assert all(len(g.token_ids) == new_tokens for g in out)

    return run


def transformers_run(model, prompts, pad_id, new_tokens, device):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):  # left padding, as for qtune
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=pad_id)
        assert out.shape[1] == width + new_tokens

    return run


def tokens_per_s(runs, n_tokens, repeats, device) -> list[float]:
    """New tokens per second of each run, median over `repeats`; the runs take turns, so that a machine whose
    load changes slows them alike."""
    for fn in runs:
        fn()  # warm-up (first-call allocations, bitsandbytes' weight packing, kernel compilation on CUDA)
    times = [[] for _ in runs]
    for _ in range(repeats):
        for fn, t in zip(runs, times):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            t.append(time.perf_counter() - t0)
    return [n_tokens / statistics.median(t) for t in times]


def load_peer(model_dir, quantize: str, device):
    import transformers

    kwargs = {"dtype": torch.float32 if device == "cpu" else torch.bfloat16}
    if quantize == "nf4":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, device_map=device, **kwargs).eval()
    if not bnb_kernel_in_use():
        # on a CPU without AVX-512 BF16 bitsandbytes' layers do not pack their weights for its kernel
        # (`has_avx512bf16()` is false there) but dequantize them at every call; --isa avx2 mirrors that
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    return model


def bnb_kernel_in_use() -> bool:
    """Whether both sides multiply NF4 weights with bitsandbytes' CPU kernel. Under --isa avx2 it is still
    present (bitsandbytes asks the CPU itself, not torch), but an AVX2-only CPU has none: neither side uses it."""
    from qtune.weights.nf4_decode import bnb_gemv_is_exact

    return bnb_gemv_is_exact() and torch.backends.cpu.get_cpu_capability() == "AVX512"


def restricted_to_avx2() -> None:
    """Run this script again with torch and oneDNN limited to AVX2 (they read these variables at start-up)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", BENCH_GENERATE_AVX2="1")
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native")
    args = ap.parse_args()
    if args.isa == "avx2" and not os.environ.get("BENCH_GENERATE_AVX2"):
        restricted_to_avx2()
    suffix = "_avx2" if args.isa == "avx2" else ""
    from qtune.weights.checkpoint import load_model, resolve
    from qtune.tokenizer import load_tokenizer

    model_dir = resolve(args.model)
    tok = load_tokenizer(model_dir)
    batches = [int(b) for b in args.batches.split(",")]
    results, rows = {}, []
    nf4_cpu_kernel = "bitsandbytes" if bnb_kernel_in_use() else "dense"
    nf4_dtype = "model dtype" if args.device == "cuda" else "bf16" if nf4_cpu_kernel == "bitsandbytes" else "fp32"
    for quantize in ("none", "nf4"):
        ours = load_model(model_dir, quantize=quantize, device=args.device)
        peer = load_peer(model_dir, quantize, args.device)
        for b in batches:
            prompts = encode_prompts(tok, b)
            runs = [qtune_run(ours, prompts, args.new_tokens, nf4_cpu_kernel),
                    transformers_run(peer, prompts, tok.pad_id, args.new_tokens, args.device)]
            q, p = tokens_per_s(runs, b * args.new_tokens, args.repeats, args.device)
            key = f"{quantize}_b{b}{suffix}"
            results[key] = {"qtune_tok_s": round(q, 2), "transformers_tok_s": round(p, 2), "ratio": round(q / p, 2)}
            print(f"{quantize:>4}{suffix}  batch {b:>2}: qtune {q:7.1f} tok/s   transformers {p:7.1f} tok/s   ratio {q / p:5.2f}x",
                  flush=True)
            rows += [{"case": key, "impl": impl, "metric": "new_tokens_per_s", "value": v, "unit": "tok/s"}
                     for impl, v in (("qtune", q), ("transformers", p))]
        del ours, peer
    append_rows("generate", args.device, rows)
    print_json({"benchmark": "generate", "device": device_name(args.device), "new_tokens": args.new_tokens,
                "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "nf4_products": nf4_dtype, "load_average": os.getloadavg(), "results": results,
                "min_ratio": min(r["ratio"] for r in results.values())})


if __name__ == "__main__":
    main()
