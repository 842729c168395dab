"""The SFT loop through its real entry points on a tiny model: accumulation, resume, checkpoints, NaN, outputs.

Every run uses the shipped quickstart recipe with overrides (a tiny random Llama with a small real BPE
tokenizer, generated checkable tasks, a few steps), so these tests exercise what `qtune sft` runs.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import save_tiny_with_tokenizer

from qtune.cli import main
from qtune.data.sft import build_sft_data
from qtune.peft import load_adapter
from qtune.recipe.load import load_recipe
from qtune.tokenizer import load_tokenizer
from qtune.train.common import Checkpointer
from qtune.train.sft import run_sft

REPO = Path(__file__).resolve().parents[1]
# One thread in every process, so that runs compared bit for bit sum in the same order.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread as well: a tiny model gains nothing from more, and loses much to a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny_sft"), seed=1)


def overrides(tiny_dir, out, **extra) -> list[str]:
    """Quickstart overrides for a fast run on the tiny model; `extra` uses __ for dots (train__lr=...)."""
    settings = {"model.path": tiny_dir, "output.dir": out, "data.cache_dir": "", "data.max_seq_len": 64,
                "data.path": "qtune:checkable-tasks?count=48&seed=0", "data.val_size": 8, "eval.exact_match": 0,
                "train.max_steps": 6, "train.save_every": 0, "train.log_every": 1}
    settings.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]


def losses(out: Path) -> list[dict]:
    return [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def adapter_tensors(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def cli(args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from qtune.cli import main; main()", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=ENV)


def test_accumulation_of_4_equals_a_batch_of_4(tiny_dir, tmp_path):
    """Batch 1 x accumulation 4 == batch 4 x accumulation 1 in fp32, although the rows carry different
    numbers of trained tokens (averaging per micro-batch would weight them wrongly)."""
    common = dict(data__shuffle=False, data__group_by_length=False, lora__dropout=0.0, train__max_steps=3,
                  train__max_grad_norm=0.0, model__quantize="none")
    big = run_sft(load_recipe("quickstart", overrides(tiny_dir, tmp_path / "b4", train__micro_batch_size=4,
                                                        train__grad_accum_steps=1, **common)))
    acc = run_sft(load_recipe("quickstart", overrides(tiny_dir, tmp_path / "a4", train__micro_batch_size=1,
                                                        train__grad_accum_steps=4, **common)))
    recipe = load_recipe("quickstart", overrides(tiny_dir, tmp_path / "x"))
    data = build_sft_data(recipe.data, load_tokenizer(tiny_dir), seed=0)
    assert len({int((ex.labels != -100).sum()) for ex in data.train[:4]}) > 1
    for a, b in zip(losses(tmp_path / "a4"), losses(tmp_path / "b4"), strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wa = load_file(Path(acc["adapter"]) / "adapter_model.safetensors")
    wb = load_file(Path(big["adapter"]) / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


# 52 training examples in micro-batches of 2, accumulated 2 by 2: 13 steps an epoch, so 20 steps cross into
# the second epoch; dropout makes the result depend on the restored RNG state.
RESUME_SETTINGS = dict(train__max_steps=20, train__micro_batch_size=2, train__grad_accum_steps=2, lora__dropout=0.1,
                       train__save_every=7, eval__every=5, data__path="qtune:checkable-tasks?count=60")


def test_ctrl_c_then_resume_reproduces_the_uninterrupted_run(tiny_dir, tmp_path):
    """Through the real CLI: SIGINT mid-run saves a checkpoint and exits 130; --resume finishes the run
    with the same losses and a bit-identical adapter. Dropout, accumulation and an epoch boundary are on."""
    args = overrides(tiny_dir, "OUT", **RESUME_SETTINGS)
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = cli(["sft", "quickstart", *[a.replace("OUT", str(full)) for a in args]])
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])

    cut_args = [a.replace("OUT", str(cut)) for a in args]
    proc = subprocess.Popen([sys.executable, "-c", "from qtune.cli import main; main()", "sft", "quickstart",
                             *cut_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=ENV)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (cut / "metrics.jsonl").exists() and len(losses(cut)) >= 3:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    stopped = Checkpointer(cut).latest()
    assert stopped is not None and 3 <= int(stopped.name.split("-")[1]) < 20
    assert "continue with --resume" in err

    resumed = cli(["sft", "quickstart", *cut_args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in losses(cut)] == list(range(1, 21))
    for a, b in zip(losses(full), losses(cut), strict=True):
        assert (a["step"], a["loss"], a["lr"], a["grad_norm"], a.get("val_loss")) == \
               (b["step"], b["loss"], b["lr"], b["grad_norm"], b.get("val_loss"))
    wa, wb = adapter_tensors(full), adapter_tensors(cut)
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and wa.keys() == wb.keys()
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["after"] == summary["after"]
    check_run_outputs(full, summary, tiny_dir)


def check_run_outputs(out: Path, summary: dict, tiny_dir: Path) -> None:
    """What a finished run leaves: adapter/ (PEFT), metrics.jsonl, the resolved recipe, checkpoints/, plot."""
    from qtune.weights.checkpoint import load_model

    assert summary["metric"] == "val_loss" and summary["before"] > summary["after"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r and "loss" in r for r in records)
    assert load_recipe(out / "recipe.toml") == load_recipe("quickstart", overrides(tiny_dir, out, **RESUME_SETTINGS))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model = load_model(tiny_dir, quantize="none")
    load_adapter(model, out / "adapter")
    final = load_file(out / "checkpoints" / "step-000020" / "trainable.safetensors")
    assert len(final) == len(load_file(out / "adapter" / "adapter_model.safetensors"))
    assert (out / "loss_curve.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text()) == summary


KILLED_WRITER = """
import sys, time
from pathlib import Path
from qtune.train.common import Checkpointer

