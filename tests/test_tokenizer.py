"""qtune.tokenizer against transformers' tokenizers and chat-template rendering (the independent reference).

(a) the sentencepiece path on the real Llama/Mistral `tokenizer.model` (32000 pieces, shipped by mistral-common)
    in a Llama-2-style model directory; (b) the tokenizer.json path on the converted SmolLM2 tokenizer.
"""

import json
import shutil

import pytest

from qtune.tokenizer import TokenizerError, load_tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, naïve café — déjà vu",
    "日本語のテキストと中文混合",
    "emoji 🤗🚀 and a ZWJ sequence 👩‍💻",
    "digits 1234567890, 3.14159 and 1e-5; 2024-01-02",
    "many     spaces   and\ttabs\t\there",
    "newlines\n\n\nand\r\nwindows\n",
    "def f(x):\n    return x ** 2  # square\n",
    "{\"json\": [1, 2, 3], 'quote': \"it's\"}",
    "  leading and trailing spaces  ",
    "\n starts with a newline",
]
LLAMA_SPECIAL_TEXTS = ["<s>[INST] hi [/INST] ok</s>", "x </s> y", "a<s>b<unk>c", "</s>"]
SMOLLM_SPECIAL_TEXTS = ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "a<|endoftext|>b 12"]

# A Llama-2-style chat template, spread over lines so trim_blocks/lstrip_blocks matter.
LLAMA2_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set messages = messages[1:] %}
{% else %}
    {% set system = false %}
{% endif %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {% if loop.first and system %}
            {% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}
        {% else %}
            {% set content = message['content'] %}
        {% endif %}
{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
    {% else %}
{{ ' ' + message['content'].strip() + ' ' + eos_token }}
    {% endif %}
{% endfor %}"""

# Template features beyond plain loops: tojson (no HTML escaping, non-ASCII kept), namespace, loop controls,
# the {% generation %} tag, strftime_now, extra variables.
FEATURE_TEMPLATE = """{% set ns = namespace(count=0) %}
Today is {{ strftime_now('%Y') }}.
{% if tools is not none %}Tools: {{ tools | tojson }}{% endif %}
{% for message in messages %}
    {% if message['role'] == 'stop' %}{% break %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    {% if message['role'] == 'assistant' %}
<a>{% generation %}{{ message['content'] | tojson }}{% endgeneration %}</a>
    {% else %}
<{{ message['role'] }}>{{ message | tojson(indent=2) }}
    {% endif %}
{% endfor %}
{{ ns.count }} messages{% if add_generation_prompt %}<a>{% endif %}"""

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Bonjour ! <b>&</b>"},
        {"role": "user", "content": "  How are you?  "},
    ],
    [{"role": "user", "content": "héllo 世界"}, {"role": "assistant", "content": "Hi \"there\""}],
]


def reference_llama_tokenizer(sp_model_path, legacy: bool):
    """transformers' Llama tokenizer converted from the sentencepiece vocabulary and scores.

    legacy=True takes the normalizer of Llama-2's published tokenizer.json (prepend "▁" to every text
    segment, spaces -> "▁"), which is what sentencepiece does to each segment between special tokens.
    """
    import sentencepiece
    from tokenizers import normalizers
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), legacy=legacy)
    if legacy:
        tok.backend_tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
        tok.backend_tokenizer.pre_tokenizer = None
    return tok


def make_llama2_dir(path, sp_model_path, legacy: bool):
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(sp_model_path, path / "tokenizer.model")
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "__type": "AddedToken"}
    config = {
        "add_bos_token": True, "add_eos_token": False, "legacy": legacy, "pad_token": None,
        "bos_token": {"content": "<s>", **special}, "eos_token": {"content": "</s>", **special},
        "unk_token": {"content": "<unk>", **special}, "tokenizer_class": "LlamaTokenizer",
        "clean_up_tokenization_spaces": False, "chat_template": LLAMA2_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def llama_pair(request, tmp_path_factory, sp_model_path):
    legacy = request.param
    ours = load_tokenizer(make_llama2_dir(tmp_path_factory.mktemp("llama2"), sp_model_path, legacy))
    return ours, reference_llama_tokenizer(sp_model_path, legacy), legacy


def test_sentencepiece_ids_equal_transformers(llama_pair):
    ours, reference, legacy = llama_pair
    for text in TEXTS + LLAMA_SPECIAL_TEXTS:
        if not legacy and text[0].isspace():
            # transformers' non-legacy Metaspace adds no "▁" to text that already starts with a space;
            # sentencepiece (and we) always add it, so these two differ by design there.
            continue
        ids = ours.encode(text)
        assert ids == reference(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special=False) == reference.decode(ids, skip_special_tokens=False), text


def test_sentencepiece_special_tokens(llama_pair):
    ours, reference, _ = llama_pair
    assert (ours.bos_id, ours.eos_id, ours.unk_id) == (1, 2, 0) == (
        reference.bos_token_id, reference.eos_token_id, reference.unk_token_id)
    assert ours.pad_id == ours.eos_id  # Llama-2 sets no pad token
    assert ours.eos_ids == {2} and ours.vocab_size == 32000 and ours.add_bos_token
    assert ours.encode("hi", add_bos=True, add_eos=True) == [1, *reference("hi", add_special_tokens=False).input_ids, 2]
    assert ours.token_to_id("\u2581the") == reference.convert_tokens_to_ids("\u2581the")
    assert ours.token_to_id("<0x0A>") == 13 and ours.token_to_id("not-a-piece") is None


def test_sentencepiece_decode_round_trip(llama_pair):
    ours, _, _ = llama_pair
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == text


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_llama2_chat_template_equals_transformers(llama_pair, add_generation_prompt):
    ours, reference, _ = llama_pair
    for chat in CHATS:
        expected = reference.apply_chat_template(
            chat, chat_template=LLAMA2_TEMPLATE, tokenize=False, add_generation_prompt=add_generation_prompt)
        rendered = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
        assert rendered == expected
        assert ours.encode(rendered) == reference(rendered, add_special_tokens=False).input_ids


def test_chat_template_raise_exception(llama_pair):
    ours, _, _ = llama_pair
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: the chat template failed .*roles must alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "first"}])


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_dir):
    from transformers import AutoTokenizer

    return load_tokenizer(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)


def test_tokenizer_json_ids_equal_transformers(smollm2_pair):
    ours, reference = smollm2_pair
    for text in TEXTS + SMOLLM_SPECIAL_TEXTS:
        ids = ours.encode(text)
        assert ids == reference(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special=False) == reference.decode(ids, skip_special_tokens=False), text
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == text


def test_tokenizer_json_special_tokens(smollm2_pair):
    ours, reference = smollm2_pair
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == (1, 2, 2)
    assert ours.eos_ids == {2} and ours.vocab_size == len(reference) == 49152
    assert not ours.add_bos_token and ours.has_chat_template
    assert ours.token_to_id("<|im_end|>") == 2 and ours.token_to_id("no such token") is None


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_smollm2_chat_template_equals_transformers(smollm2_pair, add_generation_prompt):
    ours, reference = smollm2_pair
    for chat in CHATS:
        expected = reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        rendered = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
        assert rendered == expected
        assert ours.encode(rendered) == reference(rendered, add_special_tokens=False).input_ids


def test_template_features_equal_transformers(smollm2_pair, smollm2_dir):
    _, reference = smollm2_pair
    ours = load_tokenizer(smollm2_dir)
    ours.chat_template = FEATURE_TEMPLATE
    tools = [{"name": "lookup", "description": "finds <things> & 'stuff' — fast"}]
    chat = CHATS[2] + [{"role": "stop", "content": ""}, {"role": "user", "content": "never shown"}]
    for kwargs in ({}, {"tools": tools}):
        expected = reference.apply_chat_template(
            chat, chat_template=FEATURE_TEMPLATE, tokenize=False, add_generation_prompt=True, **kwargs)
        assert ours.apply_chat_template(chat, add_generation_prompt=True, **kwargs) == expected
    assert "never shown" not in expected and "<b>&</b>" in expected


def test_generation_config_eos_list_and_pad_fallback(smollm2_dir, tmp_path):
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == 2 and tok.eos_ids == {0, 2} and tok.pad_id == 2 and tok.bos_id is None
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_tokenizer_json_preferred_and_chat_template_file(smollm2_dir, sp_model_path, tmp_path):
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copy(sp_model_path, tmp_path / "tokenizer.model")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 49152
    assert tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "[a][b]"


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)
