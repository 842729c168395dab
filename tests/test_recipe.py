"""Recipes: TOML -> dataclasses, overrides, error messages, round trip, the shipped recipes and their CLI."""

import dataclasses
import typing
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from qtune.cli.recipe_cmds import COMMANDS
from qtune.recipe.load import load_recipe
from qtune.recipe.schema import RecipeError, field_docs, iter_fields, recipe_to_toml
from qtune.recipe.sections import DataSource, SFTDataSection, SFTRecipe
from qtune.recipes import shipped_recipes

MINIMAL = 'description = "tiny"\n[data]\npath = "train.json"\n'


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(path, overrides)
    return str(e.value)


def all_section_types(cls, seen=None) -> set:
    seen = set() if seen is None else seen
    seen.add(cls)
    for tp in typing.get_type_hints(cls).values():
        for t in (tp, *typing.get_args(tp)):
            if dataclasses.is_dataclass(t) and t not in seen:
                all_section_types(t, seen)
    return seen


def test_defaults_fill_every_field(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert isinstance(r, SFTRecipe) and r.kind == "sft" and r.description == "tiny"
    assert (r.model.path, r.model.quantize, r.lora.r, r.lora.alpha) == ("smollm2-135m", "nf4", 64, 16.0)
    assert (r.data.path, r.train.max_steps, r.train.seed, r.output.dir) == ("train.json", 0, 0, "runs/sft")


def test_every_field_has_a_one_line_doc():
    for cls in all_section_types(SFTRecipe):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
            assert "\n" not in docs[f.name]
    keys = {key: doc for key, _, doc in iter_fields(load_recipe("alpaca"))}
    assert keys["lora.r"].startswith("Rank") and keys["data.max_seq_len"]


def test_overrides_parse_toml_literals_and_keep_strings(tmp_path):
    path = write(tmp_path, MINIMAL)
    r = load_recipe(path, ["train.lr=1e-4", "train.max_steps=7", "data.packing=true", "lora.alpha=32",
                           'lora.target_modules=["q_proj", "v_proj"]', "model.path=/models/7b",
                           "output.dir=123", 'data.sources=[{path = "a.jsonl", weight = 2}]', "data.path="])
    assert r.train.lr == 1e-4 and r.train.max_steps == 7 and r.data.packing is True
    assert r.lora.alpha == 32.0 and isinstance(r.lora.alpha, float)
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.model.path == "/models/7b" and r.output.dir == "123"  # string fields take the text as written
    assert r.data.sources == [DataSource(path="a.jsonl", weight=2.0)]


@pytest.mark.parametrize("text, expected", [
    ("[train]\nlrr = 1.0\n", ["r.toml", "train.lrr", "did you mean 'lr'", "max_steps"]),
    ("[traing]\nlr = 1.0\n", ["r.toml", "traing", "did you mean 'train'"]),
    ('[train]\nlr = "fast"\n', ["r.toml", "train.lr", "expected a number", "'fast'"]),
    ("[train]\nmax_steps = 1.5\n", ["train.max_steps", "expected an integer"]),
    ("[model]\nquantize = \"nf8\"\n", ["model.quantize", "'nf8'", "nf4, none"]),
    ('[train]\noptimizer = "sgd"\n', ["train.optimizer", "adamw, adamw8bit, paged_adamw, paged_adamw8bit"]),
    ("[lora]\ndropout = 1.5\n", ["lora.dropout", "[0, 1)", "1.5"]),
    ('[lora]\ntarget_modules = ["qkv"]\n', ["lora.target_modules", "'qkv'", "q_proj"]),
    ("[model]\ngradient_checkpointing = 1\n", ["model.gradient_checkpointing", "true or false"]),
    ("[data]\nval_size = 10\nval_fraction = 0.1\n", ["data.val_size", "not both"]),
    ('[[data.sources]]\npath = "a.json"\nweight = 0\n', ["data.sources[0].weight", "positive"]),
    ('[[data.sources]]\npath = "a.json"\nshape = 1\n', ["data.sources[0].shape", "unknown key"]),
    ("[data]\npretrain_fraction = 0.2\n", ["data.pretrain_path", "needs a pretrain_path"]),
    ('kind = "rlhf"\n', ["r.toml", "kind = 'rlhf'", "sft", "dpo"]),
    ("[train\n", ["r.toml", "not valid TOML"]),
])
def test_file_errors_name_file_key_and_allowed_values(tmp_path, text, expected):
    if "[data]" in text:
        body = text.replace("[data]\n", '[data]\npath = "train.json"\n')
    elif "sources" in text:
        body = text
    else:
        body = MINIMAL + text if text.startswith("[") else text + MINIMAL
    message = error_of(write(tmp_path, body))
    for part in expected:
        assert part in message, message


def test_missing_data_is_an_error(tmp_path):
    assert "no training data" in error_of(write(tmp_path, 'description = "x"\n'))


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", ["override 'train.lrr=1'", "did you mean 'lr'"]),
    ("train.lr=abc", ["override 'train.lr=abc'", "expected a number"]),
    ("lora.r=0", ["override 'lora.r=0'", "lora.r", "positive"]),
    ("data.path.x=1", ["data.path is not a table"]),
    ("lr", ["expected key.sub=value"]),
])
def test_override_errors_name_the_override(tmp_path, override, expected):
    message = error_of(write(tmp_path, MINIMAL), [override])
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("text, key, expected", [
    ("[train]\nlr = nan\n", "train.lr", "must be a number, got nan"),
    ("[lora]\nalpha = inf\n", "lora.alpha", "must be finite, got inf"),
    ("[train]\nwarmup_ratio = -inf\n", "train.warmup_ratio", "must be finite, got -inf"),
    ("[train]\nseed = 9223372036854775808\n", "train.seed", "must fit in 64 bits"),
])
def test_unusable_numbers_are_refused_naming_the_key(tmp_path, text, key, expected):
    path = write(tmp_path, MINIMAL + text)
    message = error_of(path)
    assert str(path) in message and key in message and expected in message, message
    override = f"{key}={text.split('= ')[1].strip()}"
    message = error_of(write(tmp_path, MINIMAL, "plain.toml"), [override])
    assert f"override {override!r}" in message and expected in message, message


