"""`qtune grpo` through the real CLI on a tiny model: the summary line, what each step logs, the invariants
(ratio 1 on the first pass, KL 0 while the policy is the reference, β = 0 never runs the reference), exact
resume, reward adapters beside reward functions, and the errors a recipe or a reward function can cause."""

import json
import textwrap

import click
import pytest
from click.testing import CliRunner
from test_ppo import one_thread, reward_dir, tiny_dir  # noqa: F401  (fixtures)

from qtune.cli.ppo_cmds import COMMANDS
from qtune.data.prompts import load_prompts
from qtune.recipe.align import PromptDataSection
from qtune.tokenizer import load_tokenizer

DATA = "qtune:arithmetic?task=addition&count=40&seed=0"
# The tiny model's random text: a response has a vowel or not, so groups differ and there is something to learn.
RECIPE = """
kind = "grpo"
[data]
format = "prompt"
chat = false
[lora]
r = 4
dropout = 0.0
[grpo]
group_size = 4
rollout_batch_size = 8
max_new_tokens = 5
generation_batch_size = 8
# Every group is trained on, whatever the tiny model samples (the dropping test turns dynamic sampling on).
dynamic_sampling = false
{grpo}
[[grpo.rewards]]
fn = "format"
pattern = ".*[aeiou].*"
{rewards}
[train]
max_steps = 2
micro_batch_size = 4
grad_accum_steps = 2
lr = 1e-2
optimizer = "adamw"
log_every = 1
schedule = "constant"
"""
LOGGED = ("reward", "reward_std", "reward_0_format", "reward_0_format_std", "kl", "clip_low_frac", "clip_high_frac",
          "entropy", "completion_length", "dropped_groups", "rollout_seconds", "update_seconds", "grad_norm", "loss",
          "ratio_first", "lr")


def write_recipe(tmp_path, grpo: str = "", rewards: str = ""):
    path = tmp_path / "grpo.toml"
    path.write_text(RECIPE.format(grpo=textwrap.dedent(grpo), rewards=textwrap.dedent(rewards)))
    return path


def qtune(*args):
    result = CliRunner().invoke(click.Group(commands=COMMANDS), [str(a) for a in args])
    summary = json.loads(result.stdout.strip().splitlines()[-1]) if result.exit_code == 0 else None
    return result, summary


def steps(out_dir) -> list[dict]:
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "reward" in r]


def run(tiny_dir, tmp_path, *overrides, grpo: str = "", rewards: str = "", out="run"):  # noqa: F811
    return qtune("grpo", write_recipe(tmp_path, grpo, rewards), f"model.path={tiny_dir}", f"data.path={DATA}",
                 "data.val_size=4", f"output.dir={tmp_path / out}", *overrides)


def test_two_steps_through_the_cli(tiny_dir, tmp_path):  # noqa: F811
    result, summary = run(tiny_dir, tmp_path)
    assert result.exit_code == 0, result.output
    assert summary["metric"] == "val_accuracy" and 0 <= summary["before"] <= 1 and 0 <= summary["after"] <= 1
    assert summary["kl"] is not None and summary["kl"] >= 0 and summary["steps"] == 2
    logged = steps(tmp_path / "run")
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert all(k in r and r[k] == r[k] for k in LOGGED), r
        assert 1 <= r["completion_length"] <= 5 and r["ratio_first"] == 1.0  # old = the sampling policy itself
    # One minibatch per step: step 1 updates a policy that is still the reference (B = 0), so its KL is 0.
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6) and logged[0]["updates"] == 1
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "reward_curve.png").is_file()
    # the paired test reads the per-prompt rewards kept before training; metrics.jsonl stays free of them
    kept = json.loads((tmp_path / "run" / "held_out_before.json").read_text())["val_scores"]
    assert len(kept) == 4 and sum(kept) / 4 == pytest.approx(summary["before"])
    assert summary["val_improved"] + summary["val_worsened"] <= 4 and 0 < summary["val_p_one_sided"] <= 1
    assert not any("val_scores" in json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open())


