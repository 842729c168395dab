"""Memory of QLoRA fine-tuning on a 7B shape: bytes per parameter, a measured step, the peer, the tracer.

    python benchmarks/bench_memory.py --shape llama2-7b --seq 512 --rank 16

1. Bytes per parameter of full fine-tuning (mixed-precision AdamW), LoRA on a bf16 base and QLoRA (NF4 +
   double quantization), counted on the shape built on the meta device and compared with the accounting.
2. One real QLoRA step (random weights quantized tensor by tensor, batch 1, r=16 on every linear,
   gradient checkpointing, fp32 on the CPU) at two sequence lengths, each in its own process
   (`python -m qtune.memory.measure`); then the same step with transformers + peft + bitsandbytes (CPU
   backend) on a random bf16 checkpoint written shard by shard for it and deleted afterwards.
3. The tracer's replay of the step on fake tensors: fp32 (the measured step) and bf16 (a GPU), and the
   estimator's prediction of each.
4. One table of every [peft] method at its default size on the NF4 base: trainable parameters, adapter
   bytes, resident bytes and the estimator's bf16 step peak (the accounting only, nothing measured).

Memory is the kernel's count for each process (/proc/self/status VmHWM, reset once the model is loaded).
Every process runs with MALLOC_MMAP_THRESHOLD_=65536, so glibc returns freed buffers to the kernel and the
resident size follows the live tensors instead of keeping freed heap memory. The last stdout line is a
JSON object with qtune_peak_bytes, peer_peak_bytes, floor_bytes and bytes_per_param (per regime).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

# qtune is imported as installed (pip install -e .): putting the repository root on sys.path would let its
# kernels/ folder shadow the `kernels` package that bitsandbytes looks for.
HERE = Path(__file__).resolve().parent

from common import append_rows, print_json

from qtune.config import shape_config
from qtune.memory.accounting import REGIMES, nf4_nbytes, param_counts, regime_bytes
from qtune.memory.estimate import StepShape, estimate
from qtune.memory.measure import proc_status, reset_peak_rss
from qtune.memory.tracer import fmt_bytes

ACCOUNTED_METHODS = ("lora", "dora", "adalora", "ia3", "adapter")  # the [peft] methods qtune.memory.accounting counts

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
PEER_NEEDS = 21 * 2**30  # the peer's load peaks near 20 GB on this shape


def write_checkpoint(args) -> dict:
    """A random bf16 Hugging Face checkpoint of the shape, written one shard at a time."""
    from safetensors.torch import save_file

    from qtune.memory.build import INIT_STD

    cfg = shape_config(args.shape)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    D, V = cfg.hidden_size, cfg.vocab_size
    shapes = {"q_proj": (cfg.num_attention_heads * cfg.head_dim, D), "k_proj": (cfg.num_key_value_heads * cfg.head_dim, D),
              "v_proj": (cfg.num_key_value_heads * cfg.head_dim, D), "o_proj": (D, cfg.num_attention_heads * cfg.head_dim),
              "gate_proj": (cfg.intermediate_size, D), "up_proj": (cfg.intermediate_size, D),
              "down_proj": (D, cfg.intermediate_size)}
    shards = [{"model.embed_tokens.weight": (V, D), "lm_head.weight": (V, D), "model.norm.weight": (D,)}]
    for i in range(cfg.num_hidden_layers):
        layer = {f"model.layers.{i}.{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{n}.weight": s
                 for n, s in shapes.items()}
        layer[f"model.layers.{i}.input_layernorm.weight"] = (D,)
        layer[f"model.layers.{i}.post_attention_layernorm.weight"] = (D,)
        shards.append(layer)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=generator) * INIT_STD)
                   .to(torch.bfloat16) for key, s in shard.items()}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    config = {**cfg.to_dict(), "torch_dtype": "bfloat16"}
    config.pop("extra", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return {"dir": str(out), "bytes": total}


def run_peer(args) -> dict:
    """The same step with transformers + peft + bitsandbytes (CPU backend), same settings."""
    import peft
    import transformers

    runtime = proc_status()
    t0 = time.perf_counter()
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=bnb,
                                                              dtype=torch.float32, device_map="cpu")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lora = peft.LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    for p in params:  # steady-state optimizer state, as for qtune
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    load_s = time.perf_counter() - t0
    loaded = proc_status()
    reset_peak_rss()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.3)
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - t0
    after = proc_status()
    return {"impl": "transformers+peft+bitsandbytes", "runtime_rss": runtime["VmRSS"], "load_peak": loaded["VmHWM"],
            "loaded_rss": loaded["VmRSS"], "loaded_anon": loaded["RssAnon"], "step_peak": after["VmHWM"],
            "after_step_rss": after["VmRSS"], "load_s": load_s, "step_s": step_s, "loss": out.loss.item(),
            "tokens": args.batch * args.seq, "trainable": sum(p.numel() for p in params)}



def regimes(shape: str, r: int) -> dict:
    """Bytes per base parameter of each regime: counted on the meta-built model, and the accounting."""
    from qtune.memory.build import training_state_bytes

    cfg = shape_config(shape)
    out = {}
    for regime in REGIMES:
        counted = training_state_bytes(cfg, regime, r)
        acc = regime_bytes(cfg, regime, r)
        per = {k: v / acc.base_params for k, v in counted.items()}
        per["total"] = sum(counted.values()) / acc.base_params
        per["adapter_bytes_per_trainable_param"] = counted["adapters"] / acc.trainable_params if regime != "full" else 0
        out[regime] = {"per_param": per, "counted_equals_accounting": all(counted[k] == getattr(acc, k) for k in counted),
                       "adapter_8bit_per_trainable_param": regime_bytes(cfg, regime, r, optimizer="adamw8bit")
                       .per_param()["adapter_bytes_per_trainable_param"] if regime != "full" else 0}
    codes, consts = nf4_nbytes(4096 * 11008)
    out["nf4_bytes_per_quantized_param"] = (codes + consts) / (4096 * 11008)
    out["base_params"] = param_counts(cfg).total
    return out


def method_rows(shape: str, r: int, seq: int, batch: int) -> dict:
    """Every [peft] method at its default size (the recipe's defaults; LoRA also with PiSSA's residual pairs) on
    the NF4 base: trainable parameters, adapter bytes (fp32 weights, gradients, AdamW state), what stays resident
    (base + adapter) and the estimator's bf16 step peak at `seq` x `batch`. The LoRA-shaped methods come from the
    QLoRA regime's accounting; the virtual-token ones (no adapted layer) add their tensors to the same base."""
    from qtune.memory.accounting import VIRTUAL_METHODS, virtual_state_nbytes, virtual_token_numels
    from qtune.recipe.peft import PeftSection

    cfg, out = shape_config(shape), {}
    for method, init in [(m, "default") for m in ACCOUNTED_METHODS + VIRTUAL_METHODS] + [("lora", "pissa")]:
        peft = PeftSection(method=method)
        if method in VIRTUAL_METHODS:
            numels = virtual_token_numels(cfg, peft)
            base = regime_bytes(cfg, "qlora", r, method="lora")
            trainable, adapters = sum(numels), sum(virtual_state_nbytes(numels).values())
            total = base.total - base.adapters + adapters
            step = StepShape(cfg, micro_batch_size=batch, seq_len=seq, r=0, targets=(), method=method,
                             virtual_numels=tuple(numels), virtual_tokens=getattr(peft, method).num_virtual_tokens)
        else:
            rank = peft.adalora.init_r if method == "adalora" else r
            acc = regime_bytes(cfg, "qlora", rank, method=method, peft=peft, init=init)
            trainable, adapters, total = acc.trainable_params, acc.adapters, acc.total
            step = StepShape(cfg, micro_batch_size=batch, seq_len=seq, r=rank, method=method, peft=peft, init=init)
        name = method if init == "default" else f"{method}+{init}"
        out[name] = {"trainable_params": trainable, "adapter_bytes": adapters, "total_bytes": total,
                     "estimate_peak_bf16": estimate(step).peak_bytes}
    return out


