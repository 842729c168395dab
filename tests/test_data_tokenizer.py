"""A small real tokenizer directory for the data tests, and checks that it behaves like a model's.

`make_tokenizer_dir` trains a byte-level BPE (the `tokenizers` library, as GPT-2 / SmolLM2 use) on the
Alpaca demo data and writes tokenizer.json + tokenizer_config.json with a ChatML chat template, which
`qtune.tokenizer.load_tokenizer` reads like any Hugging Face model directory.
"""

import json
from pathlib import Path

import pytest

from shared_data import ALPACA_DEMO, C4_DEMO, DPO_DEMO, SHARED_DATA  # noqa: F401  (re-exported for other tests)

# ChatML, with a default system turn when the conversation has none (as SmolLM2's template does).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    if ALPACA_DEMO.is_file():
        rows = json.loads(ALPACA_DEMO.read_text())[:300]
        return [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    return ["Below is an instruction that describes a task. Write a response.\n\n### Response:"] * 50


def make_tokenizer_dir(directory: Path, chat_template: str | None = CHATML, add_bos: bool = False,
                       specials: list[str] = SPECIALS, config: dict | None = None) -> Path:
    """Write a tokenizer-only model directory. add_bos: `<|endoftext|>` is BOS and is prepended (Llama-style).

    `specials` are the special tokens (ids 0, 1, ...); `config` replaces the default tokenizer_config.json
    special-token fields (a model family's own bos / eos / pad, as tests/test_chat_templates.py writes them).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config is None:
        config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                  "bos_token": "<|endoftext|>" if add_bos else "<|im_start|>", "add_bos_token": add_bos}
    if chat_template is not None:
        config = {**config, "chat_template": chat_template}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def load(directory: Path):
    from qtune.tokenizer import load_tokenizer

    return load_tokenizer(directory)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def test_fixture_tokenizer_round_trips_text_and_special_tokens(tok):
    text = "### Instruction:\nName three primary colors.\n\n### Response:Red, blue and yellow."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user\n")[0] == SPECIALS.index("<|im_start|>")
    assert tok.eos_id == SPECIALS.index("<|im_end|>") and tok.pad_id == SPECIALS.index("<|endoftext|>")


def test_fixture_template_renders_chatml(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
