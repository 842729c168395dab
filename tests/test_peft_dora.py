"""DoRA (Liu et al. 2024) against a plain re-implementation of its formula and against PEFT on transformers.

    y = m / ||W + s B A||_row ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b,  the norm a constant in backward (the paper's 4.3)
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from peft_cli import cli_files, hf_model, logits, token_ids, two_steps_and_resume
from qtune.lora import LoraConfig, LoRALinear, adapter_parameters, adapters_disabled, add_lora, merged_state_dict
from qtune.peft import load_adapter, merge_adapter_into_dir, save_adapter
from qtune.weights.checkpoint import load_model
from qtune.weights.nf4_linear import NF4Linear
from test_lora import randomise
from tiny import save_tiny

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("dora") / "llama")


def reference_dora(x, w, bias, a, b, m, s):
    """The paper's formula in plain torch: the magnitude times the row-normalised direction (norm detached)."""
    v = w + s * (b @ a)
    y = x @ (v / v.norm(dim=1, keepdim=True).detach()).T * m
    return y + bias if bias is not None else y


@pytest.mark.parametrize("nf4", [False, True])
def test_output_and_gradients_match_the_formula(nf4):
    g = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(72, 40)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(40, 72, generator=g) * 0.1)
    layer = LoRALinear(NF4Linear.from_linear(dense, double_quant=True) if nf4 else dense)
    cfg = LoraConfig(r=3, alpha=6, use_dora=True)
    layer.add_adapter("d", cfg, torch.randn(3, 72, generator=g) * 0.1, torch.randn(40, 3, generator=g) * 0.1)
    layer.active = "d"
    w = layer.dense_weight()  # the dequantized NF4 weight on a 4-bit base
    a, b, m = (p.detach().clone().requires_grad_() for p in adapter_parameters_of(layer))
    assert torch.allclose(m, (w + 2.0 * b @ a).norm(dim=1))  # the magnitude starts at ||W + s B A||_row
    with torch.no_grad():
        layer.lora_magnitude_vector["d"].mul_(1 + 0.1 * torch.randn(40, generator=g))
        m.copy_(layer.lora_magnitude_vector["d"])
    x = torch.randn(5, 72, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    layer.train()
    y = layer(x)
    want = reference_dora(x_ref, w, dense.bias.detach(), a, b, m, 2.0)
    assert (y - want).abs().max() <= 1e-5
    up = torch.randn(y.shape, generator=g)
    (y * up).sum().backward()
    (want * up).sum().backward()
    for got, ref in zip((x, *adapter_parameters_of(layer)), (x_ref, a, b, m)):
        assert (got.grad - ref.grad).abs().max() <= 1e-5


def adapter_parameters_of(layer):
    return layer.lora_A["d"].weight, layer.lora_B["d"].weight, layer.lora_magnitude_vector["d"]


def test_saved_dora_loads_in_peft_with_equal_logits_and_gradients(tiny_dir, tmp_path):
    m = load_model(tiny_dir, quantize="none")
    fresh = logits(m, token_ids())
    add_lora(m, LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), use_dora=True), seed=2)
    assert (logits(m, token_ids()) - fresh).abs().max() <= 1e-5  # a fresh DoRA adapter leaves the output unchanged
    randomise(m)
    out = save_adapter(m, tmp_path / "dora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector"].shape == (64,)
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dir), out, is_trainable=True)
    ref.eval()
    x = token_ids(1)
    got, want = m(x), ref(x).logits
    assert (got - want).abs().max() <= TOL
    with adapters_disabled(m):
        assert (logits(m, x) - want).abs().max() > 1e-2  # the adapter matters
    # Gradients of every DoRA tensor equal PEFT's
    for p in adapter_parameters(m, "default"):
        p.requires_grad_(True)
    got.square().mean().backward()
    want.square().mean().backward()
    theirs = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    for name, layer in ((n, mod) for n, mod in m.named_modules() if isinstance(mod, LoRALinear)):
        prefix = f"base_model.model.{name}"
        pairs = ((layer.lora_A["default"].weight, f"{prefix}.lora_A.default.weight"),
                 (layer.lora_B["default"].weight, f"{prefix}.lora_B.default.weight"),
                 (layer.lora_magnitude_vector["default"], f"{prefix}.lora_magnitude_vector.default.weight"))
        for mine, key in pairs:
            assert (mine.grad - theirs[key].grad).abs().max() <= 1e-5, key


