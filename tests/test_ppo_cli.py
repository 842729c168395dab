"""`qtune ppo` through the real CLI on a tiny model: the shipped recipe with a reward model and PPO-ptx,
a verifiable reward, exact resume, and the errors a recipe can run into."""

import json
import shutil

import click
import pytest
import torch
from click.testing import CliRunner
from shared_data import C4_DEMO, HH_HARMLESS, SHARED_DATA
from test_ppo import one_thread, reward_dir, tiny_dir  # noqa: F401  (fixtures)

from qtune.cli.ppo_cmds import COMMANDS
from qtune.weights.checkpoint import load_model
from qtune.align.reward_model import load_reward_model
from qtune.align.reward_functions import write_problems

LOGGED = ("reward", "kl", "beta", "clip_frac", "value_loss", "value_clip_frac", "entropy", "response_length",
          "policy_loss", "approx_kl", "grad_norm", "lr")
SMALL = ["ppo.rollout_batch_size=4", "ppo.max_new_tokens=4", "ppo.ppo_epochs=2", "train.micro_batch_size=2",
         "train.grad_accum_steps=1", "train.optimizer=adamw", "train.log_every=1", "data.cache_dir=",
         "lora.r=4", "data.max_seq_len=24"]


def qtune(*args):
    result = CliRunner().invoke(click.Group(commands=COMMANDS), [str(a) for a in args])
    summary = json.loads(result.stdout.strip().splitlines()[-1]) if result.exit_code == 0 else None
    return result, summary


def iterations(out_dir) -> list[dict]:
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "reward" in r]


@SHARED_DATA
def test_shipped_recipe_with_reward_model_and_ptx(tiny_dir, reward_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    result, summary = qtune("ppo", "ppo", f"model.path={tiny_dir}", f"ppo.reward_model={reward_dir}",
                            f"data.path={HH_HARMLESS}", f"data.pretrain_path={C4_DEMO}", "ppo.ptx_coef=0.5",
                            "data.val_size=4", "train.max_steps=2", f"output.dir={out}", *SMALL)
    assert result.exit_code == 0, result.output
    logged = iterations(out)
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert all(k in r and r[k] == r[k] for k in LOGGED), r
        assert r["ptx_loss"] > 0 and 1 <= r["response_length"] <= 4
    assert logged[0]["kl"] == 0.0  # the fresh policy adapter is the reference
    assert summary["iterations"] == 2 and summary["val_reward_before"] is not None
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "reward_curve.png").is_file()
    # The value adapter and head are saved as a reward model: it loads like one and scores sequences.
    base = load_model(tiny_dir, quantize="nf4")
    value = load_reward_model(base, summary["value_adapter"], name="v")
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert torch.isfinite(value.score(batch)).all()


def test_verifiable_reward_and_exact_resume(tiny_dir, tmp_path):  # noqa: F811
    prompts = write_problems(tmp_path / "add.jsonl", "addition", 12)
    (tmp_path / "r.toml").write_text('kind = "ppo"\n')
    args = ["ppo", tmp_path / "r.toml", f"model.path={tiny_dir}", f"data.path={prompts}", "data.chat=false",
            "ppo.reward_fn=qtune.align.reward_functions:arithmetic", "train.max_steps=2", "train.save_every=1", *SMALL]
    out = tmp_path / "full"
    result, summary = qtune(*args, f"output.dir={out}")
    assert result.exit_code == 0, result.output
    full = iterations(out)
    assert len(full) == 2 and summary["val_reward_before"] is None  # no held-out prompts asked for
    # Resume from the checkpoint after iteration 1: iteration 2 must come out the same.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000002")
    shutil.rmtree(resumed / "adapter")
    result, _ = qtune(*args, f"output.dir={resumed}", "--resume")
    assert result.exit_code == 0, result.output
    again = iterations(resumed)
    assert [r["step"] for r in again] == [1, 2]
    for key in ("reward", "kl", "beta", "policy_loss", "value_loss", "entropy", "grad_norm"):
        assert again[1][key] == pytest.approx(full[1][key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("overrides, message", [
    (["ppo.reward_fn=qtune.align.reward_functions:arithmetic", "ppo.reward_model=somewhere"], "exactly one of reward_model"),
    ([], "exactly one of reward_model"),
    (["ppo.reward_fn=qtune.align.reward_functions:arithmetic", "ppo.rollout_batch_size=6", "train.micro_batch_size=4",
      "train.grad_accum_steps=1"], "not a multiple of the minibatch"),
    (["ppo.reward_fn=qtune.align.reward_functions:arithmetic", "ppo.ptx_coef=1"], "needs plain text in data.pretrain_path"),
    (["ppo.reward_fn=arithmetic"], "module:function"),
    (["ppo.reward_model=/no/such/dir"], "no such directory"),
    (["ppo.reward_fn=qtune.align.reward_functions:nothing_here"], "not defined there"),
])
def test_recipe_errors_name_the_key(tiny_dir, tmp_path, overrides, message):  # noqa: F811
    prompts = write_problems(tmp_path / "add.jsonl", "addition", 8)
    (tmp_path / "r.toml").write_text('kind = "ppo"\n')
    result, _ = qtune("ppo", tmp_path / "r.toml", f"model.path={tiny_dir}", f"data.path={prompts}",
                      f"output.dir={tmp_path / 'out'}", "data.cache_dir=", *overrides)
    assert result.exit_code != 0 and message in result.output, result.output
