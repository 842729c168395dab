"""One command on a GPU that proves and times qtune: the compiled test lane, every kernel, a QLoRA step, decoding.

    python benchmarks/gpu_check.py                          # on one CUDA GPU, within 8 minutes
    python benchmarks/gpu_check.py --device cpu --interpret # the smoke mode CI runs: tiny shapes, Triton interpreted

In order:
  1. tests    `pytest -m gpu` over the GPU lane and the kernel tests (compiled kernels; on a CPU they skip)
  2. kernels  nf4_matmul (decode and prefill rows), the LoRA SwiGLU MLP and the fused cross-entropy, forward and
              backward, each asserted against its plain-torch reference (error within 2x of torch's own in the
              same dtype against fp32) and timed beside it; bitsandbytes' 4-bit matmul and Liger's fused
              cross-entropy are timed too where importable, else their rows say why not
  3. train    one QLoRA step (NF4 base, r=16 adapters on every linear, gradient checkpointing, AdamW) of a random
              Llama-3-8B-shaped model at sequence 2048, or the largest shape whose `qtune estimate` fits in 90%
              of the card: tokens/s, model FLOP utilisation against the card's dense bf16 peak and peak memory
              against the estimate of the same shape
  4. decode   greedy NF4 decoding of that model at batch 1 and batch 16: tokens/s
  5. context  the longest sequence on a 24 GB share of the card (the allocator capped at 24 GB): Llama-3.1-8B
              QLoRA r=32 on every linear, batch 1, one real step at the planner's `--max-context` length with the
              switches it names, and one at 10% more; which ran, their peak memory against the planner's

Model FLOPs of a step (frozen base, so no weight gradients): 4 x tokens x (decoder linear + lm_head weights)
for the forward and the input-gradient backward, plus causal attention 6 x layers x tokens x seq x hidden; the
checkpointed recomputation is not counted (MFU, not hardware utilisation).

Needs nothing beyond torch, triton and qtune's dependencies and no network: models are drawn at random on the
device. The last stdout line is one JSON object with every figure and every pass/fail; the exit status is 1
when anything failed.
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_json, sync, time_ms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 480
TEST_FILES = ("tests/test_gpu_lane.py", "tests/test_kernels_nf4.py", "tests/test_kernels_lora.py",
              "tests/test_kernels_logprobs.py", "tests/test_long_context.py")
CONTEXT_CARD_BYTES = 24 * 2**30  # the card the context stage emulates
# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets, without sparsity), by device-name fragment, the
# first fragment found in torch.cuda.get_device_name() wins (an SXM H100 reports "NVIDIA H100 80GB HBM3").
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0, "RTX 5090": 209.0, "T4": 65.0}
TRAIN_SHAPES = ("llama3-8b", "llama2-7b", "smollm2-360m", "smollm2-135m")  # largest first
TINY = dict(model_type="llama", vocab_size=160, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=False)


def within_2x(found, own, exact) -> bool:
    """found's error against fp32 `exact` is at most 2x torch's own in the same dtype (+ a 1e-5 scale floor)."""
    found, own, exact = found.float(), own.float(), exact.float()
    floor = 1e-5 * exact.abs().max().item() + 1e-12
    return (found - exact).abs().max().item() <= 2 * (own - exact).abs().max().item() + floor


# ----------------------------------------------------------------------------- 1. tests

def run_tests(device: str, timeout_s: float) -> dict:
    """The gpu-marked tests in a subprocess (conftest interprets Triton only where there is no CUDA device)."""
    files = TEST_FILES if device == "cuda" else TEST_FILES[:1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s"}
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    ok = proc.returncode in (0, 5) and not counts.get("failed") and not counts.get("error", counts.get("errors"))
    return {"ok": ok, "summary": tail, **counts}


# ----------------------------------------------------------------------------- 2. kernels

def check_nf4(device, dtype, n, k, rows, repeat) -> dict:
    from qtune.kernels.nf4 import nf4_matmul, reference_dequantize_nf4, reference_nf4_matmul
    from qtune.weights.nf4 import quantize_nf4

    q = quantize_nf4(torch.randn(n, k, device=device) / k**0.5)
    w32 = reference_dequantize_nf4(q, torch.float32)
    out = {}
    for m in rows:
        x = torch.randn(m, k, device=device).to(dtype)
        ok = within_2x(nf4_matmul(x, q), reference_nf4_matmul(x, q), x.float() @ w32.T)
        ours = time_ms(lambda: nf4_matmul(x, q), device, warmup=2, repeat=repeat)["median_ms"]
        ref = time_ms(lambda: reference_nf4_matmul(x, q), device, warmup=2, repeat=repeat)["median_ms"]
        out[f"M{m}"] = {"ok": ok, "ms": ours, "reference_ms": ref, **bnb_matmul_ms(device, w32.to(dtype), x, repeat)}
    return out


def bnb_matmul_ms(device, weight, x, repeat) -> dict:
    """bitsandbytes' NF4 matmul of the same shape (its own quantization of the weight), where it runs."""
    if device != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        return {"bitsandbytes": "skipped: " + ("not installed" if device == "cuda" else "CUDA only")}
    import bitsandbytes as bnb

    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    return {"bitsandbytes_ms": time_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state), device,
                                       warmup=2, repeat=repeat)["median_ms"]}


