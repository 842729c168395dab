"""Hypothesis generators of the inputs a user hands qtune, and the targets that read them (#21).

Shared by tests/test_fuzz_inputs.py (bounded, in CI) and benchmarks/fuzz_inputs.py (10,000 cases in all).
Each target reads one drawn input the way qtune does and may raise only qtune's own error types.

Inputs are near misses more than noise: recipes and configs drawn over their real keys with values of every
JSON/TOML type (NaN, huge integers, nested tables), data records over the fields the formats read, chat turns
with odd roles, files written as JSON, JSONL or gzip, then truncated or spliced with garbage.
"""

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from qtune.config import ConfigError, ModelConfig
from qtune.data.kto import load_kto_records
from qtune.data.prefs import load_preferences, tokenize_preferences
from qtune.data.prompts import load_prompts
from qtune.data.records import DataError
from qtune.data.sft import build_sft_data
from qtune.lora import AdapterError
from qtune.lora.peft import read_adapter_config
from qtune.recipe.align import PromptDataSection
from qtune.recipe.load import RECIPE_KINDS, find_recipe, load_recipe
from qtune.recipe.schema import RecipeError, iter_fields
from qtune.recipe.sections import SFTDataSection
from qtune.tokenizer import TokenizerError, load_tokenizer
from qtune.train.common import TrainingError
from qtune.weights.checkpoint import CheckpointError

QTUNE_ERRORS = (RecipeError, ConfigError, AdapterError, DataError, TokenizerError, CheckpointError, TrainingError)

# ----------------------------------------------------------------------------- values

unicode = st.characters(codec="utf-8")  # no lone surrogates: a file holding one is not text at all (raw bytes are)
scalars = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(unicode, max_size=24))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(unicode, max_size=8), inner, max_size=4), max_leaves=10)

ROLES = ["system", "user", "assistant", "human", "gpt", "usr", "assitant", "", "tool"]
texts = st.text(unicode, max_size=40) | st.sampled_from(["", " ", "\n", "<|im_end|>", "\x00", "\ud7ff", "Answer: 4"])
turn = st.fixed_dictionaries({}, optional={"role": st.sampled_from(ROLES) | json_values, "content": texts | json_values,
                                           "from": st.sampled_from(ROLES), "value": texts})
turns = st.lists(turn, max_size=5) | json_values
field_values = texts | turns | json_values

words = st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "Zs")), min_size=1, max_size=30)
chat = st.builds(lambda system, pairs: system + [t for p in pairs for t in p],
                 st.lists(st.builds(lambda t: {"role": "system", "content": t}, words), max_size=1),
                 st.lists(st.tuples(st.builds(lambda t: {"role": "user", "content": t}, words),
                                    st.builds(lambda t: {"role": "assistant", "content": t}, words)),
                          min_size=1, max_size=2))


def _sharegpt(messages: list[dict]) -> list[dict]:
    return [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
            for m in messages]


sharegpt = chat.map(_sharegpt)
transcript = st.builds(lambda q, a: f"\n\nHuman: {q}\n\nAssistant: {a}", words, words)
hh_pair = st.builds(lambda q, a, b: {"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}",
                                     "rejected": f"\n\nHuman: {q}\n\nAssistant: {b}"}, words, words, words)
question = chat.map(lambda turns: turns[:-1])  # a conversation up to its last user turn

# Well-formed records of each layout the readers take; `mutated` then damages some of them.
SFT_ROWS = [st.fixed_dictionaries({"instruction": words, "input": words | st.just(""), "output": words}),
            st.fixed_dictionaries({"messages": chat}), st.fixed_dictionaries({"conversations": sharegpt}),
            st.fixed_dictionaries({"text": words})]
PREF_ROWS = [st.fixed_dictionaries({"prompt": words | question, "chosen": words, "rejected": words}),
             st.fixed_dictionaries({"prompt": words, "responses": st.lists(words, min_size=2, max_size=3),
                                    "scores": st.lists(st.floats(-5, 5), min_size=2, max_size=3)}),
             hh_pair,
             st.fixed_dictionaries({"conversations": question.map(_sharegpt), "chosen": words, "rejected": words}),
             st.fixed_dictionaries({"messages": question, "chosen": words, "rejected": words})]
KTO_ROWS = [st.fixed_dictionaries({"prompt": words, "completion": words, "label": st.booleans()})]
PROMPT_ROWS = [st.fixed_dictionaries({"prompt": words | chat}), st.fixed_dictionaries({"instruction": words}),
               st.fixed_dictionaries({"messages": chat}), st.fixed_dictionaries({"conversations": sharegpt}),
               st.fixed_dictionaries({"chosen": transcript})]
FIELDS = ["instruction", "input", "output", "messages", "conversations", "text", "prompt", "chosen", "rejected",
          "responses", "scores", "chosen_score", "rejected_score", "completion", "label"]


