"""AdaLoRA against `peft` (same tiny weights on transformers' model) and against a plain re-implementation of
the paper's formulas: outputs, gradients, the regulariser, the budget schedule, importance and masking on the
same gradients, the file format both ways, merge, and `qtune sft / dpo / reward` with resume through the CLI."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import save_tiny, save_tiny_with_tokenizer

from qtune.cli import main
from qtune.lora import adapter_parameters
from qtune.lora.layer import LoraConfig
from qtune.lora.merge import merged_state_dict
from qtune.peft import load_adapter, merge_adapter_into_dir, save_adapter
from qtune.peft.adalora import RankAllocator, add_adalora, budget_schedule, orthogonality_regulariser, svd_layers
from qtune.weights.checkpoint import load_model

peft = pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).parent))
from test_dpo import pairs_file  # noqa: E402,F401  (the fixture)
from test_sft_loop import one_thread  # noqa: E402,F401  (the fixture: one thread, as every run compared bit for bit)

TARGETS = ("q_proj", "v_proj", "down_proj")
SETTINGS = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
            "orth_reg_weight": 0.5, "total_step": 10}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny_adalora"))


def hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def peft_config(**extra):
    s = {**SETTINGS, **extra}
    return peft.AdaLoraConfig(init_r=s["init_r"], target_r=s["target_r"], tinit=s["tinit"], tfinal=s["tfinal"],
                              deltaT=s["deltaT"], beta1=s["beta1"], beta2=s["beta2"], total_step=s["total_step"],
                              orth_reg_weight=s["orth_reg_weight"], lora_alpha=8, target_modules=list(TARGETS),
                              task_type="CAUSAL_LM")


def qtune_adalora(tiny_dir, seed=0, quantize="none"):
    model = load_model(tiny_dir, quantize=quantize)
    add_adalora(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS), dict(SETTINGS), "default", seed)
    for p in adapter_parameters(model, "default"):
        p.requires_grad_(True)
    return model


def nonzero_singular_values(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in svd_layers(model, "default").values():
            layer.lora_E["default"].copy_(torch.randn(layer.lora_E["default"].shape, generator=gen))


def peft_twin(tiny_dir, model):
    """PEFT's AdaLoRA model on transformers' copy of the same weights, holding qtune's A, E and B."""
    ref = peft.get_peft_model(hf_model(tiny_dir), peft_config())
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for module, layer in svd_layers(model, "default").items():
            base = f"base_model.model.{module}"
            params[f"{base}.lora_A.default"].copy_(layer.lora_A["default"].weight)
            params[f"{base}.lora_E.default"].copy_(layer.lora_E["default"])
            params[f"{base}.lora_B.default"].copy_(layer.lora_B["default"].weight)
    return ref