def run_json(cmd: list[str]) -> dict:
    """Run a measuring subprocess; its last stdout line is a JSON object."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV}, cwd=HERE,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_qtune(shape: str, seq: int, batch: int, r: int) -> dict:
    spec = {"shape": shape, "seq_len": seq, "micro_batch_size": batch, "r": r}
    return run_json([sys.executable, "-m", "qtune.memory.measure", json.dumps(spec)])


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_peer(args) -> dict | None:
    """The peer's step, if the machine has room for its load peak (waiting up to --wait-minutes)."""
    deadline = time.time() + 60 * args.wait_minutes
    while available_memory() < PEER_NEEDS:
        if time.time() > deadline:
            print(f"peer skipped: {fmt_bytes(available_memory())} available, its load needs ~{fmt_bytes(PEER_NEEDS)}",
                  file=sys.stderr)
            return None
        time.sleep(30)
    model_dir = Path(args.peer_dir)
    script = str(Path(__file__).resolve())
    try:
        if not (model_dir / "config.json").exists():
            run_json([sys.executable, script, "--role", "write-checkpoint", "--shape", args.shape, "--out", str(model_dir)])
        return run_json([sys.executable, script, "--role", "peer", "--model-dir", str(model_dir), "--seq", str(args.seq),
                         "--batch", str(args.batch), "--rank", str(args.rank)])
    finally:
        if not args.keep_peer_checkpoint:
            shutil.rmtree(model_dir, ignore_errors=True)


