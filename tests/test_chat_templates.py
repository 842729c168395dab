"""Each family's published chat template (tests/fixtures/chat_templates, sources in SOURCES.md) through qtune.

For every family a tiny byte-level BPE gets the family's own special tokens and tokenizer_config.json fields
(bos / eos / pad as the model publishes them, generation_config.json's end-of-turn ids); then
  - qtune's render equals transformers' `apply_chat_template` on the same directory, single and multi-turn,
    with and without a system message and a generation prompt, including where the template raises;
  - the SFT token ids equal transformers' tokenized render, and the response-only label mask equals, token by
    token, the mask built from hand-written reply texts (what each template writes for an assistant turn)
    located with transformers' offset mapping;
  - a DPO pair on a chat prompt: the prompt's ids equal transformers' render with the generation prompt, each
    reply's ids the tokens of the template's reply text in transformers' render of the prompt plus that reply.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_data_tokenizer import load, make_tokenizer_dir

from qtune.data import DataError, tokenize_record
from qtune.data.prefs import Preference, tokenize_preference
from qtune.tokenizer import TokenizerError

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
IGNORE = -100


@dataclass(frozen=True)
class Family:
    template: str  # file under tests/fixtures/chat_templates
    specials: tuple[str, ...]  # special tokens of the family's tokenizer that the template writes
    config: dict  # tokenizer_config.json's special-token fields, as published
    end_of_turn: tuple[str, ...]  # generation_config.json's eos_token_id list, as tokens
    reply: str  # what the template writes for an assistant turn, {} = the reply text
    last_reply: str | None = None  # for the reply after the last user turn, where the template differs
    system: bool = True  # whether the template accepts a system message (Gemma 2 and Mixtral raise)


SP = ("<unk>", "<s>", "</s>")
GEMMA = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
GEMMA_CONFIG = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                "add_bos_token": True}
PHI3 = ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")
PHI3_CONFIG = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
               "add_bos_token": False}
LLAMA3 = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
          "<|eot_id|>", "<|python_tag|>")
LLAMA3_CONFIG = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
MISTRAL_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}

FAMILIES = {
    "qwen3": Family("qwen3.jinja", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
                    {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                    ("<|im_end|>", "<|endoftext|>"), "{}<|im_end|>\n",
                    last_reply="<think>\n\n</think>\n\n{}<|im_end|>\n"),
    "gemma2": Family("gemma2.jinja", GEMMA, GEMMA_CONFIG, ("<eos>", "<end_of_turn>"), "{}<end_of_turn>\n",
                     system=False),
    "gemma3": Family("gemma3.jinja", GEMMA, GEMMA_CONFIG, ("<eos>", "<end_of_turn>"), "{}<end_of_turn>\n"),
    "phi3": Family("phi3.jinja", PHI3, PHI3_CONFIG, ("<|endoftext|>", "<|assistant|>", "<|end|>"), "{}<|end|>\n",
                   last_reply="{}<|end|>\n<|endoftext|>"),
    "phi3.5": Family("phi3_5.jinja", PHI3, PHI3_CONFIG, ("<|endoftext|>", "<|assistant|>", "<|end|>"),
                     "{}<|end|>\n", last_reply="{}<|end|>\n<|endoftext|>"),
    "phi4": Family("phi4.jinja", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|dummy_85|>"),
                   {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|dummy_85|>"},
                   ("<|im_end|>",), "{}<|im_end|>"),
    "mistral-nemo": Family("mistral_nemo.jinja", (*SP, "[INST]", "[/INST]"), MISTRAL_CONFIG, ("</s>",), "{}</s>"),
    "mistral-small-3.1": Family("mistral_small_3_1.jinja", (*SP, "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                                                            "[/SYSTEM_PROMPT]"), MISTRAL_CONFIG, ("</s>",), "{}</s>"),
    "mixtral": Family("mixtral.jinja", SP, MISTRAL_CONFIG, ("</s>",), "{}</s>", system=False),
    "mistral-v0.2": Family("mistral_instruct_v0_2.jinja", SP, MISTRAL_CONFIG, ("</s>",), " {}</s>"),
    "llama3.1": Family("llama3_1.jinja", LLAMA3, LLAMA3_CONFIG, ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
                       "{}<|eot_id|>"),
    "llama3.2": Family("llama3_2.jinja", LLAMA3, LLAMA3_CONFIG, ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
                       "{}<|eot_id|>"),
}

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
Q1, A1 = {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}
Q2, A2 = {"role": "user", "content": "And the largest city of Italy?"}, {"role": "assistant", "content": "Rome, too."}
CONVERSATIONS = {"single": [Q1, A1], "single+system": [SYSTEM, Q1, A1], "multi": [Q1, A1, Q2, A2],
                 "multi+system": [SYSTEM, Q1, A1, Q2, A2]}


def write_family_dir(directory: Path, family: Family) -> Path:
    """A tokenizer directory with the family's special tokens, tokenizer_config fields, template and
    generation_config end-of-turn ids."""
    make_tokenizer_dir(directory, (FIXTURES / family.template).read_text(encoding="utf-8"),
                       specials=list(family.specials), config=family.config)
    eos_ids = [family.specials.index(token) for token in family.end_of_turn]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}))
    return directory


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, Family, qtune tokenizer, transformers tokenizer) over one directory."""
    from transformers import AutoTokenizer

    spec = FAMILIES[request.param]
    directory = write_family_dir(tmp_path_factory.mktemp(request.param.replace(".", "_")), spec)
    return request.param, spec, load(directory), AutoTokenizer.from_pretrained(directory)


