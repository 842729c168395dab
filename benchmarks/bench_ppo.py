"""PPO with every role on one 4-bit base: (1) its memory against the base alone, (2) learning with a verifiable reward.

memory   SmolLM2-135M in NF4, each case in a fresh process (peak RssAnon above the post-import baseline on a
         CPU, torch.cuda.max_memory_allocated on a GPU):
           base        the bare base: sample responses to a rollout batch, then one forward pass over it
           four-roles  the same base with the reward adapter + head, the policy adapter, the value adapter +
                       head, and the reference (adapters off): sample with the policy, one forward per role
           ppo-step    four-roles plus one whole PPO iteration (rollout, scoring, 2 epochs of updates, AdamW)
         and the bytes each role adds to the base's tensors. Loading the four roles as separate models would
         take four bases. On a CPU, `generate` decodes from dense copies of the NF4 weights made for the call,
         in every case alike.
learn    recipes/ppo.toml through the real loop with a verifiable reward: the built-in addition task
         ("Question: What is 7 + 5?\\nAnswer:", reward 1 when the first number of the reply is the sum), raw-text
         prompts, short replies. Reports the rollout reward of the first and last thirds of the run with a
         two-proportion z-test, the greedy held-out reward before and after, and the KL to the reference.
         Defaults are sized for a shared CPU (fp32 weights: CPU NF4 decoding only costs time there).
best-of-n  recipes/best_of_n.toml as shipped (larger-number questions, the first-number check, best of 8, then
         SFT), and the untrained and the fine-tuned model's greedy and sampled answers to new questions.

    python benchmarks/bench_ppo.py memory [--quantize nf4] [--batch 16]
    python benchmarks/bench_ppo.py learn [--iterations 8] [--rollout 32] [--threads 1]
    python benchmarks/bench_ppo.py best-of-n [--bon-prompts 128]
    python benchmarks/bench_ppo.py all              # memory and learn

Rows go to results.csv; the last stdout line is JSON with every number.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import append_rows, print_json  # noqa: E402

MB = 2**20


# ----------------------------------------------------------------------------- memory

class PeakMemory:
    """Peak memory above the level at construction: CUDA allocator peak, or sampled RssAnon on a CPU."""

    def __init__(self, device: str):
        import torch

        self.device, self.peak, self.stop = device, 0, threading.Event()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.rss_anon()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    @staticmethod
    def rss_anon() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon in /proc/self/status")

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.rss_anon())
            time.sleep(0.002)

    def read(self) -> int:
        import torch

        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        self.peak = max(self.peak, self.rss_anon())
        return self.peak - self.base


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_child(case: str, settings: dict) -> dict:
    """One memory case, run in its own process; returns its peak and tensor sizes."""
    import torch

    from qtune.lora import adapters_disabled, adapter_parameters, use_adapter
    from qtune.recipe.load import load_recipe
    from qtune.train import common
    from qtune.train.ppo import (
        VALUE_HEAD,
        attach_roles,
        make_experience,
        ppo_epochs,
        response_logprobs,
        response_values,
    )
    from qtune.data.prompts import load_prompts
    from qtune.train.rollout import sample
    from qtune.train.run import load_base_model

    device = common.training_device()
    recipe = load_recipe("ppo", settings["overrides"])
    meter = PeakMemory(device)
    model, tokenizer = load_base_model(recipe.model, device)
    base_bytes = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    prompts = load_prompts(recipe.data, tokenizer, 0)[0][:recipe.ppo.rollout_batch_size]
    result = {"case": case, "base_bytes": base_bytes}
    if case == "base":
        gens = sample(model, prompts, tokenizer, recipe.ppo.max_new_tokens, seed=0)
        with torch.no_grad():
            response_logprobs(model, _batch(prompts, gens), 1.0)
        return {**result, "peak_bytes": meter.read()}
    scorer, params = attach_roles(model, recipe, tokenizer.pad_id, device)
    result["roles_bytes"] = {name: tensor_bytes(adapter_parameters(model, name)) for name in ("reward", "policy", "value")}
    result["roles_bytes"]["heads"] = tensor_bytes(model.get_submodule(VALUE_HEAD).parameters()) + \
        tensor_bytes(scorer.reward_model.head.parameters())
    with use_adapter(model, "policy"):
        gens = sample(model, prompts, tokenizer, recipe.ppo.max_new_tokens, seed=0)
    batch = _batch(prompts, gens)
    if case == "four-roles":
        with torch.no_grad():
            with use_adapter(model, "policy"):
                response_logprobs(model, batch, 1.0)
            with use_adapter(model, "value"):
                response_values(model, batch)
            with adapters_disabled(model):
                response_logprobs(model, batch, 1.0)
            scorer.score(prompts, gens)
        return {**result, "peak_bytes": meter.read()}
    optimizer = common.build_optimizer(params, "adamw", 1e-5)
    scheduler = common.build_scheduler(optimizer, "constant", 0, 10)
    rollout, _ = make_experience(model, scorer, prompts, gens, recipe, 0.05, device)
    model.train()
    ppo_epochs(model, rollout, recipe, None, params, optimizer, scheduler, 1, device)
    optimizer_bytes = tensor_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {**result, "optimizer_bytes": optimizer_bytes, "peak_bytes": meter.read()}


def _batch(prompts, generations) -> dict:
    from qtune.train import common
    from qtune.train.rollout import collate_responses

    batch = collate_responses([p.ids for p in prompts], [g.token_ids for g in generations], pad_id=0)
    return common.to_device(batch, common.training_device())


def make_reward_model(model_path: str, quantize: str, out: Path) -> Path:
    """A reward model directory as `qtune reward` writes it (random adapter and head: only its size matters here)."""
    from qtune.weights.checkpoint import load_model
    from qtune.lora import LoraConfig, add_lora
    from qtune.peft import save_adapter
    from qtune.align.reward_model import ScalarHead

    model = load_model(model_path, quantize=quantize)
    add_lora(model, LoraConfig(r=16, alpha=32, target_modules="all-linear"), name="rm")
    return save_adapter(model, out, name="rm", extra_tensors=ScalarHead(model.config.hidden_size).tensors())


def run_memory(args, work: Path) -> dict:
    from qtune.align.reward_functions import write_problems
    from qtune.train.common import training_device

    prompts = write_problems(work / "addition.jsonl", "addition", args.batch)
    reward_dir = make_reward_model(args.model, args.quantize, work / "reward")
    overrides = [f"model.path={args.model}", f"model.quantize={args.quantize}", f"data.path={prompts}",
                 "data.format=prompt", "data.chat=false", "data.val_size=0", "data.cache_dir=",
                 f"ppo.reward_model={reward_dir}", f"ppo.rollout_batch_size={args.batch}",
                 f"ppo.max_new_tokens={args.new_tokens}", "ppo.ppo_epochs=2", f"train.micro_batch_size={args.batch}",
                 "train.grad_accum_steps=1", "model.gradient_checkpointing=true"]
    cases = {}
    for case in ("base", "four-roles", "ppo-step"):
        command = [sys.executable, __file__, "_child", case, json.dumps({"overrides": overrides})]
        if args.threads:
            command += ["--threads", str(args.threads)]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"memory case {case} failed:\n{proc.stderr[-3000:]}")
        cases[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{case:>11}: peak {cases[case]['peak_bytes'] / MB:7.1f} MB above the post-import baseline", flush=True)
    base, roles, step = cases["base"], cases["four-roles"], cases["ppo-step"]
    extra = sum(roles["roles_bytes"].values())
    result = {"quantize": args.quantize, "batch": args.batch, "new_tokens": args.new_tokens,
              "base_tensor_bytes": base["base_bytes"], "roles_tensor_bytes": roles["roles_bytes"],
              "roles_over_base_tensors": extra / base["base_bytes"],
              "four_separate_bases_bytes": 4 * base["base_bytes"],
              "peak_base_bytes": base["peak_bytes"], "peak_four_roles_bytes": roles["peak_bytes"],
              "peak_ppo_step_bytes": step["peak_bytes"], "optimizer_bytes": step["optimizer_bytes"],
              "peak_ratio_four_roles_vs_base": roles["peak_bytes"] / base["peak_bytes"],
              "peak_ratio_ppo_step_vs_base": step["peak_bytes"] / base["peak_bytes"]}
    print(f"base tensors {base['base_bytes'] / MB:.1f} MB; the three adapters and two heads add {extra / MB:.1f} MB "
          f"({100 * result['roles_over_base_tensors']:.1f}%); four separate bases would hold "
          f"{4 * base['base_bytes'] / MB:.1f} MB")
    case = f"{Path(args.model).name},{args.quantize},batch={args.batch},new_tokens={args.new_tokens}"
    append_rows("ppo_memory", training_device(), [
        {"case": case, "impl": impl, "metric": "peak_bytes", "value": cases[impl]["peak_bytes"], "unit": "bytes"}
        for impl in cases] + [{"case": case, "impl": "four-roles", "metric": "roles_tensor_bytes", "value": extra,
                               "unit": "bytes"}])
    return result


# ----------------------------------------------------------------------------- learning

def two_proportion_p(successes_a: int, n_a: int, successes_b: int, n_b: int) -> float:
    """One-sided p-value of "b's success rate is not above a's" (two-proportion z-test, pooled variance)."""
    p = (successes_a + successes_b) / (n_a + n_b)
    se = math.sqrt(p * (1 - p) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 1.0
    z = (successes_b / n_b - successes_a / n_a) / se
    return 0.5 * math.erfc(z / math.sqrt(2))


def run_learning(args, work: Path) -> dict:
    from qtune.recipe.load import load_recipe
    from qtune.align.reward_functions import write_problems
    from qtune.train.common import training_device
    from qtune.train.ppo import run_ppo

    prompts = write_problems(work / "addition.jsonl", "addition", args.prompts, seed=args.seed, max_operand=10)
    out = work / "run"
    overrides = [f"model.path={args.model}", f"model.quantize={args.learn_quantize}", f"data.path={prompts}",
                 "data.format=prompt", "data.chat=false", f"data.val_size={args.val_size}", "data.cache_dir=",
                 "ppo.reward_model=", "ppo.reward_fn=qtune.align.reward_functions:arithmetic", f"ppo.rollout_batch_size={args.rollout}",
                 f"ppo.max_new_tokens={args.new_tokens}", f"ppo.temperature={args.temperature}",
                 f"ppo.ppo_epochs={args.ppo_epochs}", f"train.micro_batch_size={args.minibatch}",
                 "train.grad_accum_steps=1", f"train.max_steps={args.iterations}", f"train.lr={args.lr}",
                 "train.optimizer=adamw", "train.log_every=1", "train.save_every=0", f"train.seed={args.seed}",
                 f"eval.every={args.eval_every}", f"lora.r={args.rank}", f"lora.alpha={2 * args.rank}",
                 "model.gradient_checkpointing=false", f"output.dir={out}"]
    summary = run_ppo(load_recipe("ppo", overrides))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    third = max(1, len(steps) // 3)
    first, last = steps[:third], steps[-third:]
    n = third * args.rollout
    wins_first = round(sum(r["reward"] for r in first) * args.rollout)
    wins_last = round(sum(r["reward"] for r in last) * args.rollout)
    held_out = [(r["step"], r["val_reward"]) for r in records if r.get("val_reward") is not None]
    result = {"task": "addition (operands 1..10), raw-text prompts", "iterations": len(steps),
              "rollout": args.rollout, "temperature": args.temperature, "quantize": args.learn_quantize,
              "seconds": summary["seconds"], "seconds_per_iteration": summary["seconds"] / len(steps),
              "reward_per_iteration": [round(r["reward"], 4) for r in steps],
              "kl_per_iteration": [round(r["kl"], 4) for r in steps],
              "reward_first_third": wins_first / n, "reward_last_third": wins_last / n,
              "p_no_rise": two_proportion_p(wins_first, n, wins_last, n),
              "held_out_greedy_reward": held_out, "val_size": args.val_size,
              "kl_max": max(r["kl"] for r in steps), "kl_last": steps[-1]["kl"], "beta_last": summary["beta_last"],
              "entropy_first": steps[0]["entropy"], "entropy_last": steps[-1]["entropy"]}
    print(f"rollout reward: first third {result['reward_first_third']:.3f}, last third {result['reward_last_third']:.3f} "
          f"(n = {n} responses each, one-sided p = {result['p_no_rise']:.2g}); held-out greedy {held_out}; "
          f"KL max {result['kl_max']:.3f} nats, last {result['kl_last']:.3f}; {result['seconds']:.0f} s")
    case = (f"{Path(args.model).name},addition,T={args.temperature},rollout={args.rollout},iterations={len(steps)},"
            f"{args.learn_quantize}")
    append_rows("ppo_learning", training_device(), [
        {"case": case, "impl": "qtune", "metric": metric, "value": result[metric], "unit": unit}
        for metric, unit in (("reward_first_third", "fraction"), ("reward_last_third", "fraction"),
                             ("p_no_rise", "p"), ("kl_max", "nats"), ("seconds", "s"))])
    return result


# ----------------------------------------------------------------------------- best-of-N

def answer_rates(model, tokenizer, prompts, seed: int) -> dict:
    """Share of `prompts` answered right (qtune.align.reward_functions:arithmetic), greedy and sampled at temperature 1."""
    from qtune.align.reward_functions import arithmetic
    from qtune.train.rollout import sample

    def rate(generations):
        return sum(arithmetic(p.text, g.text, p.record) for p, g in zip(prompts, generations)) / len(prompts)

    return {"greedy": rate(sample(model, prompts, tokenizer, 16, greedy=True, batch_size=64)),
            "sampled": rate(sample(model, prompts, tokenizer, 16, 1.0, seed=seed, batch_size=64))}


def run_best_of_n_bench(args, work: Path) -> dict:
    from qtune.recipe.align import PromptDataSection
    from qtune.weights.checkpoint import load_model
    from qtune.lora import adapters_disabled, use_adapter
    from qtune.peft import load_adapter
    from qtune.recipe.load import load_recipe
    from qtune.tokenizer import load_tokenizer
    from qtune.train.best_of_n import run_best_of_n
    from qtune.train.common import training_device
    from qtune.data.prompts import load_prompts

    recipe = load_recipe("best_of_n", [f"model.path={args.model}", f"best_of_n.num_prompts={args.bon_prompts}",
                                       f"output.dir={work / 'best-of-n'}", "data.cache_dir="])
    summary = run_best_of_n(recipe)
    model = load_model(args.model, quantize=recipe.model.quantize)
    tokenizer = load_tokenizer(args.model)
    load_adapter(model, summary["adapter"], name="best_of_n")
    # New questions: the recipe's generator with another seed, less any the run sampled for.
    seen = {json.loads(line)["prompt"] for line in Path(summary["samples"]).read_text().splitlines()}
    new = PromptDataSection(path="qtune:checkable-tasks?count=80&seed=7&families=larger_number", format="chat",
                            cache_dir="")
    prompts = [p for p in load_prompts(new, tokenizer, 0)[0] if p.text not in seen][:64]
    with adapters_disabled(model):
        before = answer_rates(model, tokenizer, prompts, args.seed)
    with use_adapter(model, "best_of_n"):
        after = answer_rates(model, tokenizer, prompts, args.seed)
    result = {"prompts": summary["prompts"], "n": summary["n"], "kept": summary["kept"],
              "best_of_1_score": summary["best_of_1_score"], "best_of_n_score": summary["best_of_n_score"],
              "new_questions": len(prompts), "untrained": before, "fine_tuned": after,
              "sft_seconds": summary["seconds"]}
    print(f"best-of-1 {result['best_of_1_score']:.3f}, best-of-{result['n']} {result['best_of_n_score']:.3f}, "
          f"{result['kept']}/{result['prompts']} kept; new questions right, greedy {before['greedy']:.3f} -> "
          f"{after['greedy']:.3f}, sampled {before['sampled']:.3f} -> {after['sampled']:.3f}")
    case = f"{Path(args.model).name},larger_number,prompts={result['prompts']},n={result['n']}"
    append_rows("best_of_n", training_device(), [
        {"case": case, "impl": impl, "metric": metric, "value": value, "unit": "fraction"}
        for impl, metric, value in (("selection", "best_of_1", result["best_of_1_score"]),
                                    ("selection", "best_of_n", result["best_of_n_score"]),
                                    ("untrained", "greedy_right", before["greedy"]),
                                    ("fine_tuned", "greedy_right", after["greedy"]),
                                    ("untrained", "sampled_right", before["sampled"]),
                                    ("fine_tuned", "sampled_right", after["sampled"]))])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "learn", "best-of-n", "all", "_child"], nargs="?", default="all")
    parser.add_argument("child_args", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--quantize", default="nf4", choices=["nf4", "none"], help="memory: the base's weights")
    parser.add_argument("--batch", type=int, default=16, help="memory: responses in the rollout batch")
    parser.add_argument("--new-tokens", type=int, default=5, help="longest response")
    parser.add_argument("--learn-quantize", default="none", choices=["nf4", "none"], help="learn: the base's weights")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--rollout", type=int, default=32)
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--val-size", type=int, default=48)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bon-prompts", type=int, default=128, help="best-of-n: prompts sampled for")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.what == "_child":
        print(json.dumps(memory_child(args.child_args[0], json.loads(args.child_args[1]))))
        return
    result = {"benchmark": "ppo", "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as work:
        if args.what in ("memory", "all"):
            result["memory"] = run_memory(args, Path(work))
        if args.what in ("learn", "all"):
            result["learning"] = run_learning(args, Path(work))
        if args.what == "best-of-n":
            result["best_of_n"] = run_best_of_n_bench(args, Path(work))
    print_json(result)


if __name__ == "__main__":
    main()
