"""Best-of-N / rejection-sampling fine-tuning through the real CLI on a tiny model: the shipped recipe, which
response is kept, the min_score filter, the SFT stage on the kept chats, and resuming."""

import json

import click
import pytest
import torch
from click.testing import CliRunner
from test_ppo import one_thread, tiny_dir  # noqa: F401  (fixtures)

from qtune.cli.ppo_cmds import COMMANDS
from qtune.train.best_of_n import select_best

SMALL = ["best_of_n.n=3", "best_of_n.num_prompts=5", "best_of_n.max_new_tokens=5", "best_of_n.sample_batch_size=6",
         "train.max_steps=2", "train.micro_batch_size=2", "train.log_every=1", "data.cache_dir=", "lora.r=4",
         "data.max_seq_len=48"]


def letter_e_count(prompt: str, response: str, record: dict) -> float:
    """A test reward with spread: how many times the letter e appears in the response."""
    return float(response.count("e"))


def qtune(*args):
    result = CliRunner().invoke(click.Group(commands=COMMANDS), [str(a) for a in args])
    summary = json.loads(result.stdout.strip().splitlines()[-1]) if result.exit_code == 0 else None
    return result, summary


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_select_best_takes_the_highest_score_and_the_first_of_ties():
    scores = torch.tensor([[0.1, 0.9, 0.3], [2.0, 2.0, -1.0], [-5.0, -4.0, -4.5]])
    assert select_best(scores).tolist() == [1, 0, 1]


def test_shipped_recipe_keeps_each_prompts_best_and_fine_tunes_on_it(tiny_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    result, summary = qtune("best-of-n", "best_of_n", f"model.path={tiny_dir}", f"output.dir={out}",
                            "best_of_n.reward_fn=test_best_of_n:letter_e_count", "best_of_n.min_score=-inf", *SMALL)
    assert result.exit_code == 0, result.output
    samples, best = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "best.jsonl")
    assert len(samples) == len(best) == summary["prompts"] == summary["kept"] == 5
    for sample, kept in zip(samples, best):
        assert len(sample["responses"]) == 3 and all(s["kept"] for s in samples)
        assert sample["scores"] == [letter_e_count("", r, {}) for r in sample["responses"]]
        assert sample["scores"][sample["best"]] == max(sample["scores"])
        assert kept["messages"][-1] == {"role": "assistant", "content": sample["responses"][sample["best"]]}
        assert kept["messages"][-2]["role"] == "user"  # the generated task's reference answer was cut off
    first = sum(s["scores"][0] for s in samples) / 5
    assert summary["best_of_1_score"] == pytest.approx(first)
    assert summary["best_of_n_score"] == pytest.approx(sum(max(s["scores"]) for s in samples) / 5)
    assert summary["best_of_n_score"] >= summary["mean_score"]
    assert summary["steps"] == 2 and (out / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    again, _ = qtune("best-of-n", "best_of_n", f"model.path={tiny_dir}", f"output.dir={out}",
                     "best_of_n.reward_fn=test_best_of_n:letter_e_count", *SMALL)
    assert again.exit_code != 0 and "--resume" in again.output


def test_min_score_filters_prompts_and_resume_reuses_the_samples(tiny_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = ["best-of-n", "best_of_n", f"model.path={tiny_dir}", f"output.dir={out}",
            "best_of_n.reward_fn=test_best_of_n:letter_e_count", "best_of_n.min_score=2", *SMALL]
    result, summary = qtune(*args)
    samples = read_jsonl(out / "samples.jsonl")
    assert result.exit_code == 0, result.output
    passing = [s for s in samples if max(s["scores"]) >= 2]
    assert 0 < len(passing) < len(samples)  # the seeded samples hold both kinds of prompt
    assert summary["kept"] == len(passing) == len(read_jsonl(out / "best.jsonl"))
    assert [s["kept"] for s in samples] == [max(s["scores"]) >= 2 for s in samples]
    resumed, again = qtune(*args, "--resume")
    assert resumed.exit_code == 0 and "reusing the kept samples" in resumed.output
    assert again["best_of_n_score"] == summary["best_of_n_score"]


def test_nothing_kept_is_an_error(tiny_dir, tmp_path):  # noqa: F811
    result, _ = qtune("best-of-n", "best_of_n", f"model.path={tiny_dir}", f"output.dir={tmp_path / 'run'}",
                      "best_of_n.reward_fn=test_best_of_n:letter_e_count", "best_of_n.min_score=1000", *SMALL)
    assert result.exit_code != 0 and "min_score" in result.output and "samples.jsonl" in result.output


@pytest.mark.parametrize("override, message", [
    ("data.chat=false", "set data.chat = true"),
    ("data.format=hh", "hh transcripts are raw text"),
    ("best_of_n.n=0", "best_of_n.n"),
    ("best_of_n.top_p=0", "best_of_n.top_p"),
])
def test_recipe_errors(override, message):
    result, _ = qtune("best-of-n", "best_of_n", override)
    assert result.exit_code != 0 and message in result.output, result.output
