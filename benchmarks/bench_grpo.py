"""GRPO on one 4-bit base: (1) qtune against TRL's GRPOTrainer, (2) learning on the built-in tasks, (3) GRPO vs PPO.

trl      the same step in both: SmolLM2-135M in NF4 (qtune's NF4 / bitsandbytes' NF4 with double quantization, fp32
         compute), LoRA r=16 alpha=32 on every linear layer, no dropout; `prompts` word problems per step (the same
         ones, in the same order), G = 8 sampled responses each (temperature 1, up to `new_tokens` tokens, eos the
         only stop), reward 1 when the last number of the response is the answer (qtune's `answer_match` in both),
         group-normalised advantages, clip 0.2 / 0.28, β = 0.04 against the adapter-free base, one update of the
         whole batch per step (token-level loss: TRL's "dapo", qtune's "token"), AdamW lr 1e-5.
         Each implementation runs in a fresh process; the first step is a warm-up and is left out. Reports the
         median seconds per step split into rollout (sampling, rewards, the log-prob passes of the reference) and
         update (forward + backward + optimizer), and the peak RssAnon above the post-import level, with the ratios.
learn    recipes/grpo.toml through the real loop on each built-in task (addition, word problems), in fp32 on a CPU:
         greedy accuracy on the held-out prompts before and after, the one-sided exact McNemar (sign) test against
         no change on the same prompts (and the unpaired two-proportion z-test of earlier rounds), the KL (mean
         and largest over the steps), wall and CPU seconds and the 15-minute load average.
vs-ppo   the addition task with GRPO (operands 1-30; recipes/grpo.toml, reward 1 when the last number is the sum) and PPO
         (recipes/ppo.toml with reward_fn arithmetic: 1 when the first number is the sum, as PPO's responses do not stop
         at a newline; GRPO's do, so a response holds one line and its last number is the answer), the same prompts,
         sampled responses per step and optimizer: reward curve ends, held-out greedy accuracy (PPO's held-out
         reward is its 0/1 check), peak memory and wall time.

    python benchmarks/bench_grpo.py trl [--steps 3] [--prompts 2] [--new-tokens 8] [--threads 2]
    python benchmarks/bench_grpo.py learn [--learn-steps 12] [--tasks addition word_problems] [--val 200]
    python benchmarks/bench_grpo.py vs-ppo [--learn-steps 12] [--learn-new-tokens 16]

Rows go to results.csv; the last stdout line is JSON with every number.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_ppo import PeakMemory  # noqa: E402
from common import append_rows, print_json  # noqa: E402

G, LORA_R, LORA_ALPHA, LR, BETA, CLIP_LOW, CLIP_HIGH = 8, 16, 32, 1e-5, 0.04, 0.2, 0.28
TASK = "qtune:arithmetic?task=word_problems&count={count}&seed=0"


# ----------------------------------------------------------------------------- qtune vs TRL: one process each

def qtune_child(args) -> dict:
    """qtune's GRPO loop on the benchmark's settings; per-step times from its metrics.jsonl."""
    from qtune.recipe.load import load_recipe
    from qtune.train.grpo import run_grpo
    from qtune.weights.checkpoint import resolve

    batch = args.prompts * G
    out = Path(tempfile.mkdtemp()) / "run"
    meter = PeakMemory("cpu")
    recipe = load_recipe("grpo", [
        f"model.path={resolve(args.model)}", f"data.path={TASK.format(count=args.prompts * args.steps)}",
        "data.val_size=0", "data.shuffle=false", f"lora.r={LORA_R}", f"lora.alpha={LORA_ALPHA}",
        f"grpo.group_size={G}", f"grpo.rollout_batch_size={batch}", f"grpo.generation_batch_size={batch}",
        f"grpo.max_new_tokens={args.new_tokens}", "grpo.stop_strings=[]", "grpo.temperature=1.0", f"grpo.beta={BETA}",
        f"grpo.clip_low={CLIP_LOW}", f"grpo.clip_high={CLIP_HIGH}", "grpo.dynamic_sampling=false",
        f"train.micro_batch_size={batch}", "train.grad_accum_steps=1", f"train.max_steps={args.steps}",
        f"train.lr={LR}", "train.save_every=0", "eval.every=0", f"output.dir={out}"])
    run_grpo(recipe)
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
    return {"rollout_s": [r["rollout_seconds"] for r in records], "update_s": [r["update_seconds"] for r in records],
            "step_s": [r["seconds"] for r in records], "reward": [r["reward"] for r in records],
            "peak_bytes": meter.read()}


def trl_child(args) -> dict:
    """TRL's GRPOTrainer with peft + bitsandbytes on the same settings; the rollout is timed around its
    `_generate_and_score_completions`, the step by a callback."""
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from qtune.align.reward_functions import answer_match
    from qtune.data.tasks import arithmetic_tasks
    from qtune.weights.checkpoint import resolve

    path = str(resolve(args.model))
    rows = arithmetic_tasks("word_problems", args.prompts * args.steps, seed=0)
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    meter = PeakMemory("cpu")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token

    def correct(prompts, completions, answer, **_):
        return [answer_match(c, {"answer": a}, "last_number") for c, a in zip(completions, answer)]

    times = {"rollout_s": [], "step_s": []}

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            times["rollout_s"].append(time.perf_counter() - t0)
            return out

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times["step_s"].append(time.perf_counter() - self.t0)

    batch = args.prompts * G
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, beta=BETA,
        epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH, loss_type="dapo", scale_rewards="group", learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, max_steps=args.steps, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=True, shuffle_dataset=False, seed=0,
        max_grad_norm=1.0, weight_decay=0.0)
    peft = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = Timed(model=model, reward_funcs=correct, args=config, train_dataset=dataset, processing_class=tokenizer,
                    peft_config=peft, callbacks=[StepTimer()])
    trainer.train()
    rollout, step = times["rollout_s"], times["step_s"]
    return {"rollout_s": rollout, "update_s": [s - r for s, r in zip(step, rollout)], "step_s": step,
            "reward": [h["reward"] for h in trainer.state.log_history if "reward" in h], "peak_bytes": meter.read()}


def run_child(impl: str, args) -> dict:
    command = [sys.executable, __file__, "_child", impl, "--steps", str(args.steps), "--prompts", str(args.prompts),
               "--new-tokens", str(args.new_tokens), "--threads", str(args.threads), "--model", args.model]
    proc = subprocess.run(command, capture_output=True, text=True, cwd="/tmp")  # not the repo root: its kernels/
    if proc.returncode != 0:                                                  # would shadow the `kernels` package
        raise RuntimeError(f"{impl} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_trl(args) -> dict:
    results = {}
    for impl in ("qtune", "trl"):
        r = run_child(impl, args)
        timed = {k: statistics.median(r[k][1:]) for k in ("rollout_s", "update_s", "step_s")}  # step 1: warm-up
        results[impl] = {**timed, "peak_bytes": r["peak_bytes"], "all": r}
        print(f"{impl:>5}: step {timed['step_s']:.1f} s (rollout {timed['rollout_s']:.1f} s, update "
              f"{timed['update_s']:.1f} s), peak {r['peak_bytes'] / 2**20:.0f} MB", flush=True)
    q, t = results["qtune"], results["trl"]
    ratios = {f"{k}_speedup": t[k] / q[k] for k in ("step_s", "rollout_s", "update_s")}
    ratios["peak_ratio_trl_over_qtune"] = t["peak_bytes"] / q["peak_bytes"]
    print("qtune vs TRL: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    case = f"smollm2-135m,nf4,prompts={args.prompts},G={G},new_tokens={args.new_tokens},threads={args.threads}"
    rows = [{"case": case, "impl": impl, "metric": metric, "value": round(results[impl][metric], 4),
             "unit": "bytes" if metric == "peak_bytes" else "s"}
            for impl in results for metric in ("step_s", "rollout_s", "update_s", "peak_bytes")]
    rows += [{"case": case, "impl": "qtune/trl", "metric": k, "value": round(v, 4), "unit": "x"}
             for k, v in ratios.items()]
    append_rows("grpo_vs_trl", "cpu", rows)
    return {"trl": {impl: {k: v for k, v in r.items() if k != "all"} for impl, r in results.items()}, **ratios}


# ----------------------------------------------------------------------------- learning, and GRPO vs PPO

def cli(verb: str, recipe: str, overrides: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", "from qtune.cli import main; main()", verb, recipe, *overrides],
                          capture_output=True, text=True, cwd="/tmp")
    if proc.returncode != 0:
        raise RuntimeError(f"qtune {verb} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_sided_p(before: float, after: float, n: int) -> float:
    """P(Z ≥ z) of the two-proportion z-test of after > before, each a fraction of n held-out prompts."""
    pooled = (before + after) / 2
    se = math.sqrt(max(2 * pooled * (1 - pooled) / n, 1e-12))
    return 0.5 * math.erfc((after - before) / se / math.sqrt(2))


def grpo_overrides(task: str, steps: int, out: Path, val: int, new_tokens: int | None, extra: list[str]) -> list[str]:
    """recipes/grpo.toml on `task`, sized for a CPU: fp32 weights (CPU NF4 dequantization only costs time), no
    gradient checkpointing (the activations of 64 short responses fit easily), `val` held-out prompts; then `extra`."""
    from qtune.recipe.load import load_recipe

    g = load_recipe("grpo", extra).grpo
    per_step = g.rollout_batch_size // g.group_size
    return [f"data.path=qtune:arithmetic?task={task}&count={val + per_step * steps}&seed=0", f"data.val_size={val}",
            "model.quantize=none", "model.gradient_checkpointing=false", f"train.max_steps={steps}",
            "train.save_every=0", "eval.every=0", f"output.dir={out}",
            *([f"grpo.max_new_tokens={new_tokens}"] if new_tokens else []), *extra]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_learn(args, work: Path) -> dict:
    """The shipped recipe on each built-in task: held-out greedy accuracy before and after, the one-sided test of
    "no better", the KL (mean and largest over the steps), wall and CPU time and the machine's load meanwhile."""
    from qtune.recipe.load import load_recipe

    new_tokens = args.learn_new_tokens or load_recipe("grpo").grpo.max_new_tokens
    results, rows = {}, []
    for task in args.tasks:
        t0, cpu0, out = time.perf_counter(), cpu_seconds(), work / f"learn-{task}"
        s = cli("grpo", "grpo", grpo_overrides(task, args.learn_steps, out, args.val, args.learn_new_tokens,
                                                    args.overrides))
        seconds, cpu, load = time.perf_counter() - t0, cpu_seconds() - cpu0, os.getloadavg()[2]
        kls = [r["kl"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
        p = one_sided_p(s["before"], s["after"], args.val)
        # the paired (McNemar) test on the same 200 prompts, and the unpaired two-proportion one of earlier rounds
        results[task] = {"before": s["before"], "after": s["after"], "improved": s["val_improved"],
                         "worsened": s["val_worsened"], "p_paired": s["val_p_one_sided"],
                         "p_one_sided": p, "kl_mean": statistics.mean(kls),
                         "kl_max": max(kls), "seconds": seconds, "cpu_seconds": cpu, "load_15min": load,
                         "steps": args.learn_steps, "reward_first": s["reward_first"], "reward_last": s["reward_last"],
                         "dropped_groups": s["dropped_groups"]}
        print(f"{task}: held-out accuracy {s['before']:.3f} -> {s['after']:.3f} (n={args.val}; "
              f"{s['val_improved']} prompts right only after, {s['val_worsened']} only before: paired one-sided "
              f"p={s['val_p_one_sided']:.3g}; two-proportion p={p:.3g}), "
              f"KL mean {results[task]['kl_mean']:.4f} (max {max(kls):.4f}), {seconds:.0f} s wall, {cpu:.0f} s CPU, "
              f"load {load:.1f}", flush=True)
        case = ",".join(["smollm2-135m,fp32", task, f"steps={args.learn_steps}", f"new_tokens={new_tokens}",
                         f"val={args.val}", *args.overrides])
        rows += [{"case": case, "impl": "qtune-grpo", "metric": k, "value": float(f"{results[task][k]:.5g}"),
                  "unit": u}
                 for k, u in (("before", "fraction"), ("after", "fraction"), ("p_paired", "p"), ("p_one_sided", "p"),
                              ("kl_mean", "nats/token"), ("kl_max", "nats/token"), ("seconds", "s"),
                              ("cpu_seconds", "s"), ("load_15min", "load"))]
    append_rows("grpo_learn", "cpu", rows)
    return {"learn": results}


def run_vs_ppo(args, work: Path) -> dict:
    """GRPO and PPO on the addition task: 64 sampled responses per step in both (8 prompts x 8 for GRPO, 64 prompts
    x 1 for PPO), the same new tokens, AdamW at the same lr, the same held-out prompts."""
    from qtune.data.tasks import arithmetic_tasks

    steps, val, new_tokens = args.learn_steps, args.val, args.learn_new_tokens or 16
    records = arithmetic_tasks("addition", val + 64 * steps, seed=0, max_operand=30)
    prompts = work / "addition.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = [f"data.path={prompts}", "data.format=prompt", "data.chat=false", f"data.val_size={val}",
              f"train.max_steps={steps}", "train.save_every=0", "eval.every=0", "train.optimizer=adamw",
              "train.lr=2e-5", "train.schedule=constant"]
    out = {}
    for algo, overrides in (
            ("grpo", ["grpo.rollout_batch_size=64", f"grpo.max_new_tokens={new_tokens}",
                      "train.micro_batch_size=16", "train.grad_accum_steps=4"]),
            ("ppo", ["ppo.reward_model=", "ppo.reward_fn=qtune.align.reward_functions:arithmetic",
                     "ppo.rollout_batch_size=64", f"ppo.max_new_tokens={new_tokens}", "ppo.ppo_epochs=1",
                     "train.micro_batch_size=16", "train.grad_accum_steps=4", "data.pretrain_path="])):
        t0 = time.perf_counter()
        s = cli(algo, algo, common + overrides + [f"output.dir={work / algo}"])
        rewards = [r["reward"] for r in map(json.loads, (work / algo / "metrics.jsonl").read_text().splitlines())
                   if "reward" in r]
        before, after = (s["before"], s["after"]) if algo == "grpo" else (s["val_reward_before"], s["val_reward_after"])
        out[algo] = {"reward_first": rewards[0], "reward_last": rewards[-1], "accuracy_before": before,
                     "accuracy_after": after, "peak_bytes": s["peak_memory_bytes"], "seconds": time.perf_counter() - t0}
        print(f"{algo}: reward {rewards[0]:.3f} -> {rewards[-1]:.3f}, held-out accuracy {before:.3f} -> {after:.3f}, "
              f"peak {s['peak_memory_bytes'] / 2**20:.0f} MB, {out[algo]['seconds']:.0f} s", flush=True)
    case = f"smollm2-135m,nf4,addition,steps={steps},responses=64,new_tokens={new_tokens},val={val}"
    append_rows("grpo_vs_ppo", "cpu", [{"case": case, "impl": algo, "metric": k, "value": round(v, 5),
                                        "unit": "bytes" if k == "peak_bytes" else "s" if k == "seconds" else "fraction"}
                                       for algo, r in out.items() for k, v in r.items()])
    return {"vs_ppo": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["trl", "learn", "vs-ppo", "_child"])
    parser.add_argument("impl", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="steps per implementation (the first is a warm-up)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step (G = 8 responses each)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--learn-steps", type=int, default=12)
    parser.add_argument("--tasks", nargs="+", default=["addition", "word_problems"],
                        choices=["addition", "word_problems"], help="built-in tasks that learn trains on, one run each")
    parser.add_argument("--override", dest="overrides", action="append", default=[],
                        help="learn: a further recipe override key.sub=value (repeatable)")
    parser.add_argument("--val", type=int, default=200, help="held-out prompts")
    parser.add_argument("--learn-new-tokens", type=int, default=0,
                        help="longest response in learn and vs-ppo (0: the recipe's grpo.max_new_tokens)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.mode == "_child":
        print(json.dumps((qtune_child if args.impl == "qtune" else trl_child)(args)))
        return
    with tempfile.TemporaryDirectory() as work:
        run = {"trl": lambda: run_trl(args), "learn": lambda: run_learn(args, Path(work)),
               "vs-ppo": lambda: run_vs_ppo(args, Path(work))}[args.mode]
        print_json({"mode": args.mode, **run()})


if __name__ == "__main__":
    main()
