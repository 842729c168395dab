"""PPO's and GRPO's updates go through the fp16 loss scaler (pre-Ampere cards train in fp16 with one): every
backward of a minibatch is multiplied by the scale, so the accumulated gradients are exactly scale times the
unscaled ones. A CPU GradScaler exercises the same calls the CUDA one makes."""

import pytest
import torch
from test_ppo import one_thread, randomise_adapter, random_sequences, recipe_for, tiny_dir  # noqa: F401  (fixtures)

from qtune.lora import add_lora, adapter_parameters
from qtune.peft import lora_config
from qtune.recipe.grpo import GRPORecipe, GRPOSection
from qtune.recipe.sections import TrainSection
from qtune.train.grpo import grpo_minibatch
from qtune.train.ppo import POLICY, VALUE, attach_roles, ppo_minibatch
from qtune.train.rollout import collate_responses
from qtune.weights.checkpoint import load_model

SCALE = 2.0 ** 8  # a power of two: scaling is exact in fp32


def rollout_batch(vocab: int, seed: int) -> dict:
    prompts, responses = random_sequences(vocab, seed=seed)
    batch = collate_responses(prompts, responses, pad_id=0)
    S, R = batch["targets"].shape
    g = torch.Generator().manual_seed(seed)
    batch.update(old_logp=-torch.rand(S, R, generator=g) * 3, ref_logp=-torch.rand(S, R, generator=g) * 3,
                 values=torch.randn(S, R, generator=g), advantages=torch.randn(S, R, generator=g),
                 returns=torch.randn(S, R, generator=g))
    return batch


def grads_of(model, run_minibatch, scaler) -> dict:
    for p in model.parameters():
        p.grad = None
    run_minibatch(scaler)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_scaled(model, run_minibatch):
    plain = grads_of(model, run_minibatch, None)
    scaled = grads_of(model, run_minibatch, torch.amp.GradScaler("cpu", init_scale=SCALE))
    assert plain and plain.keys() == scaled.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(scaled[name], plain[name] * SCALE, rtol=1e-5, atol=1e-6, msg=name)


def test_every_ppo_backward_is_scaled(tiny_dir):  # noqa: F811
    model = load_model(tiny_dir, quantize="nf4")
    recipe = recipe_for(tiny_dir, reward_fn="qtune.align.reward_functions:arithmetic")
    attach_roles(model, recipe, 0, "cpu")
    randomise_adapter(model, POLICY, seed=1)
    randomise_adapter(model, VALUE, seed=2)
    batch = rollout_batch(model.config.vocab_size, seed=3)
    rows = torch.arange(len(batch["input_ids"]))
    model.train()
    assert_scaled(model, lambda scaler: ppo_minibatch(model, batch, rows, recipe, None, (0,), "cpu", scaler))


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_the_grpo_backward_is_scaled(tiny_dir, beta):  # noqa: F811
    model = load_model(tiny_dir, quantize="nf4")
    recipe = GRPORecipe(grpo=GRPOSection(group_size=2, rollout_batch_size=4, beta=beta),
                        train=TrainSection(micro_batch_size=2, grad_accum_steps=2))
    recipe.lora.r, recipe.lora.dropout = 4, 0.0
    add_lora(model, lora_config(recipe.lora), name=POLICY)
    for p in adapter_parameters(model, POLICY):
        p.requires_grad_(True)
    randomise_adapter(model, POLICY, seed=4)
    batch = rollout_batch(model.config.vocab_size, seed=5)
    rows = torch.arange(len(batch["input_ids"]))
    model.train()
    assert_scaled(model, lambda scaler: grpo_minibatch(model, batch, rows, recipe, "cpu", scaler))
