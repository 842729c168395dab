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