def check_lora_mlp(device, dtype, tokens, hidden, inter, repeat) -> dict:
    from qtune.kernels import lora
    from qtune.kernels.nf4 import reference_dequantize_nf4
    from qtune.weights.nf4 import quantize_nf4

    def proj(o, i):
        a = (torch.randn(16, i, device=device) / i**0.5).requires_grad_()
        b = (torch.randn(o, 16, device=device) / 4).requires_grad_()
        return lora.LoraParams(quantize_nf4(torch.randn(o, i, device=device) / i**0.5), None, a, b, 2.0)

    blocks = [proj(inter, hidden), proj(inter, hidden), proj(hidden, inter)]
    dense = [p._replace(weight=reference_dequantize_nf4(p.weight, torch.float32)) for p in blocks]
    x32 = torch.randn(tokens, hidden, device=device)
    dy = torch.randn(tokens, hidden, device=device)

    def run(fn, dt, ps):
        x = x32.to(dt).requires_grad_()
        y = fn(x, *ps)
        tensors = [x, *(t for p in ps for t in (p.lora_a, p.lora_b))]
        return [y, *torch.autograd.grad(y, tensors, dy.to(dt))]

    fused = lambda x, *ps: lora.lora_mlp(x, *ps, kernels="triton")  # noqa: E731
    exact, own, found = run(lora.reference_lora_mlp, torch.float32, dense), run(lora.reference_lora_mlp, dtype, dense), \
        run(fused, dtype, blocks)
    ok = all(within_2x(f, o, e) for f, o, e in zip(found, own, exact))
    return {"ok": ok, "ms": time_ms(lambda: run(fused, dtype, blocks), device, repeat=repeat)["median_ms"],
            "reference_ms": time_ms(lambda: run(lora.reference_lora_mlp, dtype, blocks), device,
                                    repeat=repeat)["median_ms"]}


def check_cross_entropy(device, dtype, tokens, hidden, vocab, repeat) -> dict:
    from qtune.kernels.logprobs import cross_entropy_sum

    h32 = torch.randn(tokens, hidden, device=device)
    w32 = torch.randn(vocab, hidden, device=device) * hidden**-0.5
    y = torch.randint(0, vocab, (tokens,), device=device)
    kernels = "triton" if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "auto"

    def run(fn, dt):
        h = h32.to(dt).requires_grad_()
        loss = fn(h, w32.to(dt))
        return [loss, *torch.autograd.grad(loss, h)]

    fused = lambda h, w: cross_entropy_sum(h, w, y, kernels=kernels)[0]  # noqa: E731
    naive = lambda h, w: torch.nn.functional.cross_entropy((h @ w.T).float(), y, reduction="sum")  # noqa: E731
    ok = all(within_2x(f, o, e) for f, o, e in zip(run(fused, dtype), run(naive, dtype), run(naive, torch.float32)))
    out = {"ok": ok, "ms": time_ms(lambda: run(fused, dtype), device, repeat=repeat)["median_ms"],
           "reference_ms": time_ms(lambda: run(naive, dtype), device, repeat=repeat)["median_ms"]}
    if device != "cuda" or importlib.util.find_spec("liger_kernel") is None:
        out["liger"] = "skipped: " + ("not installed" if device == "cuda" else "CUDA only")
    else:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        out["liger_ms"] = time_ms(lambda: run(lambda h, w: liger(w, h, y), dtype), device, repeat=repeat)["median_ms"]
    return out


def check_kernels(device, dtype, smoke: bool) -> dict:
    if smoke:
        return {"nf4_matmul": check_nf4(device, dtype, 67, 48, (1, 70), 1),
                "lora_mlp": check_lora_mlp(device, dtype, 19, 48, 72, 1),
                "cross_entropy": check_cross_entropy(device, dtype, 23, 32, 301, 1)}
    return {"nf4_matmul": check_nf4(device, dtype, 14336, 4096, (1, 16, 2048), 10),
            "lora_mlp": check_lora_mlp(device, dtype, 2048, 4096, 14336, 5),
            "cross_entropy": check_cross_entropy(device, dtype, 2048, 4096, 128256, 5)}


