"""Bottleneck adapters against a plain re-implementation of Houlsby's (serial) and He et al.'s (parallel) formulas
on transformers' model of the same tiny weights (forward hooks on its attention and MLP blocks): outputs and
gradients; the base at the start; the file format round trip; merge refused; sft / dpo / reward and resume
through the CLI."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tiny import save_tiny, save_tiny_with_tokenizer

from qtune.cli import main
from qtune.lora import AdapterError, adapter_parameters, adapters_disabled
from qtune.peft import load_adapter, merge_adapter_into_dir, save_adapter
from qtune.peft.bottleneck import add_bottleneck
from qtune.weights.checkpoint import load_model

sys.path.insert(0, str(Path(__file__).parent))
from test_dpo import pairs_file  # noqa: E402,F401  (the fixture)
from test_peft_adalora import check_serving, invoke, logged, one_thread  # noqa: E402,F401  (one_thread: a fixture)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny_bottleneck"))


def settings(**extra):
    return {"size": 6, "placement": "serial", "after": "both", "activation": "gelu", "scale": 0.7, **extra}


def ids():
    return torch.randint(3, 160, (2, 9), generator=torch.Generator().manual_seed(3))


def with_adapter(tiny_dir, quantize="none", **extra):
    model = load_model(tiny_dir, quantize=quantize)
    add_bottleneck(model, settings(**extra))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in adapter_parameters(model, "default"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)  # up != 0: the adapter does something
            p.requires_grad_(True)
    return model


def reference_logits(tiny_dir, model, s):
    """transformers' Llama with each adapter written out by hand as a hook on its attention / MLP block."""
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[s["activation"]]
    copies = {}
    for i, (ours, theirs) in enumerate(zip(model.model.layers, ref.model.layers)):
        blocks = ours.adapter.adapters["default"]

        def bottleneck(x, where, blocks=blocks, i=i):
            w = {k: copies.setdefault(f"{i}.{where}.{k}", p.detach().clone().requires_grad_(True))
                 for k, p in blocks[where].named_parameters()}
            return (act(x @ w["down.weight"].T + w["down.bias"])) @ w["up.weight"].T + w["up.bias"]

        def attention_hook(module, args, kwargs, output, bottleneck=bottleneck):
            source = output[0] if s["placement"] == "serial" else kwargs["hidden_states"]
            return (output[0] + s["scale"] * bottleneck(source, "attention"), *output[1:])

        def mlp_hook(module, args, output, bottleneck=bottleneck):
            source = output if s["placement"] == "serial" else args[0]
            return output + s["scale"] * bottleneck(source, "feed_forward")

        if "attention" in blocks:
            theirs.self_attn.register_forward_hook(attention_hook, with_kwargs=True)
        if "feed_forward" in blocks:
            theirs.mlp.register_forward_hook(mlp_hook)
    return ref(input_ids=ids()).logits, copies


@pytest.mark.parametrize("extra", [{}, {"placement": "parallel"}, {"after": "attention", "activation": "relu"},
                                   {"after": "feed_forward", "activation": "silu", "placement": "parallel"}])
