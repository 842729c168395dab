"""The router's load-balancing loss (qtune/train/router_loss.py) against transformers' `load_balancing_loss_func`
(the independent reference), on the same router logits and through whole tiny Mixtral / Qwen3-MoE models; where
its gradient goes; and `train.router_aux_loss_coef` through the SFT CLI and the recipe checks."""

import dataclasses
import json

import pytest
import torch
from regression.cases import CASES, run_case
from tiny import TINY_CONFIGS, save_tiny

from qtune.lora import LoraConfig, add_lora, lora_layers, adapter_parameters
from qtune.recipe.load import load_recipe
from qtune.recipe.schema import RecipeError
from qtune.train.router_loss import load_balancing_loss, moe_routers, recorded_router_logits
from qtune.weights.checkpoint import load_model

transformers = pytest.importorskip("transformers")
MOE = ("mixtral", "qwen3-moe")


def hf_loss(logits, n_experts, top_k, mask=None):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(tuple(logits), n_experts, top_k, mask)


@pytest.mark.parametrize("mask", ["none", "left-padding", "packed"])
def test_value_and_logit_gradients_equal_transformers(mask):
    g = torch.Generator().manual_seed(0)
    L, B, T, E, k = 3, 2, 7, 5, 2
    masks = {"none": None, "left-padding": torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7]),
             "packed": torch.tensor([[1, 1, 1, 2, 2, 2, 0], [1, 1, 2, 2, 3, 3, 3]])}  # qtune's segment ids
    ours_in = [torch.randn(B * T, E, generator=g, requires_grad=True) for _ in range(L)]
    ref_in = [x.detach().clone().requires_grad_() for x in ours_in]
    ours = load_balancing_loss(ours_in, k, masks[mask])
    ref = hf_loss(ref_in, E, k, None if masks[mask] is None else (masks[mask] != 0).long())
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    ours.backward()
    ref.backward()
    for a, b in zip(ours_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_a_uniform_router_scores_top_k():
    """P_e = 1/E for every expert, and the k routing slots of each token sum to k whichever experts they pick."""
    assert load_balancing_loss([torch.zeros(6, 4), torch.zeros(6, 4)], top_k=2).item() == pytest.approx(2.0)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {kind: save_tiny(kind, root / kind) for kind in MOE}


@pytest.mark.parametrize("kind", MOE)
def test_whole_model_router_logits_and_aux_equal_transformers(moe_dirs, kind):
    ids = torch.randint(3, 160, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
    hf = transformers.AutoModelForCausalLM.from_pretrained(moe_dirs[kind], dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, output_router_logits=True)
        ours = load_model(moe_dirs[kind], quantize="none")
        with recorded_router_logits(ours) as logits:
            ours.hidden_states(ids, mask)
    assert len(logits) == len(out.router_logits) == TINY_CONFIGS[kind]["num_hidden_layers"]
    real = mask.reshape(-1) != 0  # padding rows attend to nothing; their router logits are never used
    for a, b in zip(logits, out.router_logits):
        torch.testing.assert_close(a[real], b[real], rtol=1e-4, atol=1e-5)
    top_k = TINY_CONFIGS[kind]["num_experts_per_tok"]
    assert load_balancing_loss(logits, top_k, mask).item() == pytest.approx(out.aux_loss.item(), rel=1e-5)


def aux_gradients(model, ids, checkpointing=False) -> dict[str, torch.Tensor]:
    model.gradient_checkpointing = checkpointing
    model.train()
    with recorded_router_logits(model) as logits:
        model.hidden_states(ids)
    load_balancing_loss(logits, model.config.num_experts_per_tok).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", MOE)
def test_gradient_reaches_the_router_only_when_it_is_trainable(moe_dirs, kind):
    ids = torch.randint(3, 160, (2, 9), generator=torch.Generator().manual_seed(2))
    frozen = load_model(moe_dirs[kind], quantize="none")
    add_lora(frozen, LoraConfig(r=2, target_modules=("q_proj", "v_proj")))
    for p in adapter_parameters(frozen):  # a trained adapter: B != 0, so A receives gradient too
        torch.nn.init.normal_(p, std=0.05)
    grads = aux_gradients(frozen, ids)
    assert all(not p.requires_grad for router in moe_routers(frozen) for p in router.parameters())
    assert not any(".gate." in n or n.endswith(".gate.weight") for n in grads)
    # the router reads the hidden states, so the attention adapters of every layer below the last router learn
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "q_proj" in n)

    trained = load_model(moe_dirs[kind], quantize="none")
    add_lora(trained, LoraConfig(r=2, target_modules=("q_proj", "v_proj", "gate")))
    router_names = {f"{n}." for n, layer in lora_layers(trained).items() if n.endswith(".gate")}
    assert len(router_names) == TINY_CONFIGS[kind]["num_hidden_layers"]
    grads = aux_gradients(trained, ids)
    router_grads = [g for n, g in grads.items() if n.startswith(tuple(router_names)) and "lora_B" in n]
    assert len(router_grads) == len(router_names) and all(g.abs().sum() > 0 for g in router_grads)
    assert all(not p.requires_grad for n, p in trained.named_parameters() if n.endswith("gate.base.weight"))


def test_gradient_checkpointing_gives_the_same_gradients(moe_dirs):
    ids = torch.randint(3, 160, (2, 9), generator=torch.Generator().manual_seed(3))
    grads = []
    for checkpointing in (False, True):
        model = load_model(moe_dirs["mixtral"], quantize="none")
        add_lora(model, LoraConfig(r=2, target_modules=("q_proj", "v_proj", "gate")), seed=5)
        for p in adapter_parameters(model):
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(7))
        grads.append(aux_gradients(model, ids, checkpointing))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_sft_cli_adds_the_loss_to_the_gradient_and_logs_it(tmp_path):
    """Step 1's cross-entropy is the committed one (the loss is measured before the update); its gradient norm
    and step 2's loss are not, since the aux loss's gradient reaches the attention adapters."""
    case = CASES["sft-mixtral"]
    want = json.loads(case.reference.read_text())
    with_aux = dataclasses.replace(case, overrides=(*case.overrides, "train.router_aux_loss_coef=0.5"),
                                   step_keys=(*case.step_keys, "router_aux_loss"))
    got = run_case(with_aux, tmp_path)
    assert got["loss"][0] == pytest.approx(want["loss"][0], rel=1e-5)
    assert got["grad_norm"][0] != pytest.approx(want["grad_norm"][0], rel=1e-4)
    assert got["loss"][1] != pytest.approx(want["loss"][1], rel=1e-5)
    assert len(got["router_aux_loss"]) == 2 and all(1.0 < a < 4.0 for a in got["router_aux_loss"])  # near k = 2