def ids():
    return torch.randint(3, 160, (2, 9), generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------- the layer

def test_fresh_adapter_keeps_base_output_and_matches_the_formula(tiny_dir):
    model, base = qtune_adalora(tiny_dir), load_model(tiny_dir, quantize="none")
    x = ids()
    assert torch.equal(model(x), base(x))  # E = 0 at the start
    nonzero_singular_values(model)
    layer = svd_layers(model, "default")["model.layers.0.self_attn.q_proj"]
    h = torch.randn(5, 64)
    a, e, b = layer.lora_A["default"].weight, layer.lora_E["default"], layer.lora_B["default"].weight
    # the paper's W + P Λ Q, with PEFT's scale alpha / (init_r + 1e-5)
    expected = h @ (layer.base_layer.weight + 8 / (4 + 1e-5) * b @ torch.diag(e.view(-1)) @ a).T
    torch.testing.assert_close(layer(h), expected, rtol=1e-5, atol=1e-5)


def test_logits_and_gradients_match_peft(tiny_dir):
    model = qtune_adalora(tiny_dir)
    nonzero_singular_values(model)
    ref = peft_twin(tiny_dir, model)
    x = ids()
    ours, theirs = model(x), ref(input_ids=x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    ours.square().mean().backward()
    theirs.square().mean().backward()
    params = dict(ref.named_parameters())
    for module, layer in svd_layers(model, "default").items():
        for kind, p in (("A", layer.lora_A["default"].weight), ("E", layer.lora_E["default"]),
                        ("B", layer.lora_B["default"].weight)):
            torch.testing.assert_close(p.grad, params[f"base_model.model.{module}.lora_{kind}.default"].grad,
                                       rtol=1e-4, atol=1e-6)


def test_orthogonality_regulariser_matches_peft_and_the_formula(tiny_dir):
    model = qtune_adalora(tiny_dir)
    ref = peft_twin(tiny_dir, model)
    x = ids()
    with_reg = ref(input_ids=x, labels=x).loss
    plain = ref.base_model.model(input_ids=x, labels=x).loss
    layers = svd_layers(model, "default")
    reg = orthogonality_regulariser(layers, "default")
    torch.testing.assert_close(0.5 * reg, with_reg - plain, rtol=1e-4, atol=1e-6)
    by_hand = [torch.sqrt(((m @ m.T - torch.eye(len(m))) ** 2).sum()) for layer in layers.values()
               for m in (layer.lora_A["default"].weight, layer.lora_B["default"].weight.T)]
    torch.testing.assert_close(reg, sum(by_hand) / len(by_hand))


# ----------------------------------------------------------------------------- schedule, importance, masking

@pytest.mark.parametrize("tinit,tfinal,total,delta_t", [(0, 0, 10, 1), (2, 3, 20, 2), (5, 5, 17, 3)])
def test_budget_schedule_matches_peft_and_the_cubic_formula(tinit, tfinal, total, delta_t):
    from peft.tuners.adalora.layer import RankAllocator as PeftAllocator

    ref = PeftAllocator.__new__(PeftAllocator)
    ref.peft_config = peft.AdaLoraConfig(tinit=tinit, tfinal=tfinal, total_step=total, deltaT=delta_t)
    ref.init_bgt, ref.target_bgt = 48, 20
    for step in range(total + 2):
        ours = budget_schedule(step, 48, 20, tinit, tfinal, total, delta_t)
        assert ours == ref.budget_schedule(step)
        if tinit < step <= total - tfinal:
            cubic = 20 + 28 * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3
            assert ours == (math.floor(cubic), step % delta_t == 0)


def reference_scores(history, beta1, beta2):
    """The paper's eqs. 8-11 by hand: I = |w g|, Ī and Ū smoothed, s = Ī Ū, S_i = s(λ_i) + mean s(Q_i·) + mean s(P_·i)."""
    avg = unc = None
    for w, g in history:
        ipt = {k: (w[k] * g[k]).abs() for k in w}
        avg = {k: beta1 * (avg[k] if avg else 0) + (1 - beta1) * ipt[k] for k in w}
        unc = {k: beta2 * (unc[k] if unc else 0) + (1 - beta2) * (ipt[k] - avg[k]).abs() for k in w}
    s = {k: avg[k] * unc[k] for k in avg}
    return s["E"].view(-1) + s["A"].mean(1) + s["B"].mean(0)


def test_importance_and_masking_match_peft_rank_allocator_and_the_formulas(tiny_dir):
    """The same parameters and gradients through qtune's allocator and PEFT's `update_and_allocate`, step by step:
    equal singular values after each step (the masking), equal patterns, and scores equal to the hand formulas."""
    model = qtune_adalora(tiny_dir)
    nonzero_singular_values(model)
    ref = peft_twin(tiny_dir, model)
    ours = RankAllocator(model, "default", SETTINGS["total_step"])
    theirs = dict(ref.named_parameters())
    layers = svd_layers(model, "default")
    gen = torch.Generator().manual_seed(5)
    history = {m: [] for m in layers}
    for step in range(SETTINGS["total_step"]):
        with torch.no_grad():
            for module, layer in layers.items():
                snapshot_w, snapshot_g = {}, {}
                for kind, p in (("A", layer.lora_A["default"].weight), ("E", layer.lora_E["default"]),
                                ("B", layer.lora_B["default"].weight)):
                    twin = theirs[f"base_model.model.{module}.lora_{kind}.default"]
                    p.add_(0.01 * torch.randn(p.shape, generator=gen))  # an optimizer's update
                    twin.copy_(p)
                    g = torch.randn(p.shape, generator=gen)
                    p.grad, twin.grad = g.clone(), g.clone()
                    snapshot_w[kind], snapshot_g[kind] = p.clone(), g
                history[module].append((snapshot_w, snapshot_g))
        ours.after_step()
        if step == 4:  # mid-schedule: the scores the pruning used are the paper's
            for module, scores in ours.triplet_scores().items():
                torch.testing.assert_close(scores, reference_scores(history[module], 0.85, 0.85))
        ref.base_model.update_and_allocate(step)
        for module, layer in layers.items():
            assert torch.equal(layer.lora_E["default"], theirs[f"base_model.model.{module}.lora_E.default"]), step
    pattern = ref.peft_config["default"].rank_pattern
    assert {f"{m}.lora_E.default": layer.rank_pattern["default"] for m, layer in layers.items()} == pattern
    assert sum(ours.ranks().values()) <= SETTINGS["target_r"] * len(layers)


# ----------------------------------------------------------------------------- files and merge

def pruned_adapter(tiny_dir, quantize="none"):
    """A qtune AdaLoRA adapter with non-zero singular values and a pattern that prunes some of them."""
    model = qtune_adalora(tiny_dir, quantize=quantize)
    nonzero_singular_values(model)
    allocator = RankAllocator(model, "default", SETTINGS["total_step"])
    gen = torch.Generator().manual_seed(7)
    for _ in range(4):
        for p in adapter_parameters(model, "default"):
            p.grad = torch.randn(p.shape, generator=gen)
        allocator.after_step()
    assert any(not all(layer.rank_pattern["default"]) for layer in svd_layers(model, "default").values())
    return model


def test_saved_adapter_loads_in_peft_and_back_in_qtune_with_equal_logits(tiny_dir, tmp_path):
    model = pruned_adapter(tiny_dir)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"]
    x = ids()
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dir), tmp_path / "a").eval()
    torch.testing.assert_close(model(x), ref(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    again = load_model(tiny_dir, quantize="none")
    load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)
    save_adapter(again, tmp_path / "b")  # a loaded (cut) adapter saves as it was
    first, second = load_file(tmp_path / "a" / "adapter_model.safetensors"), \
        load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_peft_trained_adapter_loads_in_qtune_with_equal_logits(tiny_dir, tmp_path):
    ref = peft.get_peft_model(hf_model(tiny_dir), peft_config())
    x = ids()
    optimizer = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(5):
        ref(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        ref.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    ref.save_pretrained(tmp_path / "peft")
    ref.eval()
    model = load_model(tiny_dir, quantize="none")
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(model(x), ref(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_merge_folds_the_adapter(tiny_dir, tmp_path):
    model = pruned_adapter(tiny_dir)
    x = ids()
    merged = load_model(tiny_dir, quantize="none")
    merged.load_state_dict(merged_state_dict(model, "default", torch.float32), strict=False)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-4, atol=1e-4)
    save_adapter(model, tmp_path / "a")
    out = merge_adapter_into_dir(tiny_dir, tmp_path / "a", tmp_path / "merged", from_original=True, dtype="float32")
    torch.testing.assert_close(load_model(out, quantize="none")(x), model(x), rtol=1e-4, atol=1e-4)


def test_nf4_base_trains_the_adapter_only(tiny_dir):
    model = qtune_adalora(tiny_dir, quantize="nf4")
    nonzero_singular_values(model)
    model(ids()).square().mean().backward()
    grads = [p.grad for p in adapter_parameters(model, "default")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny_adalora_chat"), seed=1)


ADALORA = ["peft.method=adalora", "peft.adalora.init_r=4", "peft.adalora.target_r=2", "peft.adalora.tinit=1",
           "peft.adalora.tfinal=1", "train.log_every=1"]


def invoke(*args) -> dict:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.output.strip().splitlines()[-1])


def logged(out: Path) -> list[tuple]:
    """What decides a run's course, per logged step (not its timing)."""
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r.get("val_loss")) for r in records if "loss" in r]


def sft_args(chat_dir, out, steps=4, quantize="nf4"):
    return ["sft", "quickstart", f"model.path={chat_dir}", f"output.dir={out}", "data.cache_dir=", "data.max_seq_len=64",
            "data.path=qtune:checkable-tasks?count=24&seed=0", "data.val_size=4", "eval.exact_match=0",
            f"train.max_steps={steps}", "train.save_every=2", f"model.quantize={quantize}", *ADALORA]


@pytest.mark.parametrize("quantize", ["nf4", "none"])
def test_sft_through_the_cli_reports_ranks_and_resume_reproduces_it(chat_dir, tmp_path, quantize):
    out = tmp_path / "run"
    summary = invoke(*sft_args(chat_dir, out, quantize=quantize))
    ranks = summary["adalora_ranks"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["total_step"] == 4
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in config["rank_pattern"].items()} == ranks
    assert summary["adalora_total_rank"] == sum(ranks.values()) < 4 * len(ranks)
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert {k: tensors[f"base_model.model.{k}.lora_E"].shape[0] for k in ranks} == ranks

    # resume from step 2: the allocator's scores and pattern come back with the checkpoint
    metrics = logged(out)
    for leftover in ("checkpoints/step-000004", "adapter", "summary.json"):
        path = out / leftover
        os.system(f"rm -rf '{path}'")
    resumed = invoke(*sft_args(chat_dir, out, quantize=quantize), "--resume")
    assert resumed["adalora_ranks"] == ranks and logged(out) == metrics
    again = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    check_serving(chat_dir, out / "adapter", quantize, tmp_path)


def check_serving(chat_dir, adapter, quantize, tmp_path):
    """`qtune generate` and `qtune eval` take the adapter, and eval's loss is the one the adapter gives."""
    result = CliRunner().invoke(main, ["generate", str(chat_dir), "--adapter", str(adapter), "--quantize", quantize,
                                       "--prompt", "Reverse: a b c", "--greedy", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"instruction": "Reverse: a b c", "input": "", "output": "c b a"},
                                {"instruction": "Last word of: red tree", "input": "", "output": "tree"}]))
    losses = [invoke("eval", chat_dir, "--quantize", quantize, "--data", data, *extra)["loss"]
              for extra in ((), ("--adapter", adapter))]
    assert losses[0] != losses[1]


