"""Best-of-N / rejection-sampling fine-tuning: Llama 2's step before PPO (Touvron et al. 2023, section 3.2.3).

    prompts -> n sampled responses each (the base model, KV cache) -> scored by the reward model or a function
            -> keep each prompt's best response (if it scores at least min_score)
            -> SFT on (prompt, best response) with the SFT loop

    output.dir/
      samples.jsonl   every prompt with its n responses, their scores, the best one and whether it was kept
      best.jsonl      the kept responses as chat records (what the SFT stage trains on)
      selection.json  mean score of all samples, of the first sample (best-of-1) and of the kept ones (best-of-n)
      sft/            the SFT run: adapter/, checkpoints/, metrics.jsonl, summary.json
      summary.json    the SFT summary plus the selection statistics

To sample from a fine-tuned model, merge its adapter first (`qtune merge`) and point model.path at the result.
"""

import dataclasses
import gc
import json
import os
from pathlib import Path

import torch
from rich.console import Console

from qtune.data.prompts import load_prompts
from qtune.lora import adapters_disabled
from qtune.recipe.align import BestOfNRecipe
from qtune.recipe.schema import recipe_to_toml
from qtune.recipe.sections import OutputSection, SFTDataSection, SFTRecipe
from qtune.train import common
from qtune.train.rollout import build_scorer, sample
from qtune.train.run import load_base_model
from qtune.train.sft import run_sft


def select_best(scores: torch.Tensor) -> torch.Tensor:
    """Index of each prompt's best response in scores (P, n); the first of equal scores wins. (P,)"""
    return scores.argmax(1)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write atomically: a temporary file renamed into place once complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no partial file


@torch.no_grad()
def sample_and_select(recipe: BestOfNRecipe, out_dir: Path, console) -> dict:
    """Sample, score and select; writes samples.jsonl, best.jsonl and selection.json; returns the statistics."""
    b, t, device = recipe.best_of_n, recipe.train, common.training_device()
    common.seed_everything(t.seed)
    model, tokenizer = load_base_model(recipe.model, device)
    scorer = build_scorer(b, model, tokenizer.pad_id, t.micro_batch_size, device)
    # Every prompt is a candidate: the held-out share (data.val_*) is cut from the kept samples by the SFT stage.
    prompts, _, stats = load_prompts(dataclasses.replace(recipe.data, val_size=0, val_fraction=0.0), tokenizer, t.seed)
    prompts = prompts[:b.num_prompts] if b.num_prompts else prompts
    console.print(f"best-of-{b.n}: sampling {len(prompts) * b.n} responses for {len(prompts)} prompts "
                  f"({stats['format']} records)")
    samples, best, all_scores = [], [], []
    chunk = max(1, b.sample_batch_size // b.n)  # prompts per generate call
    report_every = max(1, len(prompts) // chunk // 10)  # about ten progress lines
    for start in range(0, len(prompts), chunk):
        group = prompts[start:start + chunk]
        repeated = [p for p in group for _ in range(b.n)]
        with adapters_disabled(model):  # the policy is the base itself (a reward adapter may be active)
            generations = sample(model, repeated, tokenizer, b.max_new_tokens, b.temperature, b.top_p,
                                 seed=t.seed * 1_000_003 + start, batch_size=b.sample_batch_size)
        scores = scorer.score(repeated, generations).reshape(len(group), b.n)  # (P, n)
        all_scores.append(scores)
        for row, (p, k) in enumerate(zip(group, select_best(scores).tolist())):
            texts = [g.text for g in generations[row * b.n:(row + 1) * b.n]]
            kept = bool(scores[row, k] >= b.min_score)
            samples.append({"prompt": p.text, "responses": texts, "scores": scores[row].tolist(), "best": k,
                            "kept": kept})
            if kept:
                best.append({"messages": p.messages + [{"role": "assistant", "content": texts[k]}],
                             "score": float(scores[row, k])})
        if (start // chunk + 1) % report_every == 0 or start + chunk >= len(prompts):
            console.print(f"  {min(start + chunk, len(prompts))}/{len(prompts)} prompts")
    _write_jsonl(out_dir / "samples.jsonl", samples)
    scores = torch.cat(all_scores)
    selection = {"prompts": len(prompts), "n": b.n, "kept": len(best), "mean_score": float(scores.mean()),
                 "best_of_1_score": float(scores[:, 0].mean()), "best_of_n_score": float(scores.max(1).values.mean())}
    if not best:
        raise common.TrainingError(f"no prompt's best response reached best_of_n.min_score = {b.min_score} (the best "
                                   f"score was {float(scores.max()):.4f}); lower min_score, raise best_of_n.n, or "
                                   f"check the reward (samples: {out_dir / 'samples.jsonl'})")
    (out_dir / "selection.json").write_text(json.dumps(selection, indent=2))
    _write_jsonl(out_dir / "best.jsonl", best)  # written last: its presence means the sampling stage is complete
    del model, scorer
    gc.collect()
    return selection


def sft_recipe(recipe: BestOfNRecipe, best_path: Path, out_dir: Path) -> SFTRecipe:
    """The SFT stage: the recipe's model, adapter and training settings on the kept (prompt, response) chats."""
    d = recipe.data
    data = SFTDataSection(path=str(best_path), format="chat", max_seq_len=d.max_seq_len + recipe.best_of_n.max_new_tokens,
                          val_size=d.val_size, val_fraction=d.val_fraction, shuffle=d.shuffle, cache_dir=d.cache_dir)
    sft = SFTRecipe()
    return SFTRecipe(description=f"SFT stage of best-of-{recipe.best_of_n.n}: {recipe.description}",
                     model=recipe.model, lora=recipe.lora, data=data, train=recipe.train,
                     eval=dataclasses.replace(sft.eval, every=recipe.eval.every, max_batches=recipe.eval.max_batches),
                     output=OutputSection(dir=str(out_dir / "sft")))


def run_best_of_n(recipe: BestOfNRecipe, resume: bool = False, console=None) -> dict:
    """Sample, select and fine-tune; returns the summary (also written to output.dir/summary.json).

    With `resume`, kept samples from an earlier run are reused and its SFT stage continues from its checkpoint.
    """
    console = console or Console(stderr=True)
    out_dir = Path(recipe.output.dir)
    best_path = out_dir / "best.jsonl"
    if best_path.exists() and not resume:
        raise common.TrainingError(f"{out_dir} already holds a best-of-n run (best.jsonl); pass --resume to continue "
                                   "it, or set output.dir=NEW_DIR to start a new one (nothing there is overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.toml").write_text(recipe_to_toml(recipe))
    if best_path.exists():
        selection = json.loads((out_dir / "selection.json").read_text())
        console.print(f"reusing the kept samples in {best_path}")
    else:
        selection = sample_and_select(recipe, out_dir, console)
    console.print(f"mean score: all samples {selection['mean_score']:.4f}, best-of-1 {selection['best_of_1_score']:.4f}, "
                  f"best-of-{selection['n']} {selection['best_of_n_score']:.4f}; {selection['kept']} of "
                  f"{selection['prompts']} prompts kept")
    sft_dir = out_dir / "sft"
    summary = run_sft(sft_recipe(recipe, best_path, out_dir),
                      resume=resume and (sft_dir / "checkpoints").exists(), console=console)
    summary = {**summary, **selection, "samples": str(out_dir / "samples.jsonl"), "best": str(best_path)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
