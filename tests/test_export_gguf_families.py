"""`qtune export-gguf` for the #16 families (Qwen3, Gemma 2 / 3, Phi-3, Mixtral, Qwen3-MoE) and Llama 3.1's rope_freqs.

References: the gguf package's own tables (which tensor names and shapes llama.cpp's architectures have),
transformers' GGUF loader (`from_pretrained(..., gguf_file=...)`, independent of qtune's reader) against
transformers on the Hugging Face directory, llama.cpp's rope_freqs formula written out here, and transformers'
llama3 RoPE. The always-on round-trip check (qtune's reader, logits equal) runs in every export below.
"""

import json

import gguf
import pytest
import torch
from click.testing import CliRunner

import tiny
from qtune.cli.export_cmds import COMMANDS
from qtune.weights.checkpoint import load_model
from qtune.weights.gguf import convert_gguf

transformers = pytest.importorskip("transformers")

# Gemma as llama.cpp runs it: queries scaled by head_dim^-1/2 (it stores no query_pre_attn_scalar) and its fixed
# sliding-layer patterns (Gemma 2: every other layer; Gemma 3: five of each six).
GEMMA_AS_LLAMA_CPP = {"gemma2": dict(query_pre_attn_scalar=16),
                      "gemma3": dict(num_hidden_layers=6, layer_types=None, sliding_window_pattern=6)}
# transformers' GGUF loader fills what its key table lacks (Qwen3's head_dim, Qwen3-MoE's expert width, Gemma's
# query scale, soft-caps and RoPE scaling, Phi-3's partial rotation and LongRoPE) with its config defaults, so
# the models compared with it take those defaults.
GEMMA3_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
TRANSFORMERS_DEFAULTS = {
    "qwen3": dict(head_dim=128),
    "qwen3-moe": dict(moe_intermediate_size=768),
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3": dict(head_dim=256, query_pre_attn_scalar=256, num_hidden_layers=6, layer_types=None,
                   rope_parameters=GEMMA3_ROPE),
    "phi3": dict(partial_rotary_factor=None, rope_parameters=None, original_max_position_embeddings=None),
}
FAMILIES = ("qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3-moe")
ARCH = {"qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3", "mixtral": "llama",
        "qwen3-moe": "qwen3moe"}


def cli(*args):
    import click

    group = click.Group("qtune", commands={command.name: command for command in COMMANDS})
    return CliRunner().invoke(group, [str(a) for a in args], catch_exceptions=False)


def save_variant(kind, out_dir, **changes):
    """tests/tiny.py's model of `kind` with a real tokenizer, with `changes` to its config (None removes a key)."""
    saved = tiny.TINY_CONFIGS[kind]
    tiny.TINY_CONFIGS[kind] = {k: v for k, v in {**saved, **changes}.items() if v is not None}
    try:
        return tiny.save_tiny_with_tokenizer(kind, out_dir)
    finally:
        tiny.TINY_CONFIGS[kind] = saved