@pytest.mark.parametrize("content, expected", [
    (b'description = "caf\xe9"\n', "not UTF-8 text (byte 18 is b'\\xe9')"),
    (b"kind = [1]\n", "kind = [1] is not a recipe kind"),
    (b"kind = 3\n", "kind = 3 is not a recipe kind"),
])
def test_unreadable_recipes_are_errors_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "r.toml"
    path.write_bytes(content)
    message = error_of(path)
    assert str(path) in message and expected in message, message


def test_an_inline_table_override_merges_into_the_files_section(tmp_path):
    path = write(tmp_path, MINIMAL + "[train]\nlr = 0.0005\nseed = 7\n")
    recipe = load_recipe(path, ["train={max_steps=2, seed=3}"])
    assert (recipe.train.max_steps, recipe.train.seed, recipe.train.lr) == (2, 3, 0.0005)


def test_an_infinite_default_may_be_written_out():
    recipe = load_recipe("best_of_n", ["best_of_n.min_score=-inf"])  # -inf is the field's own "keep all"
    assert recipe.best_of_n.min_score == float("-inf")
    assert "must be finite" in error_of("best_of_n", ["best_of_n.min_score=inf"])


def test_recipe_to_toml_round_trips(tmp_path):
    text = MINIMAL.replace('path = "train.json"\n', "") + (
        '[[data.sources]]\npath = "a.json"\nweight = 2.5\nmax_examples = 100\n'
        '[[data.sources]]\npath = "b.jsonl"\nformat = "sharegpt"\n')
    r = load_recipe(write(tmp_path, text), ['description=quote " and \\ backslash', "train.lr=3e-05"])
    out = recipe_to_toml(r)
    assert "# Peak learning rate." in out and "[[data.sources]]" in out
    assert load_recipe(write(tmp_path, out, "back.toml")) == r


