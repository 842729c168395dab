"""What qtune writes stays checkable: every file of a checkpoint or adapter directory is listed with its SHA-256
in qtune-manifest.json, and --resume, `qtune merge` and --adapter refuse a flipped byte with one Error naming
the file; a PEFT adapter saved by peft (no manifest) still loads. Leftovers of killed writers are removed at
the next start while a live process's are kept, and a run that fails on bad input leaves no empty output.dir.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console
from tiny import save_tiny_with_tokenizer

from qtune.cli import main
from qtune.lora import AdapterError, LoraConfig, add_lora
from qtune.peft import load_extra_tensors, save_adapter
from qtune.train.lock import LOCK_NAME
from qtune.train.run import Run
from qtune.weights.checkpoint import load_model
from qtune.weights.integrity import MANIFEST, remove_dead_leftovers


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny") / "m", seed=1)


def sft_args(tiny_dir, out, *extra) -> list[str]:
    return ["sft", "quickstart", f"model.path={tiny_dir}", f"output.dir={out}", "data.cache_dir=",
            "data.path=qtune:checkable-tasks?count=48&seed=0", "data.val_size=8", "eval.exact_match=0",
            "train.max_steps=2", "train.save_every=2", "train.log_every=1", *extra]


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    """A finished two-step run: checkpoints/step-000002 and adapter/."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run(*sft_args(tiny_dir, out))
    assert result.exit_code == 0, result.output
    return out


def flip(path: Path) -> None:
    """Flip the lowest bit of the byte in the middle of the file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def assert_one_error_naming(result, path: Path) -> None:
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert message.count("Error: ") == 1 and f"Error: {path}" in message, message


def listed_files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*")
            if p.is_file() and p != directory / MANIFEST}


def test_every_file_is_listed_with_its_sha256(finished):
    ckpt = finished / "checkpoints" / "step-000002"
    for directory in (ckpt, ckpt / "adapter", finished / "adapter"):
        files = json.loads((directory / MANIFEST).read_text())["files"]
        assert set(files) == listed_files(directory) and len(files) >= 2
        for name, entry in files.items():
            data = (directory / name).read_bytes()
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert {"trainable.safetensors", "optimizer.safetensors", "rng.json", "trainer.json", "COMPLETE",
            "adapter/adapter_model.safetensors", f"adapter/{MANIFEST}"} <= listed_files(ckpt)


def test_resume_refuses_a_flipped_byte_in_any_checkpoint_file(finished, tiny_dir, tmp_path):
    names = sorted(listed_files(finished / "checkpoints" / "step-000002"))
    for name in names:
        out = tmp_path / name.replace("/", "_")
        shutil.copytree(finished, out)
        damaged = out / "checkpoints" / "step-000002" / name
        flip(damaged)
        result = run(*sft_args(tiny_dir, out, "train.max_steps=4"), "--resume")
        assert_one_error_naming(result, damaged)
        assert "differ from what qtune wrote" in result.output.replace("\n", " ")
        assert "data:" not in result.output  # refused before the model and the data were loaded
        assert not (out / LOCK_NAME).exists() and (out / "checkpoints" / "step-000002").exists()
    intact = tmp_path / "intact"
    shutil.copytree(finished, intact)
    assert run(*sft_args(tiny_dir, intact, "train.max_steps=4"), "--resume").exit_code == 0


def test_merge_and_adapter_loading_refuse_a_flipped_byte(finished, tiny_dir, tmp_path):
    prompt = ["--prompt", "hi", "--max-new-tokens", "2"]
    for name in sorted(listed_files(finished / "adapter")):
        adapter = tmp_path / name.replace(".", "_")
        shutil.copytree(finished / "adapter", adapter)
        flip(adapter / name)
        assert_one_error_naming(run("merge", tiny_dir, adapter, tmp_path / "merged"), adapter / name)
        assert_one_error_naming(run("generate", tiny_dir, "--adapter", adapter, *prompt), adapter / name)
        assert not (tmp_path / "merged").exists()
    # A damaged manifest is refused too (naming it), and a file added after qtune wrote the directory.
    adapter = tmp_path / "manifest"
    shutil.copytree(finished / "adapter", adapter)
    flip(adapter / MANIFEST)
    result = run("merge", tiny_dir, adapter, tmp_path / "merged")
    assert result.exit_code == 1 and "Error: " in result.output and "Traceback" not in result.output
    adapter = tmp_path / "added"
    shutil.copytree(finished / "adapter", adapter)
    (adapter / "extra_tensors.safetensors").write_bytes(b"not from qtune")
    with pytest.raises(AdapterError, match=f"{adapter / 'extra_tensors.safetensors'}: not listed"):
        load_extra_tensors(adapter)
    assert run("merge", tiny_dir, finished / "adapter", tmp_path / "merged").exit_code == 0


def test_extra_tensors_are_checked(tiny_dir, tmp_path):
    model = load_model(tiny_dir, quantize="none")
    add_lora(model, LoraConfig(r=2), seed=0)
    adapter = save_adapter(model, tmp_path / "reward", extra_tensors={"score.weight": torch.ones(1, 64)})
    assert torch.equal(load_extra_tensors(adapter)["score.weight"], torch.ones(1, 64))
    flip(adapter / "extra_tensors.safetensors")
    with pytest.raises(AdapterError, match=f"{adapter / 'extra_tensors.safetensors'}: its contents differ"):
        load_extra_tensors(adapter)


def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_a_dead_writers_leftovers_go_at_the_next_start_and_a_live_ones_stay(tmp_path):
    out, dead = tmp_path / "run", dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        leftovers = [out / f".adapter.tmp-{dead}", out / "checkpoints" / f".step-000004.tmp-{dead}",
                     out / "checkpoints" / f".step-000002.del-{dead}", out / f".value.tmp-{dead}"]
        kept = [out / f".adapter.tmp-{live.pid}", out / "checkpoints" / f".step-000006.tmp-{live.pid}"]
        for d in leftovers + kept:
            d.mkdir(parents=True)
            (d / "adapter_model.safetensors").write_bytes(b"partial")
        console = Console(record=True, file=open(os.devnull, "w"))
        Run(out, console, resume=False).lock.release()
        assert not any(d.exists() for d in leftovers) and all(d.exists() for d in kept)
        notice = " ".join(console.export_text().split())
        assert "removed what a killed run left" in notice and f".adapter.tmp-{dead}" in notice
        assert str(live.pid) not in notice
    finally:
        live.kill()
        live.wait()


def test_a_swap_cut_short_puts_the_previous_version_back(tmp_path):
    """Killed between moving the old adapter aside and the new one in: the old one is the last complete version."""
    dead = dead_pid()
    (tmp_path / f".adapter.old-{dead}").mkdir()
    (tmp_path / f".adapter.old-{dead}" / "adapter_config.json").write_text("{}")
    (tmp_path / f".adapter.tmp-{dead}").mkdir()
    remove_dead_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "{}"


def test_a_run_failing_on_bad_input_leaves_no_empty_output_dir(tiny_dir, tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    result = run(*sft_args(tiny_dir, tmp_path / "new" / "run", f"data.path={missing}"))
    assert result.exit_code == 1 and str(missing) in result.output.replace("\n", "")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # a directory the user made stays
    assert run(*sft_args(tiny_dir, tmp_path / "mine", f"data.path={missing}")).exit_code == 1
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
