"""The max-context planner: `qtune estimate --max-context` (its JSON, checked against the tracer's replay), a
data.max_seq_len the card cannot hold refused before the model loads, and an out-of-memory error during a
run reported with the same advice while the last good checkpoint stays."""

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from tiny import save_tiny_with_tokenizer

import qtune.train.sft
from qtune.cli import main
from qtune.config import shape_config
from qtune.memory.estimate import StepShape, estimate, host_bytes
from qtune.memory.plan import CUDA_CONTEXT_BYTES, device_peak, ladder, on_card
from qtune.memory.step import trace_step

GOOD = [{"instruction": f"Repeat the word {w}.", "input": "", "output": w}
        for w in ("apple", "river", "stone", "cloud", "tiger", "music", "paper", "garden")]


@pytest.fixture(autouse=True, scope="module")
def keep_thread_count():
    """`qtune sft` sets the process's torch threads (one per idle core); give the other tests theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_max_context_json_and_tracer_replay_within_the_card():
    result = CliRunner().invoke(main, ["estimate", "quickstart", "--shape", "smollm2-135m", "--gpu-memory", "0.9GB",
                                       "--max-context", "model.gradient_checkpointing=true",
                                       "train.micro_batch_size=1"])
    assert result.exit_code == 0, result.output
    plan = last_json(result.output)
    assert set(plan) == {"max_context", "peak_bytes", "switches", "host_bytes"}
    assert plan["switches"]["train.offload_checkpoints"] is True  # the longest rung needs the host copies
    n, budget = plan["max_context"], int(0.9 * 2**30)
    assert 0 < n < 8192 and plan["peak_bytes"] <= budget
    # the tracer replays that step on fake tensors with GPU semantics: it fits the card too, and its host copies
    # are the planner's host bytes (every layer's input in bf16)
    cfg = shape_config("smollm2-135m")
    rep = trace_step(cfg, 1, n, torch.bfloat16, r=16, offload_checkpoints=True, tiled_mlp="on")
    assert on_card(rep.peak_bytes, rep.start_bytes) <= budget * 1.03
    assert rep.host_peak_bytes == plan["host_bytes"] == cfg.num_hidden_layers * n * cfg.hidden_size * 2


def test_each_switch_lengthens_and_offload_frees_the_checkpoints():
    s = StepShape(shape_config("llama3.1-8b"), 1, 1024, "bfloat16", r=32, triton_loss=True,
                  gradient_checkpointing=False, tiled_mlp="off")
    rungs = ladder(s, 24 * 2**30, 131072)
    assert [r.added for r in rungs] == ["the recipe as it is", "model.gradient_checkpointing=true",
                                        "train.tiled_mlp=on", "train.offload_checkpoints=true"]
    lengths = [r.max_context for r in rungs]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4
    # offload: 32 layer inputs leave the card; at 64K tokens that is 32 x 64K x 4096 x 2 bytes
    at = replace(s, seq_len=65536, gradient_checkpointing=True, tiled_mlp="on")
    off = replace(at, offload_checkpoints=True)
    assert host_bytes(off) == 32 * 65536 * 4096 * 2 and host_bytes(at) == 0
    assert estimate(at).parts["checkpoints"] - estimate(off).parts["checkpoints"] == 30 * 65536 * 4096 * 2
    assert device_peak(s) > CUDA_CONTEXT_BYTES + estimate(s).peak_bytes


def sft_args(tiny_dir, out, data, *extra):
    return ["sft", "quickstart", f"model.path={tiny_dir}", f"output.dir={out}", f"data.path={data}",
            "data.format=alpaca", "data.cache_dir=", "data.max_seq_len=128", "data.val_size=2", "eval.exact_match=0",
            "train.micro_batch_size=2", "train.grad_accum_steps=1", *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctx")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    return save_tiny_with_tokenizer("llama", root / "tiny", seed=2), data, root


def test_sequence_the_card_cannot_hold_is_refused_before_loading(tiny, monkeypatch):
    tiny_dir, data, root = tiny
    monkeypatch.setenv("QTUNE_GPU_MEMORY", "8GB")
    out = root / "too_long"
    result = CliRunner().invoke(main, ["sft", "quickstart", "model.path=llama3.1-8b", f"output.dir={out}",
                                       "data.max_seq_len=120000", "lora.r=32", "train.micro_batch_size=1"])
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: data.max_seq_len = 120000 does not fit")
    assert "train.offload_checkpoints=true: data.max_seq_len <= " in message and "Traceback" not in result.output
    assert not out.exists()  # refused before anything was loaded or written


def test_out_of_memory_names_what_fits_and_keeps_the_last_checkpoint(tiny, monkeypatch):
    tiny_dir, data, root = tiny
    out = root / "oom"
    real_step, calls = qtune.train.sft.train_step, []

    def step_then_oom(*args, **kwargs):  # the card fills up on the third step
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(qtune.train.sft, "train_step", step_then_oom)
    monkeypatch.setenv("QTUNE_GPU_MEMORY", "24GB")
    result = CliRunner().invoke(main, sft_args(tiny_dir, out, data, "train.max_steps=4", "train.save_every=1"))
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error: out of memory during the run (CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert "the recipe as it is: data.max_seq_len <= " in message
    assert f"The last good checkpoint is {out / 'checkpoints' / 'step-000002'}" in message
    assert (out / "checkpoints" / "step-000002" / "trainer.json").is_file()