def write(tmp):
    (tmp / "trainable.safetensors").write_bytes(b"half a tensor")
    print("writing", flush=True)
    time.sleep(120)

Checkpointer(Path(sys.argv[1])).save(6, write)
"""


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["sft", "quickstart", *overrides(tiny_dir, out, train__max_steps=4,
                                                                        train__save_every=2)])
    assert result.exit_code == 0, result.output
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env=ENV)
    assert writer.stdout.readline().strip() == "writing"
    writer.kill()
    writer.wait()
    assert len(list((out / "checkpoints").glob(".step-000006.tmp-*"))) == 1
    assert Checkpointer(out).latest().name == "step-000004"
    # Resume with a longer run and a new peak learning rate: the recipe's rate applies from the next step.
    more = CliRunner().invoke(main, ["sft", "quickstart", *overrides(tiny_dir, out, train__max_steps=6,
                                                                      train__lr=5e-4), "--resume"])
    assert more.exit_code == 0, more.output
    assert "resumed from" in more.output and "step-000004" in more.output.replace("\n", "")
    records = losses(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    # cosine after 2 warmup steps over 6: step 5 runs at progress 2/4, step 6 at 3/4 of the decay
    assert records[4]["lr"] == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    assert records[5]["lr"] == pytest.approx(5e-4 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert not list((out / "checkpoints").glob(".step-000006.tmp*"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["sft", "quickstart", *overrides(
        tiny_dir, out, train__lr=1e30, train__max_grad_norm=0.0, train__save_every=1, train__max_steps=8)])
    assert result.exit_code == 1
    assert "this step is not applied" in result.output and "lower train.lr" in result.output
    last_good = Checkpointer(out).latest()
    assert last_good is not None and str(last_good) in result.output.replace("\n", "")
    saved = load_file(last_good / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_existing_run_is_not_overwritten(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(main, ["sft", "quickstart", *overrides(tiny_dir, out, train__max_steps=1)]).exit_code == 0
    again = CliRunner().invoke(main, ["sft", "quickstart", *overrides(tiny_dir, out, train__max_steps=1)])
    assert again.exit_code == 1 and "already holds a run" in again.output and "--resume" in again.output
    fresh = CliRunner().invoke(main, ["sft", "quickstart", *overrides(tiny_dir, tmp_path / "new"), "--resume"])
    assert fresh.exit_code == 1 and "no complete checkpoint" in fresh.output


def test_8bit_optimizer_checkpoint_resumes_bit_exactly(tiny_dir, tmp_path):
    """bitsandbytes' 8-bit AdamW (rank 64: the adapter matrices are big enough for 8-bit states) saves its
    quantized states and maps without pickle, and a run resumed from step 2 ends where the whole run did."""
    import shutil

    settings = dict(train__optimizer="adamw8bit", lora__r=64, train__max_steps=4, train__save_every=2)
    run_sft(load_recipe("quickstart", overrides(tiny_dir, tmp_path / "full", **settings)))
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "adapter")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-000004")
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-000002" / "optimizer.json").read_text())
    assert "__bnb_optimizer_quant_state__" in json.dumps(state)
    run_sft(load_recipe("quickstart", overrides(tiny_dir, tmp_path / "cut", **settings)), resume=True)
    a, b = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seed_fixes_the_run_and_gradient_checkpointing_changes_nothing(tiny_dir, tmp_path):
    """Same seed: the same adapter (LoRA init, data order, dropout). Another seed: another adapter.
    Recomputing activations in backward (gradient checkpointing) gives the same training."""
    settings = dict(train__max_steps=3, lora__dropout=0.1)
    runs = {name: adapter_tensors(Path(run_sft(load_recipe("quickstart", overrides(
                tiny_dir, tmp_path / name, **settings, **extra)))["output_dir"]))
            for name, extra in [("a", {}), ("b", {}), ("seed1", {"train__seed": 1}),
                                ("ckpt", {"model__gradient_checkpointing": True})]}
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not any(torch.equal(runs["a"][k], runs["seed1"][k]) for k in runs["a"] if "lora_A" in k)
    for k in runs["a"]:
        torch.testing.assert_close(runs["ckpt"][k], runs["a"][k], atol=1e-6, rtol=0)


def test_cpu_threads_follow_idle_cores(monkeypatch):
    from qtune.train.common import use_idle_cpu_cores

    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
        assert use_idle_cpu_cores("cpu") == cores == torch.get_num_threads()
        monkeypatch.setattr(os, "getloadavg", lambda: (cores + 8.0, 9.0, 9.0))
        assert use_idle_cpu_cores("cpu") == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert use_idle_cpu_cores("cpu") is None
        assert use_idle_cpu_cores("cuda") is None
    finally:
        torch.set_num_threads(before)


def test_learning_rate_schedules_by_hand():
    """Warmup 2 of 6 steps, then cosine / linear decay or constant: factors computed by hand."""
    from qtune.train.common import lr_factor

    warm = [0.5, 1.0]
    assert [lr_factor(s, "constant", 2, 6) for s in range(6)] == warm + [1.0] * 4
    assert [lr_factor(s, "linear", 2, 6) for s in range(6)] == pytest.approx(warm + [1.0, 0.75, 0.5, 0.25])
    cosine = warm + [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2]
    assert [lr_factor(s, "cosine", 2, 6) for s in range(6)] == pytest.approx(cosine)
    assert lr_factor(6, "cosine", 2, 6) == pytest.approx(0.0)


def test_overrides_alone_apply_to_the_quickstart(tiny_dir, tmp_path):
    result = CliRunner().invoke(main, ["sft", *overrides(tiny_dir, tmp_path / "run", train__max_steps=1)])
    assert result.exit_code == 0, result.output
    assert load_recipe(tmp_path / "run" / "recipe.toml").description == load_recipe("quickstart").description