def traced(shape: str, seq: int, batch: int, r: int, dtype: str) -> dict:
    """Tracer peak and estimator prediction of the step (run in a worker process)."""
    from qtune.memory.step import trace_step

    cfg = shape_config(shape)
    rep = trace_step(cfg, batch, seq, getattr(torch, dtype), r=r)
    est = estimate(StepShape(cfg, batch, seq, dtype, r=r))
    return {"seq": seq, "dtype": dtype, "trace_peak": rep.peak_bytes, "estimate_peak": est.peak_bytes,
            "estimate_parts": est.parts, "at_peak": dict(list(rep.at_peak.items())[:8])}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--seq2", type=int, default=1024, help="second sequence length (memory per token); 0 skips it")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--trace-seqs", default="512,2048", help="sequence lengths the bf16 tracer replays")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--peer-dir", default="/tmp/qtune-bench-peer-checkpoint")
    p.add_argument("--keep-peer-checkpoint", action="store_true")
    p.add_argument("--wait-minutes", type=float, default=20.0, help="how long to wait for memory for the peer")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--role", choices=["peer", "write-checkpoint"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args()


def report(args, result: dict) -> None:
    print(f"{args.shape}, r={args.rank}, all linears, batch {args.batch}, checkpointing, CPU fp32 (bf16 = tracer)")
    for regime in REGIMES:
        per = result["bytes_per_param"][regime]
        print(f"  {regime:7s} bytes/param: weights {per['weights']:.3f} + consts {per['quant_constants']:.3f} + grads "
              f"{per['gradients']:.2f} + optimizer {per['optimizer']:.2f} + adapters {per['adapters']:.3f} "
              f"= {per['total']:.3f}")
    for m in result["qtune"]:
        print(f"  qtune step seq {m['seq']}: peak {fmt_bytes(m['step_peak'])} (build peak {fmt_bytes(m['build_peak'])}), "
              f"{m['step_s']:.0f} s")
    if result["peer"]:
        p = result["peer"]
        print(f"  peer  step seq {args.seq}: peak {fmt_bytes(p['step_peak'])} (load peak {fmt_bytes(p['load_peak'])}), "
              f"{p['step_s']:.0f} s; qtune / peer = {result['qtune_over_peer']:.3f}")
    for method, m in result["methods"].items():
        print(f"  qlora + {method:10s}: {m['trainable_params']:>11,} trainable, adapters "
              f"{fmt_bytes(m['adapter_bytes'])}, resident {fmt_bytes(m['total_bytes'])}, estimated bf16 step peak "
              f"{fmt_bytes(m['estimate_peak_bf16'])}")
    print(f"  floor {fmt_bytes(result['floor_bytes'])}; qtune / floor = {result['qtune_over_floor']:.3f}")
    for t in result["traces"]:
        print(f"  tracer {t['dtype']} seq {t['seq']}: {fmt_bytes(t['trace_peak'])}, estimate {fmt_bytes(t['estimate_peak'])} "
              f"({t['estimate_peak'] / t['trace_peak']:.3f})")


