"""Damaged safetensors files (model shards, adapters) through the real CLI: one `Error:` line naming the file,
exit status 1, no traceback, nothing written."""

import json

import pytest
from click.testing import CliRunner
from tiny import save_tiny_with_tokenizer

from qtune.cli import main
from qtune.lora import LoraConfig, add_lora
from qtune.peft import save_adapter
from qtune.weights.checkpoint import load_model


def damage(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[how])


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny") / "m")


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_a_damaged_model_shard_is_one_error_naming_it(model_dir, tmp_path, how):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    shard = next(broken.glob("*.safetensors"))
    damage(shard, how)
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"instruction": "say hi", "input": "", "output": "hi"}]))
    for args in (["generate", broken, "--prompt", "hi", "--max-new-tokens", "2"], ["eval", broken, "--data", data],
                 ["quantize", broken, tmp_path / "out"]):
        result = run(*args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1, (args, result.output)
        assert lines[-1].startswith("Error: ") and str(shard) in lines[-1] and "not a readable safetensors file" in lines[-1]
        assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_damaged_adapter_is_one_error_naming_it(model_dir, tmp_path):
    model = load_model(model_dir, quantize="none")
    add_lora(model, LoraConfig(r=2, target_modules="all-linear"), seed=0)
    save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    damage(weights, "truncated")
    result = run("generate", model_dir, "--adapter", tmp_path / "adapter", "--prompt", "hi", "--max-new-tokens", "2")
    assert result.exit_code == 1 and str(weights) in result.output and "Traceback" not in result.output, result.output
