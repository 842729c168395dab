"""`qtune export-gguf`: every family and type through the CLI, checked by an independent reader.

References: transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`, which undoes llama.cpp's
Q/K permutation and names by itself) against transformers on the merged Hugging Face directory; the gguf
package's reader for the metadata; the `tokenizers` library for the vocabulary.
"""

import json

import gguf
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer as HFTokenizer

from qtune.cli.export_cmds import COMMANDS
from qtune.lora import LoraConfig, add_lora, lora_parameters, merge_lora_into_dir, save_adapter
from qtune.weights.checkpoint import load_model
from qtune.weights.gguf import unpermute_qk
from qtune.weights.gguf_export import permute_qk
from tiny import save_tiny_with_tokenizer

transformers = pytest.importorskip("transformers")
FAMILIES = ("llama", "mistral", "qwen2")
TYPES = ("f16", "bf16", "q8_0", "q4_0")


def cli(*args):
    import click

    group = click.Group("qtune", commands={command.name: command for command in COMMANDS})
    return CliRunner().invoke(group, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{family: (model dir, adapter dir)}: a tiny model with a real tokenizer and a non-zero LoRA adapter."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for family in FAMILIES:
        model_dir = save_tiny_with_tokenizer(family, root / family)
        model = load_model(model_dir, quantize="none", dtype=torch.float32)
        add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), seed=0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in lora_parameters(model):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)  # B != 0, as after training
        out[family] = (model_dir, save_adapter(model, root / f"{family}-adapter"))
    return out


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """{(family, type): gguf path}, all written through the CLI."""
    root = tmp_path_factory.mktemp("gguf")
    files = {}
    for family, (model_dir, adapter) in trained.items():
        for type_name in TYPES:
            path = root / f"{family}.{type_name}.gguf"
            result = cli("export-gguf", str(model_dir), "--adapter", str(adapter), str(path), "--type", type_name)
            assert result.exit_code == 0, result.output
            assert result.stdout.strip().endswith(str(path)) and path.is_file()
            files[family, type_name] = path
    return files