@st.composite
def mutated(draw, rows):
    """A well-formed record, often as it is, else with a field set to any value, a field dropped, or replaced."""
    row = dict(draw(st.one_of(rows)))
    how = draw(st.sampled_from(["keep", "keep", "keep", "set", "drop", "replace"]))
    if how == "set":
        row[draw(st.sampled_from(FIELDS) | st.text(max_size=6))] = draw(field_values)
    elif how == "drop" and row:
        row.pop(draw(st.sampled_from(sorted(row))))
    elif how == "replace":
        return draw(json_values)
    return row


@st.composite
def data_files(draw, layouts) -> tuple[str, bytes]:
    """(file suffix, bytes): records of one layout as JSONL or a JSON array, maybe gzipped, maybe damaged."""
    layout = draw(st.sampled_from(layouts))
    rows = draw(st.lists(mutated([layout]), min_size=1, max_size=6))
    suffix = draw(st.sampled_from([".jsonl", ".json", ".jsonl.gz", ".json.gz"]))
    text = json.dumps(rows) if suffix.startswith(".json.") or suffix == ".json" else "".join(
        json.dumps(r) + "\n" for r in rows)
    data = text.encode("utf-8", errors="surrogatepass")
    damage = draw(st.sampled_from(["none"] * 6 + ["splice", "bytes"]))
    if damage == "splice":  # a stray line or byte run somewhere in the file
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(max_size=12) | st.just(b"\n{\n")) + data[at:]
    elif damage == "bytes":
        data = draw(st.binary(max_size=64))
    if suffix.endswith(".gz"):
        packed = gzip.compress(data)
        if draw(st.integers(0, 3)) == 0:  # truncated, or not gzip at all under a .gz name
            packed = draw(st.sampled_from([packed[:draw(st.integers(0, len(packed)))], data]))
        data = packed
    return suffix, data


# ----------------------------------------------------------------------------- recipes and configs

def _toml_value(value) -> str:
    """A value as TOML text (JSON's string escapes are TOML's; a few NaN/inf spellings pass through)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(value, "nan" if value != value else repr(value))
    if isinstance(value, (int, str)):
        return json.dumps(value) if isinstance(value, str) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    return '""'


# every dotted key of every recipe kind -> its default value
RECIPE_DEFAULTS = {key: value for schema in RECIPE_KINDS.values() for key, value, _ in iter_fields(schema())}
recipe_keys = st.sampled_from(sorted(RECIPE_DEFAULTS)) | st.text(unicode, min_size=1, max_size=10)
recipe_values = json_values | st.sampled_from(["nan", "inf", "-1", "0", "1e400", "9" * 30, "auto"])


def typed_value(key: str):
    """A value of the key's own type (its default, or near it) half the time, else any value."""
    default = RECIPE_DEFAULTS.get(key)
    same = {bool: st.booleans(), int: st.integers(-2, 10**6), float: st.floats(-10, 1e4) | st.just(float("nan")),
            str: st.just(default) | words, list: st.lists(words, max_size=3)}.get(type(default))
    return recipe_values if same is None else same | recipe_values


@st.composite
def override_texts(draw) -> str:
    key = draw(recipe_keys)
    value = draw(st.text(unicode, max_size=20) | typed_value(key).map(_toml_value))
    return f"{key}{draw(st.sampled_from(['=', '=', '=', ':', '']))}{value}"