def test_sign_test_against_hand_values_and_scipy():
    from qtune.train.grpo import paired_change, sign_test_p

    assert sign_test_p(3, 0) == 1 / 8 and sign_test_p(5, 1) == 7 / 64 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(0, 4) == 1.0 and sign_test_p(2, 2) == 11 / 16
    stats = pytest.importorskip("scipy.stats")
    for improved, worsened in ((12, 3), (40, 25), (7, 7), (1, 9)):
        ref = stats.binomtest(improved, improved + worsened, 0.5, alternative="greater").pvalue
        assert sign_test_p(improved, worsened) == pytest.approx(ref, rel=1e-12)
    change = paired_change({"val_scores": [0, 1, 0, 1, 0]}, {"val_scores": [1, 1, 0, 0, 1]})
    assert change == {"val_improved": 2, "val_worsened": 1, "val_p_one_sided": 0.5}
    assert paired_change({"val_accuracy": 0.5}, {"val_scores": [1.0]}) == {}


def test_later_passes_use_the_rollout_policy_as_old(tiny_dir, tmp_path):  # noqa: F811
    """num_iterations = 2 with two minibatches: log π_old comes from the rollout, and the first minibatch of each
    step still sees ratio 1 (the policy has not moved since it sampled)."""
    result, summary = run(tiny_dir, tmp_path, "grpo.num_iterations=2", "train.grad_accum_steps=1")
    assert result.exit_code == 0, result.output
    for r in steps(tmp_path / "run"):
        assert r["updates"] == 4 and r["ratio_first"] == pytest.approx(1.0, abs=1e-5)


