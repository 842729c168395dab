"""The error contract (#21) through the real CLI, one row per class of bad input: exit status 1, exactly one line
starting `Error:` that names the file or key, no traceback, and nothing written (the output location absent or
left empty, a resumed run's files byte for byte as they were).

Read-only and full file systems are small tmpfs mounts (skipped with a reason where mounting is not allowed).
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny import save_tiny_with_tokenizer

from qtune.cli import main
from qtune.train.run import CollapseCheck

WORDS = "apple river stone cloud tiger music paper garden window silver candle forest".split()


@dataclass
class Case:
    args: list  # the command line after `qtune`
    names: list[str]  # what the Error line (and its detail lines) must name
    untouched: Path | None = None  # absent or empty afterwards; a directory of a run: unchanged
    env: dict = field(default_factory=dict)


def snapshot(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(args, env=None):
    with _environment(env or {}):
        return CliRunner().invoke(main, [str(a) for a in args])


@contextlib.contextmanager
def _environment(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def assert_contract(result, names: list[str]) -> None:
    output = result.output
    assert result.exit_code == 1, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    message = " ".join(output[output.index("Error:"):].split())
    for name in names:
        assert name in message, (name, message)
    assert "Traceback" not in output


# ----------------------------------------------------------------------------- the world the cases run in

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, broken copies of it, data files, and a finished two-step run to resume."""
    root = tmp_path_factory.mktemp("contract")
    model = save_tiny_with_tokenizer("llama", root / "model")
    alpaca = root / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"Repeat {w}.", "input": "", "output": w}) + "\n"
                              for w in WORDS))
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}."},
                                                    {"role": "assistant", "content": w}]}) + "\n" for w in WORDS))
    prefs = root / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": "no"}) + "\n"
                             for w in WORDS))
    (root / "not_gzip.jsonl.gz").write_text(prefs.read_text())
    (root / "a_file").write_text("not a directory")
    run = root / "run"
    done = run_cli(sft_args(model, run, alpaca, "train.max_steps=2", "train.save_every=1"))
    assert done.exit_code == 0, done.output
    return {"root": root, "model": model, "alpaca": alpaca, "chat": chat, "prefs": prefs, "run": run}


def sft_args(model, out, data, *extra, fmt="alpaca") -> list:
    return ["sft", "quickstart", f"model.path={model}", f"output.dir={out}", f"data.path={data}",
            f"data.format={fmt}", "data.cache_dir=", "data.max_seq_len=128", "data.val_size=2", "eval.exact_match=0",
            "train.max_steps=1", "train.micro_batch_size=2", *extra]


def broken_model(world, name: str, edit) -> Path:
    """A copy of the tiny model with one file damaged by `edit(directory)`."""
    directory = world["root"] / name
    if not directory.exists():
        shutil.copytree(world["model"], directory)
        edit(directory)
    return directory


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def shrink_vocab(directory: Path) -> None:
    """Embedding and head cut to 100 rows, config.json saying so; the tokenizer still has ids up to ~300."""
    weights = load_file(directory / "model.safetensors")
    cut = {k: v[:100].clone() if "embed_tokens" in k or "lm_head" in k else v for k, v in weights.items()}
    save_file(cut, directory / "model.safetensors", metadata={"format": "pt"})
    edit_json(directory / "config.json", vocab_size=100)


TEMPLATES = {
    "syntax_error": "{% for m in messages %}{{ m.content }",
    "raise_exception": "{{ raise_exception('Conversation roles must alternate') }}",
    "sandbox_refusal": "{{ messages.__class__.__mro__ }}",
}


def template_model(world, kind: str) -> Path:
    return broken_model(world, f"template_{kind}",
                        lambda d: edit_json(d / "tokenizer_config.json", chat_template=TEMPLATES[kind]))


def bad_tokenizer_json(world) -> Path:
    return broken_model(world, "bad_tokenizer", lambda d: (d / "tokenizer.json").write_text('{"model": '))


def bad_config(world) -> Path:
    return broken_model(world, "bad_config", lambda d: (d / "config.json").write_text('["not", "an", "object"]'))


# ----------------------------------------------------------------------------- the table

