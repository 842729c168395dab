"""LoRA+ (Hayou et al. 2024): B trains at `lora.b_lr_ratio` times A's learning rate, in its own optimizer group.

Checked against torch.optim.AdamW given the two groups by hand, and through the CLI for every loop and base."""

import pytest
import torch

from peft_cli import preference_files, two_steps_and_resume
from qtune.lora import LoraConfig, adapter_parameters, add_lora, lora_b_parameters, mark_trainable
from qtune.recipe.sections import LoRASection, TrainRecipe, TrainSection
from qtune.train.common import adapter_optimizer, build_scheduler, load_state
from qtune.weights.checkpoint import load_model
from tiny import save_tiny, save_tiny_with_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("loraplus") / "llama")


def adapted_model(tiny_dir, use_dora=False):
    m = load_model(tiny_dir, quantize="none")
    add_lora(m, LoraConfig(r=4, alpha=8, target_modules=("q_proj", "down_proj"), use_dora=use_dora), seed=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(m, "default"):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # a non-zero B, so that A has a gradient
    mark_trainable(m, "default")
    return m


def one_step(model, optimizer):
    ids = torch.randint(3, 160, (2, 7), generator=torch.Generator().manual_seed(0))
    model(ids).square().mean().backward()
    optimizer.step()


@pytest.mark.parametrize("use_dora", [False, True])
def test_one_adamw_step_equals_torch_with_two_groups(tiny_dir, use_dora):
    recipe = TrainRecipe(lora=LoRASection(b_lr_ratio=16.0), train=TrainSection(lr=1e-3, weight_decay=0.1,
                                                                               optimizer="adamw"))
    m = adapted_model(tiny_dir, use_dora)
    params = adapter_parameters(m, "default")
    before = [p.detach().clone() for p in params]
    one_step(m, adapter_optimizer(recipe, m, "default", params))

    ref = adapted_model(tiny_dir, use_dora)
    b_ids = {id(p) for p in lora_b_parameters(ref, "default")}
    ref_params = adapter_parameters(ref, "default")
    groups = [{"params": [p for p in ref_params if id(p) not in b_ids]},
              {"params": [p for p in ref_params if id(p) in b_ids], "lr": 16e-3}]
    one_step(ref, torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1))
    assert len(b_ids) == 4 and len(ref_params) == (12 if use_dora else 8)  # 2 layers x q_proj, down_proj
    for got, want, start in zip(params, ref_params, before):
        assert torch.equal(got, want)
        assert not torch.equal(got, start)


def test_b_update_is_ratio_times_the_plain_update(tiny_dir):
    """Adam's first step moves each weight by lr (sign-like ratio + decay): B's move scales by the ratio, A's not."""
    moves = {}
    for ratio in (1.0, 4.0):
        recipe = TrainRecipe(lora=LoRASection(b_lr_ratio=ratio), train=TrainSection(lr=1e-3, optimizer="adamw"))
        m = adapted_model(tiny_dir)
        a, b = m.model.layers[0].self_attn.q_proj.lora_A["default"].weight, m.model.layers[0].self_attn.q_proj.lora_B["default"].weight
        start = (a.detach().clone(), b.detach().clone())
        opt = adapter_optimizer(recipe, m, "default", adapter_parameters(m, "default"))
        assert len(opt.param_groups) == (1 if ratio == 1.0 else 2)
        one_step(m, opt)
        moves[ratio] = (a.detach() - start[0], b.detach() - start[1])
    assert torch.allclose(moves[4.0][0], moves[1.0][0])
    assert torch.allclose(moves[4.0][1], 4 * moves[1.0][1], rtol=1e-5, atol=1e-9)


def test_schedule_keeps_the_ratio(tiny_dir):
    recipe = TrainRecipe(lora=LoRASection(b_lr_ratio=8.0), train=TrainSection(lr=2e-4, optimizer="adamw"))
    m = adapted_model(tiny_dir)
    opt = adapter_optimizer(recipe, m, "default", adapter_parameters(m, "default"))
    sched = build_scheduler(opt, "cosine", warmup_steps=2, max_steps=10)
    for _ in range(4):
        a_lr, b_lr = (g["lr"] for g in opt.param_groups)
        assert b_lr == pytest.approx(8.0 * a_lr) and a_lr > 0
        opt.step()
        sched.step()


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loraplus_cli")
    return save_tiny_with_tokenizer("llama", root / "tiny"), preference_files(root / "data")


@pytest.mark.parametrize("verb,quantize,method", [("sft", "nf4", "lora"), ("sft", "none", "dora"),
                                                  ("dpo", "nf4", "dora"), ("reward", "none", "lora")])
def test_cli_trains_and_resumes(cli_setup, tmp_path, verb, quantize, method):
    tiny, data = cli_setup
    two_steps_and_resume(verb, tiny, tmp_path / "run", data, quantize, f"peft.method={method}", "lora.r=4",
                         "lora.b_lr_ratio=16", "train.lr=2e-4")
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    groups = load_state(ckpt, "optimizer")["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([2e-4, 16 * 2e-4])  # the recipe's lr and B's
