"""Evol-Instruct with a local model (WizardLM; docs: data-pipelines §3).

Start from N instructions (D0). In each of `evolve.rounds` epochs every instruction of the current set is
rewritten once by an operation drawn uniformly, the rewrite is answered, and the elimination rules judge
the pair: a success replaces the instruction in the next epoch's set and becomes a training example, a
failure leaves the instruction unchanged for the next epoch. Work is committed in chunks of
`generate.prompts_per_round` instructions, so an interrupted run resumes at the chunk it was in.
"""

import math
import random
from dataclasses import asdict
from pathlib import Path

from qtune.datagen.config import EvolInstructRecipe
from qtune.datagen.evol import (JUDGED_EQUAL, Elimination, clean_evolved, equal_prompt, evolution_prompt,
                                judged_equal, pick_operation)
from qtune.datagen.rouge import rouge_l
from qtune.datagen.runner import (INSTRUCTIONS_FILE, REJECTED_FILE, Counters, Generator, ProgressBar, export,
                                  load_generator, round_seed, score_tasks)
from qtune.datagen.seeds import Instance, Task, load_tasks, task_name
from qtune.datagen.store import Journal

PROMPT_STYLE = "qtune-v1"
# qtune's additions to WizardLM's rules: a rewrite or an answer cut off by the token budget is unusable.
EVOLUTION_TRUNCATED = "evolution_truncated"
ANSWER_TRUNCATED = "answer_truncated"


def starting_set(tasks: list[Task], num: int, seed: int) -> list[Task]:
    """D0: `num` tasks drawn with the run's seed (all of them, in file order, when num is 0 or too big)."""
    if num <= 0 or num >= len(tasks):
        return list(tasks)
    return random.Random(seed).sample(tasks, num)


def task_text(task: Task) -> str:
    """The text that is evolved: the instruction, and its first input on the next line if there is one."""
    inp = task.instances[0].input.strip()
    return task.instruction.strip() + (f"\n{inp}" if inp else "")


def frontier(start: list[str], kept: list[dict], epoch: int) -> list[str]:
    """The instruction set at the start of `epoch` (1-based): each successful evolution of an earlier epoch
    replaces its instruction."""
    current = list(start)
    by_epoch: dict[int, dict[int, str]] = {}
    for r in kept:
        p = r["provenance"]
        by_epoch.setdefault(p["epoch"], {})[p["index"]] = r["instruction"]
    for e in range(1, epoch):
        for i, text in by_epoch.get(e, {}).items():
            current[i] = text
    return current


def fingerprint(recipe: EvolInstructRecipe) -> dict:
    e = {k: v for k, v in asdict(recipe.evolve).items() if k != "rounds"}
    g = recipe.generate
    return {"kind": recipe.kind, "model": recipe.model.path, "seed_tasks": recipe.data.seed_tasks, "seed": g.seed,
            "num_instructions": g.num_instructions, "chat": g.chat, "evolve": e, "difficulty": recipe.difficulty.enabled}


def _evolve(recipe: EvolInstructRecipe, gen: Generator, parents: list[str], rng: random.Random, seed: int):
    """Operations, prompts and cleaned rewrites for a chunk of parents."""
    ev = recipe.evolve
    ops = [pick_operation(rng, ev.operations) for _ in parents]
    prompts = [evolution_prompt(op, p, rng, ev.input_formats) for op, p in zip(ops, parents)]
    outs = gen(prompts, chat=recipe.generate.chat, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
               top_p=ev.top_p, stop_strings=("Original task:",), seed=seed)
    return ops, [clean_evolved(o.text) for o in outs], [o.finish_reason for o in outs]


def _judge(recipe: EvolInstructRecipe, gen: Generator, pairs: list[tuple[str, str]]) -> list[bool]:
    """WizardLM's equality judge (only when evolve.judge_equal is on)."""
    if not recipe.evolve.judge_equal or not pairs:
        return [False] * len(pairs)
    outs = gen([equal_prompt(a, b) for a, b in pairs], chat=recipe.generate.chat, max_new_tokens=3, greedy=True,
               stop_strings=("\n",))
    return [judged_equal(o.text) for o in outs]


