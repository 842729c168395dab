"""PPO's roles on one base, its rollout tensors against full-logit references, and its prompt data."""

import json

import pytest
import torch
from tiny import save_tiny_with_tokenizer

from qtune.weights.checkpoint import load_model
from qtune.data.batching import DataPosition
from qtune.data.records import DataError
from qtune.lora import LoraConfig, adapters_disabled, add_lora, lora_layers, use_adapter
from qtune.peft import save_adapter
from qtune.weights.nf4_linear import NF4Linear
from qtune.recipe.align import PPORecipe, PPOSection, PromptDataSection
from qtune.recipe.sections import TrainSection
from qtune.align.reward_model import ScalarHead
from qtune.tokenizer import load_tokenizer
from qtune.train.ppo import (POLICY, VALUE, VALUE_HEAD, attach_roles, make_experience, ppo_minibatch,
                             response_logprobs, response_values)
from qtune.data.prompts import Prompt, load_prompts, prompt_batches, prompt_of
from qtune.train.rollout import collate_responses, micro_batches


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: on a busy machine, waking a second thread costs far more than the arithmetic.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def reward_dir(tiny_dir, tmp_path_factory):
    """A reward model as `qtune reward` saves it: a LoRA adapter (non-zero B) plus a scalar head."""
    model = load_model(tiny_dir, quantize="none")
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), name="rm", seed=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["rm"].weight.copy_(torch.randn(layer.lora_B["rm"].weight.shape, generator=g) * 0.1)
    head = ScalarHead(model.config.hidden_size, seed=5)
    return save_adapter(model, tmp_path_factory.mktemp("rm") / "adapter", name="rm", extra_tensors=head.tensors())


def recipe_for(tiny_dir, **ppo) -> PPORecipe:
    r = PPORecipe(data=PromptDataSection(path="unused.jsonl"), ppo=PPOSection(**ppo),
                  train=TrainSection(micro_batch_size=2, grad_accum_steps=2))
    r.model.path = str(tiny_dir)
    r.lora.r = 4
    return r


