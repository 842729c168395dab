"""Self-Instruct and Alpaca-style instruction generation with a local model (docs: data-pipelines §1, §2).

Each round (the unit committed to disk):
  1. prompts: Self-Instruct shows 8 numbered instructions (6 seed + 2 generated) and lets the model continue
     the list; Alpaca shows 3 complete seed tasks and lets it continue with instruction / input / output;
  2. candidates parsed from the completions go through the text filters and the ROUGE-L test against the
     pool (seeds and every instruction accepted before, including earlier ones of the same round);
  3. a few-shot prompt asks whether each accepted instruction is a classification task;
  4. Self-Instruct generates instances, output-first for classification and input-first otherwise
     (Alpaca's instance came with the task); instances are filtered; tasks left without one are rejected;
  5. with difficulty scoring on, each instance gets its IFD scores.
"""

import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qtune.datagen import filters as F
from qtune.datagen.config import SelfInstructRecipe
from qtune.datagen.parse import parse_alpaca_list, parse_instances, parse_instruction_list, parse_yes_no
from qtune.datagen.prompts import (alpaca_prompt, classification_prompt, instance_prompt, instruction_prompt,
                                   sample_demonstrations)
from qtune.datagen.rouge import InstructionPool
from qtune.datagen.runner import (INSTRUCTIONS_FILE, REJECTED_FILE, Counters, Generator, ProgressBar, export,
                                  load_generator, round_seed, score_tasks)
from qtune.datagen.seeds import Instance, Task, load_tasks, task_name
from qtune.datagen.store import Journal

PROMPT_STYLE = "qtune-v1"


@dataclass
class Candidate:
    """A parsed instruction on its way through the filters, with what is known about its origin."""

    text: str
    prompt: int  # index of the prompt (within the round) whose completion it came from
    demonstrations: list[str]  # ids of the tasks shown in that prompt
    finish_reason: str
    instances: list[tuple[str, str]] = field(default_factory=list)
    similarity: dict = field(default_factory=dict)
    is_classification: bool = False
    classification_answer: str = ""
    instance_info: dict = field(default_factory=dict)
    seq: int = -1  # position in the run's sequence of candidates, assigned when it is filtered


@dataclass
class RunState:
    """What a round needs from the committed past: seeds, kept tasks, the ROUGE pool, the candidate count."""

    seeds: list[Task]
    kept: list[dict]
    machine: list[Task]
    pool: InstructionPool
    seq: int


def restore_state(seeds: list[Task], kept: list[dict], rejected: list[dict]) -> RunState:
    """Rebuild the state from the committed files. The pool holds the seeds, then every instruction that
    passed the instruction filters (kept, or rejected later for its instances) in the order it was accepted."""
    pool = InstructionPool()
    for t in seeds:
        pool.add(t.instruction)
    accepted = list(kept) + [r for r in rejected if r["stage"] == "instances"]
    for r in sorted(accepted, key=lambda r: r["provenance"]["seq"] if "provenance" in r else r["seq"]):
        pool.add(r["instruction"])
    machine = [Task(r["id"], r["name"], r["instruction"], [Instance(**i) for i in r["instances"]],
                    r["is_classification"]) for r in kept]
    seq = 1 + max([r["provenance"]["seq"] for r in kept] + [r["seq"] for r in rejected], default=-1)
    return RunState(seeds, list(kept), machine, pool, seq)


def fingerprint(recipe: SelfInstructRecipe) -> dict:
    """Settings that decide what a run generates; resuming with other values would mix two runs."""
    g = {k: v for k, v in asdict(recipe.generate).items() if k not in ("num_instructions", "max_rounds", "batch_size")}
    return {"kind": recipe.kind, "model": recipe.model.path, "seed_tasks": recipe.data.seed_tasks, "generate": g,
            "filter": asdict(recipe.filter), "difficulty": recipe.difficulty.enabled}