def hf_render(reference, messages, **kwargs):
    """transformers' render, or the template's own error message."""
    from jinja2.exceptions import TemplateError

    try:
        return reference.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as err:
        return TemplateError(str(err))


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_render_equals_transformers(family, conversation):
    _, _, ours, reference = family
    messages = CONVERSATIONS[conversation]
    cases = [(messages, False), *[(messages[:k + 1], True) for k, m in enumerate(messages) if m["role"] == "user"]]
    for prefix, generation_prompt in cases:
        expected = hf_render(reference, prefix, add_generation_prompt=generation_prompt)
        if isinstance(expected, Exception):  # the template refuses the conversation: qtune names its reason
            with pytest.raises(TokenizerError, match="the chat template failed") as err:
                ours.apply_chat_template(prefix, add_generation_prompt=generation_prompt)
            assert str(expected) in str(err.value)
        else:
            assert ours.apply_chat_template(prefix, add_generation_prompt=generation_prompt) == expected


def expected_mask(reference, text: str, replies: list[str]) -> list[bool]:
    """Per token of `text` (transformers' tokenization and offsets): whether it lies inside one of `replies`,
    found in order in the text; every reply must start and end at a token boundary."""
    enc = reference(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    for reply in replies:
        start = text.index(reply, pos)
        spans.append((start, start + len(reply)))
        pos = start + len(reply)
    mask = []
    for a, b in enc["offset_mapping"]:
        inside = [s <= a and b <= e for s, e in spans]
        assert any(inside) or not any(a < e and s < b for s, e in spans), f"token {text[a:b]!r} straddles a reply"
        mask.append(any(inside))
    return mask


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_response_only_labels_token_by_token(family, conversation):
    name, spec, ours, reference = family
    messages = CONVERSATIONS[conversation]
    if messages[0]["role"] == "system" and not spec.system:
        # The template refuses a system turn (Gemma 2: "System role not supported"): so does the data pipeline.
        with pytest.raises(DataError, match="chat template failed"):
            tokenize_record({"messages": messages}, "chat", ours, False, "data.jsonl line 1")
        return
    ids, labels = tokenize_record({"messages": messages}, "chat", ours, False, "data.jsonl line 1")
    text = reference.apply_chat_template(messages, tokenize=False)
    assert ids == reference(text, add_special_tokens=False)["input_ids"]  # the template's end-of-turn is an EOS
    assert ids == reference.apply_chat_template(messages, tokenize=True, return_dict=False)
    last_user = max(k for k, m in enumerate(messages) if m["role"] == "user")
    replies = [(spec.last_reply if k > last_user and spec.last_reply else spec.reply).format(m["content"])
               for k, m in enumerate(messages) if m["role"] == "assistant"]
    assert [label != IGNORE for label in labels] == expected_mask(reference, text, replies), name
    assert all(label in (IGNORE, token) for label, token in zip(labels, ids))
    _, all_labels = tokenize_record({"messages": messages}, "chat", ours, True, "r")
    assert all_labels == ids


def test_gemma2_refuses_a_system_turn_with_its_own_message(tmp_path):
    ours = load(write_family_dir(tmp_path, FAMILIES["gemma2"]))
    with pytest.raises(DataError, match="System role not supported") as err:
        tokenize_record({"messages": CONVERSATIONS["single+system"]}, "chat", ours, False, "data.jsonl line 7")
    assert "data.jsonl line 7" in str(err.value) and "tokenizer_config.json" in str(err.value)


def test_qwen3_earlier_reply_trains_on_its_answer_without_the_dropped_reasoning(tmp_path):
    """Qwen3's template keeps the reasoning of replies after the last user turn only; an earlier reply's
    `<think>` block is not in the conversation, so its answer is what is trained."""
    from transformers import AutoTokenizer

    directory = write_family_dir(tmp_path, FAMILIES["qwen3"])
    ours, reference = load(directory), AutoTokenizer.from_pretrained(directory)
    first = {"role": "assistant", "content": "<think>\nThe capital is Paris.\n</think>\n\nParis."}
    last = {"role": "assistant", "content": "<think>\nMilan is larger than Rome? No.\n</think>\n\nRome, too."}
    messages = [Q1, first, Q2, last]
    ids, labels = tokenize_record({"messages": messages}, "chat", ours, False, "r")
    text = reference.apply_chat_template(messages, tokenize=False)
    assert "The capital is Paris" not in text and ids == reference(text, add_special_tokens=False)["input_ids"]
    replies = ["Paris.<|im_end|>\n", "<think>\nMilan is larger than Rome? No.\n</think>\n\nRome, too.<|im_end|>\n"]
    assert [label != IGNORE for label in labels] == expected_mask(reference, text, replies)


@pytest.mark.parametrize("conversation", ["single+system", "multi+system", "multi"])
def test_dpo_pair_prompt_and_replies(family, conversation):
    """A preference pair on a chat prompt: the prompt is transformers' render with the generation prompt (what
    the model reads before it answers, Mistral Nemo's system text included), each reply the tokens the template
    writes for it in transformers' render of the prompt plus that reply, located by the offsets of the reply text."""
    name, spec, ours, reference = family
    prompt = CONVERSATIONS[conversation][:-1]
    chosen, rejected = "Rome, too.", "Milan."
    pref = Preference(prompt, [chosen, rejected], where="pairs.jsonl line 1")
    if prompt[0]["role"] == "system" and not spec.system:
        with pytest.raises(DataError, match="chat template failed"):
            tokenize_preference(pref, ours, 512)
        return
    item, cut = tokenize_preference(pref, ours, 512)
    assert not cut
    assert item.prompt_ids.tolist() == reference.apply_chat_template(prompt, add_generation_prompt=True,
                                                                     return_dict=False)
    template = spec.last_reply or spec.reply
    for reply, ids in zip((chosen, rejected), item.response_ids):
        text = reference.apply_chat_template([*prompt, {"role": "assistant", "content": reply}], tokenize=False)
        tokens = reference(text, add_special_tokens=False)["input_ids"]
        mask = expected_mask(reference, text, [template.format(reply)])
        assert ids.tolist() == [t for t, inside in zip(tokens, mask) if inside], name