def test_dpo_and_reward_through_the_cli(chat_dir, pairs_file, tmp_path):  # noqa: F811
    for kind in ("dpo", "reward"):
        recipe = tmp_path / f"{kind}.toml"
        recipe.write_text(f'kind = "{kind}"\n')
        summary = invoke(kind, recipe, f"model.path={chat_dir}", f"output.dir={tmp_path / kind}",
                         f"data.path={pairs_file}", "data.val_size=4", "data.max_seq_len=64", "train.max_steps=3",
                         "train.save_every=0", "train.micro_batch_size=4", *ADALORA)
        ranks = summary["adalora_ranks"]
        assert ranks and summary["adalora_total_rank"] == sum(ranks.values()) <= 2 * len(ranks)
        config = json.loads((tmp_path / kind / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "ADALORA"
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # E = 0: the policy is its adapters-off reference


def test_a_schedule_without_room_to_prune_is_refused(chat_dir, tmp_path):
    result = CliRunner().invoke(main, [str(a) for a in sft_args(chat_dir, tmp_path / "r", steps=2)])
    assert result.exit_code == 1 and "peft.adalora.tinit" in result.output and "Traceback" not in result.output


def estimated_adapter(tiny_dir, *overrides):
    """(trainable parameters attached from the quickstart recipe with `overrides`, what `qtune estimate` counts)."""
    from qtune.config import ModelConfig
    from qtune.memory.accounting import lora_param_count
    from qtune.memory.estimate import estimate, step_shape_from_recipe
    from qtune.peft import attach
    from qtune.recipe.load import load_recipe

    recipe = load_recipe("quickstart", [f"model.path={tiny_dir}", *overrides])
    model = load_model(tiny_dir, quantize="none")
    attach(model, recipe, "default", 0)
    attached = sum(p.numel() for p in adapter_parameters(model, "default"))
    shape = step_shape_from_recipe(recipe, "cpu")
    counted = lora_param_count(ModelConfig.from_json(tiny_dir), shape.r, shape.targets, shape.method, shape.peft)
    return attached, counted, estimate(shape).parts


def test_estimate_counts_the_trainable_parameters_exactly(tiny_dir):
    attached, counted, parts = estimated_adapter(tiny_dir, "peft.method=adalora", "peft.adalora.init_r=6",
                                                 "peft.adalora.target_r=3")
    assert attached == counted and parts["adapter_weights"] == 4 * attached


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_triton_route_matches_torch_route(tiny_dir, quantize):
    """The fused LoRA op takes A ⊙ E as its A: outputs and every gradient (E's included) as the torch route."""
    model = qtune_adalora(tiny_dir, quantize=quantize)
    nonzero_singular_values(model)
    results = []
    for mode in ("torch", "triton"):
        model.set_kernels(mode)
        model.zero_grad()
        out = model(ids()[:1, :5])
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in adapter_parameters(model, "default")]))
    (y_t, g_t), (y_k, g_k) = results
    torch.testing.assert_close(y_k, y_t, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_t, g_k, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
