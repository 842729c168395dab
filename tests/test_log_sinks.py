"""train.log = ["jsonl", "tensorboard", "wandb"]: the scalars of metrics.jsonl reach TensorBoard's event files
and an offline W&B run, read back with TensorBoard's own event reader and W&B's own record reader; a
resumed run continues both (TensorBoard without the steps after the checkpoint, W&B under the same run id).
"""

import json

import pytest
import torch

from qtune.recipe.load import load_recipe
from qtune.train.common import TrainingError
from qtune.train.log_sinks import check_sinks
from qtune.train.sft import run_sft
from test_sft_loop import overrides, tiny_dir  # noqa: F401  (the module-scoped tiny model fixture)

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
wandb = pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    torch.set_num_threads(1)


def run(tiny_dir, out, resume=False, **extra):
    args = overrides(tiny_dir, out, train__log='["jsonl", "tensorboard", "wandb"]', data__max_seq_len=256, **extra)
    return run_sft(load_recipe("quickstart", args), resume=resume)


def jsonl_scalars(out) -> dict[tuple[str, int], float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(k, r["step"]): float(v) for r in records for k, v in r.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def tensorboard_scalars(out) -> dict[tuple[str, int], float]:
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def wandb_log_records(path):
    """The records of a `.wandb` file: a 7-byte header (":W&B", magic, version), then LevelDB's log format
    (32 KiB blocks of chunks: crc32, length, kind = full / first / middle / last, data)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts = 7, 32768, []
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # a block's zero padding
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            yield b"".join(parts)
            parts = []


def wandb_summary(out) -> dict:
    """The last summary record of the newest offline run."""
    from wandb.proto import wandb_internal_pb2

    path = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))[-1]
    summary = {}
    for data in wandb_log_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in record.summary.update})
    return summary


def wandb_runs(out) -> dict[str, dict[tuple[str, int], float]]:
    """{run id: scalars} over every offline run directory W&B wrote under the run directory."""
    from wandb.proto import wandb_internal_pb2

    runs = {}
    for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id = path.stem.removeprefix("run-")
        for data in wandb_log_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                step = items.pop("_step")
                runs.setdefault(run_id, {}).update({(k, step): float(v) for k, v in items.items()
                                                    if not k.startswith("_")})
    return runs


def assert_same(got: dict, want: dict):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_every_scalar_reaches_tensorboard_and_wandb_and_resume_continues_them(tiny_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    result = run(tiny_dir, out, train__max_steps=3, train__save_every=2)
    first = jsonl_scalars(out)
    summary = wandb_summary(out)  # the held-out before / after of the summary table
    assert summary["before"] == pytest.approx(result["before"]) and summary["after"] == pytest.approx(result["after"])
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert {"summary/text_summary", "recipe/text_summary"} <= set(acc.Tags()["tensors"])
    assert ("loss", 3) in first and ("lr", 1) in first
    assert_same(tensorboard_scalars(out), first)
    (run_id,) = wandb_runs(out)
    assert_same(wandb_runs(out)[run_id], first)

    run(tiny_dir, out, resume=True, train__max_steps=4, train__save_every=2)  # from the step-2 checkpoint
    resumed = jsonl_scalars(out)
    assert sorted({step for _, step in resumed}) == [1, 2, 3, 4]
    assert_same(tensorboard_scalars(out), resumed)  # step 3 of the first run is purged, not doubled
    runs = wandb_runs(out)
    assert list(runs) == [run_id]  # the same run continued
    assert {k: v for k, v in runs[run_id].items() if k[1] > 2} == {k: v for k, v in resumed.items() if k[1] > 2}


def test_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TrainingError, match=r"pip install 'qtune\[wandb\]'"):
        check_sinks(["jsonl", "wandb"])


def test_unknown_sink_is_a_recipe_error(tiny_dir, tmp_path):  # noqa: F811
    from qtune.recipe.schema import RecipeError

    with pytest.raises(RecipeError, match="train.log"):
        load_recipe("quickstart", overrides(tiny_dir, tmp_path, train__log='["mlflow"]'))