def run_chunk(recipe: EvolInstructRecipe, gen: Generator, parents: list[tuple[int, str, str]], epoch: int,
              round_: int) -> tuple[list[dict], list[dict], Counters]:
    """Evolve, eliminate and answer one chunk of (index, origin id, text) parents."""
    counters, rules = Counters(), Elimination(min_change=recipe.evolve.min_change)
    seed = round_seed(recipe.generate.seed, round_)
    tokens_before, seconds_before = gen.tokens, gen.seconds
    ops, evolved, finish = _evolve(recipe, gen, [p[2] for p in parents], random.Random(seed), seed)
    reasons = [EVOLUTION_TRUNCATED if f == "length" else rules.evolution_reason(p[2], e)
               for p, e, f in zip(parents, evolved, finish)]
    alive = [k for k, r in enumerate(reasons) if r is None]
    for k, equal in zip(alive, _judge(recipe, gen, [(parents[k][2], evolved[k]) for k in alive])):
        reasons[k] = JUDGED_EQUAL if equal else None
    alive = [k for k, r in enumerate(reasons) if r is None]
    ev = recipe.evolve
    answers = dict(zip(alive, gen([evolved[k] for k in alive], chat=recipe.generate.chat,
                                  max_new_tokens=ev.response_max_new_tokens, temperature=ev.temperature,
                                  top_p=ev.top_p, seed=seed + 1)))
    for k, out in answers.items():
        reasons[k] = rules.answer_reason(out.text) or (ANSWER_TRUNCATED if out.finish_reason == "length" else None)
    tasks, rejected = [], []
    for k, ((index, origin, parent), op, reason) in enumerate(zip(parents, ops, reasons)):
        counters.values["candidates"] += 1
        if reason:
            counters.rejected[reason] += 1
            rejected.append({"epoch": epoch, "index": index, "round": round_, "operation": op, "reason": reason,
                             "parent": parent, "evolved": evolved[k],
                             "answer": answers[k].text if k in answers else None})
            continue
        provenance = {"pipeline": "evol-instruct", "prompt_style": PROMPT_STYLE, "model": recipe.model.path,
                      "seed": recipe.generate.seed, "round": round_, "epoch": epoch, "index": index, "origin": origin,
                      "operation": op, "parent": parent, "similarity_to_parent": rouge_l(parent, evolved[k]),
                      "finish_reason": finish[k], "answer_finish_reason": answers[k].finish_reason}
        tasks.append(Task(f"evol_{epoch}_{index}", task_name(evolved[k]), evolved[k],
                          [Instance("", answers[k].text.strip())], False, provenance))
    score_tasks(gen, tasks, recipe.difficulty)
    counters.values["rounds"] += 1
    counters.values["completions"] += len(parents) + len(answers)
    counters.values["truncated"] += sum(f == "length" for f in finish) + sum(o.finish_reason == "length" for o in answers.values())
    counters.values["tokens"] += gen.tokens - tokens_before
    counters.values["gen_millis"] += round((gen.seconds - seconds_before) * 1000)
    return [t.to_json() for t in tasks], rejected, counters


def run_evol_instruct(recipe: EvolInstructRecipe, gen: Generator | None = None, progress: bool = True) -> dict:
    """Run (or resume) Evol-Instruct for `evolve.rounds` epochs; writes the same files as Self-Instruct."""
    out = Path(recipe.output.dir)
    g = recipe.generate
    d0 = starting_set(load_tasks(recipe.data.seed_tasks), g.num_instructions, g.seed)
    start = [task_text(t) for t in d0]
    journal = Journal(out, (INSTRUCTIONS_FILE, REJECTED_FILE), fingerprint(recipe))
    kept = journal.open()[INSTRUCTIONS_FILE]
    counters = Counters.from_json(journal.counters)
    chunks = math.ceil(len(d0) / g.prompts_per_round)
    total_rounds = recipe.evolve.rounds * chunks
    gen = gen or load_generator(recipe.model, g.batch_size)
    settings = {"method": "evol-instruct", "model": recipe.model.path, "seed_tasks": recipe.data.seed_tasks,
                "seed": g.seed, "prompt_style": PROMPT_STYLE, "starting_instructions": len(d0)}
    try:
        with ProgressBar("evol-instruct", len(d0) * recipe.evolve.rounds, progress) as bar:
            bar.update(len(kept), sum(counters.rejected.values()), gen.tokens_per_second(), journal.round)
            while journal.round < total_rounds:
                round_ = journal.round + 1
                epoch, chunk = (round_ - 1) // chunks + 1, (round_ - 1) % chunks
                current = frontier(start, kept, epoch)
                span = range(chunk * g.prompts_per_round, min((chunk + 1) * g.prompts_per_round, len(d0)))
                new, rejected, part = run_chunk(recipe, gen, [(i, d0[i].id, current[i]) for i in span], epoch, round_)
                journal.append(INSTRUCTIONS_FILE, new)
                journal.append(REJECTED_FILE, rejected)
                counters.values.update(part.values)
                counters.rejected.update(part.rejected)
                journal.commit(round_, counters.to_json())
                kept += new
                bar.update(len(kept), sum(counters.rejected.values()), gen.tokens_per_second(), round_)
    finally:
        report = export(out, kept, d0, Counters.from_json(journal.counters), recipe.difficulty,
                        recipe.output.include_seeds, settings)
    return report
