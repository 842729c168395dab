"""Long context on one card: the planner's longest sequence per card, the tracer's replay of it, and CPU steps.

    python benchmarks/bench_context.py                      # all of it (the 7B-shaped CPU steps take long)
    python benchmarks/bench_context.py --skip-big --replay 8  # the 8 GB card's replay only, no 7B steps

1. Per card (24, 16, 8 GB): Llama-3.1-8B QLoRA, r=32 on every linear, batch 1, bf16 with the Triton loss. The
   planner's ladder (`qtune estimate --max-context`), its longest length with the switches it needs, and the
   tracer's replay of that step on fake tensors with GPU semantics (bf16, NF4, offloaded checkpoints counted
   as host memory), put on the card by the planner's own formula (CUDA context, allocator overhead).
   Nothing here ran on a GPU.
2. CPU slopes: real fp32 steps (each in its own process, `python -m qtune.memory.measure`, measured after a
   warm-up step) of SmolLM2-360M's shape and of the 7B shape (its tiled MLP in 256-token chunks, so that both
   lengths tile within the hour), with and without the tiled MLP, at two lengths each: memory per extra token,
   and the tracer's fp32 replay of the same steps (their ratio should be within 5%).
3. Exactness: loss and adapter gradients of a 4-layer SmolLM2-135M-shaped step with offloaded checkpoints,
   the tiled MLP and both, against the plain checkpointed step (max abs difference).
4. Speed on the CPU: the tiled step over the untiled one (tiling costs one more MLP forward), and the
   default short step (train.tiled_mlp=auto, 512 tokens) over the untiled one (the same code: ratio ~1).

The last stdout line is one JSON object (`cards`, `cpu_slopes`, `exactness`, `tiling_speed_ratio`,
`short_step_ratio`).
"""

import argparse
import json
import subprocess
import sys
import time
from multiprocessing import Pool, TimeoutError
from dataclasses import replace
from pathlib import Path

import torch

from common import append_rows, print_json

from qtune.config import shape_config
from qtune.memory.estimate import StepShape
from qtune.memory.plan import ASSUMPTIONS, best_rung, ladder, on_card
from qtune.memory.tracer import fmt_bytes
from qtune.config import position_limit
from qtune.tiled_mlp import CHUNK_TOKENS

HERE = Path(__file__).resolve().parent
SHAPE = "llama3.1-8b"
PUBLISHED = {24: 78_475, 16: 40_724, 8: 2_972}  # Unsloth's figures for Llama-3.1-8B QLoRA r=32 (batch 1)
TARGETS = {24: 100_000, 16: 50_000, 8: 6_000}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers go back to the kernel: RSS follows live tensors


def card_step() -> StepShape:
    """The issue's step: Llama-3.1-8B, NF4, r=32 all-linear, batch 1, bf16, Triton loss, default switches."""
    return StepShape(shape_config(SHAPE), 1, 1024, "bfloat16", r=32, targets="all-linear", optimizer="paged_adamw",
                     triton_loss=True, tiled_mlp="auto")


def plan_card(gb: int) -> dict:
    s = card_step()
    budget = gb * 2**30
    rungs = ladder(s, budget, position_limit(s.cfg))
    best = best_rung(rungs)
    return {"budget_bytes": budget, "max_context": best.max_context, "switches": best.switches,
            "peak_bytes": best.peak_bytes, "host_bytes": best.host_bytes, "published_peer": PUBLISHED[gb],
            "target": TARGETS[gb], "position_limit": position_limit(s.cfg),
            "ladder": [{"added": r.added, "max_context": r.max_context} for r in rungs]}


def replay(max_context: int, switches: dict) -> dict:
    """The tracer's bf16 replay of the card's step at `max_context` with `switches` (in a worker process)."""
    from qtune.memory.step import trace_step

    s = card_step()
    t0 = time.perf_counter()
    rep = trace_step(s.cfg, 1, max_context, torch.bfloat16, r=s.r, targets=s.targets,
                     gradient_checkpointing=switches["model.gradient_checkpointing"],
                     offload_checkpoints=switches["train.offload_checkpoints"], tiled_mlp=switches["train.tiled_mlp"])
    return {"live_peak_bytes": rep.peak_bytes, "resident_bytes": rep.start_bytes,
            "on_card_bytes": on_card(rep.peak_bytes, rep.start_bytes), "host_bytes": rep.host_peak_bytes,
            "peak_phase": rep.peak_phase, "seconds": round(time.perf_counter() - t0, 1)}


