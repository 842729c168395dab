"""Decoding NF4 layers through bitsandbytes' CPU 4-bit kernel: the relaid bytes against bitsandbytes' own
conversion, the kernel against its plain-torch reference, whole decoding against transformers + bitsandbytes on
the same bytes, and the dense fallback where the kernel is missing; the one-query attention against SDPA."""

import pytest
import torch
import torch.nn.functional as F

from qtune.generate import decoding_weights, generate
from qtune.kernels.cpu.attention import decode_attention
from qtune.weights import nf4_decode
from qtune.weights.checkpoint import load_model
from qtune.weights.nf4 import import_bitsandbytes, quantize_nf4
from qtune.weights.nf4_decode import (BnbGemvNF4Linear, bnb_gemv_is_exact, gemv_layout_applies,
                                      pack_for_bnb_gemv, reference_nf4_gemv)

transformers = pytest.importorskip("transformers")
BF = import_bitsandbytes().functional

needs_kernel = pytest.mark.skipif(not bnb_gemv_is_exact(), reason="no exact bitsandbytes CPU 4-bit kernel here "
                                  "(it needs AVX-512 BF16)")
SHAPES = [(32, 64), (96, 320), (576, 576), (192, 1536)]


@pytest.mark.parametrize("shape", SHAPES)
def test_relayout_equals_bitsandbytes_conversion(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    packed, state = BF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    want_packed, want_state = BF._convert_weight_packed_for_cpu(packed.clone(), state)
    q = quantize_nf4(w)
    assert torch.equal(q.packed, packed.view(-1))  # the bytes the relayout starts from are bitsandbytes' own
    got_packed, got_absmax = pack_for_bnb_gemv(q)
    assert torch.equal(got_packed, want_packed)
    assert torch.equal(got_absmax, want_state.absmax)


def test_reference_is_the_dense_product_with_bf16_operands():
    """The reference's weight is the exact NF4 weight up to bf16 rounding of the levels and scales."""
    torch.manual_seed(1)
    q = quantize_nf4(torch.randn(64, 128))
    x = torch.randn(5, 128)
    exact = x @ q.dequantize(torch.float32).t()
    ref = reference_nf4_gemv(x, q)
    # three bf16 roundings (x, level, scale) of 2^-9 each, then the output's: a few per cent of the scale at most
    assert (ref - exact).abs().max() <= 0.02 * exact.abs().max()
    assert not torch.equal(ref, exact)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_kernel_equals_reference(shape, rows):
    torch.manual_seed(2)
    q = quantize_nf4(torch.randn(shape) * 0.05)
    bias = torch.randn(shape[0])
    x = torch.randn(2, rows, shape[1])
    got = BnbGemvNF4Linear(q, bias)(x)
    want = reference_nf4_gemv(x, q)
    assert got.shape == (2, rows, shape[0]) and got.dtype == torch.float32
    # bf16 outputs: the kernel's summation order may move one by a unit in its last place
    assert ((got - bias - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()


def test_layout_rule():
    assert gemv_layout_applies((576, 576), 64) and gemv_layout_applies((192, 1536), 64)
    assert not gemv_layout_applies((88, 64), 64)  # rows not whole tiles of 32
    assert not gemv_layout_applies((64, 88), 64)  # blocks straddling rows
    assert not gemv_layout_applies((64, 128), 128)


def wide_tiny(path):
    """A tiny Llama whose every linear fits the kernel's layout (bitsandbytes' conversion asserts it too)."""
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return wide_tiny(tmp_path_factory.mktemp("wide"))


PROMPTS = [[5, 17, 33, 9, 70], [40, 41], [7, 8, 9, 10, 11, 12, 13]]


def peer_nf4(path):
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32,
                                                             device_map="cpu").eval()


@needs_kernel
def test_decoding_equals_transformers_bitsandbytes(tiny_dir):
    """On the same bytes, qtune's decoding with the kernel and transformers + bitsandbytes (which packs its
    weights for the same kernel on this CPU) pick the same tokens from the same logits."""
    ours, peer = load_model(tiny_dir, quantize="nf4", dtype="float32"), peer_nf4(tiny_dir)
    got = generate(ours, PROMPTS, max_new_tokens=10, greedy=True, stop_ids=set(), nf4_cpu_kernel="bitsandbytes")
    for p, g in zip(PROMPTS, got):
        with torch.no_grad():
            ref = peer.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                pad_token_id=0)
        assert g.token_ids == ref[0, len(p):].tolist()
    ids = torch.tensor([PROMPTS[0] + got[0].token_ids])
    with torch.no_grad(), decoding_weights(ours, "bitsandbytes"):
        assert sum(isinstance(m, BnbGemvNF4Linear) for m in ours.modules()) == 14
        logits = ours(ids)
        want = peer(ids).logits
    assert (logits - want).abs().max() <= 1e-4 * want.abs().max()


@needs_kernel
def test_kernel_logits_stay_near_the_exact_ones(tiny_dir):
    ours = load_model(tiny_dir, quantize="nf4", dtype="float32")
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        exact = ours(ids)
        with decoding_weights(ours, "bitsandbytes"):
            fast = ours(ids)
    assert (fast - exact).abs().max() <= 0.05 * exact.abs().max()


def test_fallback_without_the_kernel_is_the_dense_path(tiny_dir, monkeypatch):
    """Where the kernel is absent or inexact, "bitsandbytes" decodes from the exact dense copies."""
    ours = load_model(tiny_dir, quantize="nf4", dtype="float32")
    dense = generate(ours, PROMPTS, max_new_tokens=8, greedy=True, stop_ids=set())
    monkeypatch.setattr(nf4_decode, "bnb_gemv_is_exact", lambda: False)
    with decoding_weights(ours, "bitsandbytes"):
        assert not any(isinstance(m, BnbGemvNF4Linear) for m in ours.modules())
    fallback = generate(ours, PROMPTS, max_new_tokens=8, greedy=True, stop_ids=set(), nf4_cpu_kernel="bitsandbytes")
    assert [g.token_ids for g in fallback] == [g.token_ids for g in dense]


def test_unfit_layers_keep_dense_copies(tmp_path):
    """The standard tiny Llama (MLP width 88): its MLP projections do not fit the layout and stay dense."""
    from tiny import save_tiny

    ours = load_model(save_tiny("llama", tmp_path), quantize="nf4", dtype="float32")
    with decoding_weights(ours, "bitsandbytes"):
        kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in ours.named_modules() if n.endswith("_proj")}
    assert kinds["gate_proj"] == kinds["down_proj"] == "Linear"
    assert kinds["q_proj"] == ("BnbGemvNF4Linear" if bnb_gemv_is_exact() else "Linear")


