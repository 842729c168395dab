import os

# Triton reads this when kernels are defined: the CPU test lane runs every kernel in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct as a Hugging Face directory, pulled once per session.

    It lands in a session-private $QTUNE_HOME layout (`<home>/models/smollm2-135m`), so the tests never
    touch the user's own cache; `qtune pull` pointed at that home finds it ready.
    """
    from qtune.weights import hub

    dest = tmp_path_factory.mktemp("qtune_home") / "models" / "smollm2-135m"
    return hub.convert_into(hub.locate_gguf("smollm2-135m"), dest)


@pytest.fixture(scope="session")
def sp_model_path() -> Path:
    """The Llama/Mistral sentencepiece model (32000 pieces) that the mistral-common package ships."""
    spec = importlib.util.find_spec("mistral_common")
    return Path(spec.origin).parent / "data" / "tokenizer.model.v1"
