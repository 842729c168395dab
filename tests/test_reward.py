"""Reward models: the scalar head against transformers' hidden states, save / load, weighted combination,
chance-level ranking at initialisation, and `qtune reward` / `qtune eval-prefs` run through the CLI on a tiny model,
its first logged losses checked against an independent transformers computation."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny import save_tiny_with_tokenizer

from qtune.weights.checkpoint import load_model
from qtune.cli.align_cmds import COMMANDS
from qtune.data.prefs import TokenizedPreference, collate_preferences, load_preferences, tokenize_preferences
from qtune.lora import LoraConfig, add_lora, lora_layers
from qtune.peft import save_adapter
from qtune.align.reward_model import CombinedReward, RewardModel, ScalarHead, evaluate_reward, load_reward_model
from qtune.tokenizer import load_tokenizer
from qtune.train.reward import indifferent_validation

CLI = {c.name: c for c in COMMANDS}
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
WORDS = "the cat dog sat on mat a big small red blue green tree house river".split()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny_reward"))


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def hf_last_hidden(hf_model, ids: list[int]) -> torch.Tensor:
    """transformers' final (normed) hidden state at the last token of one unpadded sequence. (D,)"""
    with torch.no_grad():
        return hf_model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]


def random_items(n: int, vocab: int, seed: int) -> list[TokenizedPreference]:
    """Pairs of random token sequences of random lengths (nothing to prefer)."""
    rng = np.random.default_rng(seed)

    def seq(lo: int, hi: int) -> np.ndarray:
        return rng.integers(3, vocab, int(rng.integers(lo, hi))).astype(np.int32)

    return [TokenizedPreference(seq(2, 9), (seq(1, 9), seq(1, 9)), 0.0, None) for _ in range(n)]


def with_random_adapter(model, name: str, seed: int) -> None:
    """Attach adapter `name` with non-zero B, so it changes the model's outputs."""
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), name=name, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            b = layer.lora_B[name].weight
            b.copy_(torch.randn(b.shape, generator=g) * 0.2)


# ----------------------------------------------------------------------------- the head

def test_head_reads_the_last_non_padding_token(tiny_dir, hf_model):
    model = load_model(tiny_dir, quantize="none")
    head = ScalarHead(model.config.hidden_size, seed=3)
    items = random_items(3, model.config.vocab_size, seed=1)
    batch = collate_preferences(items, pad_id=0)
    with torch.no_grad():
        rewards = head(model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"]),
                       batch["attention_mask"])
    w, b = head.linear.weight[0].detach(), head.linear.bias[0].detach()
    expected = [float(hf_last_hidden(hf_model, it.prompt_ids.tolist() + r.tolist()) @ w + b)
                for it in items for r in it.response_ids]
    assert rewards.tolist() == pytest.approx(expected, abs=1e-4)


def test_head_init_is_seeded_scaled_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = ScalarHead(4096, seed=0), ScalarHead(4096, seed=0), ScalarHead(4096, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.linear.weight, b.linear.weight) and not torch.equal(a.linear.weight, c.linear.weight)
    # N(0, 1/(D+1)) as in OpenAI's lm-human-preferences; bias 0
    assert float(a.linear.weight.detach().std()) == pytest.approx(1 / math.sqrt(4097), rel=0.05)
    assert float(a.linear.bias.detach()) == 0.0
    zero = ScalarHead(64, init="zero")
    assert not zero.linear.weight.any() and not zero.linear.bias.any()
    with pytest.raises(ValueError, match="'xavier' is not one of normal, zero"):
        ScalarHead(64, init="xavier")


def test_fresh_reward_model_ranks_random_pairs_at_chance(tiny_dir):
    model = load_model(tiny_dir, quantize="none")
    with_random_adapter(model, "rm", seed=0)
    scorer = RewardModel(model, "rm", ScalarHead(model.config.hidden_size, seed=0))
    items = random_items(300, model.config.vocab_size, seed=2)
    batches = (collate_preferences(items[i:i + 50], pad_id=0) for i in range(0, 300, 50))
    result = evaluate_reward(scorer, batches, "cpu")
    assert result["n"] == 300 and abs(result["accuracy"] - 0.5) < 0.1  # ±0.1 is 3.5 binomial standard deviations


def test_saved_reward_model_scores_the_same_after_loading(tiny_dir, tmp_path):
    model = load_model(tiny_dir, quantize="none")
    with_random_adapter(model, "rm", seed=4)
    head = ScalarHead(model.config.hidden_size, seed=5)
    save_adapter(model, tmp_path / "rm", name="rm", extra_tensors=head.tensors())
    batch = collate_preferences(random_items(4, model.config.vocab_size, seed=3), pad_id=0)
    with torch.no_grad():
        before = RewardModel(model, "rm", head).score(batch)
        fresh = load_model(tiny_dir, quantize="none")
        after = load_reward_model(fresh, tmp_path / "rm").score(batch)
    torch.testing.assert_close(after, before)


