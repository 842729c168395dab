"""GGUF -> Hugging Face conversion and `qtune pull`, checked against transformers' own GGUF loader.

Two files: the real SmolLM2-135M-Instruct Q4_1 GGUF (byte-level BPE, tied embeddings), and a tiny Llama
written here with gguf.GGUFWriter (sentencepiece vocabulary of Mistral/Llama, F32 + F16 + Q8_0 tensors,
an untied lm_head, Q/K permuted the way llama.cpp's converter does it).
"""

import json
import math
import os

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from qtune.weights import hub
from qtune.cli.hub_cmds import COMMANDS
from qtune.weights.gguf import (GGUFFile, convert_gguf, gguf_tokenizer_files, llama_config, sentencepiece_merges,
                                unpermute_qk)
from qtune.tokenizer import load_tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, naïve café — déjà vu",
    "日本語のテキストと中文混合",
    "emoji 🤗🚀 and a ZWJ sequence 👩‍💻",
    "digits 1234567890, 3.14159 and 1e-5; 2024-01-02",
    "many     spaces   and\ttabs\t\there",
    "newlines\n\n\nand\r\nwindows",
    "def f(x):\n    return x ** 2  # square\n",
    "{\"json\": [1, 2, 3], 'quote': \"it's\"}",
]


def cli(*args, env=None):
    import click

    group = click.Group("qtune", commands={command.name: command for command in COMMANDS})
    return CliRunner().invoke(group, list(args), env=env, catch_exceptions=False)


# --- un-permutation -------------------------------------------------------------------------------------


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's converter does to HF Q/K rows: interleave each head's two halves."""
    out_features, in_features = w.shape
    return w.reshape(n_head, 2, out_features // n_head // 2, in_features).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_hand_example():
    # 2 heads of dim 4: llama.cpp stores each head's rows as (0, 2, 1, 3), i.e. first-half row i next to
    # second-half row i.
    stored = torch.tensor([0.0, 2, 1, 3, 4, 6, 5, 7])[:, None]
    assert unpermute_qk(stored, n_head=2).flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def rope_interleaved(x: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    """llama.cpp's RoPE: rotate pairs (x0, x1), (x2, x3), ... by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    angle = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * angle.cos() - b * angle.sin()
    out[..., 1::2] = a * angle.sin() + b * angle.cos()
    return out


def rope_half(x: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    """Hugging Face's RoPE: rotate pairs (x_i, x_{i+d/2}) (the rotate_half layout)."""
    d = x.shape[-1]
    angle = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.cat([angle, angle])
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x * angle.cos() + rotated * angle.sin()


def test_unpermute_makes_half_rope_equal_interleaved_rope():
    # The reason for the permutation: interleaved RoPE on the stored rows == rotate_half RoPE on the HF rows.
    n_head, head_dim, d_in = 3, 8, 5
    w_hf = torch.randn(n_head * head_dim, d_in, dtype=torch.float64)
    w_gguf = llama_cpp_permute(w_hf, n_head)
    x = torch.randn(d_in, dtype=torch.float64)
    q_gguf = rope_interleaved((w_gguf @ x).view(n_head, head_dim), pos=7)
    q_hf = rope_half((unpermute_qk(w_gguf, n_head) @ x).view(n_head, head_dim), pos=7)
    assert torch.allclose(unpermute_qk(q_gguf.reshape(-1, 1), n_head).view(n_head, head_dim), q_hf)
    assert torch.equal(unpermute_qk(w_gguf, n_head), w_hf)


# --- the real SmolLM2 file ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_gguf_dir():
    return hub.locate_gguf("smollm2-135m").parent


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf_dir):
    """transformers' own reading of the GGUF: LlamaForCausalLM with dequantized weights."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf_dir, gguf_file=SMOLLM2_GGUF)


def test_smollm2_weights_equal_transformers_gguf_loader(smollm2_dir, smollm2_reference):
    reference = smollm2_reference.state_dict()
    ours = load_file(smollm2_dir / "model.safetensors")
    assert "lm_head.weight" not in ours  # tied: transformers' lm_head.weight is the embedding itself
    assert set(ours) == set(reference) - {"lm_head.weight"}
    for name, w in ours.items():
        assert w.dtype == torch.float32
        assert torch.equal(w, reference[name]), name


def test_smollm2_config_equals_transformers_gguf_config(smollm2_dir, smollm2_reference):
    reference = smollm2_reference.config
    ours = json.loads((smollm2_dir / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert ours[key] == getattr(reference, key), key
    assert ours["rope_theta"] == reference.rope_parameters["rope_theta"] == 100000.0
    assert math.isclose(ours["rms_norm_eps"], reference.rms_norm_eps, rel_tol=1e-6)
    assert ours["model_type"] == "llama" and ours["architectures"] == ["LlamaForCausalLM"]
    assert "rope_scaling" not in ours


def test_smollm2_tokenizer_json_equals_transformers_gguf_tokenizer(smollm2_dir, smollm2_gguf_dir):
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(smollm2_gguf_dir, gguf_file=SMOLLM2_GGUF)
    ours_json = RustTokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ours = load_tokenizer(smollm2_dir)
    texts = TEXTS + ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "a<|endoftext|>b"]
    for text in texts:
        expected = reference(text, add_special_tokens=False).input_ids
        assert ours_json.encode(text, add_special_tokens=False).ids == expected, text
        assert ours.encode(text) == expected, text
    expected_ids = (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == expected_ids
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == reference.chat_template


def write_byte_level_tokenizer_gguf(path, smollm2_dir, pre: str, n_tokens: int = 3000):
    """A weightless GGUF holding the first `n_tokens` of SmolLM2's byte-level vocabulary and their merges."""
    body = json.loads((smollm2_dir / "tokenizer.json").read_text())["model"]
    tokens = sorted(body["vocab"], key=body["vocab"].get)[:n_tokens]
    kept = set(tokens)
    merges = [f"{a} {b}" for a, b in body["merges"] if a in kept and b in kept and a + b in kept]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(128)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i < 17 else gguf.TokenType.NORMAL for i in range(n_tokens)])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt2", "qwen2"])
