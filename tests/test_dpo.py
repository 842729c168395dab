"""DPO: sequence log-probabilities against transformers, the adapters-disabled reference, a first loss of ln 2,
the cached reference equal to the live one, learning on a tiny model, `qtune eval-prefs --kind dpo` against
transformers + PEFT, and the shipped recipes."""

import json
import math
import random
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from shared_data import SHARED_DATA
from tiny import save_tiny_with_tokenizer

from qtune.weights.checkpoint import load_model
from qtune.cli.align_cmds import COMMANDS
from qtune.data.prefs import TokenizedPreference, collate_preferences, load_preferences, tokenize_preferences
from qtune.lora import LoraConfig, add_lora, lora_layers
from qtune.recipe.align import DPORecipe, DPOSection, RewardRecipe
from qtune.recipe.load import load_recipe
from qtune.recipe.schema import RecipeError
from qtune.tokenizer import load_tokenizer
from qtune.train import dpo as dpo_loop
from qtune.train.dpo import batch_reference, pair_losses, reference_logprobs, response_lengths, sequence_logprobs

ROOT = Path(__file__).resolve().parents[1]
CLI = {c.name: c for c in COMMANDS}
WORDS = "the cat dog sat on mat a big small red blue green tree house river".split()
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny_dpo"))


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Learnable pairs: the chosen reply repeats the prompt after "good", the rejected one is "bad" and noise."""
    rng = random.Random(2)
    rows = []
    for _ in range(40):
        words = " ".join(rng.choices(WORDS, k=5))
        rows.append({"prompt": f"Say: {words}", "chosen": f"good {words}",
                     "rejected": "bad " + " ".join(rng.choices(WORDS, k=4))})
    path = tmp_path_factory.mktemp("dpo_pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_response_logprob(model, prompt: list[int], response: list[int]) -> float:
    """Σ log p(response token | everything before it), from full transformers logits."""
    ids = prompt + response
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # (T, V)
    return float(sum(logp[t - 1, ids[t]] for t in range(len(prompt), len(ids))))


def random_items(n: int, vocab: int, seed: int) -> list[TokenizedPreference]:
    rng = np.random.default_rng(seed)

    def seq(lo: int, hi: int) -> np.ndarray:
        return rng.integers(3, vocab, int(rng.integers(lo, hi))).astype(np.int32)

    return [TokenizedPreference(seq(1, 7), (seq(1, 7), seq(1, 7), seq(1, 7)), 0.0, None) for _ in range(n)]


def run_cli(command: str, *args) -> dict:
    result = CliRunner().invoke(CLI[command], [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.output.strip().splitlines()[-1])


def dpo_recipe(tmp_path) -> Path:
    path = tmp_path / "dpo.toml"
    path.write_text('kind = "dpo"\n')
    return path


def logged(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ----------------------------------------------------------------------------- log-probabilities

@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_sequence_logprobs_match_transformers(tiny_dir, hf_model, kernels):
    model = load_model(tiny_dir, quantize="none", kernels=kernels)
    items = random_items(3, model.config.vocab_size, seed=0)
    batch = collate_preferences(items, pad_id=0)
    with torch.no_grad():
        got = sequence_logprobs(model, batch)
    expected = [hf_response_logprob(hf_model, it.prompt_ids.tolist(), r.tolist()) for it in items for r in it.response_ids]
    assert got.tolist() == pytest.approx(expected, abs=1e-4)


def test_reference_is_the_base_with_adapters_disabled(tiny_dir, hf_model):
    model = load_model(tiny_dir, quantize="none")
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), name="policy", seed=0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["policy"].weight.normal_(0, 0.3)
    items = random_items(2, model.config.vocab_size, seed=1)
    batch = collate_preferences(items, pad_id=0)
    base = [hf_response_logprob(hf_model, it.prompt_ids.tolist(), r.tolist()) for it in items for r in it.response_ids]
    reference = reference_logprobs(model, batch)
    assert reference.tolist() == pytest.approx(base, abs=1e-4) and not reference.requires_grad
    with torch.no_grad():
        policy = sequence_logprobs(model, batch)
    assert (policy - reference).abs().max() > 1e-2  # the adapter is back on afterwards
    assert all(layer.active == "policy" for layer in lora_layers(model).values())


# ----------------------------------------------------------------------------- training through the CLI

def test_first_loss_is_ln2_with_a_fresh_adapter_on_an_nf4_base(tiny_dir, pairs_file, tmp_path):
    out = tmp_path / "run"
    run_cli("dpo", dpo_recipe(tmp_path), f"model.path={tiny_dir}", f"data.path={pairs_file}", f"output.dir={out}",
            "train.max_steps=2", "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.log_every=1",
            "train.lr=1e-2", "lora.r=4", "lora.dropout=0.1", "train.optimizer=adamw")
    first, second = logged(out)
    assert first["loss"] == pytest.approx(LN2, abs=1e-7) and first["accuracy"] == 0.5  # ln 2 to fp32 precision
    assert first["chosen_reward"] == first["rejected_reward"] == first["margin"] == 0.0
    assert second["loss"] != first["loss"] and second["margin"] != 0.0


@pytest.mark.parametrize("loss,expected", [("ipo", (1 / (2 * 0.25)) ** 2), ("robust", LN2)])
def test_first_loss_of_ipo_and_robust_dpo(tiny_dir, pairs_file, tmp_path, loss, expected):
    out = tmp_path / "run"
    run_cli("dpo", dpo_recipe(tmp_path), f"model.path={tiny_dir}", "model.quantize=none", f"data.path={pairs_file}",
            f"output.dir={out}", f"dpo.loss={loss}", "dpo.beta=0.25", "dpo.label_smoothing=0.0" if loss == "ipo"
            else "dpo.label_smoothing=0.2", "train.max_steps=1", "train.micro_batch_size=4", "train.grad_accum_steps=1",
            "lora.r=4", "train.optimizer=adamw")
    assert logged(out)[0]["loss"] == pytest.approx(expected, rel=1e-6)


def test_cached_reference_gives_the_same_run_and_is_reused(tiny_dir, pairs_file, tmp_path):
    common = [f"model.path={tiny_dir}", "model.quantize=none", f"data.path={pairs_file}", "data.val_size=8",
              "train.max_steps=3", "train.micro_batch_size=4", "train.grad_accum_steps=1", "train.log_every=1",
              "train.lr=5e-3", "lora.r=4", "lora.dropout=0.0", "train.optimizer=adamw", "eval.every=3"]
    cache = tmp_path / "cache"
    live = run_cli("dpo", dpo_recipe(tmp_path), *common, f"output.dir={tmp_path / 'live'}")
    cached = run_cli("dpo", dpo_recipe(tmp_path), *common, f"output.dir={tmp_path / 'cached'}",
                     "dpo.precompute_reference=true", f"data.cache_dir={cache}")
    files = list((cache / "dpo_reference").glob("*.safetensors"))
    assert len(files) == 1
    for a, b in zip(logged(tmp_path / "live"), logged(tmp_path / "cached")):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["margin"] == pytest.approx(b["margin"], abs=1e-5)
    assert cached["val_accuracy_after"] == live["val_accuracy_after"]
    assert cached["val_margin_after"] == pytest.approx(live["val_margin_after"], abs=1e-5)
    stamp = files[0].stat().st_mtime_ns
    result = CliRunner().invoke(CLI["dpo"], [str(dpo_recipe(tmp_path)), *common, f"output.dir={tmp_path / 'again'}",
                                             "dpo.precompute_reference=true", f"data.cache_dir={cache}"])
    assert result.exit_code == 0 and "cached at" in result.output and files[0].stat().st_mtime_ns == stamp
    run_cli("dpo", dpo_recipe(tmp_path), *common, f"output.dir={tmp_path / 'shorter'}", "data.max_seq_len=12",
            "dpo.precompute_reference=true", f"data.cache_dir={cache}")
    assert len(list((cache / "dpo_reference").glob("*.safetensors"))) == 2  # other tokens, other entry


def test_dpo_learns_and_eval_prefs_matches_transformers_with_peft(tiny_dir, hf_model, pairs_file, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "run"
    summary = run_cli("dpo", dpo_recipe(tmp_path), f"model.path={tiny_dir}", "model.quantize=none",
                      f"data.path={pairs_file}", f"output.dir={out}", "data.val_size=12", "train.max_steps=12",
                      "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.lr=2e-3", "lora.r=8",
                      "train.optimizer=adamw", "dpo.beta=0.1")
    assert summary["val_pairs"] == 12 and summary["val_accuracy_after"] >= 0.8 and summary["val_margin_after"] > 0
    result = run_cli("eval-prefs", tiny_dir, "--adapter", out / "adapter", "--data", pairs_file, "--kind", "dpo",
                     "--quantize", "none", "--beta", 0.1)
    # Independent: transformers + PEFT, the reference being PEFT's own disable_adapter().
    policy = peft.PeftModel.from_pretrained(hf_model, out / "adapter").eval()
    items, _ = tokenize_preferences(load_preferences(str(pairs_file))[0], load_tokenizer(tiny_dir), 512)
    margins = []
    for it in items:
        prompt, (chosen, rejected) = it.prompt_ids.tolist(), [r.tolist() for r in it.response_ids]
        with policy.disable_adapter():
            ref = [hf_response_logprob(policy, prompt, chosen), hf_response_logprob(policy, prompt, rejected)]
        pol = [hf_response_logprob(policy, prompt, chosen), hf_response_logprob(policy, prompt, rejected)]
        margins.append(0.1 * ((pol[0] - ref[0]) - (pol[1] - ref[1])))
    assert result["n"] == 40
    assert result["mean_margin"] == pytest.approx(sum(margins) / 40, abs=1e-4)
    assert result["accuracy"] == sum(m > 0 for m in margins) / 40


def test_eval_prefs_dpo_takes_exactly_one_adapter(tiny_dir, pairs_file):
    result = CliRunner().invoke(CLI["eval-prefs"], [str(tiny_dir), "--adapter", "a", "--adapter", "b", "--data",
                                                    str(pairs_file), "--kind", "dpo"])
    assert result.exit_code == 1 and "--kind dpo evaluates one adapter" in result.output


# ----------------------------------------------------------------------------- reference-free losses

def test_response_lengths_count_each_sequences_response_tokens():
    items = random_items(3, 50, seed=4)
    assert response_lengths(collate_preferences(items, pad_id=0)).tolist() == [len(r) for it in items
                                                                                for r in it.response_ids]


@pytest.mark.parametrize("loss", ["simpo", "cpo", "orpo"])
def test_reference_free_losses_of_a_fresh_adapter_use_transformers_logprobs(tiny_dir, loss):
    # A fresh adapter is the base, so every loss equals its formula on transformers' log-probs of the base. (Its
    # own transformers model: the module's hf_model gets a PEFT adapter injected by an earlier test.)
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model = load_model(tiny_dir, quantize="none")
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), name="policy", seed=0)
    items = [TokenizedPreference(it.prompt_ids, it.response_ids[:2], 0.0, None)
             for it in random_items(3, model.config.vocab_size, seed=5)]
    batch, section = collate_preferences(items, pad_id=0), DPOSection(beta=2.0, loss=loss)
    assert batch_reference(model, batch, "train", section, None) is None
    with torch.no_grad():
        losses, chosen, rejected = pair_losses(sequence_logprobs(model, batch), None, batch, section)
    expected = []
    for it in items:
        (c, r), (n_c, n_r) = ([hf_response_logprob(hf_model, it.prompt_ids.tolist(), y.tolist()) for y in it.response_ids],
                              [len(y) for y in it.response_ids])
        if loss == "simpo":  # −log σ(β ℓ⁺ − β ℓ⁻ − γ)
            expected.append(-math.log(torch.sigmoid(torch.tensor(2.0 * (c / n_c - r / n_r) - 0.5)).item()))
        elif loss == "cpo":  # −log σ(β (log π⁺ − log π⁻)) + α NLL(y⁺)
            expected.append(-math.log(torch.sigmoid(torch.tensor(2.0 * (c - r))).item()) - c / n_c)
        else:  # −ℓ⁺ − λ log σ(log OR)
            odds = (c / n_c - math.log(1 - math.exp(c / n_c))) - (r / n_r - math.log(1 - math.exp(r / n_r)))
            expected.append(-c / n_c - 0.1 * math.log(torch.sigmoid(torch.tensor(odds)).item()))
    assert losses.tolist() == pytest.approx(expected, rel=1e-4)


@pytest.fixture
def no_reference_pass(monkeypatch):
    """Make every way to the reference model fail, so a run that needs one stops."""
    def refuse(*args, **kwargs):
        raise AssertionError("the reference model was run for a reference-free loss")
    monkeypatch.setattr(dpo_loop, "reference_logprobs", refuse)
    monkeypatch.setattr(dpo_loop.ReferenceLogprobs, "compute", refuse)


@pytest.mark.parametrize("loss", ["simpo", "orpo", "cpo"])
def test_reference_free_dpo_through_the_cli_runs_no_reference_pass(tiny_dir, pairs_file, tmp_path, loss,
                                                                   no_reference_pass):
    peft, transformers = pytest.importorskip("peft"), pytest.importorskip("transformers")
    out = tmp_path / "run"
    summary = run_cli("dpo", dpo_recipe(tmp_path), f"model.path={tiny_dir}", "model.quantize=none",
                      f"data.path={pairs_file}", f"output.dir={out}", f"dpo.loss={loss}", "data.val_size=8",
                      "train.max_steps=3", "train.micro_batch_size=4", "train.grad_accum_steps=1", "train.log_every=1",
                      "train.lr=5e-3", "lora.r=4", "train.optimizer=adamw")
    records = logged(out)
    assert len(records) == 3 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert summary["val_pairs"] == 8 and 0 <= summary["val_accuracy_after"] <= 1
    assert math.isfinite(summary["val_margin_after"])
    result = run_cli("eval-prefs", tiny_dir, "--adapter", out / "adapter", "--data", pairs_file, "--kind", "dpo",
                     "--loss", loss, "--quantize", "none", "--beta", 0.1)
    assert result["n"] == 40 and result["loss_type"] == loss and math.isfinite(result["loss"])
    # Independent: the rewards of transformers + PEFT log-probs (SimPO β ℓ, CPO β log π, ORPO λ ℓ; β = λ = 0.1 here).
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    policy = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    items, _ = tokenize_preferences(load_preferences(str(pairs_file))[0], load_tokenizer(tiny_dir), 512)
    margins = []
    for it in items:
        (c, r), (n_c, n_r) = ([hf_response_logprob(policy, it.prompt_ids.tolist(), y.tolist()) for y in it.response_ids],
                              [len(y) for y in it.response_ids])
        margins.append(0.1 * (c - r) if loss == "cpo" else 0.1 * (c / n_c - r / n_r))
    assert result["mean_margin"] == pytest.approx(sum(margins) / 40, abs=1e-4)
    assert result["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / 40)


def test_kto_through_the_cli_starts_at_one_half_and_learns(tiny_dir, tmp_path):
    # A fresh adapter is the reference: every r = 0 and z₀ = 0, so each completion's loss is 1 − σ(0) = 1/2.
    rng = random.Random(3)
    rows = []
    for i in range(48):
        words = " ".join(rng.choices(WORDS, k=5))
        good = i % 2 == 0
        rows.append({"prompt": f"Say: {words}", "completion": f"good {words}" if good else
                     "bad " + " ".join(rng.choices(WORDS, k=4)), "label": good})
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    summary = run_cli("dpo", dpo_recipe(tmp_path), f"model.path={tiny_dir}", "model.quantize=none", f"data.path={path}",
                      f"output.dir={out}", "dpo.loss=kto", "data.val_size=8", "train.max_steps=10",
                      "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.log_every=1", "train.lr=5e-3",
                      "lora.r=8", "train.optimizer=adamw", "dpo.kto_undesirable_weight=1.0")
    records = logged(out)
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-6) and records[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]
    assert (summary["records"], summary["val_records"]) == (40, 8) and summary["val_accuracy_after"] > 0.5
    assert json.loads((out / "summary.json").read_text())["steps"] == 10


def test_the_reference_guard_stops_a_dpo_run(tiny_dir, pairs_file, tmp_path, no_reference_pass):
    # the control for the test above: the sigmoid loss needs the reference, and the guard catches it
    result = CliRunner().invoke(CLI["dpo"], [str(dpo_recipe(tmp_path)), f"model.path={tiny_dir}",
                                             f"data.path={pairs_file}", f"output.dir={tmp_path / 'run'}",
                                             "train.max_steps=1", "train.micro_batch_size=4", "lora.r=4"])
    assert result.exit_code != 0 and "reference model was run" in repr(result.exception) + result.output


@pytest.mark.parametrize("overrides,key,message", [
    (["dpo.loss=hinge"], "dpo.loss", "sigmoid, ipo, robust, simpo, cpo, orpo"),
    (["dpo.loss=kto", "train.micro_batch_size=1"], "train.micro_batch_size", ">= 2 records"),
    (["dpo.loss=kto", "data.format=pairs"], "data.format", "unpaired"),
    (["data.format=kto"], "data.format", "need dpo.loss = \"kto\""),
    (["dpo.loss=kto", "dpo.precompute_reference=true"], "dpo.precompute_reference", "cannot be cached"),
    (["dpo.loss=kto", "dpo.kto_undesirable_weight=0"], "dpo.kto_undesirable_weight", "positive"),
    (["dpo.loss=simpo", "dpo.precompute_reference=true"], "dpo.precompute_reference", "no reference model"),
    (["dpo.loss=orpo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing", "orpo has no label smoothing"),
    (["dpo.loss=orpo", "dpo.orpo_lambda=0"], "dpo.orpo_lambda", "positive"),
    (["dpo.loss=cpo", "dpo.cpo_alpha=-1"], "dpo.cpo_alpha", ">= 0"),
    (["dpo.simpo_gamma=-0.5"], "dpo.simpo_gamma", ">= 0"),
])
def test_bad_dpo_loss_settings_are_recipe_errors_naming_the_key(tmp_path, overrides, key, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(dpo_recipe(tmp_path), ["data.path=prefs.jsonl", *overrides])
    assert key in str(e.value) and message in str(e.value)


# ----------------------------------------------------------------------------- shipped recipes

@pytest.mark.parametrize("name,schema", [("reward", RewardRecipe), ("dpo", DPORecipe)])
def test_shipped_recipes_load_and_point_at_the_shared_data(name, schema):
    path = ROOT / "recipes" / f"{name}.toml"
    recipe = load_recipe(path)
    assert isinstance(recipe, schema) and tomllib.loads(path.read_text())["kind"] == name
    assert recipe.model.path == "smollm2-135m" and recipe.lora.r == 16
    assert recipe.data.path.startswith("../shared/data/")


@SHARED_DATA
@pytest.mark.slow
def test_shipped_dpo_recipe_starts_at_ln2_on_smollm2(smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe's data path is relative to the repository root
    out = tmp_path / "run"
    run_cli("dpo", "recipes/dpo.toml", f"model.path={smollm2_dir}", "data.max_seq_len=48", "data.val_size=1",
            "train.max_steps=1", "train.micro_batch_size=1", "train.grad_accum_steps=1", "train.log_every=1",
            "model.gradient_checkpointing=false", f"output.dir={out}", "eval.every=0", "eval.max_batches=1")
    assert logged(out)[0]["loss"] == pytest.approx(LN2, abs=1e-7)


def test_resumed_run_with_cached_reference_reproduces_the_uninterrupted_one(tiny_dir, pairs_file, tmp_path):
    args = [dpo_recipe(tmp_path), f"model.path={tiny_dir}", "model.quantize=none", f"data.path={pairs_file}",
            "train.micro_batch_size=4", "train.grad_accum_steps=1", "train.schedule=constant", "train.warmup_ratio=0",
            "train.lr=5e-3", "train.optimizer=adamw", "train.log_every=1", "lora.r=4", "lora.dropout=0.1",
            "dpo.precompute_reference=true", f"data.cache_dir={tmp_path / 'cache'}"]
    run_cli("dpo", *args, "train.max_steps=4", f"output.dir={tmp_path / 'straight'}")
    run_cli("dpo", *args, "train.max_steps=2", f"output.dir={tmp_path / 'split'}")
    run_cli("dpo", *args, "train.max_steps=4", f"output.dir={tmp_path / 'split'}", "--resume")
    straight, split = ([v for r in logged(tmp_path / run) for v in (r["step"], r["loss"], r["margin"])]
                       for run in ("straight", "split"))
    assert len(straight) == 4 * 3 and straight == pytest.approx(split, rel=1e-5, abs=1e-7)