# validate reads a model's config.json (not its weights) to check data.max_seq_len against its positions
TINY_CONFIG = ('{"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, '
               '"num_attention_heads": 2, "max_position_embeddings": 4096}')


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_round_trips(tmp_path, name):
    """--resume compares a recipe with the run's recipe.toml, so what recipe_to_toml writes must read back equal
    (a field doc of several lines once left a line of prose outside the comment)."""
    r = load_recipe(name)
    assert load_recipe(write(tmp_path, recipe_to_toml(r), "back.toml"), schema=type(r)) == r


def test_source_list_wraps_a_single_path():
    d = SFTDataSection(path="x.json", format="alpaca", split="test")
    assert d.source_list() == [DataSource(path="x.json", format="alpaca", split="test")]


def test_shipped_alpaca_recipe_has_the_qlora_paper_settings():
    assert "alpaca" in shipped_recipes()
    r = load_recipe("alpaca")
    assert (r.model.quantize, r.model.double_quant) == ("nf4", True)
    assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.target_modules) == (64, 16.0, 0.1, "all-linear")
    assert (r.train.lr, r.train.schedule, r.train.warmup_ratio, r.train.max_grad_norm) == (2e-4, "constant", 0.03, 0.3)
    assert r.train.optimizer == "paged_adamw" and r.train.micro_batch_size * r.train.grad_accum_steps == 16
    assert r.data.max_seq_len == 512 and r.data.format == "alpaca"
    text = shipped_recipes()["alpaca"].read_text()
    assert "arXiv:2305.14314" in text and "model.path" in text and "data.path" in text


@pytest.fixture()
def cli():
    group = click.Group(commands=COMMANDS)
    return lambda *args: CliRunner().invoke(group, list(args))


def test_cli_ls_and_cp(cli, tmp_path):
    result = cli("ls")
    assert result.exit_code == 0 and "alpaca" in result.output and "QLoRA" in result.output
    assert cli("cp", "alpaca", str(tmp_path)).exit_code == 0
    assert (tmp_path / "alpaca.toml").read_text() == shipped_recipes()["alpaca"].read_text()
    again = cli("cp", "alpaca", str(tmp_path / "alpaca.toml"))
    assert again.exit_code != 0 and "--force" in again.output
    assert cli("cp", "nope", str(tmp_path)).exit_code != 0


def test_cli_validate(cli, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(TINY_CONFIG)
    data = write(tmp_path, "[]", "train.json")
    ok = cli("validate", "alpaca", f"model.path={model}", f"data.path={data}")
    assert ok.exit_code == 0, ok.output
    assert "Recipe is valid" in ok.output and "lora.alpha" in ok.output
    missing = cli("validate", "alpaca", f"model.path={model}", "data.path=./nowhere.json")
    assert missing.exit_code != 0 and "nowhere.json: no such file" in missing.output
    bad = cli("validate", "alpaca", "train.lr=-1")
    assert bad.exit_code != 0 and "train.lr" in bad.output and "positive" in bad.output


def test_cli_validate_imports_no_reward_function_and_says_the_run_will(cli, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('imported').touch()\ndef score(p, r, rec): return 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(TINY_CONFIG)
    data = write(tmp_path, "[]", "prompts.json")
    result = cli("validate", "ppo", f"model.path={model}", f"data.path={data}", "ppo.reward_model=",
                 "ppo.reward_fn=my_rewards:score", "data.pretrain_path=")
    output = " ".join(result.output.split())  # rich wraps long lines at the terminal width
    assert "ppo.reward_fn = 'my_rewards:score'" in output and "the run imports and calls" in output, output
    assert not (tmp_path / "imported").exists()
    grpo = cli("validate", "grpo", f"model.path={model}", f"data.path={data}",
               'grpo.rewards=[{fn="answer"}, {fn="my_rewards:score", weight=0.5}]')
    output = " ".join(grpo.output.split())
    assert "grpo.rewards[1].fn = 'my_rewards:score'" in output and "grpo.rewards[0].fn" not in output, output
    assert not (tmp_path / "imported").exists()
