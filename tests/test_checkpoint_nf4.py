"""Quantize-on-load and `qtune quantize` against transformers + bitsandbytes (NF4, double quantization)."""

import json

import pytest
import torch

from qtune.weights.checkpoint import load_model, quantize_checkpoint
from qtune.weights.nf4_linear import NF4Linear
from tiny import save_tiny

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")


def fp32_reference_path(model):
    """bitsandbytes' CPU backend repacks weights for a bf16 AVX-512 kernel in eval mode; compare against its
    fp32 dequantize-then-matmul path instead, which computes exactly what NF4 defines."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "mistral-nemo", "qwen3", "gemma2", "gemma3", "phi3"])
def tiny_dir(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param))


def hf_nf4(path):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, torch_dtype=torch.float32,
                                                              device_map="cpu")
    return fp32_reference_path(model.eval())


def test_quantize_on_load_matches_bitsandbytes(tiny_dir):
    ours = load_model(tiny_dir, quantize="nf4", dtype="float32")
    config = json.loads((tiny_dir / "config.json").read_text())
    per_layer = 4 if config["model_type"] == "phi3" else 7  # Phi-3 fuses q/k/v and gate/up
    assert sum(isinstance(m, NF4Linear) for m in ours.modules()) == per_layer * config["num_hidden_layers"]
    ids = torch.randint(3, 160, (2, 13))
    with torch.no_grad():
        ref = hf_nf4(tiny_dir)(ids).logits
        got = ours(ids)
    assert (ref - got).abs().max().item() <= 1e-4


def test_quantized_checkpoint_round_trip(tiny_dir, tmp_path):
    out = quantize_checkpoint(tiny_dir, tmp_path / "nf4", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    ours = load_model(tiny_dir, quantize="nf4", dtype="float32")
    reloaded = load_model(out, dtype="float32")
    hf = fp32_reference_path(transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval())
    ids = torch.randint(3, 160, (2, 9))
    with torch.no_grad():
        want = ours(ids)
        assert torch.equal(reloaded(ids), want)
        assert (hf(ids).logits - want).abs().max().item() <= 1e-4
    for (name, a), b in zip(ours.named_buffers(), reloaded.buffers()):
        if name.endswith("packed") or name.endswith("absmax"):
            assert torch.equal(a, b), name


def test_quantized_files_are_smaller(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    out = quantize_checkpoint(src, tmp_path / "nf4", dtype="float32")
    from safetensors import safe_open

    def linear_bytes(path):
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                       for k in f.keys() if k.startswith("model.layers.") and "_proj." in k)

    # 4 bits per weight, one byte per 64-weight block (double-quantized absmax) and, at these tiny sizes, a
    # noticeable fixed cost per layer (the 16- and 256-entry code tables): still over 4x smaller than fp32
    assert linear_bytes(out) < linear_bytes(src) / 4


def test_existing_output_survives_a_failed_quantize(tmp_path):
    out = tmp_path / "nf4"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    with pytest.raises(Exception):
        quantize_checkpoint(tmp_path / "missing-model", out)
    assert (out / "keep.txt").read_text() == "earlier result"


@pytest.mark.parametrize("kind", ["qwen3-moe", "mixtral"])
def test_mixture_of_experts_nf4_equals_bitsandbytes_dequantized_weights(tmp_path, kind):
    """transformers keeps experts as fused 3-D parameters, which bitsandbytes does not quantize; so the reference
    is transformers on the checkpoint with every quantized weight (experts one by one, attention) replaced by
    bitsandbytes' NF4 round trip (double quantization) of it."""
    from safetensors.torch import load_file, save_file

    from qtune.weights.checkpoint import is_quantizable

    bnb_f = pytest.importorskip("bitsandbytes.functional")
    src = save_tiny(kind, tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    quantized = [k for k in tensors if is_quantizable(k)]
    assert sum(".experts." in k for k in quantized) == 2 * 3 * 4  # layers x projections x experts
    for k in quantized:
        tensors[k] = bnb_f.dequantize_4bit(*bnb_f.quantize_4bit(tensors[k], quant_type="nf4", compress_statistics=True))
    (tmp_path / "ref").mkdir()
    save_file(tensors, tmp_path / "ref" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "ref" / "config.json").write_text((src / "config.json").read_text())
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32).eval()
    ours = load_model(src, quantize="nf4", dtype="float32")
    assert sum(isinstance(m, NF4Linear) for m in ours.modules()) == len(quantized)
    ids = torch.randint(3, 160, (2, 13))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max().item() <= 1e-4