def run_json(cmd: list[str]) -> dict:
    """A measuring subprocess; its last stdout line is a JSON object."""
    import os

    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV}, cwd=HERE, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measured(shape: str, seq: int, tiled: str, tile_tokens: int) -> dict:
    """A real step's peak after a warm-up step: the first step also builds the runtime's lazily made state
    (oneDNN primitives and scratch memory, thread pools; 50-90 MB on SmolLM2-360M, which is no tensor of the
    step and is built once per process), which a cold measurement would count as the step's."""
    spec = {"shape": shape, "seq_len": seq, "r": 16, "tiled_mlp": tiled, "warmup_step": True,
            "tile_tokens": tile_tokens}
    return run_json([sys.executable, "-m", "qtune.memory.measure", json.dumps(spec)])


def traced_fp32(shape: str, seq: int, tiled: str, tile_tokens: int) -> int:
    import qtune.tiled_mlp
    from qtune.memory.step import trace_step

    qtune.tiled_mlp.CHUNK_TOKENS = tile_tokens  # this worker process's chunk, as the measured step's

    return trace_step(shape_config(shape), 1, seq, torch.float32, r=16, tiled_mlp=tiled).peak_bytes


def cpu_slopes(shape: str, seqs: tuple[int, int], tiled: str, pool, tile_tokens: int = CHUNK_TOKENS) -> dict:
    """Two real steps and their fp32 replays: bytes per extra token, and replay / measured at each length.
    tile_tokens: the tiled MLP's chunk (smaller than the default for the 7B shape, whose steps at lengths of
    several default chunks would take hours on this CPU)."""
    pending = [pool.apply_async(traced_fp32, (shape, n, tiled, tile_tokens)) for n in seqs]
    steps = [measured(shape, n, tiled, tile_tokens) for n in seqs]
    traces = [f.get() for f in pending]
    (a, b), (n0, n1) = steps, seqs
    return {"shape": shape, "tiled_mlp": tiled, "tile_tokens": tile_tokens, "seqs": list(seqs),
            "measured_step_peak_tensors": [m["step_peak_tensors"] for m in steps],
            "traced_fp32_peak": traces, "step_s": [m["step_s"] for m in steps],
            "measured_bytes_per_token": (b["step_peak_tensors"] - a["step_peak_tensors"]) / (n1 - n0),
            "traced_bytes_per_token": (traces[1] - traces[0]) / (n1 - n0),
            "traced_over_measured": [round(t / m["step_peak_tensors"], 4) for t, m in zip(traces, steps)]}


def small_setup(seq: int, offload: bool, tiled: str, seed: int = 0):
    """A 4-layer SmolLM2-135M-shaped QLoRA step with random (non-zero) adapters."""
    from qtune.memory.step import build_step

    cfg = replace(shape_config("smollm2-135m"), num_hidden_layers=4)
    setup = build_step(cfg, 1, seq, torch.float32, "cpu", r=16, offload_checkpoints=offload, tiled_mlp=tiled)
    setup.model.set_kernels("torch")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in setup.params:  # B = 0 at init would give the A matrices no gradient
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return setup


def loss_and_grads(setup) -> tuple[float, list[torch.Tensor]]:
    from qtune.train.common import lm_loss_sum

    loss, count = lm_loss_sum(setup.model, setup.batch)
    (loss / count).backward()
    grads = [p.grad.clone() for p in setup.params]
    setup.optimizer.zero_grad(set_to_none=True)
    return loss.item(), grads


def exactness(seq: int) -> dict:
    ref_loss, ref_grads = loss_and_grads(small_setup(seq, False, "off"))
    out = {}
    for name, offload, tiled in (("offload_checkpoints", True, "off"), ("tiled_mlp", False, "on"),
                                 ("both", True, "on")):
        loss, grads = loss_and_grads(small_setup(seq, offload, tiled))
        out[name] = {"loss_abs_diff": abs(loss - ref_loss),
                     "grad_max_abs_diff": max((g - r).abs().max().item() for g, r in zip(grads, ref_grads)),
                     "grad_max_abs": max(r.abs().max().item() for r in ref_grads)}
    return out


def step_seconds(seq: int, tiled: str, repeat: int) -> float:
    """Median wall time of forward + backward of the small step."""
    setup = small_setup(seq, False, tiled)
    loss_and_grads(setup)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        loss_and_grads(setup)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replay", default="24,16,8", help="cards (GB) whose longest step the tracer replays ('' none)")
    p.add_argument("--small-seqs", default="2048,3072", help="SmolLM2-360M lengths of the CPU slope")
    p.add_argument("--big-shape", default="llama2-7b")
    p.add_argument("--big-seqs", default="512,1024")
    p.add_argument("--big-tile-tokens", type=int, default=256, help="the tiled MLP's chunk in the 7B-shaped steps")
    p.add_argument("--skip-big", action="store_true", help="skip the 7B-shaped CPU steps (minutes each)")
    p.add_argument("--exact-seq", type=int, default=2304, help="tokens of the exactness and speed steps")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--replay-minutes", type=float, default=60.0,
                   help="replays not done by then (from the start) are reported as unfinished")
    p.add_argument("--no-csv", action="store_true")
    return p.parse_args()