def csv_rows(args, result: dict) -> list[dict]:
    case = f"{args.shape},seq={args.seq},r={args.rank},b={args.batch}"
    rows = [{"case": case, "impl": "qtune", "metric": "step_peak", "value": result["qtune_peak_bytes"], "unit": "B"},
            {"case": case, "impl": "floor", "metric": "step_peak", "value": result["floor_bytes"], "unit": "B"}]
    if result["peer"]:
        rows += [{"case": case, "impl": "peer", "metric": "step_peak", "value": result["peer_peak_bytes"], "unit": "B"},
                 {"case": case, "impl": "peer", "metric": "load_peak", "value": result["peer"]["load_peak"], "unit": "B"}]
    for regime, per in result["bytes_per_param"].items():
        rows.append({"case": args.shape, "impl": regime, "metric": "bytes_per_param", "value": round(per["total"], 4),
                     "unit": "B/param"})
    for t in result["traces"]:
        c = f"{args.shape},seq={t['seq']},r={args.rank},{t['dtype']}"
        rows += [{"case": c, "impl": "tracer", "metric": "peak", "value": t["trace_peak"], "unit": "B"},
                 {"case": c, "impl": "estimate", "metric": "peak", "value": t["estimate_peak"], "unit": "B"}]
    for method, v in result["methods"].items():
        rows.append({"case": f"{args.shape},seq={args.seq},b={args.batch}", "impl": method, "metric": "estimate_peak",
                     "value": v["estimate_peak_bf16"], "unit": "B"})
    if result.get("bytes_per_token"):
        rows.append({"case": case, "impl": "qtune", "metric": "bytes_per_token", "value": result["bytes_per_token"],
                     "unit": "B/token"})
    return rows


def main() -> None:
    args = parse_args()
    if args.role:
        fn = {"peer": run_peer, "write-checkpoint": write_checkpoint}[args.role]
        print(json.dumps(fn(args)), flush=True)
        return
    seqs = sorted({args.seq, args.seq2} - {0})
    jobs = [(args.shape, s, args.batch, args.rank, "bfloat16") for s in map(int, args.trace_seqs.split(","))]
    jobs.append((args.shape, args.seq, args.batch, args.rank, "float32"))
    with ProcessPoolExecutor(1) as pool:  # the tracer (fake tensors, little memory) runs beside the measurements
        pending = [pool.submit(traced, *job) for job in jobs]
        per_param = regimes(args.shape, args.rank)
        qtune = [{"seq": s, **measure_qtune(args.shape, s, args.batch, args.rank)} for s in seqs]
        peer = None if args.skip_peer else measure_peer(args)
        traces = [f.result() for f in pending]
    main_run = next(m for m in qtune if m["seq"] == args.seq)
    fp32 = next(t for t in traces if t["dtype"] == "float32")
    # the floor: what the accounting says the step must hold, plus the process's own runtime (interpreter, libraries)
    floor = main_run["runtime_rss"] + fp32["estimate_peak"]
    result = {"shape": args.shape, "seq": args.seq, "rank": args.rank, "qtune": qtune, "peer": peer, "traces": traces,
              "bytes_per_param": {r: per_param[r]["per_param"] for r in REGIMES}, "regimes": per_param,
              "methods": method_rows(args.shape, args.rank, args.seq, args.batch),
              "qtune_peak_bytes": main_run["step_peak"], "peer_peak_bytes": peer["step_peak"] if peer else None,
              "floor_bytes": floor, "qtune_over_floor": main_run["step_peak"] / floor,
              "qtune_over_peer": main_run["step_peak"] / peer["step_peak"] if peer else None,
              "tracer_fp32_over_measured": fp32["trace_peak"] / main_run["step_peak_tensors"],
              "estimate_fp32_over_measured": fp32["estimate_peak"] / main_run["step_peak_tensors"]}
    if len(qtune) == 2:
        a, b = qtune
        result["bytes_per_token"] = (b["step_peak"] - a["step_peak"]) / ((b["seq"] - a["seq"]) * args.batch)
    report(args, result)
    if not args.no_csv:
        append_rows("memory", "cpu", csv_rows(args, result))
    print_json(result)


if __name__ == "__main__":
    main()