def randomise_adapter(model, name: str, seed: int) -> None:
    """Non-zero B, so the adapter actually changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                w = layer.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)


def random_sequences(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 2, 7, 4)]
    responses = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 6, 1, 4)]
    return prompts, responses


def full_logit_reference(model, prompts, responses, temperature: float):
    """log-probs and entropies of each response token, one unpadded sequence at a time, from all the logits."""
    logps, entropies = [], []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        logits = model(ids)[0, len(p) - 1:len(p) + len(r) - 1].double() / temperature  # (len(r), V)
        logp = torch.log_softmax(logits, -1)
        logps.append(logp.gather(1, torch.tensor(r)[:, None]).squeeze(1))
        entropies.append(-(logp.exp() * logp).sum(-1))
    return logps, entropies


def test_response_logprobs_match_full_logits_for_each_role(tiny_dir):
    model = load_model(tiny_dir, quantize="nf4")
    scorer, _ = attach_roles(model, recipe_for(tiny_dir, reward_fn="qtune.align.reward_functions:arithmetic"), 0, "cpu")
    randomise_adapter(model, POLICY, seed=1)
    model.eval()
    prompts, responses = random_sequences(model.config.vocab_size)
    batch = collate_responses(prompts, responses, pad_id=0)
    for temperature in (1.0, 0.7):
        with torch.no_grad(), use_adapter(model, POLICY):
            logp, entropy = response_logprobs(model, batch, temperature)
            want_logp, want_entropy = full_logit_reference(model, prompts, responses, temperature)
        with torch.no_grad(), adapters_disabled(model):
            ref_logp, _ = response_logprobs(model, batch, temperature)
            want_ref, _ = full_logit_reference(model, prompts, responses, temperature)
        for s, r in enumerate(responses):
            torch.testing.assert_close(logp[s, :len(r)].double(), want_logp[s], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entropy[s, :len(r)].double(), want_entropy[s], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ref_logp[s, :len(r)].double(), want_ref[s], atol=1e-5, rtol=1e-5)
            assert (logp[s, len(r):] == 0).all() and (entropy[s, len(r):] == 0).all()
        assert not torch.allclose(logp, ref_logp)  # the policy adapter is live, the reference is the bare base


def test_response_logprobs_of_a_soft_capped_family_match_full_logits(tmp_path):
    """Gemma 2 (final logits capped at 0.5 in the tiny model): PPO and GRPO score the capped logits, also when
    a temperature divides them."""
    model = load_model(save_tiny_with_tokenizer("gemma2", tmp_path / "gemma2"), quantize="none").eval()
    assert model.logit_softcap is not None
    prompts, responses = random_sequences(model.config.vocab_size)
    batch = collate_responses(prompts, responses, pad_id=0)
    for temperature in (1.0, 0.7):
        with torch.no_grad():
            logp, entropy = response_logprobs(model, batch, temperature)
            want_logp, want_entropy = full_logit_reference(model, prompts, responses, temperature)
        for s, r in enumerate(responses):
            torch.testing.assert_close(logp[s, :len(r)].double(), want_logp[s], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entropy[s, :len(r)].double(), want_entropy[s], atol=1e-5, rtol=1e-5)


def test_four_roles_share_one_base_and_value_starts_as_the_reward_model(tiny_dir, reward_dir):
    model = load_model(tiny_dir, quantize="nf4")
    nf4_before = sum(isinstance(m, NF4Linear) for m in model.modules())
    scorer, params = attach_roles(model, recipe_for(tiny_dir, reward_model=str(reward_dir)), 0, "cpu")
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == nf4_before  # no second copy of the weights
    assert set(next(iter(lora_layers(model).values())).lora_A) == {"reward", POLICY, VALUE}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}
    assert not any(p.requires_grad for p in scorer.reward_model.head.parameters())
    model.eval()
    prompts, responses = random_sequences(model.config.vocab_size, seed=2)
    batch = collate_responses(prompts, responses, pad_id=0)
    with torch.no_grad():
        rewards = scorer.reward_model.score(batch)
        with use_adapter(model, VALUE):
            hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        values_at_last = model.get_submodule(VALUE_HEAD)(hidden, batch["attention_mask"])
    torch.testing.assert_close(values_at_last, rewards)
    assert rewards.std() > 0


def test_fresh_policy_rollout_has_zero_kl_and_rewards_only_at_the_end(tiny_dir):
    model = load_model(tiny_dir, quantize="nf4")
    recipe = recipe_for(tiny_dir, reward_fn="qtune.align.reward_functions:arithmetic", gamma=1.0, lam=1.0, whiten_advantages=False)
    _, _ = attach_roles(model, recipe, 0, "cpu")
    prompts, responses = random_sequences(model.config.vocab_size, seed=4)
    fake = [Prompt(p, "", {}) for p in prompts]

    class Gen:  # what the scorer and make_experience read of a generation
        def __init__(self, ids):
            self.token_ids, self.text, self.finish_reason = ids, "", "length"

    class FixedScores:
        def score(self, prompts, generations):
            return torch.tensor([1.0, -2.0, 0.5, 3.0])

    batch, stats = make_experience(model, FixedScores(), fake, [Gen(r) for r in responses], recipe, 0.3, "cpu")
    mask = batch["response_mask"].bool()
    torch.testing.assert_close(batch["old_logp"], batch["ref_logp"])  # B = 0: the policy is the reference
    assert stats["kl"] == 0.0 and stats["reward"] == pytest.approx(0.625)
    # γ = λ = 1 and no KL: every token's return is the sequence's score
    torch.testing.assert_close(batch["returns"][mask], batch["scores"][:, None].expand_as(mask)[mask])
    model.eval()
    with torch.no_grad(), use_adapter(model, VALUE):
        values = response_values(model, batch)
    torch.testing.assert_close(batch["values"], values)


def policy_and_value_grads(model, batch, recipe, checkpointing: bool):
    model.gradient_checkpointing = checkpointing
    model.train()
    for p in model.parameters():
        p.grad = None
    ppo_minibatch(model, batch, torch.arange(len(batch["input_ids"])), recipe, None, (0,), "cpu")
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_are_the_same_with_gradient_checkpointing(tiny_dir):
    """Each role's backward runs under its own adapter, so recomputed forwards use the right one."""
    model = load_model(tiny_dir, quantize="nf4")
    recipe = recipe_for(tiny_dir, reward_fn="qtune.align.reward_functions:arithmetic")
    attach_roles(model, recipe, 0, "cpu")
    randomise_adapter(model, POLICY, seed=7)
    randomise_adapter(model, VALUE, seed=8)
    prompts, responses = random_sequences(model.config.vocab_size, seed=5)
    batch = collate_responses(prompts, responses, pad_id=0)
    S, R = batch["targets"].shape
    g = torch.Generator().manual_seed(0)
    batch.update(old_logp=-torch.rand(S, R, generator=g) * 3, values=torch.randn(S, R, generator=g),
                 advantages=torch.randn(S, R, generator=g), returns=torch.randn(S, R, generator=g))
    plain = policy_and_value_grads(model, batch, recipe, checkpointing=False)
    recomputed = policy_and_value_grads(model, batch, recipe, checkpointing=True)
    assert any(".policy." in n for n in plain) and any(".value." in n for n in plain) and "value_head.linear.weight" in plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
        assert plain[name].abs().sum() > 0, name