def _candidates(recipe: SelfInstructRecipe, state: RunState, gen: Generator, rng: random.Random, seed: int,
                counters: Counters) -> list[Candidate]:
    """Step 1: build the round's prompts, generate, parse."""
    g, chat = recipe.generate, recipe.generate.chat
    if g.method == "alpaca":
        demos = [rng.sample(state.seeds, min(g.alpaca_demonstrations, len(state.seeds))) for _ in range(g.prompts_per_round)]
        prompts = [alpaca_prompt(d, g.alpaca_tasks_per_prompt, chat) for d in demos]
        stop, sources = (f"\n{g.alpaca_tasks_per_prompt}.",), [[t.id for t in d] for d in demos]
    else:
        demos = [sample_demonstrations(rng, state.seeds, state.machine, g.num_demonstrations, g.machine_demonstrations)
                 for _ in range(g.prompts_per_round)]
        prompts = [instruction_prompt(d, chat=chat) for d in demos]
        stop, sources = ("\n\n", f"\n{2 * g.num_demonstrations + 1}."), [[x.source for x in d] for d in demos]
    outs = gen(prompts, chat=chat, max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
               stop_strings=stop, seed=seed)
    found = []
    for k, out in enumerate(outs):
        counters.values["completions"] += 1
        counters.values["truncated"] += out.finish_reason == "length"
        if g.method == "alpaca":
            parsed = parse_alpaca_list(out.text, out.finish_reason)
            found += [Candidate(it["instruction"], k, sources[k], out.finish_reason, [(it["input"], it["output"])])
                      for it in parsed.items]
        else:
            parsed = parse_instruction_list(out.text, out.finish_reason, recipe.filter.capitalize)
            found += [Candidate(text, k, sources[k], out.finish_reason) for text in parsed.items]
        counters.rejected["truncated_item"] += parsed.truncated
        counters.rejected["malformed_item"] += parsed.malformed
    counters.values["candidates"] += len(found)
    return found


def _accept(cands: list[Candidate], state: RunState, flt: F.InstructionFilter, round_: int,
            counters: Counters) -> tuple[list[Candidate], list[dict]]:
    """Step 2: text filters, then ROUGE-L against the pool; accepted instructions join the pool at once."""
    accepted, rejected = [], []
    for c in cands:
        reason = flt.reject_reason(c.text)
        if reason is None:
            sim = state.pool.similarity(c.text)
            c.similarity = sim.as_dict()
            reason = flt.similarity_reason(sim.max_score)
        c.seq, state.seq = state.seq, state.seq + 1
        if reason:
            counters.rejected[reason] += 1
            rejected.append({"seq": c.seq, "round": round_, "prompt": c.prompt, "stage": "instruction",
                             "instruction": c.text, "reason": reason,
                             "max_similarity": c.similarity.get("max")})
        else:
            state.pool.add(c.text)
            accepted.append(c)
    return accepted, rejected


def _classify(cands: list[Candidate], gen: Generator) -> None:
    """Step 3: few-shot yes/no, greedy, a few tokens (Self-Instruct: 3 tokens, temperature 0)."""
    outs = gen([classification_prompt(c.text) for c in cands], chat=False, max_new_tokens=3, greedy=True,
               stop_strings=("\n", "Task"))
    for c, out in zip(cands, outs):
        c.classification_answer = out.text.strip()
        c.is_classification = parse_yes_no(out.text)


def _generate_instances(cands: list[Candidate], recipe: SelfInstructRecipe, gen: Generator, seed: int) -> None:
    """Step 4 (Self-Instruct): instances, output-first for classification and input-first otherwise."""
    g = recipe.generate
    stop = tuple(g.instance_stop_strings) + (f"Example {g.max_instances + 1}",)
    outs = gen([instance_prompt(c.text, c.is_classification) for c in cands], chat=False,
               max_new_tokens=g.instance_max_new_tokens, greedy=g.instance_greedy, temperature=g.temperature,
               top_p=g.top_p, stop_strings=stop, seed=seed + 1)
    for c, out in zip(cands, outs):
        parsed = parse_instances(out.text, c.is_classification, out.finish_reason)
        c.instances = parsed.items
        c.instance_info = {"finish_reason": out.finish_reason, "parsed": len(parsed.items), "truncated": parsed.truncated}