def test_beta_zero_never_runs_the_reference(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    import qtune.train.grpo as grpo

    def no_reference(model):
        raise AssertionError("the reference pass ran with beta = 0")

    monkeypatch.setattr(grpo, "adapters_disabled", no_reference)
    result, summary = run(tiny_dir, tmp_path, "grpo.beta=0", "grpo.num_iterations=2")
    assert result.exit_code == 0, result.output
    assert summary["kl"] is None and all(r["kl"] == 0.0 for r in steps(tmp_path / "run"))
    result, _ = run(tiny_dir, tmp_path, "grpo.beta=0.1", out="with-kl")
    assert result.exit_code == 1 and "beta = 0" in str(result.exception)


def test_resume_reproduces_the_uninterrupted_run(tiny_dir, tmp_path):  # noqa: F811
    result, _ = run(tiny_dir, tmp_path, "train.max_steps=3", "train.save_every=1", out="full")
    assert result.exit_code == 0, result.output
    result, _ = run(tiny_dir, tmp_path, "train.max_steps=2", "train.save_every=1", out="part")
    assert result.exit_code == 0, result.output
    result, _ = run(tiny_dir, tmp_path, "train.max_steps=3", "train.save_every=1", "--resume", out="part")
    assert result.exit_code == 0, result.output
    full, part = steps(tmp_path / "full"), steps(tmp_path / "part")
    assert [r["step"] for r in part] == [1, 2, 3]
    for key in ("reward", "loss", "kl", "grad_norm", "completion_length"):
        assert part[2][key] == pytest.approx(full[2][key], rel=1e-5, abs=1e-7), key


def test_reward_adapter_beside_a_weighted_function(tiny_dir, reward_dir, tmp_path):  # noqa: F811
    rewards = f"""
    [[grpo.rewards]]
    model = "{reward_dir}"
    weight = 0.5
    [[grpo.rewards]]
    fn = "length"
    weight = -1.0
    """
    result, summary = run(tiny_dir, tmp_path, "train.max_steps=1", "grpo.advantage=rloo", rewards=rewards)
    assert result.exit_code == 0, result.output
    r = steps(tmp_path / "run")[0]
    assert r["reward_0_format_std"] >= 0 and r["reward_1_model_std"] > 0 and r["reward_2_length"] < 0
    want = r["reward_0_format"] + 0.5 * r["reward_1_model"] - r["reward_2_length"]
    assert r["reward"] == pytest.approx(want, rel=1e-5)


def test_groups_with_equal_rewards_are_dropped_and_counted(tiny_dir, tmp_path):  # noqa: F811
    """The tiny model never writes the sum, so every answer reward is 0: each group is dropped (DAPO's dynamic
    sampling), no update is made, and the policy stays the reference; with dynamic sampling off they are kept."""
    answer_only = 'grpo.rewards=[{fn="answer"}]'
    result, summary = run(tiny_dir, tmp_path, answer_only, "grpo.dynamic_sampling=true")
    assert result.exit_code == 0, result.output
    for r in steps(tmp_path / "run"):
        assert r["reward"] == 0 and r["dropped_groups"] == 2 and r["updates"] == 0 and r["grad_norm"] == 0
    assert summary["dropped_groups"] == 4
    result, _ = run(tiny_dir, tmp_path, answer_only, "grpo.dynamic_sampling=false", out="kept")
    assert result.exit_code == 0, result.output
    assert all(r["dropped_groups"] == 0 and r["updates"] == 1 for r in steps(tmp_path / "kept"))


def test_held_out_prompts_never_occur_in_training(tiny_dir):  # noqa: F811
    data = PromptDataSection(path="qtune:arithmetic?task=word_problems&count=300&seed=1", format="prompt",
                             chat=False, val_size=60)
    train, val, _ = load_prompts(data, load_tokenizer(tiny_dir), seed=0)
    assert len(val) == 60 and not {p.text for p in val} & {p.text for p in train}


# ----------------------------------------------------------------------------- bad input

# Each function behaves for step 1's 8 responses (one batch when batched), then fails.
BAD_REWARDS = '''
calls = 0

def good_first(n):
    global calls
    calls += n
    return calls <= 8

def raises(prompt, response, record):
    if not good_first(1):
        raise KeyError("solution")
    return 1.0

def not_a_number(prompt, response, record):
    return 1.0 if good_first(1) else "0.5"

def batched_short(prompts, responses, records):
    return [1.0] * (len(responses) - (0 if good_first(len(responses)) else 1))
'''


@pytest.mark.parametrize("fn, batched, says", [
    ("raises", False, "raised KeyError: 'solution'"),
    ("not_a_number", False, "returned '0.5'"),
    ("batched_short", True, "returned [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0] for a batch of 8 responses"),
])
def test_a_failing_reward_function_stops_the_run_at_the_last_checkpoint(tiny_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                         fn, batched, says):
    module = f"bad_rewards_{fn}"
    (tmp_path / f"{module}.py").write_text(BAD_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = f'[[grpo.rewards]]\nfn = "{module}:{fn}"\nbatched = {str(batched).lower()}\n'
    # No held-out prompts, so the function runs only in the training loop; step 1 is checkpointed.
    result, _ = qtune("grpo", write_recipe(tmp_path, rewards=rewards), f"model.path={tiny_dir}", f"data.path={DATA}",
                      f"output.dir={tmp_path / 'run'}", "train.save_every=1", "train.max_steps=3")
    assert result.exit_code == 1
    message = result.output
    assert f"{module}:{fn}" in message and says in message and "Question: What is" in message, message
    assert "step-000001" in message and "--resume" in message and "Traceback" not in message
    assert (tmp_path / "run" / "checkpoints" / "step-000001").is_dir()


@pytest.mark.parametrize("override, key", [
    ("grpo.group_size=1", "grpo.group_size"),
    ("grpo.rollout_batch_size=10", "grpo.rollout_batch_size"),
    ("train.micro_batch_size=3", "grpo.rollout_batch_size"),
    ("grpo.advantage=ppo", "grpo.advantage"),
    ("grpo.accuracy_reward=3", "grpo.accuracy_reward"),
])
def test_recipe_errors_name_the_key(tiny_dir, tmp_path, override, key):  # noqa: F811
    result, _ = run(tiny_dir, tmp_path, override)
    assert result.exit_code == 1 and key in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "run").exists()
