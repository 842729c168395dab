"""Training throughput: one QLoRA SFT step on SmolLM2-135M, qtune vs transformers + peft + bitsandbytes.

    python benchmarks/bench_throughput.py                      # batch 4 x 256, r=16 on every linear
    python benchmarks/bench_throughput.py --steps 5 --profile  # also print qtune's top ops
    python benchmarks/bench_throughput.py --dropout 0.1        # LoRA dropout on both sides, as recipes/alpaca.toml
    python benchmarks/bench_throughput.py --families all       # one row per model family (below), 4 x 256

Both sides get the same settings: NF4 base with double quantization, fp32 compute on the CPU, LoRA r=16
alpha=16 on every linear of the decoder layers, gradient checkpointing (non-reentrant), AdamW, gradient
clipping at 0.3, and the same batch of token ids (every position trained). The two models live in one
process and their steps alternate (each side first every other round), so both see the same machine
load. Each side's tokens/s is taken from its fastest timed step after one warm-up step (the step least
slowed by other processes on a shared machine; the median and slowest are reported too). Rows go to
benchmarks/results.csv; the last stdout line is JSON with tokens/s of each side and their ratio;
`paired_median_speedup` is the median over rounds of the peer's step time over qtune's in the same round (the
two steps ran back to back).

--families runs the same comparison once per family on a random checkpoint of a tiny-but-real shape (FAMILY_SHAPE:
SmolLM2-135M's widths, 6 layers, a 32K vocabulary) with each family's own features switched on (Qwen3's q/k norms,
Gemma 2's soft-capping and sliding window, Gemma 3's 5:1 local layers, Phi-3's fused projections, Mistral Nemo's
wider heads, the experts of Mixtral and Qwen3-MoE), written by transformers and loaded by both sides; a llama row at
the same shape is the reference. On the mixtures of experts bitsandbytes leaves transformers' 3-D expert tensors
unquantized (fp32 here) where qtune keeps them NF4, and `all-linear` adapts attention only on both sides.

Where qtune's CPU step saves time against the peer's:
- the frozen-weight products, nearly all of the step's FLOPs, run through oneDNN's inner product, which
  reaches 185-210 GFLOP/s on two cores here where MKL's sgemm (torch's `mm` and `F.linear`) reaches
  160-190 (kernels/cpu/linear.py);
- checkpoint recomputation skips the MLP's down product, whose output nothing in backward reads
  (kernels/cpu/merged_lora.py);
- without dropout each projection is one product with the merged weight W + s·B A instead of the base
  product plus two rank-r products and two elementwise passes;
- the frozen lm_head's cross-entropy takes two vocabulary matmuls instead of three (the peer materializes
  the logits once and keeps them for backward, two matmuls, and 200 MB);
- attention runs as batched products over causal query blocks (kernels/cpu/attention.py) instead of the
  CPU flash kernel;
- with --dropout, qtune draws its masks as 16-bit uniforms, four per 64-bit random number
  (kernels/cpu/dropout.py), where F.dropout draws one Bernoulli sample per element.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# qtune is imported as installed (pip install -e .): putting the repository root on sys.path would let its
# kernels/ folder shadow the `kernels` package that bitsandbytes looks for.
from common import append_rows, print_json

from qtune.memory.step import StepSetup, train_step


FAMILY_SHAPE = dict(vocab_size=32000, hidden_size=576, intermediate_size=1536, num_hidden_layers=6,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "llama": dict(model_type="llama"),
    "qwen3": dict(model_type="qwen3"),
    "gemma2": dict(model_type="gemma2", query_pre_attn_scalar=64, sliding_window=128, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3": dict(model_type="gemma3_text", query_pre_attn_scalar=64, sliding_window=128,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"]),
    "phi3": dict(model_type="phi3", tie_word_embeddings=False),
    "mistral-nemo": dict(model_type="mistral", head_dim=80, sliding_window=None),
    "mixtral": dict(model_type="mixtral", intermediate_size=768, num_local_experts=4, num_experts_per_tok=2),
    "qwen3-moe": dict(model_type="qwen3_moe", moe_intermediate_size=768, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=True),
}


def write_family_checkpoint(family: str, out_dir: Path) -> Path:
    """A random bf16 checkpoint of `family` at FAMILY_SHAPE, written by transformers (its own initialisation)."""
    import transformers

    spec = {**FAMILY_SHAPE, **FAMILIES[family]}
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def qtune_setup(model_dir: Path, batch: dict, r: int, dropout: float = 0.0) -> StepSetup:
    from qtune.weights.checkpoint import load_model
    from qtune.memory.build import add_trainable_lora
    from qtune.train.common import build_optimizer

    model = load_model(model_dir, quantize="nf4", dtype=torch.float32, double_quant=True)
    params = add_trainable_lora(model, r, "all-linear", alpha=16.0, dropout=dropout)
    model.gradient_checkpointing = True
    model.train()
    return StepSetup(model, params, build_optimizer(params, "adamw", lr=2e-4), batch)


def peer_setup(model_dir: Path, r: int, dropout: float = 0.0):
    import peft
    import transformers

    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=torch.float32,
                                                              device_map="cpu")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear",
                                                       task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=2e-4)


def peer_step(model, params, optimizer, ids: torch.Tensor) -> float:
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.item()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model directory or alias")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on both sides (the recipes use 0.05-0.1)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per side (after one warm-up step)")
    p.add_argument("--profile", action="store_true", help="print the top ops of one qtune step")
    p.add_argument("--families", default="", help="'all' or a comma list of FAMILIES: one row per family")
    p.add_argument("--no-csv", action="store_true")
    return p.parse_args()


def profile_qtune(setup: StepSetup) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(setup)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)


def compare(model_dir: Path, args) -> dict:
    """Alternating timed steps of both sides on the model in `model_dir`; tokens/s of each and their ratio."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ours = qtune_setup(model_dir, {"input_ids": ids, "labels": ids}, args.rank, args.dropout)
    ours.model.set_kernels("torch")
    peer = peer_setup(model_dir, args.rank, args.dropout)
    steps = {"qtune": lambda: train_step(ours), "peer": lambda: peer_step(*peer, ids)}
    for fn in steps.values():  # warm-up
        fn()
    times = {name: [] for name in steps}
    order = list(steps)
    for _ in range(args.steps):
        for name in order:
            times[name].append(timed(steps[name]))
        order.reverse()  # each side goes first every other round
    if args.profile:
        profile_qtune(ours)
    tokens = args.batch * args.seq
    result = {}
    for name, ts in times.items():
        result[name] = {"min_s": round(min(ts), 3), "median_s": round(statistics.median(ts), 3),
                        "max_s": round(max(ts), 3), "tokens_per_s": round(tokens / min(ts), 1),
                        "median_tokens_per_s": round(tokens / statistics.median(ts), 1)}
    result["speedup"] = round(result["qtune"]["tokens_per_s"] / result["peer"]["tokens_per_s"], 3)
    medians = result["qtune"]["median_tokens_per_s"], result["peer"]["median_tokens_per_s"]
    result["median_speedup"] = round(medians[0] / medians[1], 3)
    # each round's two steps ran back to back, so their ratio cancels load that drifts slower than a step
    paired = [p / q for p, q in zip(times["peer"], times["qtune"])]
    result["paired_median_speedup"] = round(statistics.median(paired), 3)
    return result