def _finish(cands: list[Candidate], recipe: SelfInstructRecipe, state: RunState, gen: Generator, round_: int,
            counters: Counters) -> tuple[list[dict], list[dict]]:
    """Filter each candidate's instances; make kept task records (scored) and rejected records."""
    tasks, rejected = [], []
    for c in cands:
        dropped = Counter()
        instances = F.filter_instances(c.instances, dropped)[:recipe.generate.max_instances]
        counters.instances_rejected.update(dropped)
        if not instances:
            counters.rejected[F.NO_INSTANCES] += 1
            rejected.append({"seq": c.seq, "round": round_, "prompt": c.prompt, "stage": "instances",
                             "instruction": c.text, "reason": F.NO_INSTANCES, "instances_rejected": dict(dropped)})
            continue
        provenance = {"pipeline": recipe.generate.method, "prompt_style": PROMPT_STYLE, "model": recipe.model.path,
                      "seed": recipe.generate.seed, "round": round_, "prompt": c.prompt, "seq": c.seq,
                      "demonstrations": c.demonstrations, "finish_reason": c.finish_reason,
                      "similarity": c.similarity, "classification_answer": c.classification_answer,
                      "instances": c.instance_info, "instances_rejected": dict(dropped)}
        tasks.append(Task(f"generated_{c.seq}", task_name(c.text), c.text, [Instance(i, o) for i, o in instances],
                          c.is_classification, provenance))
    score_tasks(gen, tasks, recipe.difficulty)
    return [t.to_json() for t in tasks], rejected


def run_round(recipe: SelfInstructRecipe, state: RunState, gen: Generator, round_: int) -> tuple[list[dict], list[dict], Counters]:
    """One round: returns the kept and rejected records and the round's own counters."""
    counters = Counters()
    seed = round_seed(recipe.generate.seed, round_)
    flt = F.InstructionFilter(recipe.filter.min_words, recipe.filter.max_words, tuple(recipe.filter.blacklist),
                              recipe.filter.max_similarity)
    tokens_before, seconds_before = gen.tokens, gen.seconds
    cands = _candidates(recipe, state, gen, random.Random(seed), seed, counters)
    accepted, rejected = _accept(cands, state, flt, round_, counters)
    _classify(accepted, gen)
    if recipe.generate.method == "self-instruct":
        _generate_instances(accepted, recipe, gen, seed)
    kept, late_rejects = _finish(accepted, recipe, state, gen, round_, counters)
    counters.values["rounds"] += 1
    counters.values["tokens"] += gen.tokens - tokens_before
    counters.values["gen_millis"] += round((gen.seconds - seconds_before) * 1000)
    return kept, rejected + late_rejects, counters


def _merge(total: Counters, part: Counters) -> None:
    total.values.update(part.values)
    total.rejected.update(part.rejected)
    total.instances_rejected.update(part.instances_rejected)


def run_self_instruct(recipe: SelfInstructRecipe, gen: Generator | None = None, progress: bool = True) -> dict:
    """Run (or resume) a Self-Instruct / Alpaca generation run until `num_instructions` tasks are kept.

    Writes output.dir/instructions.jsonl (kept tasks, Self-Instruct format with provenance),
    rejected.jsonl, alpaca.json and report.json; returns the report.
    """
    out = Path(recipe.output.dir)
    seeds = load_tasks(recipe.data.seed_tasks)
    journal = Journal(out, (INSTRUCTIONS_FILE, REJECTED_FILE), fingerprint(recipe))
    records = journal.open()
    state = restore_state(seeds, records[INSTRUCTIONS_FILE], records[REJECTED_FILE])
    counters = Counters.from_json(journal.counters)
    g = recipe.generate
    gen = gen or load_generator(recipe.model, g.batch_size)
    settings = {"method": g.method, "model": recipe.model.path, "seed_tasks": recipe.data.seed_tasks,
                "seed": g.seed, "prompt_style": PROMPT_STYLE}
    try:
        with ProgressBar(g.method, g.num_instructions, progress) as bar:
            bar.update(len(state.kept), sum(counters.rejected.values()), gen.tokens_per_second(), journal.round)
            while len(state.kept) < g.num_instructions and not (g.max_rounds and journal.round >= g.max_rounds):
                kept, rejected, part = run_round(recipe, state, gen, journal.round + 1)
                journal.append(INSTRUCTIONS_FILE, kept)
                journal.append(REJECTED_FILE, rejected)
                _merge(counters, part)
                journal.commit(journal.round + 1, counters.to_json())
                state.kept += kept
                state.machine += [Task(r["id"], r["name"], r["instruction"], [Instance(**i) for i in r["instances"]],
                                       r["is_classification"]) for r in kept]
                bar.update(len(state.kept), sum(counters.rejected.values()), gen.tokens_per_second(), journal.round)
    finally:
        report = export(out, state.kept, seeds, Counters.from_json(journal.counters), recipe.difficulty,
                        recipe.output.include_seeds, settings)
    return report
