"""Training throughput: one QLoRA SFT step on SmolLM2-135M, qtune vs transformers + peft + bitsandbytes.

    python benchmarks/bench_throughput.py                      # batch 4 x 256, r=16 on every linear
    python benchmarks/bench_throughput.py --steps 5 --profile  # also print qtune's top ops
    python benchmarks/bench_throughput.py --dropout 0.1        # LoRA dropout on both sides, as recipes/alpaca.toml

Both sides get the same settings: NF4 base with double quantization, fp32 compute on the CPU, LoRA r=16
alpha=16 on every linear of the decoder layers, gradient checkpointing (non-reentrant), AdamW, gradient
clipping at 0.3, and the same batch of token ids (every position trained). The two models live in one
process and their steps alternate (each side first every other round), so both see the same machine
load. Each side's tokens/s is taken from its fastest timed step after one warm-up step (the step least
slowed by other processes on a shared machine; the median and slowest are reported too). Rows go to benchmarks/results.csv; the last stdout
line is JSON with tokens/s of each side and their ratio.

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
import statistics
import sys
import time
from pathlib import Path

import torch

# qtune is imported as installed (pip install -e .): putting the repository root on sys.path would let its
# kernels/ folder shadow the `kernels` package that bitsandbytes looks for.
from common import append_rows, print_json

from qtune.memory.step import StepSetup, train_step


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
    p.add_argument("--no-csv", action="store_true")
    return p.parse_args()


def profile_qtune(setup: StepSetup) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(setup)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)


def main() -> None:
    args = parse_args()
    from qtune.weights.checkpoint import resolve

    model_dir = resolve(args.model)
    vocab = __import__("json").loads((model_dir / "config.json").read_text())["vocab_size"]
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
    result = {"model": args.model, "batch": args.batch, "seq": args.seq, "rank": args.rank, "dropout": args.dropout,
              "threads": torch.get_num_threads()}
    for name, ts in times.items():
        result[name] = {"min_s": round(min(ts), 3), "median_s": round(statistics.median(ts), 3),
                        "max_s": round(max(ts), 3), "tokens_per_s": round(tokens / min(ts), 1),
                        "median_tokens_per_s": round(tokens / statistics.median(ts), 1)}
    result["speedup"] = round(result["qtune"]["tokens_per_s"] / result["peer"]["tokens_per_s"], 3)
    result["median_speedup"] = round(result["qtune"]["median_tokens_per_s"] / result["peer"]["median_tokens_per_s"], 3)
    dropout = f"dropout {args.dropout}, " if args.dropout else ""
    print(f"{args.model} QLoRA step, {args.batch} x {args.seq} tokens, r={args.rank}, checkpointing, fp32 CPU: "
          f"{dropout}qtune {result['qtune']['tokens_per_s']} tok/s ({result['qtune']['min_s']} s), peer "
          f"{result['peer']['tokens_per_s']} tok/s ({result['peer']['min_s']} s), ratio {result['speedup']}x "
          f"(medians: {result['median_speedup']}x)")
    if not args.no_csv:
        case = f"{args.model},b={args.batch},T={args.seq},r={args.rank}" + (f",p={args.dropout}" if args.dropout else "")
        rows = [{"case": case, "impl": impl, "metric": "tokens_per_s", "value": result[impl]["tokens_per_s"],
                 "unit": "tok/s"} for impl in ("qtune", "peer")]
        rows.append({"case": case, "impl": "qtune/peer", "metric": "speedup", "value": result["speedup"], "unit": "x"})
        append_rows("throughput", "cpu", rows)
    print_json(result)


if __name__ == "__main__":
    main()