def test_combined_reward_is_the_weighted_sum_on_one_shared_base(tiny_dir):
    model = load_model(tiny_dir, quantize="none")
    with_random_adapter(model, "helpful", seed=1)
    with_random_adapter(model, "harmless", seed=2)
    helpful = RewardModel(model, "helpful", ScalarHead(model.config.hidden_size, seed=1))
    harmless = RewardModel(model, "harmless", ScalarHead(model.config.hidden_size, seed=2))
    batch = collate_preferences(random_items(3, model.config.vocab_size, seed=4), pad_id=0)
    with torch.no_grad():
        r1, r2 = helpful.score(batch), harmless.score(batch)
        combined = CombinedReward([helpful, harmless], [0.3, -2.0]).score(batch)
    assert not torch.allclose(r1, r2)
    torch.testing.assert_close(combined, 0.3 * r1 - 2.0 * r2)
    assert all(layer.active == "harmless" for layer in lora_layers(model).values())  # scoring left it as it was


def test_adapter_without_a_head_is_refused_clearly(tiny_dir, tmp_path):
    model = load_model(tiny_dir, quantize="none")
    with_random_adapter(model, "sft", seed=0)
    save_adapter(model, tmp_path / "sft", name="sft")
    with pytest.raises(ValueError, match=r"no scalar head .* is this a reward adapter written by `qtune reward`"):
        load_reward_model(load_model(tiny_dir, quantize="none"), tmp_path / "sft")


# ----------------------------------------------------------------------------- training through the CLI

@pytest.fixture(scope="module")
def ranking_file(tmp_path_factory):
    """Rankings of 2 to 4 responses with scores and some margins."""
    rng = random.Random(0)
    rows = []
    for i in range(6):
        k = 2 + i % 3
        rows.append({"prompt": " ".join(rng.choices(WORDS, k=4)),
                     "responses": [" ".join(rng.choices(WORDS, k=rng.randint(1, 5))) + f" {j}" for j in range(k)],
                     "scores": [float(k - j) for j in range(k)], "margin": 0.5 * (i % 2)})
    path = tmp_path_factory.mktemp("rank") / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference_step1_losses(hf_model, tiny_dir, path, loss: str, init: str) -> tuple[float, float]:
    """(reward loss, LM loss on the chosen replies) of the whole file with the untrained head, from transformers."""
    items, _ = tokenize_preferences(load_preferences(str(path))[0], load_tokenizer(tiny_dir), 512)
    head = ScalarHead(hf_model.config.hidden_size, seed=0, init=init)  # the recipe's seed: the head the run starts from
    w, b = head.linear.weight[0].detach(), float(head.linear.bias[0])
    terms, per_ranking, squares, lm_sum, lm_count = [], [], [], 0.0, 0
    for it in items:
        seqs = [it.prompt_ids.tolist() + r.tolist() for r in it.response_ids]
        r = [float(hf_last_hidden(hf_model, s) @ w) + b for s in seqs]
        pairs = [-math.log(1 / (1 + math.exp(-(r[i] - r[j] - it.margin))))
                 for i in range(len(r)) for j in range(i + 1, len(r))]
        terms += pairs
        per_ranking.append(sum(pairs) / len(pairs))
        squares += [(ri - si) ** 2 for ri, si in zip(r, it.scores)]
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(torch.tensor([seqs[0]])).logits[0], -1)  # (T, V)
        start = len(it.prompt_ids)
        lm_sum -= float(sum(logp[t - 1, seqs[0][t]] for t in range(start, len(seqs[0]))))
        lm_count += len(seqs[0]) - start
    main = {"pairwise": terms, "listwise": per_ranking, "mse": squares}[loss]
    return sum(main) / len(main), lm_sum / lm_count


