"""IA3 (Liu et al. 2022) against a plain re-implementation of its formula and against PEFT on transformers.

    output scaling   y = (x Wᵀ + b) ⊙ l          input scaling (feed-forward)   y = (x ⊙ l) Wᵀ + b
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from peft_cli import cli_files, hf_model, logits, token_ids, two_steps_and_resume
from qtune.lora import adapter_parameters, adapters_disabled
from qtune.peft import load_adapter, merge_adapter_into_dir, save_adapter
from qtune.peft.ia3 import IA3Linear, add_ia3
from qtune.weights.checkpoint import load_model
from qtune.weights.nf4_linear import NF4Linear
from test_lora import randomise
from tiny import save_tiny

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TOL = 1e-4
TARGETS, FEEDFORWARD = ["k_proj", "v_proj", "down_proj"], ["down_proj"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ia3")
    return {kind: save_tiny(kind, root / kind) for kind in ("llama", "qwen2")}  # qwen2: k / v biases


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("feedforward", [False, True])
def test_output_and_gradients_match_the_formula(nf4, feedforward):
    g = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(72, 40)
    layer = IA3Linear(NF4Linear.from_linear(dense) if nf4 else dense)
    w = layer.merged_weight(None)  # W as the layer holds it (dequantized NF4)
    vec = 1 + 0.3 * torch.randn(72 if feedforward else 40, generator=g)
    layer.add_adapter("d", vec, feedforward)
    layer.active = "d"
    lvec = vec.clone().requires_grad_()
    x = torch.randn(5, 72, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    want = (x_ref * lvec) @ w.T + dense.bias.detach() if feedforward else (x_ref @ w.T + dense.bias.detach()) * lvec
    assert (y - want).abs().max() <= 1e-5
    up = torch.randn(y.shape, generator=g)
    (y * up).sum().backward()
    (want * up).sum().backward()
    assert (x.grad - x_ref.grad).abs().max() <= 1e-5
    assert (layer.ia3_l["d"].grad - lvec.grad).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_saved_ia3_loads_in_peft_with_equal_logits_and_gradients(tiny_dirs, tmp_path, kind):
    m = load_model(tiny_dirs[kind], quantize="none")
    fresh = logits(m, token_ids())
    add_ia3(m, TARGETS, FEEDFORWARD)
    assert torch.equal(logits(m, token_ids()), fresh)  # vectors of ones change nothing
    randomise(m, std=0.3)
    out = save_adapter(m, tmp_path / "ia3")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, m.config.intermediate_size)
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (32, 1)  # 2 kv heads x 16
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dirs[kind]), out, is_trainable=True)
    x = token_ids(1)
    for p in adapter_parameters(m, "default"):
        p.requires_grad_(True)
    got, want = m(x), ref(x).logits
    assert (got - want).abs().max() <= TOL
    with adapters_disabled(m):
        assert (logits(m, x) - want).abs().max() > 1e-2
    got.square().mean().backward()
    want.square().mean().backward()
    theirs = {n.replace(".ia3_l.default", ".ia3_l"): p for n, p in ref.named_parameters() if p.requires_grad}
    for name, layer in ((n, mod) for n, mod in m.named_modules() if isinstance(mod, IA3Linear)):
        ref_grad = theirs[f"base_model.model.{name}.ia3_l"].grad.reshape(-1)
        assert (layer.ia3_l["default"].grad - ref_grad).abs().max() <= 1e-5, name


def test_peft_ia3_loads_in_qtune_with_equal_logits(tiny_dirs, tmp_path):
    ref = peft.get_peft_model(hf_model(tiny_dirs["qwen2"]), peft.IA3Config(
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], feedforward_modules=["up_proj", "down_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "ia3_l" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    ref.save_pretrained(tmp_path / "peft")
    m = load_model(tiny_dirs["qwen2"], quantize="none")
    settings = load_adapter(m, tmp_path / "peft")
    assert sorted(settings["feedforward_modules"]) == ["down_proj", "up_proj"]
    assert (logits(m, token_ids(2)) - logits(ref.eval(), token_ids(2))).abs().max() <= TOL


def test_bad_ia3_adapter_names_the_file(tiny_dirs, tmp_path):
    m = load_model(tiny_dirs["llama"], quantize="none")
    add_ia3(m, TARGETS, FEEDFORWARD)
    good = save_adapter(m, tmp_path / "good")
    config = json.loads((good / "adapter_config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({**config, "feedforward_modules": []}))
    (bad / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"bad.*down_proj.ia3_l has shape \[1, 88\], this layer needs \[64, 1\]"):
        load_adapter(load_model(tiny_dirs["llama"], quantize="none"), bad)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_merge_folds_ia3(tiny_dirs, tmp_path, quantize):
    m = load_model(tiny_dirs["qwen2"], quantize=quantize, dtype="float32")
    add_ia3(m, TARGETS, FEEDFORWARD)
    randomise(m, std=0.3)
    save_adapter(m, tmp_path / "adapter")
    merged = merge_adapter_into_dir(tiny_dirs["qwen2"], tmp_path / "adapter", tmp_path / "merged", dtype="float32",
                                    from_original=quantize == "none")
    assert (logits(hf_model(merged), token_ids(3)) - logits(m, token_ids(3))).abs().max() <= TOL


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    return cli_files(tmp_path_factory.mktemp("ia3_cli"))


@pytest.mark.parametrize("verb", ["sft", "dpo", "reward"])
@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_cli_trains_and_resumes(cli_setup, tmp_path, verb, quantize):
    tiny, data = cli_setup
    tensors = two_steps_and_resume(verb, tiny, tmp_path / "run", data, quantize, "peft.method=ia3")
    assert len(tensors) == 2 * 3 and all(k.endswith(".ia3_l") for k in tensors)
    assert any(not torch.equal(t, torch.ones_like(t)) for t in tensors.values())  # it trained


def test_accounting_counts_the_trainable_parameters_exactly(tiny_dirs):
    from qtune.memory.accounting import lora_param_count
    from qtune.memory.estimate import StepShape, estimate
    from qtune.peft import attach
    from qtune.recipe.peft import PeftSection
    from qtune.recipe.sections import TrainRecipe

    m = load_model(tiny_dirs["llama"], quantize="nf4")
    recipe = TrainRecipe(peft=PeftSection(method="ia3"))
    attach(m, recipe, "default", seed=0)
    counted = sum(p.numel() for p in adapter_parameters(m, "default"))
    assert counted == 2 * (32 + 32 + 88)  # layers x (k, v outputs + down_proj's input)
    assert counted == lora_param_count(m.config, 16, "all-linear", "ia3", recipe.peft)
    ia3 = estimate(StepShape(m.config, 1, 128, "float32", method="ia3", peft=recipe.peft))
    assert ia3.parts["adapter_weights"] == 4 * counted


def test_generate_and_eval_use_the_adapter(cli_setup, tmp_path):
    from peft_cli import serve_with_adapter

    tiny, data = cli_setup
    two_steps_and_resume("sft", tiny, tmp_path / "run", data, "nf4", "peft.method=ia3", "train.lr=1e-2")
    with_adapter, without = serve_with_adapter(tiny, tmp_path / "run" / "adapter", "nf4", tmp_path)
    assert with_adapter != without
