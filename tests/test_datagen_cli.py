"""`qtune self-instruct` end to end on the real SmolLM2-135M (tiny budgets): an uninterrupted run, and a run
interrupted with Ctrl-C mid-round then resumed, which must end with the very same files; the Alpaca output
loads as SFT data; bad seed files and mismatched resumes fail with clear messages."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEEDS_175 = REPO.parent / "shared" / "data" / "self_instruct" / "seed_tasks.jsonl"
if not SEEDS_175.exists():
    SEEDS_175 = Path("/work/shared/data/self_instruct/seed_tasks.jsonl")

CLI = "from qtune.cli.datagen_cmds import self_instruct_cmd; self_instruct_cmd()"
TINY = ["generate.prompts_per_round=2", "generate.batch_size=2", "generate.max_new_tokens=48",
        "generate.instance_max_new_tokens=24", "generate.num_instructions=100", "generate.max_rounds=2",
        "difficulty.drop_easiest=0.0", "difficulty.drop_hardest=0.0"]


def _cmd(model_dir, out_dir, *extra) -> list[str]:
    return [sys.executable, "-c", CLI, str(REPO / "recipes" / "self_instruct.toml"), f"model.path={model_dir}",
            f"data.seed_tasks={SEEDS_175}", f"output.dir={out_dir}", "--no-progress", *TINY, *extra]


def _env() -> dict:
    # One thread: decoding a 135M model is latency-bound, and a second thread only adds synchronisation.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)


def _read(out_dir: Path) -> dict:
    return {name: (out_dir / name).read_text() for name in ("instructions.jsonl", "rejected.jsonl", "alpaca.json")}


@pytest.fixture(scope="module")
def reference(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("si") / "reference"
    done = _run(_cmd(smollm2_dir, out))
    assert done.returncode == 0, done.stderr
    return out, json.loads(done.stdout.strip().splitlines()[-1])


def test_run_writes_tasks_alpaca_and_report(reference):
    out, report = reference
    tasks = [json.loads(line) for line in (out / "instructions.jsonl").read_text().splitlines()]
    assert report == json.loads((out / "report.json").read_text())
    assert report["rounds"] == 2 and report["kept_instructions"] == len(tasks) > 0
    assert len({t["id"] for t in tasks}) == len(tasks) and len({t["instruction"] for t in tasks}) == len(tasks)
    for t in tasks:
        assert set(t) == {"id", "name", "instruction", "instances", "is_classification", "provenance"}
        assert t["instances"] and all(i["output"] and i["input"] != i["output"] for i in t["instances"])
        p = t["provenance"]
        assert p["similarity"]["max"] <= 0.7 and len(p["demonstrations"]) == 8 and len(p["ifd"]) == len(t["instances"])
    alpaca = json.loads((out / "alpaca.json").read_text())
    dropped = sum(report["difficulty_dropped"].values())
    assert len(alpaca) + dropped == report["kept_instances"] == sum(len(t["instances"]) for t in tasks)
    assert report["candidates"] == len(tasks) + sum(v for k, v in report["rejected"].items()
                                                    if k not in ("truncated_item", "malformed_item"))


def _interrupt_in_round_2(cmd, out: Path) -> str:
    """Start the run and press Ctrl-C once round 1 is committed; returns stderr.

    The process is paused (SIGSTOP) the moment round 1 shows up, so the Ctrl-C lands inside round 2 unless
    round 2 was already committed in the polling gap; then the attempt is repeated from scratch.
    """
    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        # A shell starts background jobs with SIGINT ignored, and a child inherits that; a terminal's Ctrl-C
        # reaches a process whose SIGINT is at its default, so the child gets the default back.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 600
        while not (out / "state.json").exists() or json.loads((out / "state.json").read_text())["round"] < 1:
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first round was committed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)
        if json.loads((out / "state.json").read_text())["round"] == 1:
            proc.send_signal(signal.SIGINT)  # Ctrl-C in the middle of round 2, delivered on SIGCONT
            proc.send_signal(signal.SIGCONT)
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 130, err
            return err
        proc.send_signal(signal.SIGCONT)
        proc.communicate(timeout=300)
    pytest.fail("round 2 was committed before Ctrl-C could land in it, three times")


def test_interrupted_run_resumes_to_the_same_files(reference, smollm2_dir, tmp_path):
    ref_dir, _ = reference
    out = tmp_path / "interrupted"
    err = _interrupt_in_round_2(_cmd(smollm2_dir, out), out)
    assert "Re-run the same command to resume" in err
    assert json.loads((out / "state.json").read_text())["round"] == 1
    partial = (out / "instructions.jsonl").read_text()
    resumed = _run(_cmd(smollm2_dir, out))
    assert resumed.returncode == 0, resumed.stderr
    final = _read(out)
    assert final["instructions.jsonl"].startswith(partial)
    assert final == _read(ref_dir)  # resuming reproduces the uninterrupted run, nothing duplicated or lost


def test_output_loads_as_alpaca_sft_data(reference, smollm2_dir):
    from qtune.data.sft import build_sft_data
    from qtune.recipe.sections import SFTDataSection
    from qtune.tokenizer import load_tokenizer

    out, report = reference
    data = SFTDataSection(path=str(out / "alpaca.json"), format="alpaca", cache_dir="")
    sft = build_sft_data(data, load_tokenizer(smollm2_dir), seed=0)
    assert len(sft.train) == report["alpaca_examples"]


def test_resume_with_other_settings_is_refused(reference, smollm2_dir):
    out, _ = reference
    done = _run(_cmd(smollm2_dir, out, "generate.seed=7"))
    assert done.returncode == 1 and "different settings (generate)" in done.stderr


def test_bad_seed_file_names_the_line(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(SEEDS_175.read_text().splitlines()[0] + "\n" + '{"id": "x", "instruction": "Say hi."}\n')
    done = _run([sys.executable, "-c", CLI, str(REPO / "recipes" / "self_instruct.toml"), f"data.seed_tasks={seeds}",
                 f"output.dir={tmp_path / 'out'}", "--no-progress"])
    assert done.returncode == 1
    assert f"{seeds}:2: missing fields 'name', 'instances', 'is_classification'" in done.stderr