def report(result: dict) -> None:
    print(f"{SHAPE} QLoRA r=32 all-linear, batch 1, bf16 (planner and tracer replay; nothing measured on a GPU)")
    print(f"assumed: {ASSUMPTIONS}")
    for gb, c in result["cards"].items():
        rep = c.get("replay")
        shown = f", replay {fmt_bytes(rep['on_card_bytes'])} on the card" if isinstance(rep, dict) else f", {rep}"
        print(f"  {gb}: {c['max_context']:,} tokens (target {c['target']:,}, peer {c['published_peer']:,}), "
              f"planner {fmt_bytes(c['peak_bytes'])}{shown}, host {fmt_bytes(c['host_bytes'])}; switches "
              f"{c['switches']}")
    for s in result["cpu_slopes"]:
        tile = f" ({s['tile_tokens']}-token chunks)" if s["tiled_mlp"] == "on" else ""
        print(f"  CPU {s['shape']} tiled_mlp={s['tiled_mlp']}{tile}: "
              f"{s['measured_bytes_per_token'] / 1e3:.1f} kB/token measured, "
              f"{s['traced_bytes_per_token'] / 1e3:.1f} traced; replay / measured {s['traced_over_measured']}")
    for name, e in result["exactness"].items():
        print(f"  exact {name}: loss diff {e['loss_abs_diff']:.2e}, gradient diff {e['grad_max_abs_diff']:.2e} "
              f"(largest gradient {e['grad_max_abs']:.2e})")
    print(f"  tiled / untiled step time {result['tiling_speed_ratio']:.3f}; default short step / untiled "
          f"{result['short_step_ratio']:.3f}")


def main() -> None:
    args = parse_args()
    cards = {f"{gb}GB": plan_card(gb) for gb in (24, 16, 8)}
    replays = [int(x) for x in args.replay.split(",") if x]
    deadline = time.time() + 60 * args.replay_minutes
    # the replays (fake tensors, little memory) run in worker processes beside the CPU steps
    with Pool(len(replays) + 1) as pool:
        pending = {gb: pool.apply_async(replay, (cards[f"{gb}GB"]["max_context"], cards[f"{gb}GB"]["switches"]))
                   for gb in replays}
        small = tuple(int(x) for x in args.small_seqs.split(","))
        slopes = [cpu_slopes("smollm2-360m", small, tiled, pool) for tiled in ("off", "on")]
        if not args.skip_big:
            big = tuple(int(x) for x in args.big_seqs.split(","))
            slopes += [cpu_slopes(args.big_shape, big, tiled, pool, args.big_tile_tokens) for tiled in ("off", "on")]
        exact = exactness(args.exact_seq)
        untiled = step_seconds(args.exact_seq, "off", args.repeat)
        tiled = step_seconds(args.exact_seq, "on", args.repeat)
        short = step_seconds(512, "auto", args.repeat) / step_seconds(512, "off", args.repeat)
        for gb, future in pending.items():
            c = cards[f"{gb}GB"]
            try:
                c["replay"] = future.get(timeout=max(deadline - time.time(), 1))
                c["replay_fits"] = c["replay"]["on_card_bytes"] <= c["budget_bytes"]
            except TimeoutError:
                c["replay"] = f"not finished within {args.replay_minutes:g} minutes"
        pool.terminate()
    for c in cards.values():
        c["planner_meets_target"] = c["max_context"] >= c["target"]
    result = {"shape": SHAPE, "assumptions": ASSUMPTIONS, "cards": cards, "cpu_slopes": slopes, "exactness": exact,
              "tiling_speed_ratio": tiled / untiled, "short_step_ratio": short}
    report(result)
    if not args.no_csv:
        rows = [{"case": f"{SHAPE},r=32,{gb}", "impl": "planner", "metric": "max_context", "value": c["max_context"],
                 "unit": "tokens"} for gb, c in cards.items()]
        rows += [{"case": f"{s['shape']},tiled={s['tiled_mlp']}", "impl": "measured", "metric": "bytes_per_token",
                  "value": round(s["measured_bytes_per_token"]), "unit": "B/token"} for s in slopes]
        append_rows("context", "cpu", rows)
    print_json(result)


if __name__ == "__main__":
    main()