def test_bad_kernel_name(tiny_dir):
    ours = load_model(tiny_dir, quantize="nf4", dtype="float32")
    with pytest.raises(ValueError, match="nf4_cpu_kernel"):
        generate(ours, PROMPTS, max_new_tokens=2, nf4_cpu_kernel="bf16")


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (4, 1)])
def test_decode_attention_equals_sdpa(heads, kv_heads):
    torch.manual_seed(4)
    B, S, d = 3, 11, 16
    q = torch.randn(B, heads, 1, d)
    cache_k, cache_v = torch.randn(B, kv_heads, S + 5, d), torch.randn(B, kv_heads, S + 5, d)
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # the cache's filled part, a strided view as in decoding
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[1, ..., :4] = False  # left padding
    mask[2, ..., :1] = False
    g = heads // kv_heads
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)
    got = decode_attention(q, k, v, mask)
    assert got.shape == (B, 1, heads, d)
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-6)


@needs_kernel
def test_stand_in_is_kept_until_its_weight_changes(tiny_dir):
    ours = load_model(tiny_dir, quantize="nf4", dtype="float32")
    layer = ours.model.layers[0].self_attn.q_proj
    first = layer.decoding_module("bitsandbytes", torch.float32)
    assert layer.decoding_module("bitsandbytes", torch.float32) is first
    layer.packed[:1] ^= 0x11  # an in-place change of the codes: the stand-in is rebuilt from them
    again = layer.decoding_module("bitsandbytes", torch.float32)
    assert again is not first and torch.equal(again.packed, pack_for_bnb_gemv(layer.nf4_weight())[0])


@needs_kernel
def test_cli_generate_takes_the_kernel(tmp_path):
    """`qtune generate --nf4-cpu-kernel bitsandbytes` reaches the kernel: its greedy completion is the library's
    kernel decoding of the same prompt, and (the kernel's products being within a bf16 rounding) the dense one."""
    from click.testing import CliRunner
    from test_data_tokenizer import make_tokenizer_dir
    from tokenizers import Tokenizer

    from qtune.cli import main
    from qtune.generate import generate_text
    from qtune.tokenizer import load_tokenizer

    make_tokenizer_dir(tmp_path)
    vocab = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path)
    common = [str(tmp_path), "--quantize", "nf4", "--prompt", "the cat", "--greedy", "--max-new-tokens", "8"]
    texts = {}
    for kernel in ("dense", "bitsandbytes"):
        result = CliRunner().invoke(main, ["generate", *common, "--nf4-cpu-kernel", kernel])
        assert result.exit_code == 0, result.output
        texts[kernel] = result.stdout.splitlines()[-1]
    model = load_model(tmp_path, quantize="nf4", dtype="float32")
    want = generate_text(model, load_tokenizer(tmp_path), ["the cat"], max_new_tokens=8, greedy=True,
                         nf4_cpu_kernel="bitsandbytes")[0].text
    assert texts["bitsandbytes"] == want
    assert texts["bitsandbytes"] == texts["dense"]