def test_permute_is_the_inverse_of_the_readers_unpermute():
    w = torch.randn(4 * 8, 5)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    # Hand example: 2 heads of dim 4, rows (0, 1, 2, 3) per head are stored as (0, 2, 1, 3).
    assert permute_qk(torch.arange(8.0), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.double()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("type_name", ["f16", "q8_0"])
def test_transformers_gguf_loader_gives_the_merged_models_logits(trained, exported, tmp_path, family, type_name):
    model_dir, adapter = trained[family]
    merged = merge_lora_into_dir(model_dir, adapter, tmp_path / "merged", dtype="float32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    path = exported[family, type_name]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    if type_name == "f16":
        with torch.no_grad():
            for p in reference.parameters():
                if p.ndim == 2:  # the file keeps norms and biases in f32
                    p.copy_(p.half().float())
        want, got = hf_logits(reference, ids), hf_logits(loaded, ids)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    else:  # q8_0: a tight bound of our own (the round-trip check allows more, for real models)
        want, got = hf_logits(reference, ids), hf_logits(loaded, ids)
        assert (got - want).norm() / want.norm() <= 0.03


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_carries_tokenizer_template_and_stop_token(trained, exported, family):
    model_dir = trained[family][0]
    reader = gguf.GGUFReader(exported[family, "f16"])
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[family]
    assert field(reader, "general.architecture") == arch
    hf_tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab = hf_tok.get_vocab(with_added_tokens=True)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert {t: i for i, t in enumerate(tokens)} == vocab
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert field(reader, "tokenizer.chat_template") == config["chat_template"]
    assert field(reader, "tokenizer.ggml.add_bos_token") == config["add_bos_token"]
    im_end = vocab["<|im_end|>"]  # the ChatML template closes every turn with it
    assert field(reader, "tokenizer.ggml.eot_token_id") == im_end
    assert field(reader, "tokenizer.ggml.eos_token_id") == im_end
    assert field(reader, "tokenizer.ggml.padding_token_id") == vocab["<|endoftext|>"]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[im_end] == gguf.TokenType.CONTROL and types[vocab["a"]] == gguf.TokenType.NORMAL
    merges = field(reader, "tokenizer.ggml.merges")
    assert merges == [" ".join(m) if isinstance(m, list) else m
                      for m in json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]]


@pytest.mark.parametrize("type_name", TYPES)
def test_two_d_weights_take_the_type_and_one_d_stay_f32(exported, type_name):
    reader = gguf.GGUFReader(exported["llama", type_name])
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["blk.0.attn_q.weight"] == type_name.upper()
    # ffn_down's rows are 88 long, not a multiple of the 32-wide quant blocks: F16, as llama.cpp does
    assert kinds["blk.0.ffn_down.weight"] == ("F16" if type_name.startswith("q") else type_name.upper())


def test_a_type_the_gguf_package_cannot_write_is_refused_with_the_list(trained, tmp_path):
    model_dir = trained["llama"][0]
    result = cli("export-gguf", str(model_dir), str(tmp_path / "out.gguf"), "--type", "q4_k")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "'q4_k'" in result.output and all(t in result.output for t in TYPES)
    assert list(tmp_path.iterdir()) == []


def test_a_template_whose_turns_end_without_a_special_token_fails_and_leaves_nothing(trained, tmp_path):
    model_dir = trained["llama"][0]
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    broken = tmp_path / "model"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "model.gguf"
    result = cli("export-gguf", str(broken), str(out))
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert "round-trip check failed" in result.output and "nothing would stop generation" in result.output
    assert list(out.parent.iterdir()) == []


def gguf_tensors(path) -> dict[str, torch.Tensor]:
    reader = gguf.GGUFReader(path)
    return {t.name: torch.from_numpy(t.data.copy()).reshape([int(n) for n in reversed(t.shape)]).float()
            for t in reader.tensors}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_adapter_only_applied_the_llama_cpp_way_equals_the_merge(trained, tmp_path, family):
    """What llama.cpp computes with --lora (W + alpha / r · B A over the base file's tensors) equals the
    merged export (both f32, from the original weights, so nothing is rounded)."""
    model_dir, adapter = trained[family]
    runs = {"base": ["--type", "f32"], "merged": ["--type", "f32", "--adapter", str(adapter), "--from-original"],
            "lora": ["--adapter", str(adapter), "--adapter-only"]}
    for name, args in runs.items():
        result = cli("export-gguf", str(model_dir), str(tmp_path / f"{name}.gguf"), *args)
        assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(tmp_path / "lora.gguf")
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    alpha = field(reader, "adapter.lora.alpha")
    base, merged, lora = (gguf_tensors(tmp_path / f"{n}.gguf") for n in ("base", "merged", "lora"))
    adapted = {name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a")}
    assert len(adapted) == 7 * 2  # all-linear on two layers
    for name, w in base.items():
        if name in adapted:
            a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
            w = w + alpha / a.shape[0] * b @ a
        torch.testing.assert_close(w, merged[name], rtol=1e-5, atol=1e-6, msg=name)


def test_adapter_only_without_adapter_is_an_error(trained, tmp_path):
    result = cli("export-gguf", str(trained["llama"][0]), str(tmp_path / "x.gguf"), "--adapter-only")
    assert result.exit_code == 1 and result.output.startswith("Error: --adapter-only needs --adapter")


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_split_regex_tokenizers_export_under_llama_cpp_names(tmp_path, pre):
    """Qwen2 / Llama 3 style tokenizers (a Split regex before byte-level BPE) are written under llama.cpp's
    pre-tokenizer name and tokenize a digit-heavy conversation identically after the read-back."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from qtune.weights.gguf import LLAMA3_SPLIT, QWEN2_SPLIT
    from test_data_tokenizer import SPECIALS

    model_dir = save_tiny_with_tokenizer("qwen2", tmp_path / "model")
    def splitting(regex):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)])

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = splitting(LLAMA3_SPLIT)  # trained on digit groups, so digit merges exist to tell them apart
    tok.decoder = decoders.ByteLevel()
    corpus = ["Numbers 12345 and 2024-01-02, 470 words and more words."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.pre_tokenizer = splitting({"qwen2": QWEN2_SPLIT, "llama-bpe": LLAMA3_SPLIT}[pre])
    assert any(t.isdigit() and len(t) > 1 for t in tok.get_vocab())  # the conversation's numbers tell them apart
    assert tok.get_vocab_size() <= 600  # fits the tiny model's embedding
    tok.save(str(model_dir / "tokenizer.json"))
    out = tmp_path / "m.gguf"
    result = cli("export-gguf", str(model_dir), str(out))
    assert result.exit_code == 0, result.output  # the round-trip check tokenized the conversation identically
    assert field(gguf.GGUFReader(out), "tokenizer.ggml.pre") == pre


MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("legacy", [False, True])
def test_sentencepiece_tokenizer_exports_with_scores_and_the_check_sees_legacy_spacing(tmp_path, sp_model_path,
                                                                                      legacy):
    """A Mistral-style model (sentencepiece tokenizer.model, [INST] template ending turns with </s>) exports
    as llama.cpp's "llama" tokenizer. llama.cpp gives text after a special token no leading "▁"; a model
    trained with transformers' legacy spacing (which does) would see other ids, and the check says so."""
    import tiny

    saved = tiny.TINY_CONFIGS["mistral"]
    tiny.TINY_CONFIGS["mistral"] = {**saved, "vocab_size": 32000}
    try:
        model_dir = tiny.save_tiny("mistral", tmp_path / "model")
    finally:
        tiny.TINY_CONFIGS["mistral"] = saved
    (model_dir / "tokenizer.model").write_bytes(sp_model_path.read_bytes())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "legacy": legacy,
        "chat_template": MISTRAL_TEMPLATE}))
    out = tmp_path / "m.gguf"
    result = cli("export-gguf", str(model_dir), str(out))
    if legacy:
        assert result.exit_code == 1 and "different token ids" in result.output and not out.exists()
        return
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(out)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.eot_token_id") == 2  # </s> closes the assistant's turn
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))
    scores = field(reader, "tokenizer.ggml.scores")
    assert [round(x, 4) for x in scores[:500]] == [round(sp.get_score(i), 4) for i in range(500)]
