"""Property-based fuzzing of every reader of user input (#21): recipes, overrides, config.json,
adapter_config.json, tokenizer_config.json (chat templates included) and each data and preference layout, gzip
included. Whatever is drawn, only qtune's own error types may escape. The generators live in tests/fuzzing.py;
benchmarks/fuzz_inputs.py runs them for 10,000 cases in all and counts the outcomes."""

import pytest
from fuzzing import QTUNE_ERRORS, TARGETS, Workspace
from hypothesis import HealthCheck, given, settings
from test_data_tokenizer import make_tokenizer_dir

from qtune.tokenizer import load_tokenizer

EXAMPLES = 120  # per target: the nine together take well under a minute on one CPU core


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    return Workspace(directory, load_tokenizer(make_tokenizer_dir(directory / "tokenizer")))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_only_qtune_errors_escape(workspace, name):
    strategy, target = TARGETS[name]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def read(drawn):
        try:
            target(workspace, drawn)
        except QTUNE_ERRORS:
            pass  # a named, explained refusal: what bad input must get

    read()


GOOD = '"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, ' \
       '"num_hidden_layers": 1, "num_attention_heads": 2'
FOUND = [  # (target, input) pairs that once escaped as TypeError, AttributeError, UnicodeDecodeError, ...
    ("config.json", b"\x82\xebM"),
    ("config.json", ("{" + GOOD + ', "rope_scaling": true}').encode()),
    ("config.json", ("{" + GOOD + ', "rope_theta": "fast"}').encode()),
    ("config.json", ("{" + GOOD + ', "max_position_embeddings": null}').encode()),
    ("adapter_config.json", b"\x82\xebM"),
    ("tokenizer_config.json", b'{"eos_token": "<|im_end|>", "chat_template": "{{ 1 / 0 }}"}'),
    ("tokenizer_config.json", b'{"eos_token": "<|im_end|>", "chat_template": "{{ messages + 1 }}"}'),
    ("tokenizer_config.json", b'{"eos_token": "<|im_end|>", "added_tokens_decoder": null}'),
    ("tokenizer_config.json", b'{"eos_token": "<|im_end|>", "pad_token": {"content": ""}}'),
    ("tokenizer_config.json", b'{"eos_token": ["<|im_end|>"]}'),
]


@pytest.mark.parametrize("name, data", FOUND)
def test_inputs_fuzzing_found_are_read_or_refused_by_name(workspace, name, data):
    _, target = TARGETS[name]
    try:
        target(workspace, data)
    except QTUNE_ERRORS as e:
        assert name in str(e)