def csv_rows(case: str, result: dict) -> list[dict]:
    rows = [{"case": case, "impl": impl, "metric": "tokens_per_s", "value": result[impl]["tokens_per_s"],
             "unit": "tok/s"} for impl in ("qtune", "peer")]
    return rows + [{"case": case, "impl": "qtune/peer", "metric": "speedup", "value": result["speedup"], "unit": "x"}]


def run_families(args) -> None:
    """One row per family (--families): each family's random checkpoint at FAMILY_SHAPE, both sides."""
    import tempfile

    import transformers

    transformers.utils.logging.disable_progress_bar()  # one line per family, not per loaded tensor
    names = list(FAMILIES) if args.families == "all" else args.families.split(",")
    results, rows = {}, []
    for family in names:
        with tempfile.TemporaryDirectory() as tmp:
            result = compare(write_family_checkpoint(family, Path(tmp)), args)
        results[family] = result
        print(f"{family}: qtune {result['qtune']['tokens_per_s']} tok/s, peer {result['peer']['tokens_per_s']} tok/s, "
              f"ratio {result['speedup']}x (medians: {result['median_speedup']}x, paired rounds: "
              f"{result['paired_median_speedup']}x)", flush=True)
        rows += csv_rows(f"{family}-tiny,b={args.batch},T={args.seq},r={args.rank}", result)
    if not args.no_csv:
        append_rows("throughput", "cpu", rows)
    print_json({"families": results, "shape": FAMILY_SHAPE, "batch": args.batch, "seq": args.seq, "rank": args.rank,
                "threads": torch.get_num_threads()})


def main() -> None:
    args = parse_args()
    if args.families:
        return run_families(args)
    from qtune.weights.checkpoint import resolve

    result = {"model": args.model, "batch": args.batch, "seq": args.seq, "rank": args.rank, "dropout": args.dropout,
              "threads": torch.get_num_threads(), **compare(resolve(args.model), args)}
    dropout = f"dropout {args.dropout}, " if args.dropout else ""
    print(f"{args.model} QLoRA step, {args.batch} x {args.seq} tokens, r={args.rank}, checkpointing, fp32 CPU: "
          f"{dropout}qtune {result['qtune']['tokens_per_s']} tok/s ({result['qtune']['min_s']} s), peer "
          f"{result['peer']['tokens_per_s']} tok/s ({result['peer']['min_s']} s), ratio {result['speedup']}x "
          f"(medians: {result['median_speedup']}x, paired rounds: {result['paired_median_speedup']}x)")
    if not args.no_csv:
        case = f"{args.model},b={args.batch},T={args.seq},r={args.rank}"
        append_rows("throughput", "cpu", csv_rows(case + (f",p={args.dropout}" if args.dropout else ""), result))
    print_json(result)


if __name__ == "__main__":
    main()