def test_micro_batches_trim_to_their_longest_sequence():
    batch = collate_responses([[1, 2, 3], [4], [5, 6]], [[7], [8, 9, 10], [11, 12]], pad_id=0)
    batch["scores"] = torch.tensor([1.0, 2.0, 3.0])
    pieces = list(micro_batches(batch, 2, rows=torch.tensor([2, 0, 1])))
    first = pieces[0]  # rows 2 and 0: 4 tokens each at most, responses of at most 2 tokens
    assert first["input_ids"].tolist() == [[5, 6, 11, 12], [1, 2, 3, 7]]
    assert first["targets"].tolist() == [[11, 12], [7, -100]]
    assert first["response_cols"].tolist() == [[1, 2], [2, 3]]
    assert first["scores"].tolist() == [3.0, 1.0]
    assert pieces[1]["targets"].tolist() == [[8, 9, 10]]


# ----------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("row, fmt, chat, expected", [
    ({"prompt": "Hi", "answer": 3}, "prompt", True, [{"role": "user", "content": "Hi"}]),
    ({"prompt": "Hi"}, "prompt", False, "Hi"),
    ({"instruction": "Add", "input": "1 2"}, "alpaca", True, [{"role": "user", "content": "Add\n\n1 2"}]),
    ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                   {"role": "assistant", "content": "A"}]}, "chat", True,
     [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]),
    ({"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                        {"from": "human", "value": "Q2"}]}, "sharegpt", True,
     [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "rejected": "x"}, "hh", True,
     "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"),
])
def test_prompt_of_each_layout(row, fmt, chat, expected):
    assert prompt_of(row, fmt, chat, "f.jsonl line 1") == expected


def test_load_prompts_splits_truncates_and_names_bad_records(tiny_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_dir)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i} " * (1 + i % 3), "answer": i}) + "\n" for i in range(10)))
    data = PromptDataSection(path=str(path), val_size=3, max_seq_len=12, chat=False)
    train, val, stats = load_prompts(data, tokenizer, seed=0)
    assert (len(train), len(val), stats["format"]) == (7, 3, "prompt")
    assert all(len(p.ids) <= 12 for p in train + val) and stats["truncated"] > 0
    assert sorted(p.record["answer"] for p in train + val) == list(range(10))
    path.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    with pytest.raises(DataError, match=r"p.jsonl line 2: 'prompt' must be non-empty"):
        load_prompts(PromptDataSection(path=str(path)), tokenizer, seed=0)


def test_prompt_batches_are_full_and_resume_exactly():
    stream = prompt_batches(10, 3, seed=0, shuffle=True)
    first = [next(stream) for _ in range(5)]
    assert all(len(idx) == 3 for _, idx in first)
    assert len({i for _, idx in first[:3] for i in idx.tolist()}) == 9  # an epoch never repeats a prompt
    assert first[2][0] == DataPosition(1, 0)
    resumed = prompt_batches(10, 3, seed=0, shuffle=True, start=first[1][0])
    for (pos, idx), (pos2, idx2) in zip(first[2:], [next(resumed) for _ in range(3)]):
        assert pos == pos2 and idx.tolist() == idx2.tolist()
    with pytest.raises(DataError, match="fewer than one rollout batch"):
        next(prompt_batches(2, 3, 0, True))
