import importlib.util
import os
from pathlib import Path

import pytest
import torch

# Triton reads this when kernels are defined. Without a CUDA device the CPU lane runs every kernel in the
# interpreter; with one, the kernels must compile (`pytest -m gpu` tests real GPU code, and the interpreter's
# bf16 tl.dot is wrong), so it is left unset there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, saying why, where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu lane: needs a CUDA device (none present, so the CPU lane interprets Triton)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


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