def test_recipe_checks(tmp_path):
    with pytest.raises(RecipeError, match="router_aux_loss_coef.*must be >= 0|router_aux_loss_coef.*negative"):
        load_recipe("quickstart", ["train.router_aux_loss_coef=-0.1"])
    with pytest.raises(RecipeError, match="train.router_aux_loss_coef.*SFT only"):
        load_recipe("dpo", ["train.router_aux_loss_coef=0.01"])
    assert load_recipe("quickstart", ["train.router_aux_loss_coef=0.02"]).train.router_aux_loss_coef == 0.02
    assert load_recipe("quickstart").train.router_aux_loss_coef == 0.0


def test_a_dense_model_refuses_the_coefficient_and_a_checkpoint_asking_for_the_loss_gets_a_notice(moe_dirs, tmp_path):
    import io

    from rich.console import Console

    from qtune.train.sft import check_router_aux_loss

    dense = load_model(save_tiny("llama", tmp_path / "llama"), quantize="none")
    with pytest.raises(RecipeError, match="train.router_aux_loss_coef = 0.02.*not a mixture of experts"):
        check_router_aux_loss(dense, 0.02, Console(file=io.StringIO()))
    config_path = moe_dirs["mixtral"] / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "output_router_logits": True, "router_aux_loss_coef": 0.02}))
    try:
        moe = load_model(moe_dirs["mixtral"], quantize="none")  # was refused by name before the loss existed
    finally:
        config_path.write_text(json.dumps(config))
    assert moe.config.to_dict()["output_router_logits"] is True  # written back unchanged by merge / quantize
    shown = io.StringIO()
    check_router_aux_loss(moe, 0.0, Console(file=shown, width=200))
    assert "output_router_logits" in shown.getvalue() and "train.router_aux_loss_coef" in shown.getvalue()
    check_router_aux_loss(moe, 0.02, Console(file=shown))