# ----------------------------------------------------------------------------- 3. train, 4. decode

def pick_shape(device, dtype_name, seq_len, smoke: bool):
    """(shape name, ModelConfig, estimate) of the largest training shape whose estimate fits 90% of the card."""
    from qtune.config import ModelConfig, shape_config
    from qtune.memory.estimate import StepShape, estimate

    candidates = [("tiny", ModelConfig.from_dict(TINY))] if smoke else [(n, shape_config(n)) for n in TRAIN_SHAPES]
    budget = 0.9 * torch.cuda.get_device_properties(0).total_memory if device == "cuda" else float("inf")
    for name, cfg in candidates:
        est = estimate(StepShape(cfg, 1, seq_len, dtype_name, r=16, triton_loss=device == "cuda"))
        if est.peak_bytes <= budget:
            return name, cfg, est
    raise RuntimeError(f"no training shape fits {budget / 2**30:.1f} GiB")


def model_flops(cfg, tokens: int, seq_len: int) -> float:
    from qtune.memory.accounting import param_counts

    p = param_counts(cfg)
    head = p.lm_head or p.embedding  # a tied lm_head multiplies by the embedding
    attention = 6 * cfg.num_hidden_layers * tokens * seq_len * cfg.hidden_size
    return 4 * tokens * (p.linear + head) + attention


def bf16_peak_flops(device) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((tf * 1e12 for key, tf in BF16_PEAK_TFLOPS.items() if key in name), None)


