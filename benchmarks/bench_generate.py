"""Generation speed: qtune's KV-cache decoder vs transformers' `generate`, same model, same prompts, same run.

New tokens per second at batch 1 and batch 16 (64 new tokens each, greedy, no early stop), unquantized
and NF4 (double quantization), on SmolLM2-135M-Instruct. Prints a table, appends CSV rows and ends with
one JSON line holding every figure and the qtune / transformers ratios.

    python benchmarks/bench_generate.py [--device cpu|cuda] [--new-tokens 64] [--repeats 2]
"""

import argparse
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


def time_qtune(model, prompts, new_tokens, repeats, device) -> float:
    from qtune.generate import generate

    def run():
        out = generate(model, prompts, max_new_tokens=new_tokens, greedy=True, stop_ids=set(), batch_size=len(prompts))
        assert all(len(g.token_ids) == new_tokens for g in out)

    return _tokens_per_s(run, len(prompts) * new_tokens, repeats, device)


def time_transformers(model, prompts, pad_id, new_tokens, repeats, device) -> float:
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

    return _tokens_per_s(run, len(prompts) * new_tokens, repeats, device)


def _tokens_per_s(fn, n_tokens, repeats, device) -> float:
    fn()  # warm-up (first-call allocations, kernel compilation on CUDA)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return n_tokens / statistics.median(times)


def load_peer(model_dir, quantize: str, device):
    import transformers

    kwargs = {"dtype": torch.float32 if device == "cpu" else torch.bfloat16}
    if quantize == "nf4":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, device_map=device, **kwargs).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    from qtune.weights.checkpoint import load_model, resolve
    from qtune.tokenizer import load_tokenizer

    model_dir = resolve(args.model)
    tok = load_tokenizer(model_dir)
    batches = [int(b) for b in args.batches.split(",")]
    results, rows = {}, []
    for quantize in ("none", "nf4"):
        ours = load_model(model_dir, quantize=quantize, device=args.device)
        peer = load_peer(model_dir, quantize, args.device)
        for b in batches:
            prompts = encode_prompts(tok, b)
            q = time_qtune(ours, prompts, args.new_tokens, args.repeats, args.device)
            p = time_transformers(peer, prompts, tok.pad_id, args.new_tokens, args.repeats, args.device)
            key = f"{quantize}_b{b}"
            results[key] = {"qtune_tok_s": round(q, 2), "transformers_tok_s": round(p, 2), "ratio": round(q / p, 2)}
            print(f"{quantize:>4}  batch {b:>2}: qtune {q:7.1f} tok/s   transformers {p:7.1f} tok/s   ratio {q / p:5.2f}x",
                  flush=True)
            rows += [{"case": key, "impl": impl, "metric": "new_tokens_per_s", "value": v, "unit": "tok/s"}
                     for impl, v in (("qtune", q), ("transformers", p))]
        del ours, peer
    append_rows("generate", args.device, rows)
    print_json({"benchmark": "generate", "device": device_name(args.device), "new_tokens": args.new_tokens,
                "threads": torch.get_num_threads(), "results": results,
                "min_ratio": min(r["ratio"] for r in results.values())})


if __name__ == "__main__":
    main()