@st.composite
def recipe_texts(draw) -> bytes:
    """A recipe file: `kind`, then tables of real or stray keys with values of any type; sometimes raw bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=80))
    kind = draw(st.sampled_from(sorted(RECIPE_KINDS)) | json_values)
    lines = [f"kind = {_toml_value(kind)}"]
    own = sorted(key for key, _, _ in iter_fields(RECIPE_KINDS[kind]())) if kind in sorted(RECIPE_KINDS) else []
    keys = (st.sampled_from(own) | recipe_keys) if own else recipe_keys
    sections: dict[str, list[str]] = {}
    for key in draw(st.lists(keys, max_size=8, unique=True)):
        section, _, name = key.rpartition(".")
        if name:
            sections.setdefault(section, []).append(f"{json.dumps(name)} = {_toml_value(draw(typed_value(key)))}")
    for section, body in sections.items():
        lines += ([f"[{section}]"] if section else []) + body
    return "\n".join(lines).encode("utf-8", errors="surrogatepass")



CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "rope_scaling", "model_type", "tie_word_embeddings", "sliding_window", "attention_bias", "hidden_act"]
GOOD_CONFIG = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
               "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
ADAPTER_KEYS = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias", "use_dora",
                "base_model_name_or_path", "modules_to_save"]
GOOD_ADAPTER = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
GOOD_TOKENIZER_CONFIG = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                         "add_bos_token": False, "chat_template": CHATML}
TOKENIZER_KEYS = ["bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "chat_template",
                  "added_tokens_decoder", "legacy"]
# templates that break in each way a model's own template can: syntax, raise_exception, the sandbox, a bug
TEMPLATES = [CHATML, "{% for m in messages %}{{ m.content }", "{{ raise_exception('roles must alternate') }}",
             "{{ messages.__class__.__mro__ }}", "{{ 1 / 0 }}", "{{ messages[7].content }}", "{{ messages + 1 }}",
             "{% for %}", "{{ bos_token | length > 3 }}"]
added_token = st.fixed_dictionaries({"content": texts | json_values},
                                    optional={"special": json_values, "normalized": json_values})
tokenizer_configs = st.builds(
    lambda changes: {**GOOD_TOKENIZER_CONFIG, **changes},
    st.fixed_dictionaries({}, optional={
        "chat_template": st.sampled_from(TEMPLATES) | json_values
        | st.lists(st.fixed_dictionaries({"name": texts, "template": st.sampled_from(TEMPLATES)}), max_size=2),
        "added_tokens_decoder": st.dictionaries(st.integers(0, 700).map(str) | st.text(max_size=4), added_token,
                                                max_size=3) | json_values,
        **{key: st.sampled_from(["<|im_end|>", "<|endoftext|>", "absent-token"]) | json_values
           | st.fixed_dictionaries({"content": texts}) for key in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "add_bos_token": json_values}))


def json_files(good: dict, keys: list[str]):
    """A JSON file: a good object with some keys replaced by any value, or any JSON value, or raw bytes."""
    edited = st.builds(lambda changes: {**good, **changes},
                       st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), json_values, max_size=4))
    return (edited.map(lambda d: json.dumps(d).encode()) | json_values.map(lambda v: json.dumps(v).encode())
            | st.binary(max_size=48))


# ----------------------------------------------------------------------------- targets

@dataclass
class Workspace:
    """A directory to write the drawn files into, and a small real tokenizer with a chat template."""

    dir: Path
    tokenizer: object

    def write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        return path


def read_recipe(ws: Workspace, text: bytes) -> None:
    load_recipe(ws.write("recipe.toml", text))


def apply_override(ws: Workspace, override: str) -> None:
    load_recipe(find_recipe("quickstart"), [override])


def read_config(ws: Workspace, data: bytes) -> None:
    ws.write("config.json", data)
    ModelConfig.from_json(ws.dir / "config.json")


def read_adapter(ws: Workspace, data: bytes) -> None:
    ws.write("adapter_config.json", data)
    read_adapter_config(ws.dir)


def read_tokenizer_config(ws: Workspace, data: bytes) -> None:
    directory = ws.dir / "tokenizer_fuzz"
    directory.mkdir(exist_ok=True)
    shutil.copyfile(ws.tokenizer.model_dir / "tokenizer.json", directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_bytes(data)
    tokenizer = load_tokenizer(directory)
    tokenizer.encode("Say hi.", add_bos=tokenizer.bos_id is not None)
    if tokenizer.has_chat_template:
        tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True)


def read_sft_data(ws: Workspace, drawn: tuple[str, bytes, str]) -> None:
    suffix, data, fmt = drawn
    path = ws.write("sft" + suffix, data)
    build_sft_data(SFTDataSection(path=str(path), format=fmt, max_seq_len=256, cache_dir=""), ws.tokenizer, seed=0)


def read_preferences(ws: Workspace, drawn: tuple[str, bytes, str]) -> None:
    suffix, data, fmt = drawn
    path = ws.write("prefs" + suffix, data)
    prefs, _ = load_preferences(str(path), fmt)
    tokenize_preferences(prefs, ws.tokenizer, 256, str(path))


def read_kto(ws: Workspace, drawn: tuple[str, bytes]) -> None:
    suffix, data = drawn
    load_kto_records(str(ws.write("kto" + suffix, data)))


def read_prompts(ws: Workspace, drawn: tuple[str, bytes, str]) -> None:
    suffix, data, fmt = drawn
    path = ws.write("prompts" + suffix, data)
    load_prompts(PromptDataSection(path=str(path), format=fmt, max_seq_len=32, cache_dir=""), ws.tokenizer, seed=0)


def _with_format(rows, formats: list[str]):
    return st.tuples(data_files(rows), st.sampled_from(["auto", "auto", *formats])).map(lambda t: (*t[0], t[1]))


# name -> (strategy, target)
TARGETS = {
    "recipe": (recipe_texts(), read_recipe),
    "override": (override_texts(), apply_override),
    "config.json": (json_files(GOOD_CONFIG, CONFIG_KEYS), read_config),
    "adapter_config.json": (json_files(GOOD_ADAPTER, ADAPTER_KEYS), read_adapter),
    "tokenizer_config.json": (tokenizer_configs.map(lambda d: json.dumps(d).encode()) | json_files(
        GOOD_TOKENIZER_CONFIG, TOKENIZER_KEYS), read_tokenizer_config),
    "sft data": (_with_format(SFT_ROWS, ["auto", "alpaca", "chat", "sharegpt", "text"]), read_sft_data),
    "preference data": (_with_format(PREF_ROWS, ["auto", "pairs", "ranking", "sharegpt", "chat", "hh"]),
                        read_preferences),
    "kto data": (data_files(KTO_ROWS), read_kto),
    "prompt data": (_with_format(PROMPT_ROWS, ["auto", "prompt", "alpaca", "chat", "sharegpt", "hh"]),
                    read_prompts),
}
