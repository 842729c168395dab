"""What the PEFT method tests (tests/test_peft_*.py) share: two-step `qtune sft / dpo / reward` runs through the CLI
on a tiny model with a resume (each method must train, checkpoint and resume under every loop on both bases),
serving the adapter with `qtune generate / eval`, and the transformers reference model with its logits."""

import json
import random
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from qtune.cli import main
from tiny import save_tiny_with_tokenizer

WORDS = "the cat dog sat on mat a big small red blue green tree house river".split()


def hf_model(path):
    """transformers' model of the same checkpoint, fp32, eval mode (the reference PEFT loads adapters onto)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def token_ids(seed=0):
    return torch.randint(3, 160, (2, 9), generator=torch.Generator().manual_seed(seed))


def cli_files(root: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny model with a tokenizer and the preference files, for the CLI runs."""
    return save_tiny_with_tokenizer("llama", root / "tiny"), preference_files(root / "data")


def preference_files(root: Path) -> dict[str, Path]:
    """A pairs file for DPO and a rankings file for the reward model, small and learnable."""
    rng = random.Random(2)
    pairs, rankings = [], []
    for _ in range(12):
        words = " ".join(rng.choices(WORDS, k=4))
        pairs.append({"prompt": f"Say: {words}", "chosen": f"good {words}",
                      "rejected": "bad " + " ".join(rng.choices(WORDS, k=3))})
        rankings.append({"prompt": words, "responses": [f"good {words}", "bad " + rng.choice(WORDS)],
                         "scores": [1.0, 0.0]})
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("pairs", pairs), ("rankings", rankings)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"dpo": root / "pairs.jsonl", "reward": root / "rankings.jsonl"}


def _invoke(args: list[str]):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def two_steps_and_resume(verb: str, tiny_dir: Path, out: Path, data: dict, quantize: str, *settings: str) -> dict:
    """Run `qtune <verb>` for one step with a checkpoint, resume it to two steps; return the final adapter's
    tensors. `settings` are recipe overrides (`peft.method=...`, `lora.r=...`)."""
    recipe = "quickstart"
    if verb != "sft":
        out.parent.mkdir(parents=True, exist_ok=True)
        recipe = out.parent / f"{verb}.toml"
        recipe.write_text(f'kind = "{verb}"\n')
    common = [f"model.path={tiny_dir}", f"model.quantize={quantize}", f"output.dir={out}", "train.save_every=1",
              "train.log_every=1", "train.micro_batch_size=2", "train.grad_accum_steps=1", "data.max_seq_len=64",
              *settings]
    if verb == "sft":
        common += ["data.path=qtune:checkable-tasks?count=16&seed=0", "data.val_size=4", "eval.exact_match=0",
                   "data.cache_dir="]
    else:
        common += [f"data.path={data[verb]}"]
    _invoke([verb, recipe, *common, "train.max_steps=1"])
    resumed = _invoke([verb, recipe, *common, "train.max_steps=2", "--resume"])
    assert "resumed from" in resumed.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2]
    return load_file(out / "adapter" / "adapter_model.safetensors")


def serve_with_adapter(tiny_dir: Path, adapter: Path, quantize: str, work: Path) -> tuple[float, float]:
    """`qtune generate` and `qtune eval` with `--adapter`; returns eval's loss with and without the adapter."""
    data = work / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Repeat: {w}", "input": "", "output": f"{w} {w}"} for w in WORDS]))
    common = ["--quantize", quantize, "--dtype", "float32"]
    _invoke(["generate", tiny_dir, "--adapter", adapter, *common, "--prompt", "Say: cat", "--greedy",
             "--max-new-tokens", "4"])
    losses = [json.loads(_invoke(["eval", tiny_dir, *extra, *common, "--data", data]).output.strip().splitlines()[-1])["loss"]
              for extra in (["--adapter", adapter], [])]
    return losses[0], losses[1]
