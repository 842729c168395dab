"""PiSSA and LoftQ initialisation against PEFT's PiSSA, a plain LoftQ loop on bitsandbytes' NF4, the promised smaller
initial error than plain QLoRA's, and the saved adapter (PEFT's rank-2r conversion) used with the right base."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peft_cli import cli_files, hf_model, logits, token_ids, two_steps_and_resume
from qtune.cli import main
from qtune.lora import LoraConfig, adapter_parameters, adapters_disabled, add_lora, lora_layers
from qtune.lora.init import initialise
from qtune.peft import load_adapter, merge_adapter_into_dir, save_adapter
from qtune.weights.checkpoint import load_model
from tiny import save_tiny

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb_f = pytest.importorskip("bitsandbytes.functional")
TOL = 1e-4
TARGETS = ("q_proj", "v_proj", "down_proj")


def plant_outliers(model_dir, seed=0):
    """Give every decoder linear a strong rank-2 part on top of its noise, as trained LLM weights have (a few
    large singular values): the structure PiSSA takes out of the quantized residual."""
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(model_dir / "model.safetensors")
    for key, w in tensors.items():
        if key.startswith("model.layers.") and key.endswith("_proj.weight"):
            u, v = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w.shape[1], generator=g)
            tensors[key] = w + 0.05 * (u @ v)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    return model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return plant_outliers(save_tiny("llama", tmp_path_factory.mktemp("init") / "llama"))


def initialised(tiny_dir, quantize, init, loftq_iter=1, r=4, use_dora=False):
    m = load_model(tiny_dir, quantize=quantize, dtype="float32")
    names = add_lora(m, LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS, init=init, use_dora=use_dora), seed=0)
    errors = initialise(m, {n: m.get_submodule(n) for n in names}, "default", init, loftq_iter)
    return m, errors


def train_a_little(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, "default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def test_pissa_equals_peft_pissa(tiny_dir):
    m, _ = initialised(tiny_dir, "none", "pissa")
    ref = peft.get_peft_model(hf_model(tiny_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS),
                                                                   init_lora_weights="pissa"))
    theirs = dict(ref.named_parameters())
    for name, layer in lora_layers(m).items():
        prefix = f"base_model.model.{name}"
        assert torch.allclose(layer.lora_A["default"].weight, theirs[f"{prefix}.lora_A.default.weight"], atol=1e-6)
        assert torch.allclose(layer.lora_B["default"].weight, theirs[f"{prefix}.lora_B.default.weight"], atol=1e-6)
        assert torch.allclose(layer.base_layer.weight, theirs[f"{prefix}.base_layer.weight"], atol=1e-6)
    assert (logits(m, token_ids()) - logits(hf_model(tiny_dir), token_ids())).abs().max() <= TOL  # W itself at the start


@pytest.mark.parametrize("loftq_iter", [1, 3])
def test_loftq_equals_a_plain_loop_on_bitsandbytes_nf4(tiny_dir, loftq_iter):
    m, _ = initialised(tiny_dir, "nf4", "loftq", loftq_iter)
    w = load_file(tiny_dir / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    s = 2.0
    nf4 = lambda t: bnb_f.dequantize_4bit(*bnb_f.quantize_4bit(t, quant_type="nf4", compress_statistics=True),  # noqa: E731
                                         quant_type="nf4")
    a, b = torch.zeros(4, w.shape[1]), torch.zeros(w.shape[0], 4)
    for _ in range(loftq_iter):
        q = nf4(w - s * b @ a)
        u, sv, vh = torch.linalg.svd(w - q, full_matrices=False)
        b, a = u[:, :4] * (sv[:4] / s).sqrt(), (sv[:4] / s).sqrt()[:, None] * vh[:4]
    layer = m.model.layers[1].mlp.down_proj
    assert torch.equal(layer.base_layer.dequantize(torch.float32), q)
    assert (s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight - s * b @ a).abs().max() <= 1e-5


@pytest.mark.parametrize("init,loftq_iter", [("pissa", 1), ("loftq", 1), ("loftq", 4)])
def test_initial_error_is_below_plain_qlora(tiny_dir, init, loftq_iter):
    m, errors = initialised(tiny_dir, "nf4", init, loftq_iter)
    original = load_file(tiny_dir / "model.safetensors")
    init_sq, qlora_sq = 0.0, 0.0
    for name, layer in lora_layers(m).items():  # recomputed here from bitsandbytes' NF4 and the layers' tensors
        w = original[f"{name}.weight"]
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        init_sq += float((w - layer.base_layer.dequantize(torch.float32) - 2.0 * b @ a).square().sum())
        packed, state = bnb_f.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        qlora_sq += float((w - bnb_f.dequantize_4bit(packed, state, quant_type="nf4")).square().sum())
    assert errors["init_error"] == pytest.approx(init_sq ** 0.5, rel=1e-4)
    assert errors["qlora_error"] == pytest.approx(qlora_sq ** 0.5, rel=1e-4)
    assert errors["init_error"] < 0.9 * errors["qlora_error"]


@pytest.mark.parametrize("quantize,init", [("none", "pissa"), ("nf4", "pissa"), ("nf4", "loftq")])
def test_saved_adapter_reloads_the_trained_model_and_loads_in_peft(tiny_dir, tmp_path, quantize, init):
    m, _ = initialised(tiny_dir, quantize, init, loftq_iter=2)
    train_a_little(m)
    out = save_adapter(m, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["qtune_residual_rank"]) == (8, 16, 4)
    assert config["init_lora_weights"] is True  # PEFT's converted form: a LoRA on the original weights
    x, trained = token_ids(1), logits(m, token_ids(1))
    again = load_model(tiny_dir, quantize=quantize, dtype="float32")
    load_adapter(again, out)
    assert (logits(again, x) - trained).abs().max() <= 1e-5  # qtune rebuilds the residual base it trained on
    with adapters_disabled(m):
        off = logits(m, x)
    with adapters_disabled(again):
        assert (logits(again, x) - off).abs().max() <= 1e-5
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dir), out).eval()
    if quantize == "none":
        assert (logits(ref, x) - trained).abs().max() <= TOL
        return
    # On the 16-bit weights PEFT runs R + s B A instead of NF4(R) + s B A: for PiSSA a gap no larger than plain
    # QLoRA's (NF4(W) against W), as NF4(R) is the closer of the two; LoftQ's B A also holds the correction of
    # NF4(R)'s error, which the 16-bit weights do not need, so its gap may reach twice that.
    qlora_gap = (logits(hf_model(tiny_dir), x) - logits(load_model(tiny_dir, quantize="nf4", dtype="float32"), x)).abs().max()
    assert (logits(ref, x) - trained).abs().max() <= qlora_gap * (1 if init == "pissa" else 2)
    # What the saving option without qtune's keys costs: the rank-2r LoRA on NF4(W) is not the trained model.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if not k.startswith("qtune_")}))
    (plain / "adapter_model.safetensors").write_bytes((out / "adapter_model.safetensors").read_bytes())
    as_plain_lora = load_model(tiny_dir, quantize=quantize, dtype="float32")
    load_adapter(as_plain_lora, plain)
    assert (logits(as_plain_lora, x) - trained).abs().max() > 1e-3


def test_pissa_adapter_off_is_the_original_model(tiny_dir):
    m, _ = initialised(tiny_dir, "none", "pissa")
    train_a_little(m)
    with adapters_disabled(m):
        assert (logits(m, token_ids(2)) - logits(hf_model(tiny_dir), token_ids(2))).abs().max() <= TOL


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_merge_gives_the_trained_model(tiny_dir, tmp_path, quantize):
    m, _ = initialised(tiny_dir, quantize, "pissa", use_dora=True)
    train_a_little(m)
    save_adapter(m, tmp_path / "adapter")
    merged = merge_adapter_into_dir(tiny_dir, tmp_path / "adapter", tmp_path / "merged", dtype="float32",
                                    from_original=quantize == "none")
    assert (logits(hf_model(merged), token_ids(3)) - logits(m, token_ids(3))).abs().max() <= TOL


def test_peft_residual_adapter_is_refused(tiny_dir, tmp_path):
    ref = peft.get_peft_model(hf_model(tiny_dir), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                   init_lora_weights="pissa"))
    ref.save_pretrained(tmp_path / "pissa")
    with pytest.raises(ValueError, match=r"adapter_config.json: init_lora_weights='pissa'.*"
                                         r"path_initial_model_for_weight_conversion"):
        load_adapter(load_model(tiny_dir, quantize="none"), tmp_path / "pissa")


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    tiny, data = cli_files(tmp_path_factory.mktemp("init_cli"))
    return plant_outliers(tiny), data


@pytest.mark.parametrize("verb,quantize,init", [("sft", "nf4", "pissa"), ("sft", "none", "pissa"),
                                                ("sft", "nf4", "loftq"), ("dpo", "nf4", "loftq"),
                                                ("dpo", "none", "pissa"), ("reward", "nf4", "pissa"),
                                                ("reward", "none", "pissa")])
def test_cli_trains_and_resumes(cli_setup, tmp_path, verb, quantize, init):
    tiny, data = cli_setup
    two_steps_and_resume(verb, tiny, tmp_path / "run", data, quantize, f"lora.init={init}", "lora.r=4",
                         "lora.loftq_iter=2")
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["qtune_init"] == init


def test_cli_reports_the_initial_error_and_refuses_loftq_on_16_bit(cli_setup, tmp_path):
    tiny, _ = cli_setup
    common = ["sft", "quickstart", f"model.path={tiny}", "data.path=qtune:checkable-tasks?count=16&seed=0",
              "train.max_steps=1", "data.max_seq_len=64", "eval.exact_match=0", "data.cache_dir=", "data.val_size=4"]
    result = CliRunner().invoke(main, [*common, "lora.init=pissa", f"output.dir={tmp_path / 'a'}"])
    assert result.exit_code == 0, result.output
    line = next(s for s in result.output.splitlines() if s.startswith("lora.init = pissa"))
    init_error, qlora_error = (float(part.split("= ")[-1].split()[0]) for part in line.split(";"))
    assert init_error < qlora_error
    refused = CliRunner().invoke(main, [*common, "lora.init=loftq", "model.quantize=none", f"output.dir={tmp_path / 'b'}"])
    assert refused.exit_code == 1 and "Error:" in refused.output and "model.quantize" in refused.output


def test_accounting_counts_the_residual_pairs(tiny_dir):
    from qtune.memory.accounting import lora_param_count, residual_pair_nbytes

    m, _ = initialised(tiny_dir, "nf4", "pissa")
    kept = sum(a.numel() * a.element_size() + b.numel() * b.element_size()
               for layer in lora_layers(m).values() for a, b in layer.residual.values())
    assert kept == residual_pair_nbytes(m.config, 4, TARGETS, "pissa") and residual_pair_nbytes(m.config, 4, TARGETS) == 0
    assert sum(p.numel() for p in adapter_parameters(m, "default")) == lora_param_count(m.config, 4, TARGETS)


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_generate_and_eval_use_the_adapter_on_its_residual_base(cli_setup, tmp_path, init):
    from peft_cli import serve_with_adapter

    tiny, data = cli_setup
    two_steps_and_resume("sft", tiny, tmp_path / "run", data, "nf4", f"lora.init={init}", "lora.r=4", "train.lr=1e-2")
    with_adapter, without = serve_with_adapter(tiny, tmp_path / "run" / "adapter", "nf4", tmp_path)
    assert with_adapter != without


def test_gguf_lora_of_a_pissa_adapter_keeps_its_scale(tiny_dir, tmp_path):
    """llama.cpp scales a LoRA by alpha / rank of the file's tensors: rank 2r here, so alpha is written for 2r."""
    gguf = pytest.importorskip("gguf")
    from qtune.lora.gguf_adapter import export_gguf_adapter

    m, _ = initialised(tiny_dir, "none", "pissa")
    train_a_little(m)
    export_gguf_adapter(tiny_dir, save_adapter(m, tmp_path / "adapter"), tmp_path / "lora.gguf")
    reader = gguf.GGUFReader(tmp_path / "lora.gguf")
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    rank = next(t for t in reader.tensors if t.name.endswith(".lora_a")).shape[-1]
    assert rank == 8 and alpha / rank == pytest.approx(2.0)  # s = alpha / r = 8 / 4 in training


@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_dpo_reference_is_the_pissa_starting_model(cli_setup, tmp_path, quantize):
    """Adapters off run base + s B_r A_r, which for PiSSA is the policy before its first update: DPO's first
    loss is ln 2 (policy = reference), as with a plain LoRA adapter."""
    import math

    tiny, data = cli_setup
    out = tmp_path / "run"
    two_steps_and_resume("dpo", tiny, out, data, quantize, "lora.init=pissa", "lora.r=4", "lora.dropout=0")
    first = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
