"""Prompt tuning, P-tuning and prefix tuning through the real CLI on the tiny Llama: `qtune sft`, `qtune dpo`
and `qtune reward` two steps each on the NF4 and on the 16-bit base, the saved adapter usable by `qtune
generate`, a resumed run ending where the uninterrupted one does, and `qtune estimate` counting what trains."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from regression.cases import CASES, run_case, two_step_case
from safetensors.torch import load_file
from shared_data import SHARED_DATA
from tiny import save_tiny_with_tokenizer
from virtual_tokens import qtune_with

from qtune.cli import main
from qtune.lora import adapter_parameters
from qtune.recipe.load import load_recipe
from qtune.train.sft import run_sft

METHODS = {"prompt": ("peft.method=prompt", "peft.prompt.num_virtual_tokens=4"),
           "p_tuning": ("peft.method=p_tuning", "peft.p_tuning.num_virtual_tokens=4", "peft.p_tuning.encoder=lstm",
                        "peft.p_tuning.encoder_hidden_size=16"),
           "prefix": ("peft.method=prefix", "peft.prefix.num_virtual_tokens=4", "peft.prefix.encoder_hidden_size=16")}
# Each method meets both bases: the verbs alternate NF4 and 16-bit (model.quantize) from one method to the next.
QUANTIZE = {("prompt", "sft"): "nf4", ("prompt", "dpo"): "none", ("prompt", "reward"): "nf4",
            ("p_tuning", "sft"): "none", ("p_tuning", "dpo"): "nf4", ("p_tuning", "reward"): "none",
            ("prefix", "sft"): "nf4", ("prefix", "dpo"): "none", ("prefix", "reward"): "nf4"}


def two_steps(verb: str, method: str):
    """The verb's two-step case on the tiny Llama, training `method` on the base QUANTIZE names."""
    if verb == "sft":
        case = dataclasses.replace(CASES["sft-qwen3"], kind="llama")
    else:
        case = two_step_case(verb, "llama")
    extra = (*METHODS[method], f"model.quantize={QUANTIZE[method, verb]}")
    return dataclasses.replace(case, name=f"{verb}-{method}", overrides=(*case.overrides, *extra))


@SHARED_DATA
@pytest.mark.parametrize("verb", ["sft", "dpo", "reward"])
@pytest.mark.parametrize("method", list(METHODS))
def test_two_steps_through_the_cli(tmp_path, verb, method):
    got = run_case(two_steps(verb, method), tmp_path)
    assert len(got["loss"]) == 2 and all(math.isfinite(x) for x in got["loss"] + got["grad_norm"])
    assert all(g > 0 for g in got["grad_norm"])
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == {"prompt": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix": "PREFIX_TUNING"}[method]
    assert set(load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")) == {"prompt_embeddings"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny_virtual"), seed=1)


def sft_overrides(tiny_dir, out, method, **extra) -> list[str]:
    settings = {"model.path": tiny_dir, "output.dir": out, "data.cache_dir": "", "data.max_seq_len": 64,
                "data.path": "qtune:checkable-tasks?count=48&seed=0", "data.val_size": 8, "eval.exact_match": 0,
                "train.max_steps": 4, "train.save_every": 2, "train.log_every": 1, "train.lr": 1e-2}
    settings.update({k.replace("__", "."): v for k, v in extra.items()})
    return [*(f"{k}={v}" for k, v in settings.items()), *METHODS[method]]


@pytest.mark.parametrize("method", ["p_tuning", "prefix"])
def test_resumed_run_ends_where_the_whole_run_does(tiny_dir, tmp_path, method):
    """The checkpoints hold the encoders (LSTM, projection MLP) the saved adapter folds away; a run resumed from
    step 2 writes the same adapter as the uninterrupted run."""
    torch.set_num_threads(1)
    run_sft(load_recipe("quickstart", sft_overrides(tiny_dir, tmp_path / "full", method)))
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "adapter")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000004")
    run_sft(load_recipe("quickstart", sft_overrides(tiny_dir, tmp_path / "cut", method)), resume=True)
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert torch.equal(a["prompt_embeddings"], b["prompt_embeddings"])
    steps = load_file(tmp_path / "full" / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert len(steps) > 1  # the encoder's tensors, not the folded table


def test_generate_and_eval_take_the_adapter(tiny_dir, tmp_path):
    m = qtune_with("prefix", tiny_dir)
    from qtune.peft import save_adapter

    save_adapter(m, tmp_path / "a", base_model_name_or_path=str(tiny_dir))
    result = CliRunner().invoke(main, ["generate", str(tiny_dir), "--adapter", str(tmp_path / "a"), "--prompt", "Hi",
                                       "--max-new-tokens", "3", "--greedy", "--quantize", "none"])
    assert result.exit_code == 0, result.output
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi there"},
                                {"instruction": "Count", "input": "1 2", "output": "3 4 5"}]))
    losses = []
    for adapter in (["--adapter", str(tmp_path / "a")], []):
        ran = CliRunner().invoke(main, ["eval", str(tiny_dir), *adapter, "--data", str(data), "--quantize", "none"])
        assert ran.exit_code == 0, ran.output
        losses.append(json.loads(ran.output.strip().splitlines()[-1])["loss"])
    assert abs(losses[0] - losses[1]) > 1e-3  # the prefix took part
    merged = CliRunner().invoke(main, ["merge", str(tiny_dir), str(tmp_path / "a"), str(tmp_path / "m")])
    assert merged.exit_code == 1 and "Error:" in merged.output and "--adapter" in merged.output


@pytest.mark.parametrize("method,section", [("prompt", {}), ("p_tuning", {"encoder": "lstm"}),
                                            ("p_tuning", {"encoder": "mlp"}), ("prefix", {"projection": True}),
                                            ("prefix", {"projection": False})])
def test_estimate_counts_the_trainable_parameters_exactly(tiny_dir, tmp_path, method, section):
    settings = [f"peft.{method}.{k}={str(v).lower()}" for k, v in section.items()]
    args = [a for a in sft_overrides(tiny_dir, tmp_path / "out", method) if not a.startswith("peft.p_tuning.encoder=")]
    result = CliRunner().invoke(main, ["estimate", "quickstart", *args, *settings, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output.strip().splitlines()[-1])
    m = qtune_with(method, tiny_dir, num_virtual_tokens=4, **section)
    assert got["trainable_params"] == sum(p.numel() for p in adapter_parameters(m, "default"))
    assert got["adapter_weights"] == 4 * got["trainable_params"]
    longer = CliRunner().invoke(main, ["estimate", "quickstart", *args, *settings,
                                       f"peft.{method}.num_virtual_tokens=40", "--device", "cpu"])
    # 36 more virtual positions: more saved activations (prefix: each layer's longer keys and values)
    assert json.loads(longer.output.strip().splitlines()[-1])["checkpoints"] > got["checkpoints"]


def test_virtual_tokens_count_against_the_models_positions(tiny_dir, tmp_path):
    """512 tokens fill the tiny model's 512 positions; 4 virtual tokens in front would pass them."""
    args = sft_overrides(tiny_dir, tmp_path / "out", "prompt", data__max_seq_len=512)
    result = CliRunner().invoke(main, ["sft", "quickstart", *args])
    assert result.exit_code == 1
    assert "data.max_seq_len + peft.prompt.num_virtual_tokens = 516" in result.output.replace("\n", "")