def field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{family: (model dir, adapter dir)}: tiny models with every family feature on and a non-zero adapter."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        model_dir = save_variant(family, root / family, **GEMMA_AS_LLAMA_CPP.get(family, {}))
        out[family] = (model_dir, tiny.save_trained_adapter(model_dir, root / f"{family}-adapter"))
    return out


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """{(family, type): gguf path}, written through the CLI: each passed the round-trip check (exit status 0)."""
    root = tmp_path_factory.mktemp("family-gguf")
    files = {}
    for family, (model_dir, adapter) in trained.items():
        for type_name in ("f16", "q8_0"):
            path = root / f"{family}.{type_name}.gguf"
            result = cli("export-gguf", model_dir, "--adapter", adapter, path, "--type", type_name)
            assert result.exit_code == 0, (family, type_name, result.output)
            files[family, type_name] = path
    return files


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_names_and_shapes_are_llama_cpps(trained, exported, family):
    """Every tensor is one the gguf package lists for the architecture, with the shape llama.cpp creates it with
    (GGUF shapes innermost first: experts stacked as (hidden, expert width, experts) and (width, hidden, experts))."""
    cfg = json.loads((trained[family][0] / "config.json").read_text())
    reader = gguf.GGUFReader(exported[family, "f16"])
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == ARCH[family])
    allowed = {gguf.TENSOR_NAMES[t].format(bid=i) + suffix for t in gguf.MODEL_TENSORS[arch]
               for i in range(cfg["num_hidden_layers"]) for suffix in (".weight", ".bias")}
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert set(shapes) <= allowed, sorted(set(shapes) - allowed)
    assert field(reader, "general.architecture") == ARCH[family]
    D = cfg["hidden_size"]
    if family in ("mixtral", "qwen3-moe"):
        E = cfg.get("num_local_experts") or cfg["num_experts"]
        width = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        assert shapes["blk.1.ffn_gate_exps.weight"] == shapes["blk.1.ffn_up_exps.weight"] == [D, width, E]
        assert shapes["blk.1.ffn_down_exps.weight"] == [width, D, E]
        assert shapes["blk.1.ffn_gate_inp.weight"] == [D, E]
        assert field(reader, f"{ARCH[family]}.expert_count") == E
        assert field(reader, f"{ARCH[family]}.expert_used_count") == cfg["num_experts_per_tok"]
    if family == "phi3":
        heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        assert shapes["blk.0.attn_qkv.weight"] == [D, (heads + 2 * kv) * D // heads]
        assert shapes["blk.0.ffn_up.weight"] == [D, 2 * cfg["intermediate_size"]]
        rope = cfg["rope_parameters"]
        assert reader.tensors[[t.name for t in reader.tensors].index("rope_factors_long.weight")].data.tolist() == \
            pytest.approx(rope["long_factor"])
        assert field(reader, "phi3.rope.dimension_count") == D // heads // 2  # partial_rotary_factor 0.5
        assert field(reader, "phi3.rope.scaling.original_context_length") == rope["original_max_position_embeddings"]
    if family == "gemma2":
        assert field(reader, "gemma2.attn_logit_softcapping") == pytest.approx(cfg["attn_logit_softcapping"])
        assert field(reader, "gemma2.final_logit_softcapping") == pytest.approx(cfg["final_logit_softcapping"])
    if family.startswith("gemma"):
        assert field(reader, f"{family}.attention.sliding_window") == cfg["sliding_window"]
        assert "output.weight" not in shapes  # tied, and llama.cpp's Gemma reuses token_embd


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_norms_are_stored_as_one_plus_w(trained, exported, family):
    """llama.cpp multiplies by the stored norm weight, Hugging Face by 1 + w (exported from f32, so exact)."""
    from safetensors.torch import load_file

    model_dir = trained[family][0]
    out = exported[family, "f16"].with_name(f"{family}.f32.gguf")
    assert cli("export-gguf", model_dir, out, "--type", "f32").exit_code == 0
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(out).tensors}
    hf = load_file(model_dir / "model.safetensors")
    assert torch.equal(stored["blk.0.post_ffw_norm.weight"], hf["model.layers.0.post_feedforward_layernorm.weight"] + 1)
    assert torch.equal(stored["output_norm.weight"], hf["model.norm.weight"] + 1)
    # the embedding is stored unscaled: llama.cpp multiplies it by sqrt(hidden) itself, as Hugging Face does
    embd = stored["token_embd.weight"].reshape(hf["model.embed_tokens.weight"].shape)
    assert torch.equal(embd, hf["model.embed_tokens.weight"])


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3", "phi3", "qwen3-moe"])
def test_transformers_gguf_loader_gives_the_models_logits(tmp_path, family):
    """transformers reads the f16 file (its own names, norm offsets, expert split) with the logits of the model
    it was written from, rounded to f16; qtune's converter gives them too. (Mixtral: transformers' loader has
    no GGUF Mixtral; its layout is Llama's names and permutation plus Qwen3-MoE's experts, both checked here.)"""
    model_dir = save_variant(family, tmp_path / family, **TRANSFORMERS_DEFAULTS[family])
    path = tmp_path / f"{family}.gguf"
    result = cli("export-gguf", model_dir, path)
    assert result.exit_code == 0, result.output
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in reference.parameters():
            if p.ndim >= 2:  # the file keeps norms in f32
                p.copy_(p.half().float())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    assert type(loaded) is type(reference)
    ids = torch.randint(3, 300, (2, 21), generator=torch.Generator().manual_seed(0))  # past the windows of 8
    want = hf_logits(reference, ids)
    assert (hf_logits(loaded, ids) - want).abs().max() <= 1e-4 * want.abs().max()
    converted = load_model(convert_gguf(path, tmp_path / "converted"), quantize="none", dtype=torch.float32)
    with torch.no_grad():
        assert (converted(ids).double() - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("change, named", [
    (dict(), "query_pre_attn_scalar is 24"),  # tests/tiny.py's Gemma 2 scales queries by 24^-1/2
    (dict(query_pre_attn_scalar=16, layer_types=["full_attention"] * 3), "sliding layers"),
])
def test_a_gemma_setting_llama_cpp_fixes_otherwise_is_refused_by_name(tmp_path, change, named):
    """Refused before the adapter is merged, naming the model's own config.json; nothing is written."""
    model_dir = save_variant("gemma2", tmp_path / "model", **change)
    adapter = tiny.save_trained_adapter(model_dir, tmp_path / "adapter")
    out = tmp_path / "out" / "m.gguf"
    result = cli("export-gguf", model_dir, "--adapter", adapter, out)
    assert result.exit_code == 1 and result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert named in result.output and str(model_dir / "config.json") in result.output
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_qwen3_moe_without_renormalised_routing_is_refused(tmp_path):
    model_dir = save_variant("qwen3-moe", tmp_path / "model", norm_topk_prob=False)
    result = cli("export-gguf", model_dir, tmp_path / "m.gguf")
    assert result.exit_code == 1 and "norm_topk_prob" in result.output


# --- Llama 3.1: rope_scaling llama3 as llama.cpp's rope_freqs tensor ---------------------------------------


def llama_cpp_rope_freqs(theta, dim, factor, low, high, old_len):
    """llama.cpp's converter (LlamaModel.generate_extra_tensors), one frequency at a time: the divisor of each."""
    import math

    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi / (1.0 / theta ** (i / dim))
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def test_llama31_rope_freqs_export(tmp_path):
    """The llama3 scaling becomes the rope_freqs tensor llama.cpp expects; read back (qtune's converter) it is
    the same rope_scaling, and transformers on the converted directory gives the original's logits.
    (transformers' GGUF loader itself maps no rope-scaling key for llama, so it cannot be the reference here.)"""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    # head_dim 64: three frequencies fall between the bands (the reader needs two to recover the scaling)
    model_dir = save_variant("llama3", tmp_path / "model", head_dim=64, rope_scaling=dict(scaling))
    path = tmp_path / "llama31.gguf"
    result = cli("export-gguf", model_dir, path, "--type", "f32")
    assert result.exit_code == 0, result.output
    [freqs] = [t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight"]
    want = llama_cpp_rope_freqs(500000.0, 64, 8.0, 1.0, 4.0, 256)
    assert len({round(x, 3) for x in want}) > 3  # the band between 1 and 8 is populated
    assert freqs.data.tolist() == pytest.approx(want, rel=1e-5)
    converted = convert_gguf(path, tmp_path / "converted")
    assert json.loads((converted / "config.json").read_text())["rope_scaling"] == scaling
    ids = torch.randint(3, 300, (1, 300), generator=torch.Generator().manual_seed(0))  # past the original 256
    original = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    readback = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    want_logits = hf_logits(original, ids)
    tolerance = 1e-4 * want_logits.abs().max()
    assert (hf_logits(readback, ids) - want_logits).abs().max() <= tolerance
    unscaled = json.loads((model_dir / "config.json").read_text())
    unscaled["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    without = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, config=transformers.LlamaConfig(**unscaled), dtype=torch.float32).eval()
    assert (hf_logits(without, ids) - want_logits).abs().max() > 5 * tolerance  # the scaling matters here


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_only_applied_the_llama_cpp_way_equals_the_merge(trained, tmp_path, family):
    """llama.cpp's --lora adds alpha / r · B A to the base file's tensors (Phi-3: to the fused attn_qkv and
    ffn_up; the MoE families: qtune's "all-linear" adapts their attention, Mixtral's with Q/K rows permuted);
    that equals the merged export (f32 from the original weights)."""
    from test_export_gguf import gguf_tensors

    model_dir, adapter = trained[family]
    runs = {"base": ["--type", "f32"], "merged": ["--type", "f32", "--adapter", adapter, "--from-original"],
            "lora": ["--adapter", adapter, "--adapter-only"]}
    for name, args in runs.items():
        result = cli("export-gguf", model_dir, tmp_path / f"{name}.gguf", *args)
        assert result.exit_code == 0, result.output
    alpha = field(gguf.GGUFReader(tmp_path / "lora.gguf"), "adapter.lora.alpha")
    base, merged, lora = (gguf_tensors(tmp_path / f"{n}.gguf") for n in ("base", "merged", "lora"))
    adapted = {name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a")}
    assert adapted and adapted <= set(base)
    for name, w in base.items():
        if name in adapted:
            a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
            w = w + alpha / a.shape[0] * b @ a
        torch.testing.assert_close(w, merged[name], rtol=1e-5, atol=1e-6, msg=name)



def test_an_adapter_on_the_experts_merges_into_the_export_but_has_no_lora_file(trained, tmp_path):
    """Adapting every expert (naming gate_proj / up_proj / down_proj) merges into the stacked expert tensors
    (the round trip passes); as a GGUF LoRA file it is refused by name, nothing written."""
    model_dir = trained["qwen3-moe"][0]
    adapter = tiny.save_trained_adapter(model_dir, tmp_path / "adapter", ["gate_proj", "up_proj", "down_proj"])
    result = cli("export-gguf", model_dir, tmp_path / "merged.gguf", "--adapter", adapter, "--type", "q8_0")
    assert result.exit_code == 0, result.output
    out = tmp_path / "lora.gguf"
    result = cli("export-gguf", model_dir, out, "--adapter", adapter, "--adapter-only")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "is an expert" in result.output
    assert not out.exists()