def test_peft_dora_loads_in_qtune_with_equal_logits(tiny_dir, tmp_path):
    torch.manual_seed(0)
    ref = peft.get_peft_model(hf_model(tiny_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                   use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.2)
    ref.save_pretrained(tmp_path / "peft")
    m = load_model(tiny_dir, quantize="none")
    cfg = load_adapter(m, tmp_path / "peft")
    assert cfg.use_dora
    assert (logits(m, token_ids(2)) - logits(ref.eval(), token_ids(2))).abs().max() <= TOL


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_merge_folds_dora(tiny_dir, tmp_path, quantize):
    m = load_model(tiny_dir, quantize=quantize, dtype="float32")
    add_lora(m, LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True), seed=1)
    randomise(m)
    save_adapter(m, tmp_path / "adapter")
    merged = merge_adapter_into_dir(tiny_dir, tmp_path / "adapter", tmp_path / "merged", dtype="float32",
                                    from_original=quantize == "none")
    assert (logits(hf_model(merged), token_ids(3)) - logits(m, token_ids(3))).abs().max() <= TOL
    folded = merged_state_dict(m, dtype=torch.float32)["model.layers.1.self_attn.k_proj.weight"]
    assert torch.allclose(folded.norm(dim=1), m.model.layers[1].self_attn.k_proj.lora_magnitude_vector["default"],
                          atol=1e-5)  # each merged row has the trained magnitude


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    return cli_files(tmp_path_factory.mktemp("dora_cli"))


@pytest.mark.parametrize("verb", ["sft", "dpo", "reward"])
@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_cli_trains_and_resumes(cli_setup, tmp_path, verb, quantize):
    tiny, data = cli_setup
    tensors = two_steps_and_resume(verb, tiny, tmp_path / "run", data, quantize, "peft.method=dora", "lora.r=4")
    mags = [k for k in tensors if k.endswith("lora_magnitude_vector")]
    assert mags and len(mags) * 3 == len(tensors)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_accounting_counts_the_trainable_parameters_exactly(tiny_dir, method):
    from qtune.memory.accounting import lora_param_count, lora_state_nbytes
    from qtune.peft import attach
    from qtune.recipe.peft import PeftSection
    from qtune.recipe.sections import LoRASection, TrainRecipe

    m = load_model(tiny_dir, quantize="nf4")
    recipe = TrainRecipe(peft=PeftSection(method=method), lora=LoRASection(r=4, target_modules=["q_proj", "down_proj"]))
    attach(m, recipe, "default", seed=0)
    counted = sum(p.numel() for p in adapter_parameters(m, "default"))
    assert counted == lora_param_count(m.config, 4, ("q_proj", "down_proj"), method, recipe.peft)
    assert lora_state_nbytes(m.config, 4, ("q_proj", "down_proj"), "adamw", method, recipe.peft)["adapter_weights"] \
        == 4 * counted


def test_generate_and_eval_use_the_adapter(cli_setup, tmp_path):
    from peft_cli import serve_with_adapter

    tiny, data = cli_setup
    two_steps_and_resume("sft", tiny, tmp_path / "run", data, "nf4", "peft.method=dora", "lora.r=4", "train.lr=1e-2")
    with_adapter, without = serve_with_adapter(tiny, tmp_path / "run" / "adapter", "nf4", tmp_path)
    assert with_adapter != without


def test_gguf_lora_refuses_dora(tiny_dir, tmp_path):
    from qtune.lora.gguf_adapter import export_gguf_adapter
    from qtune.weights.gguf_export import ExportError

    m = load_model(tiny_dir, quantize="none")
    add_lora(m, LoraConfig(r=4, target_modules=("q_proj",), use_dora=True))
    with pytest.raises(ExportError, match="DoRA adapter's magnitudes have no GGUF LoRA form"):
        export_gguf_adapter(tiny_dir, save_adapter(m, tmp_path / "adapter"), tmp_path / "lora.gguf")