def train_step_figures(device, dtype, dtype_name, seq_len, steps, smoke: bool):
    """The QLoRA step's figures and the model (kept for decoding)."""
    from qtune.memory.build import add_trainable_lora, random_batch, random_model
    from qtune.train import common

    name, cfg, est = pick_shape(device, dtype_name, seq_len, smoke)
    model = random_model(cfg, dtype, device, quantize="nf4", draw_on_device=True)
    model.gradient_checkpointing = True
    model.set_kernels("triton" if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "auto")
    params = add_trainable_lora(model, r=16)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = random_batch(cfg, 1, seq_len, device)
    model.train()

    def step():
        with common.autocast(device, dtype):
            loss_sum, n = common.lm_loss_sum(model, batch)
        (loss_sum / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum

    loss = step()  # compiles the kernels, creates the optimizer state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timing = time_ms(step, device, warmup=0, repeat=steps)
    seconds = timing["median_ms"] / 1e3
    peak_flops = bf16_peak_flops(device)
    figures = {"shape": name, "seq_len": seq_len, "loss_finite": bool(torch.isfinite(loss).item()),
               "step_ms": timing["median_ms"], "tokens_per_s": seq_len / seconds,
               "mfu": model_flops(cfg, seq_len, seq_len) / seconds / peak_flops if peak_flops else None,
               "estimate_bytes": est.peak_bytes}
    if device == "cuda":
        figures["peak_bytes"] = torch.cuda.max_memory_allocated()
        figures["peak_over_estimate"] = figures["peak_bytes"] / est.peak_bytes
    return figures, model, cfg


def decode_figures(model, cfg, device, batch_sizes, new_tokens) -> dict:
    from qtune.generate import generate

    model.eval()
    generator = torch.Generator().manual_seed(0)
    out = {}
    for b in batch_sizes:
        prompts = [torch.randint(3, cfg.vocab_size, (32,), generator=generator).tolist() for _ in range(b)]
        generate(model, prompts, max_new_tokens=2, greedy=True, stop_ids=set(), batch_size=b)  # compiles
        sync(device)
        start = time.perf_counter()
        generate(model, prompts, max_new_tokens=new_tokens, greedy=True, stop_ids=set(), batch_size=b)
        sync(device)
        out[f"batch{b}_tokens_per_s"] = b * new_tokens / (time.perf_counter() - start)
    return out


def context_step(cfg, seq_len: int, switches: dict, device, dtype) -> dict:
    """One QLoRA step (r=32, every linear) at seq_len with the planner's switches: ran or out of memory, peak."""
    from qtune.memory.build import add_trainable_lora, random_batch, random_model
    from qtune.train import common

    model = random_model(cfg, dtype, device, quantize="nf4", draw_on_device=True)
    model.gradient_checkpointing = switches["model.gradient_checkpointing"]
    common.set_long_context(model, switches["train.offload_checkpoints"], switches["train.tiled_mlp"])
    model.set_kernels("triton" if device == "cuda" else "torch")  # stage 2 checks the interpreted kernels
    params = add_trainable_lora(model, r=32)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = random_batch(cfg, 1, seq_len, device)
    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        with common.autocast(device, dtype):
            loss_sum, n = common.lm_loss_sum(model, batch)
        (loss_sum / n).backward()
        optimizer.step()
        sync(device)
        out = {"ran": True, "loss_finite": bool(torch.isfinite(loss_sum).item())}
    except torch.OutOfMemoryError:
        out = {"ran": False}
    out["seconds"] = round(time.perf_counter() - start, 1)
    if device == "cuda":
        out["peak_allocated"] = torch.cuda.max_memory_allocated()
    return out


def context_figures(device, dtype, smoke: bool) -> dict:
    """Stage 5: the planner's longest length for a 24 GB card and 10% more, each run once with its switches."""
    from qtune.config import ModelConfig, shape_config
    from qtune.memory.estimate import StepShape
    from qtune.memory.plan import best_rung, ladder

    if smoke:  # tiny: the switches' code runs, nothing is planned
        switches = {"model.gradient_checkpointing": True, "train.offload_checkpoints": True, "train.tiled_mlp": "on"}
        return {"tiny": context_step(ModelConfig.from_dict(TINY), 64, switches, device, dtype)}
    cfg = shape_config("llama3.1-8b")
    total = torch.cuda.get_device_properties(0).total_memory
    budget = min(CONTEXT_CARD_BYTES, total)
    best = best_rung(ladder(StepShape(cfg, 1, 1024, "bfloat16", r=32, triton_loss=True, tiled_mlp="auto"), budget,
                            cfg.max_position_embeddings))
    torch.cuda.set_per_process_memory_fraction(budget / total)  # the allocator sees a 24 GB card
    try:
        runs = {}
        for n in (best.max_context, min(int(best.max_context * 1.1), cfg.max_position_embeddings)):
            runs[str(n)] = context_step(cfg, n, best.switches, device, dtype)
            torch.cuda.empty_cache()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    planned = runs[str(best.max_context)]
    return {"card_bytes": budget, "planner_max_context": best.max_context, "switches": best.switches,
            "planner_peak_bytes": best.peak_bytes, "planner_host_bytes": best.host_bytes, "runs": runs,
            "ok": planned["ran"], "longest_ran": max((int(n) for n, r in runs.items() if r["ran"]), default=0)}


# ----------------------------------------------------------------------------- main

def stage(results: dict, name: str, fn):
    """Run one stage, recording its figures or its error; the stages after a failed one still run."""
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # a failing stage is a reported figure, not the end of the check
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    results[name + "_s"] = round(time.perf_counter() - start, 1)
    print(f"{name}: {results[name]}", flush=True)


def passed(value) -> bool:
    """Every "ok" and "loss_finite" inside a stage's figures is true."""
    if isinstance(value, dict):
        return all(v for k, v in value.items() if k in ("ok", "loss_finite")) and all(map(passed, value.values()))
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--interpret", action="store_true", help="CPU smoke mode: Triton interpreted, tiny shapes")
    parser.add_argument("--skip-tests", action="store_true", help="leave out stage 1 (the test lane)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device (use --device cpu --interpret for the smoke mode)")
    if args.interpret:
        if args.device != "cpu":
            parser.error("--interpret runs the Triton kernels on the CPU: use it with --device cpu")
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    smoke = args.device == "cpu"
    dtype_name = "float32" if smoke else "bfloat16"
    dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    results = {"device": device_name(args.device), "torch": torch.__version__, "smoke": smoke}
    if importlib.util.find_spec("triton") is not None:
        import triton

        results["triton"] = triton.__version__
    if not args.skip_tests:
        stage(results, "tests", lambda: run_tests(args.device, 0.5 * BUDGET_S))
    stage(results, "kernels", lambda: check_kernels(args.device, dtype, smoke))
    holder = {}

    def train():
        figures, holder["model"], holder["cfg"] = train_step_figures(args.device, dtype, dtype_name,
                                                                     64 if smoke else 2048, 1 if smoke else 3, smoke)
        return figures

    stage(results, "train", train)
    if "model" in holder:
        stage(results, "decode", lambda: decode_figures(holder["model"], holder["cfg"], args.device,
                                                        (1, 16) if not smoke else (1, 2), 4 if smoke else 64))
    holder.clear()  # the context stage needs the card to itself
    stage(results, "context", lambda: context_figures(args.device, dtype, smoke))
    results["total_s"] = round(time.perf_counter() - start, 1)
    results["within_budget"] = results["total_s"] <= BUDGET_S
    stages = [k for k in ("tests", "kernels", "train", "decode", "context") if k in results]
    results["ok"] = all(passed(results[k]) for k in stages) and len(stages) == 5 - args.skip_tests
    print_json(results)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