def model_cases(w) -> dict[str, Case]:
    root, out = w["root"], w["root"] / "out"
    small = broken_model(w, "small_vocab", shrink_vocab)
    cases = {
        "tokenizer.json does not parse (sft)": Case(sft_args(bad_tokenizer_json(w), out, w["alpaca"]),
                                                    ["bad_tokenizer/tokenizer.json"], out),
        "tokenizer.json does not parse (generate)": Case(
            ["generate", bad_tokenizer_json(w), "--prompt", "hi", "--max-new-tokens", "2"], ["tokenizer.json"]),
        "tokenizer ids beyond vocab_size (sft)": Case(sft_args(small, out, w["alpaca"]),
                                                      ["small_vocab", "config.json's vocab_size is 100"], out),
        "tokenizer ids beyond vocab_size (eval)": Case(["eval", small, "--data", w["alpaca"], "--quantize", "none"],
                                                       ["config.json's vocab_size is 100"]),
        "config.json not an object (eval)": Case(["eval", bad_config(w), "--data", w["alpaca"]], ["config.json"]),
        "config.json not an object (quantize)": Case(["quantize", bad_config(w), root / "q"], ["config.json"],
                                                     root / "q"),
        "config.json not an object (eval-prefs)": Case(
            ["eval-prefs", bad_config(w), "--adapter", w["model"], "--data", w["prefs"], "--kind", "reward"],
            ["config.json"]),
        "adapter without adapter_config.json (merge)": Case(["merge", w["model"], w["model"], root / "merged"],
                                                           ["adapter_config.json"], root / "merged"),
        "generate --chat with a failing template": Case(
            ["generate", template_model(w, "raise_exception"), "--prompt", "hi", "--chat", "--max-new-tokens", "2"],
            ["tokenizer_config.json", "roles must alternate"]),
        "config.json not an object (export-gguf)": Case(["export-gguf", bad_config(w), root / "exported.gguf"],
                                                        ["config.json"], root / "exported.gguf"),
        "unknown lm-eval task (eval-harness)": Case(["eval-harness", w["model"], "--tasks", "no_such_task"],
                                                    ["no_such_task"]),
    }
    for kind in TEMPLATES:
        cases[f"chat template {kind} (sft)"] = Case(
            sft_args(template_model(w, kind), out, w["chat"], fmt="chat"),
            [f"template_{kind}/tokenizer_config.json", "chat.jsonl line 1", "the chat template failed"], out)
    return cases


def data_cases(w) -> dict[str, Case]:
    root, out = w["root"], w["root"] / "out"
    gz = root / "not_gzip.jsonl.gz"
    return {
        "mislabelled .gz (eval-prefs)": Case(["eval-prefs", w["model"], "--adapter", w["model"], "--data", gz,
                                              "--kind", "reward"], ["not_gzip.jsonl.gz"]),
        "mislabelled .gz (sft)": Case(sft_args(w["model"], out, gz), ["not_gzip.jsonl.gz"], out),
        "not a GGUF file (convert)": Case(["convert", w["alpaca"], root / "converted"], ["alpaca.jsonl"],
                                          root / "converted"),
        "max_seq_len beyond the model's positions": Case(sft_args(w["model"], out, w["alpaca"],
                                                                  "data.max_seq_len=3000"),
                                                         ["data.max_seq_len = 3000", "512 positions"], out),
    }


def location_cases(w) -> dict[str, Case]:
    root = w["root"]
    return {
        "output.dir is a file": Case(sft_args(w["model"], root / "a_file", w["alpaca"]), [str(root / "a_file")]),
        "output.dir under a file": Case(sft_args(w["model"], root / "a_file" / "run", w["alpaca"]),
                                        [str(root / "a_file")]),
        "cp into a missing directory": Case(["cp", "quickstart", root / "nowhere" / "r.toml"], ["nowhere/r.toml"],
                                            root / "nowhere"),
        "cp of an unknown recipe": Case(["cp", "no_such_recipe", root / "r.toml"], ["no_such_recipe"],
                                        root / "r.toml"),
        "pull into a cache that is a file": Case(["pull", "smollm2-135m"], [str(root / "a_file")],
                                                 env={"QTUNE_HOME": str(root / "a_file")}),
    }