def run_cli(command: str, *args) -> dict:
    result = CliRunner().invoke(CLI[command], [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.output.strip().splitlines()[-1])


def reward_recipe(tmp_path):
    path = tmp_path / "reward.toml"
    path.write_text('kind = "reward"\n')
    return path


@pytest.mark.parametrize("loss,init", [("pairwise", "normal"), ("listwise", "normal"), ("mse", "normal"),
                                       ("pairwise", "zero")])
def test_first_logged_loss_matches_transformers(tiny_dir, hf_model, ranking_file, tmp_path, loss, init):
    out = tmp_path / "run"
    run_cli("reward", reward_recipe(tmp_path), f"model.path={tiny_dir}", "model.quantize=none", f"data.path={ranking_file}",
            f"output.dir={out}", f"reward.loss={loss}", f"reward.head_init={init}", "reward.lm_loss_coef=0.5",
            "train.max_steps=1",
            "train.micro_batch_size=6", "train.grad_accum_steps=1", "train.optimizer=adamw", "train.log_every=1",
            "lora.r=4", "lora.dropout=0.1")
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    expected_loss, expected_lm = reference_step1_losses(hf_model, tiny_dir, ranking_file, loss, init)
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert first["lm_loss"] == pytest.approx(expected_lm, rel=1e-4)


@pytest.fixture(scope="module")
def learnable_pairs(tmp_path_factory):
    """The chosen reply repeats the prompt after "good"; the rejected one is "bad" and random words."""
    rng = random.Random(1)
    rows = []
    for _ in range(48):
        words = " ".join(rng.choices(WORDS, k=5))
        rows.append({"prompt": f"Say: {words}", "chosen": f"good {words}",
                     "rejected": "bad " + " ".join(rng.choices(WORDS, k=4))})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reward_model_learns_and_eval_prefs_reads_it_back(tiny_dir, learnable_pairs, tmp_path):
    out = tmp_path / "run"
    summary = run_cli("reward", reward_recipe(tmp_path), f"model.path={tiny_dir}", f"data.path={learnable_pairs}",
                      f"output.dir={out}", "data.val_size=16", "train.max_steps=12", "train.micro_batch_size=4",
                      "train.grad_accum_steps=2", "train.lr=1e-3", "train.optimizer=adamw", "lora.r=8")
    assert summary["val_pairs"] == 16 and summary["val_accuracy_after"] >= 0.9
    assert summary["val_accuracy_after"] > summary["val_accuracy_before"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "extra_tensors.safetensors", "qtune-manifest.json"]
    result = run_cli("eval-prefs", tiny_dir, "--adapter", out / "adapter", "--data", learnable_pairs, "--kind", "reward")
    assert result["n"] == 48 and result["accuracy"] >= 0.9 and result["mean_margin"] > 0
    # the same model with weights +1 and −1 cancels: every pair ties
    cancel = run_cli("eval-prefs", tiny_dir, "--adapter", out / "adapter", "--adapter", out / "adapter", "--weight", 1,
                     "--weight", -1, "--data", learnable_pairs, "--kind", "reward")
    assert (cancel["accuracy"], cancel["mean_margin"], cancel["n"]) == (0.5, 0.0, 48)


def test_shipped_recipe_learns_within_a_few_steps(tiny_dir, learnable_pairs, tmp_path):
    # recipes/reward.toml as shipped (its lr, schedule, batch and head init), only shortened to 8 steps: its first
    # few hundred pairs must already teach the head. With the N(0, 1/(D+1)) head this run ends at 0.69, because the
    # random head's initial preferences outweigh what 8 steps at lr 1e-4 can teach.
    summary = run_cli("reward", RECIPES / "reward.toml", f"model.path={tiny_dir}", f"data.path={learnable_pairs}",
                      "data.format=auto", "data.val_size=16", "train.max_steps=8", "train.save_every=0", "eval.every=0",
                      f"output.dir={tmp_path / 'run'}")
    assert summary["val_accuracy_after"] >= 0.9
    assert summary["val_accuracy_before"] == 0.5  # the zero head ties every pair


def test_zero_head_ties_every_pair_without_being_run(tiny_dir):
    model = load_model(tiny_dir, quantize="none")
    with_random_adapter(model, "rm", seed=0)
    items = random_items(20, model.config.vocab_size, seed=5)
    scored = evaluate_reward(RewardModel(model, "rm", ScalarHead(model.config.hidden_size, init="zero")),
                             [collate_preferences(items, pad_id=0)], "cpu")
    assert (scored["accuracy"], scored["mean_margin"], scored["n"]) == (0.5, 0.0, 20)
    assert scored["loss"] == pytest.approx(math.log(2))
    assert indifferent_validation() == {"val_accuracy": scored["accuracy"], "val_margin": scored["mean_margin"],
                                        "val_loss": pytest.approx(scored["loss"])}


def test_bad_preference_file_fails_with_its_line(tiny_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}) + "\n")
    result = CliRunner().invoke(CLI["reward"], [str(reward_recipe(tmp_path)), f"model.path={tiny_dir}",
                                                f"data.path={data}", f"output.dir={tmp_path / 'run'}"])
    assert result.exit_code == 1
    assert f"{data} line 2: 'chosen' and 'rejected' are identical" in result.output


def test_resumed_run_reproduces_the_uninterrupted_one(tiny_dir, learnable_pairs, tmp_path):
    from safetensors.torch import load_file

    args = [reward_recipe(tmp_path), f"model.path={tiny_dir}", "model.quantize=none", f"data.path={learnable_pairs}",
            "train.micro_batch_size=4", "train.grad_accum_steps=1", "train.schedule=constant", "train.warmup_ratio=0",
            "train.lr=1e-3", "train.optimizer=adamw", "train.log_every=1", "lora.r=4", "lora.dropout=0.1",
            "reward.lm_loss_coef=0.1"]
    run_cli("reward", *args, "train.max_steps=4", f"output.dir={tmp_path / 'straight'}")
    run_cli("reward", *args, "train.max_steps=2", f"output.dir={tmp_path / 'split'}")
    run_cli("reward", *args, "train.max_steps=4", f"output.dir={tmp_path / 'split'}", "--resume")
    straight, split = ([v for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                        for v in (r["step"], r["loss"], r["lm_loss"])] for run in ("straight", "split"))
    assert len(straight) == 4 * 3 and straight == pytest.approx(split, rel=1e-5)
    for name in ("adapter_model.safetensors", "extra_tensors.safetensors"):  # the head is checkpointed too
        a, b = (load_file(tmp_path / run / "adapter" / name) for run in ("straight", "split"))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