def test_byte_level_pre_tokenizers_equal_transformers(pre, smollm2_dir, tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import AutoTokenizer

    path = tmp_path / f"{pre}.gguf"
    write_byte_level_tokenizer_gguf(path, smollm2_dir, pre)
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    tokenizer_json, _, _ = gguf_tokenizer_files(GGUFFile(path))
    ours = RustTokenizer.from_str(json.dumps(tokenizer_json))
    for text in TEXTS + ["I'LL say it's 12345678 o'clock!!\n\n  \tend", "<|im_start|>x<|im_end|>"]:
        expected = reference(text, add_special_tokens=False).input_ids
        assert ours.encode(text, add_special_tokens=False).ids == expected, text


def test_unknown_pre_tokenizer_is_an_error(smollm2_dir, tmp_path):
    path = tmp_path / "odd.gguf"
    write_byte_level_tokenizer_gguf(path, smollm2_dir, "no-such-pre", n_tokens=300)
    with pytest.raises(ValueError, match=r"odd\.gguf.*tokenizer\.ggml\.pre='no-such-pre'.*known: .*llama-bpe"):
        gguf_tokenizer_files(GGUFFile(path))


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    # llama.cpp stores Llama 3.1's scaling as per-frequency divisors; transformers' llama3 rope is the reference.
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, head_dim = 500000.0, 64
    original = {"rope_type": "llama3", "rope_theta": theta, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

    def hf_inv_freq(params):
        config = LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=131072,
                             rope_parameters=params)
        return ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0].double()

    unscaled = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    path = tmp_path / "llama31.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [(writer.add_embedding_length, 128), (writer.add_head_count, 2), (writer.add_block_count, 0),
                       (writer.add_feed_forward_length, 256), (writer.add_context_length, 131072),
                       (writer.add_rope_freq_base, theta), (writer.add_vocab_size, 10)]:
        add(value)
    writer.add_tensor("rope_freqs.weight", (unscaled / hf_inv_freq(original)).float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    scaling = llama_config(GGUFFile(path), torch.float32)["rope_scaling"]
    assert scaling == {k: v for k, v in original.items() if k != "rope_theta"}
    assert torch.allclose(hf_inv_freq({**scaling, "rope_theta": theta}), hf_inv_freq(original), rtol=1e-6)


# --- a tiny sentencepiece Llama written here ------------------------------------------------------------

TINY = dict(hidden=64, n_head=4, n_kv=2, ff=96, layers=2)


def write_tiny_llama_gguf(path, sp_model_path, architecture="llama"):
    """A 2-layer Llama GGUF with the sentencepiece vocabulary of `sp_model_path`; returns the HF weights."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))
    n = sp.get_piece_size()
    d, ff, head_dim = TINY["hidden"], TINY["ff"], TINY["hidden"] // TINY["n_head"]
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(TINY["n_head"])
    writer.add_head_count_kv(TINY["n_kv"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    types = [gguf.TokenType.CONTROL if sp.is_control(i) else gguf.TokenType.UNKNOWN if sp.is_unknown(i)
             else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL for i in range(n)]
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())

    g = torch.Generator().manual_seed(0)
    weights = {}

    def tensor(gguf_name, hf_name, shape, qtype, n_head=None):
        w = torch.randn(shape, generator=g) * 0.1 if len(shape) == 2 else 1 + 0.1 * torch.randn(shape, generator=g)
        weights[hf_name] = w
        stored = llama_cpp_permute(w, n_head).numpy() if n_head else w.numpy()
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, stored.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, stored.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)

    F32, F16, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0
    tensor("token_embd.weight", "model.embed_tokens.weight", (n, d), F16)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        tensor(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", (d, d), Q8_0, TINY["n_head"])
        tensor(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", (TINY["n_kv"] * head_dim, d), F32, TINY["n_kv"])
        tensor(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", (TINY["n_kv"] * head_dim, d), F16)
        tensor(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", (d, d), Q8_0)
        tensor(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", (ff, d), Q8_0)
        tensor(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", (ff, d), F32)
        tensor(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", (d, ff), Q8_0)
        tensor(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", (d,), F32)
        tensor(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", (d,), F32)
    tensor("output_norm.weight", "model.norm.weight", (d,), F32)
    tensor("output.weight", "lm_head.weight", (n, d), F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, sp_model_path):
    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama.gguf"
    weights = write_tiny_llama_gguf(path, sp_model_path)
    return path, weights


@pytest.fixture(scope="module")
def tiny_converted(tiny_gguf, tmp_path_factory):
    return convert_gguf(tiny_gguf[0], tmp_path_factory.mktemp("tiny_hf"))


def test_tiny_weights_equal_transformers_and_originals(tiny_gguf, tiny_converted):
    from transformers import AutoModelForCausalLM

    path, originals = tiny_gguf
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).state_dict()
    ours = load_file(tiny_converted / "model.safetensors")
    assert set(ours) == set(reference) == set(originals)
    for name, w in ours.items():
        assert torch.equal(w, reference[name]), name
        # F32 tensors come back exactly; F16/Q8_0 within their rounding (Q8_0: 1/127 of a block's max).
        assert torch.allclose(w, originals[name], atol=originals[name].abs().max().item() / 100), name
    k_proj = "model.layers.0.self_attn.k_proj.weight"  # stored as F32: exact after un-permuting
    assert torch.equal(ours[k_proj], originals[k_proj])
    config = json.loads((tiny_converted / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["head_dim"] == 16 and config["num_key_value_heads"] == 2


def test_tiny_sentencepiece_tokenizer_equals_transformers_and_sentencepiece(tiny_gguf, tiny_converted, sp_model_path):
    import sentencepiece
    from transformers import AutoTokenizer

    path, _ = tiny_gguf
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))
    ours = load_tokenizer(tiny_converted)
    for text in TEXTS + ["<s>[INST] hi [/INST] ok</s>", "x </s> y"]:
        ids = ours.encode(text)
        assert ids == reference(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        if "<" not in text:  # sentencepiece itself does not match special tokens written in the text
            assert ids == sp.encode(text), text
    assert ours.add_bos_token and ours.bos_id == 1 and ours.eos_id == 2 and ours.vocab_size == 32000


def test_sentencepiece_merges_hand_example():
    # Pieces "a", "b", "c" merge into "ab" (score -1) before "bc" (score -2); "abc" (-3) from ("ab","c") or ("a","bc").
    tokens = ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
    types = [2, 1, 1, 1, 1, 1, 1]
    scores = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0]
    assert sentencepiece_merges(tokens, types, scores) == [["a", "b"], ["b", "c"], ["a", "bc"], ["ab", "c"]]


def test_unsupported_architecture_names_file_and_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(path, "falcon")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"falcon\.gguf.*architecture 'falcon' is not supported"):
        convert_gguf(path, tmp_path / "out")
    result = CliRunner().invoke(COMMANDS[1], [str(path), str(tmp_path / "out")])
    assert result.exit_code != 0 and "architecture 'falcon'" in result.output


def test_cli_convert_bfloat16(tiny_gguf, tmp_path):
    out = tmp_path / "bf16"
    result = cli("convert", str(tiny_gguf[0]), str(out), "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    weights = load_file(out / "model.safetensors")
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


# --- qtune pull / hub ------------------------------------------------------------------------------------


def test_commands_are_wired_into_the_qtune_cli():
    from qtune.cli import main

    assert main.commands["pull"] is COMMANDS[0] and main.commands["convert"] is COMMANDS[1]


def test_cli_pull_prints_model_dir_last(smollm2_dir):
    home = smollm2_dir.parent.parent  # the session's pull cache: $QTUNE_HOME/models/smollm2-135m
    result = cli("pull", "smollm2-135m", env={"QTUNE_HOME": str(home)})
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(smollm2_dir)


def test_resolve_model_path(smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QTUNE_HOME", str(smollm2_dir.parent.parent))
    assert hub.resolve_model_path("smollm2-135m") == smollm2_dir
    assert hub.resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match=r"no-such-model.*smollm2-135m"):
        hub.resolve_model_path("no-such-model")


def test_interrupted_conversion_leaves_nothing(tmp_path):
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")  # a header cut short
    dest = tmp_path / "models" / "broken"
    with pytest.raises(ValueError, match="truncated.gguf"):
        hub.convert_into(bad, dest)
    assert not dest.exists() and os.listdir(dest.parent) == []


def test_convert_into_writes_complete_directory(tiny_gguf, tmp_path):
    dest = hub.convert_into(tiny_gguf[0], tmp_path / "models" / "tiny")
    names = {p.name for p in dest.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", hub.MARKER_FILE} <= names
    assert os.listdir(dest.parent) == ["tiny"]


# --- the other architectures: a tiny transformers model written as GGUF with the gguf package's names -------

FAMILY_ARCHS = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma2": gguf.MODEL_ARCH.GEMMA2,
                "gemma3": gguf.MODEL_ARCH.GEMMA3, "phi3": gguf.MODEL_ARCH.PHI3}


def write_family_gguf(path, kind, sp_model_path):
    """A tiny transformers model of `kind` (tests/tiny.py, the sentencepiece vocabulary) written as llama.cpp's
    converter writes it: the gguf package's tensor names, no Q/K permutation (these families use the half-split
    rotation in llama.cpp too), Gemma's norms stored as 1 + w, F32 tensors. Returns the transformers model."""
    import sentencepiece
    from transformers import AutoModelForCausalLM
    from tiny import hf_config

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))
    n = sp.get_piece_size()
    cfg = hf_config(kind)
    cfg.vocab_size = n
    if kind.startswith("gemma"):  # GGUF has no query_pre_attn_scalar: llama.cpp takes head_dim below 27B
        cfg.query_pre_attn_scalar = cfg.head_dim
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if kind.startswith("gemma") or name.endswith(".bias") else 1.0))
    arch = FAMILY_ARCHS[kind]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if kind != "phi3":  # llama.cpp's Phi-3 converter writes neither (heads are hidden / heads wide)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    if kind.startswith("gemma"):
        writer.add_sliding_window(cfg.sliding_window)
    if kind == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if kind == "gemma3":
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if kind == "phi3":  # partial rotation, and LongRoPE's factors as tensors
        writer.add_rope_dimension_count(int(head_dim * rope["partial_rotary_factor"]))
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([gguf.TokenType.CONTROL if sp.is_control(i) else gguf.TokenType.UNKNOWN if sp.is_unknown(i)
                            else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stored = w + 1 if kind.startswith("gemma") and name.endswith("norm.weight") else w
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), stored.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.mark.parametrize("kind", list(FAMILY_ARCHS))
def test_family_gguf_converts_to_the_same_model(kind, tmp_path, sp_model_path):
    """The converted directory gives the original model's logits in qtune and in transformers."""
    from transformers import AutoModelForCausalLM

    from qtune.weights.checkpoint import load_model

    original = write_family_gguf(tmp_path / f"{kind}.gguf", kind, sp_model_path)
    out = convert_gguf(tmp_path / f"{kind}.gguf", tmp_path / "hf")
    ids = torch.randint(3, 32000, (2, 40), generator=torch.Generator().manual_seed(0))  # past Phi-3's 32
    with torch.no_grad():
        want = original(ids).logits
        assert (load_model(out, quantize="none")(ids) - want).abs().max().item() <= 1e-4
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert (theirs(ids).logits - want).abs().max().item() <= 1e-4