RECIPE_VERBS = {  # verb -> its shipped recipe and a key of it
    "sft": ("quickstart", "train.lr"), "reward": ("reward", "train.lr"), "dpo": ("dpo", "train.lr"),
    "ppo": ("ppo", "train.lr"), "grpo": ("grpo", "train.lr"), "best-of-n": ("best_of_n", "train.lr"),
    "estimate": ("quickstart", "train.lr"),
    "validate": ("dpo", "lora.alpha"), "data preview": ("quickstart", "lora.alpha"),
    "self-instruct": ("self_instruct", "generate.num_instructions"),
    "evol-instruct": ("evol_instruct", "generate.num_instructions"),
}


def recipe_cases(w) -> dict[str, Case]:
    not_utf8 = w["root"] / "latin1.toml"
    not_utf8.write_bytes('kind = "sft"\ndescription = "caf\xe9"\n'.encode("latin-1"))
    cases = {}
    for verb, (recipe, key) in RECIPE_VERBS.items():
        cases[f"{verb}: NaN value"] = Case([*verb.split(), recipe, f"{key}=nan"], [key, "nan"])
        cases[f"{verb}: unknown key"] = Case([*verb.split(), recipe, "nosuch.key=1"], ["nosuch", "unknown key"])
    cases["sft: recipe not UTF-8"] = Case(["sft", not_utf8], ["latin1.toml", "not UTF-8"])
    return cases


def all_cases(w) -> dict[str, Case]:
    return {**model_cases(w), **data_cases(w), **location_cases(w), **recipe_cases(w)}


CASE_IDS = [
    *[f"chat template {kind} (sft)" for kind in TEMPLATES], "tokenizer.json does not parse (sft)",
    "tokenizer.json does not parse (generate)", "tokenizer ids beyond vocab_size (sft)",
    "tokenizer ids beyond vocab_size (eval)", "config.json not an object (eval)", "config.json not an object (quantize)",
    "config.json not an object (eval-prefs)", "config.json not an object (export-gguf)",
    "unknown lm-eval task (eval-harness)", "adapter without adapter_config.json (merge)",
    "generate --chat with a failing template", "mislabelled .gz (eval-prefs)", "mislabelled .gz (sft)",
    "not a GGUF file (convert)", "max_seq_len beyond the model's positions", "output.dir is a file",
    "output.dir under a file", "cp into a missing directory", "cp of an unknown recipe",
    "pull into a cache that is a file", "sft: recipe not UTF-8",
    *[f"{verb}: {what}" for verb in RECIPE_VERBS for what in ("NaN value", "unknown key")],
]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input_is_one_error_line(world, case_id):
    case = all_cases(world)[case_id]
    before = snapshot(case.untouched) if case.untouched is not None else None
    result = run_cli(case.args, case.env)
    assert_contract(result, case.names)
    if case.untouched is not None:
        after = snapshot(case.untouched)
        assert after == before or after == {}, after  # absent, left empty, or as it was


def test_every_verb_is_covered(world):
    """Every verb with an input a user can get wrong has a row (`ls` takes no input)."""
    verbs = {c.args[0] if c.args[0] != "data" else "data preview" for c in all_cases(world).values()}
    listed = {name for name in main.list_commands(None) if name not in ("ls", "data")} | {"data preview"}
    assert listed <= verbs, listed - verbs