def test_outputs_and_gradients_match_the_formula_on_transformers(tiny_dir, extra):
    model = with_adapter(tiny_dir, **extra)
    ours = model(ids())
    theirs, copies = reference_logits(tiny_dir, model, settings(**extra))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for i, layer in enumerate(model.model.layers):
        for key, p in layer.adapter.adapters["default"].named_parameters():
            torch.testing.assert_close(p.grad, copies[f"{i}.{key}"].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_a_fresh_adapter_is_the_base_and_switching_off_gives_the_base(tiny_dir, quantize):
    base = load_model(tiny_dir, quantize=quantize)(ids())
    model = load_model(tiny_dir, quantize=quantize)
    add_bottleneck(model, settings(placement="parallel"))
    assert torch.equal(model(ids()), base)
    trained = with_adapter(tiny_dir, quantize=quantize)
    assert not torch.allclose(trained(ids()), base)
    with adapters_disabled(trained):
        assert torch.equal(trained(ids()), base)


def test_trainable_parameters_are_exactly_the_bottlenecks(tiny_dir):
    model = with_adapter(tiny_dir)
    D, m, layers = 64, 6, 2
    assert sum(p.numel() for p in adapter_parameters(model, "default")) == layers * 2 * (2 * D * m + m + D)


def test_files_round_trip_and_are_named_after_the_modules(tiny_dir, tmp_path):
    model = with_adapter(tiny_dir, placement="parallel", after="feed_forward")
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config == {"peft_type": "QTUNE_BOTTLENECK", "task_type": "CAUSAL_LM", "hidden_size": 64, "size": 6,
                      "placement": "parallel", "after": "feed_forward", "activation": "gelu", "scale": 0.7,
                      "layers": [0, 1], "base_model_name_or_path": None}
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(f"model.layers.{i}.adapter.feed_forward.{p}.{k}" for i in (0, 1)
                                     for p in ("down", "up") for k in ("weight", "bias"))
    assert torch.equal(tensors["model.layers.1.adapter.feed_forward.up.weight"],
                       model.model.layers[1].adapter.adapters["default"]["feed_forward"].up.weight)
    again = load_model(tiny_dir, quantize="none")
    load_adapter(again, tmp_path / "a")
    assert torch.equal(again(ids()), model(ids()))


def test_bad_files_and_merge_are_refused_naming_the_file(tiny_dir, tmp_path):
    model = with_adapter(tiny_dir)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(AdapterError, match="cannot be merged.*--adapter"):
        merge_adapter_into_dir(tiny_dir, tmp_path / "a", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "a", bad)
    (bad / "qtune-manifest.json").unlink()
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["model.layers.0.adapter.attention.up.bias"] = torch.zeros(3)
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors.*up.bias has shape \[3\]"):
        load_adapter(load_model(tiny_dir, quantize="none"), bad)


# ----------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny_bottleneck_chat"), seed=1)


ADAPTER = ["peft.method=adapter", "peft.adapter.size=8", "train.log_every=1"]


@pytest.mark.parametrize("quantize,placement", [("nf4", "serial"), ("none", "parallel")])
def test_sft_through_the_cli_and_resume(chat_dir, tmp_path, quantize, placement):
    out = tmp_path / "run"
    args = ["sft", "quickstart", f"model.path={chat_dir}", f"output.dir={out}", "data.cache_dir=",
            "data.max_seq_len=64", "data.path=qtune:checkable-tasks?count=24&seed=0", "data.val_size=4",
            "eval.exact_match=0", "train.max_steps=4", "train.save_every=2", f"model.quantize={quantize}",
            f"peft.adapter.placement={placement}", *ADAPTER]
    summary = invoke(*args)
    assert summary["after"] < summary["before"]
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    metrics = logged(out)
    for leftover in ("checkpoints/step-000004", "adapter", "summary.json"):
        shutil.rmtree(out / leftover) if (out / leftover).is_dir() else (out / leftover).unlink()
    invoke(*args, "--resume")
    again = load_file(out / "adapter" / "adapter_model.safetensors")
    assert logged(out) == metrics and all(torch.equal(again[k], tensors[k]) for k in tensors)
    check_serving(chat_dir, out / "adapter", quantize, tmp_path)
    result = CliRunner().invoke(main, ["merge", str(chat_dir), str(out / "adapter"), str(tmp_path / "merged")])
    assert result.exit_code == 1 and "Error:" in result.output and "--adapter" in result.output


def test_dpo_and_reward_through_the_cli(chat_dir, pairs_file, tmp_path):  # noqa: F811
    for kind in ("dpo", "reward"):
        recipe = tmp_path / f"{kind}.toml"
        recipe.write_text(f'kind = "{kind}"\n')
        invoke(kind, recipe, f"model.path={chat_dir}", f"output.dir={tmp_path / kind}", f"data.path={pairs_file}",
               "data.val_size=4", "data.max_seq_len=64", "train.max_steps=2", "train.save_every=0",
               "train.micro_batch_size=4", *ADAPTER)
        config = json.loads((tmp_path / kind / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "QTUNE_BOTTLENECK"
    first = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()][0]
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # up = 0: the policy is its reference


@pytest.mark.parametrize("after", ["both", "attention"])
def test_estimate_counts_the_trainable_parameters_exactly(tiny_dir, after):
    from test_peft_adalora import estimated_adapter

    attached, counted, parts = estimated_adapter(tiny_dir, "peft.method=adapter", "peft.adapter.size=5",
                                                 f"peft.adapter.after={after}")
    assert attached == counted and parts["adapter_weights"] == 4 * attached