def test_qtune_debug_shows_the_traceback(world):
    case = all_cases(world)["config.json not an object (eval)"]
    result = run_cli(case.args, {"QTUNE_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in result.output and "ConfigError" in result.output
    assert sum(line.startswith("Error:") for line in result.output.splitlines()) == 1


# ----------------------------------------------------------------------------- --resume with a changed recipe

@pytest.mark.parametrize("changes, named", [
    (["train.seed=7"], ["train.seed: 0 -> 7"]),
    (["lora.r=4", "train.micro_batch_size=1"], ["lora.r: 16 -> 4", "train.micro_batch_size: 2 -> 1"]),
    (["data.path=OTHER"], ["data.path:"]),
    (["model.path=smollm2-135m"], ["model.path:"]),
])
def test_resume_refuses_a_changed_course(world, changes, named):
    run = world["run"]
    before = snapshot(run)
    args = sft_args(world["model"], run, world["alpaca"], "train.max_steps=2", "train.save_every=1",
                    *[c.replace("OTHER", str(world["chat"])) for c in changes], "--resume")
    result = run_cli(args)
    assert_contract(result, ["--resume", "recipe.toml", *named])
    assert snapshot(run) == before


def test_resume_records_a_longer_run(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    shutil.rmtree(run / "adapter")
    result = run_cli(sft_args(world["model"], run, world["alpaca"], "train.max_steps=3", "train.save_every=1",
                              "train.log_every=2", "--resume"))
    assert result.exit_code == 0, result.output
    resumes = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resumes == [{"step": 2, "changed": {"output.dir": [str(world["run"]), str(run)],
                                               "train.max_steps": [2, 3], "train.log_every": [1, 2]}}]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


# ----------------------------------------------------------------------------- a collapsed run

def test_a_collapsed_run_stops_with_its_last_checkpoint(world):
    """A head of zeros gives every token the same logit: the loss is exactly ln(vocab_size) and no gradient
    reaches the adapters, as in a run that has died. It must stop, not be reported as finished."""
    dead = broken_model(world, "zero_head", lambda d: save_file(
        {k: torch.zeros_like(v) if "lm_head" in k else v for k, v in load_file(d / "model.safetensors").items()},
        d / "model.safetensors", metadata={"format": "pt"}))
    out = world["root"] / "collapsed"
    result = run_cli(sft_args(dead, out, world["alpaca"], "model.quantize=none", "train.max_steps=8",
                              "train.save_every=1", "train.log_every=1", "train.collapse_steps=3"))
    assert_contract(result, ["gradient norm has been exactly 0 for 3 steps", "steps 1-3", "collapse_steps",
                             str(out / "checkpoints" / "step-000002")])
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    vocab = json.loads((dead / "config.json").read_text())["vocab_size"]
    assert losses and all(loss == pytest.approx(math.log(vocab), abs=1e-5) for loss in losses)
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    off = run_cli(sft_args(dead, world["root"] / "unchecked", world["alpaca"], "model.quantize=none",
                           "train.max_steps=4", "train.collapse_steps=0"))
    assert off.exit_code == 0, off.output


def test_collapse_counts_consecutive_steps():
    uniform = math.log(160)
    check = CollapseCheck(steps=3, tolerance=1e-3)
    assert check.update(0.5, uniform + 5e-4, uniform) is None
    assert check.update(0.5, uniform - 5e-4, uniform) is None
    assert check.update(0.5, uniform + 2e-3, uniform) is None  # not pinned: the count starts again
    assert check.update(0.0, uniform + 2e-3, uniform) is None
    assert check.update(0.5, uniform, uniform) is None
    assert check.update(0.5, uniform, uniform) is None
    reason = check.update(0.5, uniform, uniform)
    assert reason is not None and "ln(vocab_size) = 5.0752" in reason and "3 steps" in reason
    assert CollapseCheck(steps=0, tolerance=1e-3).update(0.0, uniform, uniform) is None


# ----------------------------------------------------------------------------- full and read-only file systems

@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_a_full_disk_names_the_checkpoint(world):
    with tmpfs(world["root"] / "full", "size=96k") as full:
        result = run_cli(sft_args(world["model"], full / "run", world["alpaca"], "train.save_every=1"))
        assert_contract(result, [str(full / "run" / "checkpoints" / "step-000001"), "No space left on device",
                                 "run again"])


@pytest.mark.parametrize("verb", ["sft", "quantize"])
def test_a_read_only_location_is_named(world, verb):
    with tmpfs(world["root"] / "read_only", "ro,size=64k") as read_only:
        args = (sft_args(world["model"], read_only / "run", world["alpaca"]) if verb == "sft"
                else ["quantize", world["model"], read_only / "q"])
        result = run_cli(args)
        assert_contract(result, [str(read_only), "Read-only file system"])
        assert not any(read_only.iterdir())


def test_validate_checks_the_positions_without_loading_weights(world):
    result = run_cli(["validate", "quickstart", f"model.path={world['model']}", "data.max_seq_len=3000"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "FAIL data.max_seq_len = 3000 is longer than the 512 positions" in text, text
    assert run_cli(["validate", "quickstart", f"model.path={world['model']}"]).exit_code == 0
