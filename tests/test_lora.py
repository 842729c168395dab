"""LoRA adapters checked against PEFT on the transformers model (the independent reference).

Adapters saved by qtune load with `peft.PeftModel.from_pretrained` and give the same logits, adapters
saved by PEFT load in qtune, merged directories load in transformers and equal base + adapter, and
the NF4 merge equals bitsandbytes' dequantized weights plus s · B A.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtune.weights.checkpoint import load_model
from qtune.weights.integrity import MANIFEST
from qtune.lora import (AdapterError, LoraConfig, LoRALinear, adapter_names, adapter_parameters, adapters_disabled,
                        add_lora, lora_layers, mark_trainable, set_active_adapter, use_adapter)
from qtune.peft import load_adapter, load_extra_tensors, merge_adapter_into_dir, save_adapter
from tiny import save_tiny

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TOL = 1e-4
FAMILIES = ("qwen3", "gemma2", "gemma3", "mistral-nemo", "phi3", "qwen3-moe", "mixtral")  # the families beyond Llama / Qwen2 (issue #16)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny(kind, root / kind) for kind in ("llama", "llama3", "qwen2", *FAMILIES)}


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def token_ids(seed=0, shape=(2, 11)):
    return torch.randint(3, 160, shape, generator=torch.Generator().manual_seed(seed))


def randomise(model, name=None, seed=1, std=0.05):
    """Give the adapter a non-zero B (as training would) so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name):
            p.add_(torch.randn(p.shape, generator=g) * std)


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_fresh_adapter_keeps_base_output(tiny_dirs):
    m = load_model(tiny_dirs["llama"], quantize="none")
    ids = token_ids()
    base = logits(m, ids)
    names = add_lora(m, LoraConfig(r=4, target_modules="all-linear"))
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert torch.equal(logits(m, ids), base)
    assert all(torch.equal(layer.lora_B["default"].weight, torch.zeros_like(layer.lora_B["default"].weight))
               for layer in lora_layers(m).values())


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone(tiny_dirs):
    def init(seed):
        m = load_model(tiny_dirs["llama"], quantize="none")
        add_lora(m, LoraConfig(r=4), seed=seed)
        return [p.detach().clone() for p in adapter_parameters(m)]

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a1, a2, b = init(0), init(0), init(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    assert not torch.equal(a1[0], b[0])
    # PEFT's Kaiming-uniform init with a = sqrt(5): A ~ U(-1/sqrt(in), 1/sqrt(in)), in = 64 here
    bound = 1 / math.sqrt(64)
    assert a1[0].abs().max() <= bound and a1[0].abs().max() > 0.9 * bound and a1[0].std() > 0.5 * bound / math.sqrt(3)


CASES = [  # kind, config
    ("llama", LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"))),
    ("llama3", LoraConfig(r=8, alpha=16, target_modules="all-linear")),
    ("qwen2", LoraConfig(r=4, alpha=6, target_modules="all-linear", rslora=True)),
    ("qwen3", LoraConfig(r=4, alpha=8, target_modules="all-linear")),
    ("gemma2", LoraConfig(r=4, alpha=8, target_modules="all-linear")),
    ("gemma3", LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))),
    ("mistral-nemo", LoraConfig(r=4, alpha=8, target_modules="all-linear")),
    ("phi3", LoraConfig(r=4, alpha=8, target_modules=("qkv_proj", "gate_up_proj", "down_proj"))),
    ("qwen3-moe", LoraConfig(r=4, alpha=8, target_modules="all-linear")),  # attention only, as in PEFT
    ("mixtral", LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"))),
]


@pytest.mark.parametrize("kind, expert_names", [("qwen3-moe", ("gate_proj", "up_proj", "down_proj")),
                                                ("mixtral", ("w1", "w2", "w3"))])
def test_all_linear_spares_experts_and_router_and_naming_them_adapts_every_expert(tiny_dirs, kind, expert_names):
    m = load_model(tiny_dirs[kind], quantize="none")
    attention = add_lora(m, LoraConfig(r=2, target_modules="all-linear"), name="attn")
    assert len(attention) == 2 * 4 and not any(".experts." in n or n.endswith(".gate") for n in attention)
    experts = add_lora(m, LoraConfig(r=2, target_modules=expert_names), name="experts")
    assert len(experts) == 2 * 4 * 3 and all(".experts." in n for n in experts)  # layers x experts x projections


@pytest.mark.parametrize("kind,cfg", CASES, ids=[c[0] for c in CASES])
def test_saved_adapter_loads_in_peft_with_equal_logits(tiny_dirs, tmp_path, kind, cfg):
    m = load_model(tiny_dirs[kind], quantize="none")
    add_lora(m, cfg, seed=3)
    randomise(m)
    out = save_adapter(m, tmp_path / "adapter", base_model_name_or_path=str(tiny_dirs[kind]))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == cfg.r and saved["use_rslora"] == cfg.rslora and saved["peft_type"] == "LORA"
    query = "qkv_proj" if kind == "phi3" else "q_proj"  # PEFT's names: Phi-3 adapts its fused projection
    assert f"base_model.model.model.layers.0.self_attn.{query}.lora_A.weight" in load_file(out / "adapter_model.safetensors")
    assert (out / MANIFEST).exists()  # qtune's own file, which PEFT ignores
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dirs[kind]), out).eval()
    ids = token_ids(1)
    got, want = logits(m, ids), logits(ref, ids)
    assert max_diff(got, want) <= TOL
    with adapters_disabled(m):
        base = logits(m, ids)
    assert max_diff(base, want) > 1e-2  # the adapter matters, so the comparison above can fail


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_peft_adapter_loads_in_qtune_with_equal_logits(tiny_dirs, tmp_path, targets):
    torch.manual_seed(0)
    ref = peft.get_peft_model(hf_model(tiny_dirs["qwen2"]), peft.LoraConfig(
        r=6, lora_alpha=12, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    ref.save_pretrained(tmp_path / "peft")
    assert not (tmp_path / "peft" / MANIFEST).exists()  # from elsewhere: read as it is
    m = load_model(tiny_dirs["qwen2"], quantize="none")
    cfg = load_adapter(m, tmp_path / "peft")
    assert cfg.r == 6 and cfg.scale == 2.0
    assert all(not p.requires_grad for p in m.parameters())
    ids = token_ids(2)
    assert max_diff(logits(m, ids), logits(ref, ids)) <= TOL


def test_two_named_adapters_switch_like_peft(tiny_dirs, tmp_path):
    m = load_model(tiny_dirs["llama"], quantize="none")
    add_lora(m, LoraConfig(r=2, target_modules=("q_proj", "v_proj")), name="policy", seed=0)
    add_lora(m, LoraConfig(r=5, alpha=10, target_modules="all-linear"), name="value", seed=1)
    randomise(m, "policy", seed=2)
    randomise(m, "value", seed=3)
    save_adapter(m, tmp_path / "policy", name="policy")
    save_adapter(m, tmp_path / "value", name="value")
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dirs["llama"]), tmp_path / "policy", adapter_name="policy")
    ref.load_adapter(tmp_path / "value", adapter_name="value")
    ref.eval()
    ids = token_ids(3)
    assert adapter_names(m) == ["policy", "value"]
    for name in ("policy", "value"):
        ref.set_adapter(name)
        want = logits(ref, ids)
        with use_adapter(m, name):
            assert max_diff(logits(m, ids), want) <= TOL
    set_active_adapter(m, "policy")
    ref.set_adapter("policy")
    assert max_diff(logits(m, ids), logits(ref, ids)) <= TOL
    with pytest.raises(ValueError, match="no adapter named 'reward'"):
        set_active_adapter(m, "reward")


def test_adapters_disabled_gives_base_and_restores_on_error(tiny_dirs):
    m = load_model(tiny_dirs["qwen2"], quantize="none")
    add_lora(m, LoraConfig(r=4, target_modules="all-linear"))
    randomise(m)
    ids = token_ids(4)
    with_adapter = logits(m, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with adapters_disabled(m):
            assert max_diff(logits(m, ids), logits(hf_model(tiny_dirs["qwen2"]), ids)) <= TOL
            raise RuntimeError("boom")
    assert torch.equal(logits(m, ids), with_adapter)


def test_gradients_reach_only_the_active_adapter(tiny_dirs, tmp_path):
    m = load_model(tiny_dirs["llama"], quantize="none")
    add_lora(m, LoraConfig(r=4, target_modules="all-linear"), name="a")
    add_lora(m, LoraConfig(r=3, target_modules=("q_proj",)), name="b", seed=1)
    mark_trainable(m, "a")
    set_active_adapter(m, "a")
    trainable = {id(p) for p in adapter_parameters(m, "a")}
    assert {id(p) for p in m.parameters() if p.requires_grad} == trainable
    opt = torch.optim.SGD(adapter_parameters(m, "a"), lr=0.5)
    ids = token_ids(5, (2, 9))
    for _ in range(3):  # a few SGD steps make B non-zero, as training does
        loss = torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(m_p.grad is not None for m_p in adapter_parameters(m, "a"))
    assert all(p.grad is None for n, p in m.named_parameters() if id(p) not in trainable)
    # The trained adapter still equals PEFT's view of it.
    save_adapter(m, tmp_path / "a", name="a")
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dirs["llama"]), tmp_path / "a").eval()
    assert max_diff(logits(m, ids), logits(ref, ids)) <= TOL


@pytest.mark.parametrize("kind, quantize, targets", [
    ("qwen2", "none", ("q_proj", "down_proj")), ("qwen2", "nf4", ("q_proj", "down_proj")),
    ("gemma2", "nf4", ("q_proj", "down_proj")), ("qwen3", "nf4", ("q_proj", "down_proj")),
    ("phi3", "nf4", ("qkv_proj", "gate_up_proj")), ("qwen3-moe", "nf4", ("q_proj", "o_proj")),
    ("mixtral", "nf4", ("q_proj", "o_proj"))])
def test_triton_route_matches_torch_route(tiny_dirs, kind, quantize, targets):
    """Gemma 2 takes the fused GeGLU block and soft-capped attention, Qwen3 its q/k norms, Phi-3 its fused
    projections (the gated activation on gate_up's halves), the mixtures of experts the grouped NF4 products."""
    if quantize == "nf4":
        pytest.importorskip("qtune.kernels.nf4")
    m = load_model(tiny_dirs[kind], quantize=quantize)
    add_lora(m, LoraConfig(r=4, target_modules=targets))
    randomise(m)
    ids = token_ids(6, (1, 5))
    results = []
    for mode in ("torch", "triton"):
        m.set_kernels(mode)
        m.zero_grad()
        out = m(ids)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in adapter_parameters(m)]))
    (y_t, g_t), (y_k, g_k) = results
    assert max_diff(y_t, y_k) <= TOL
    assert all(max_diff(a, b) <= 1e-5 for a, b in zip(g_t, g_k))


@pytest.mark.parametrize("kind", ["qwen2", *FAMILIES])
def test_merge_from_original_equals_base_plus_adapter(tiny_dirs, tmp_path, kind):
    m = load_model(tiny_dirs[kind], quantize="none")
    add_lora(m, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomise(m)
    save_adapter(m, tmp_path / "adapter")
    out = merge_adapter_into_dir(tiny_dirs[kind], tmp_path / "adapter", tmp_path / "merged", from_original=True,
                              dtype="float32")
    merged = hf_model(out)
    ids = token_ids(7)
    assert max_diff(logits(merged, ids), logits(m, ids)) <= TOL


def test_merge_default_uses_dequantized_nf4(tiny_dirs, tmp_path):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    m = load_model(tiny_dirs["llama"], quantize="nf4", dtype="float32")
    add_lora(m, LoraConfig(r=4, alpha=8, target_modules=("q_proj", "down_proj")))
    randomise(m)
    save_adapter(m, tmp_path / "adapter")
    out = merge_adapter_into_dir(tiny_dirs["llama"], tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    ids = token_ids(8)
    assert max_diff(logits(hf_model(out), ids), logits(m, ids)) <= TOL
    # Independently: merged = bitsandbytes' dequantized NF4 weight + s · B A
    original = load_file(tiny_dirs["llama"] / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = "model.layers.1.mlp.down_proj"
    packed, state = bnb_f.quantize_4bit(original[f"{key}.weight"], quant_type="nf4", compress_statistics=True)
    w = bnb_f.dequantize_4bit(packed, state, quant_type="nf4")
    lora = adapter[f"base_model.model.{key}.lora_B.weight"] @ adapter[f"base_model.model.{key}.lora_A.weight"]
    assert max_diff(merged[f"{key}.weight"], w + 2.0 * lora) <= 1e-6
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"],
                       bnb_f.dequantize_4bit(*bnb_f.quantize_4bit(original["model.layers.0.mlp.up_proj.weight"],
                                                                  quant_type="nf4", compress_statistics=True)))
    assert max_diff(merged[f"{key}.weight"], original[f"{key}.weight"] + 2.0 * lora) > 1e-4


def test_merge_cli(tiny_dirs, tmp_path):
    from click.testing import CliRunner

    from qtune.cli.lora_cmds import merge

    m = load_model(tiny_dirs["llama"], quantize="none")
    add_lora(m, LoraConfig(r=2))
    randomise(m)
    save_adapter(m, tmp_path / "adapter")
    result = CliRunner().invoke(merge, [str(tiny_dirs["llama"]), str(tmp_path / "adapter"), str(tmp_path / "out"),
                                        "--from-original", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    other = tiny_dirs["llama3"]  # one key/value head: v_proj is narrower than the adapter's
    result = CliRunner().invoke(merge, [str(other), str(tmp_path / "adapter"), str(tmp_path / "out2")])
    assert result.exit_code == 1 and "does not match this base model" in result.output
    assert not (tmp_path / "out2").exists()


def rewrite(adapter_dir, config_update=None, tensor_update=None):
    """Edit a saved adapter as another tool would, dropping qtune's manifest (which would refuse the edit)."""
    (adapter_dir / MANIFEST).unlink()
    cfg_path, w_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    cfg, tensors = json.loads(cfg_path.read_text()), load_file(w_path)
    cfg.update(config_update or {})
    cfg_path.write_text(json.dumps(cfg))
    save_file(tensor_update(tensors) if tensor_update else tensors, w_path)


def test_bad_adapters_name_the_file(tiny_dirs, tmp_path):
    m = load_model(tiny_dirs["llama"], quantize="none")
    add_lora(m, LoraConfig(r=4))
    randomise(m)
    good = save_adapter(m, tmp_path / "good")
    fresh = lambda: load_model(tiny_dirs["llama"], quantize="none")  # noqa: E731

    def copy(name):
        import shutil

        return shutil.copytree(good, tmp_path / name)

    wrong_rank = copy("rank")
    rewrite(wrong_rank, {"r": 8})
    with pytest.raises(AdapterError, match=r"rank.*adapter_model.safetensors does not match this base model.*r=8"):
        load_adapter(fresh(), wrong_rank)

    absent = copy("absent")
    rename = lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}  # noqa: E731
    rewrite(absent, tensor_update=rename)
    with pytest.raises(AdapterError, match=r"absent.*does not match.*model.layers.7.self_attn"):
        load_adapter(fresh(), absent)

    qwen = load_model(tiny_dirs["qwen2"], quantize="none")
    wider = load_model(tiny_dirs["llama3"], quantize="none")  # same hidden size, other kv heads: v_proj differs
    with pytest.raises(AdapterError, match=r"good.*does not match.*v_proj"):
        load_adapter(wider, good)
    assert load_adapter(qwen, good).r == 4  # same shapes: loads

    uncovered = copy("uncovered")
    rewrite(uncovered, {"target_modules": ["q_proj", "v_proj", "k_proj"]})
    with pytest.raises(AdapterError, match=r"uncovered.*does not match.*k_proj"):
        load_adapter(fresh(), uncovered)

    dora = copy("dora")
    rewrite(dora, {"use_dora": True})  # DoRA without its magnitudes
    with pytest.raises(AdapterError, match=r"dora.*adapter_model.safetensors: a DoRA adapter needs one "
                                           r"lora_magnitude_vector per adapted layer"):
        load_adapter(fresh(), dora)
    lora_bias = copy("lora_bias")
    rewrite(lora_bias, {"lora_bias": True})
    with pytest.raises(AdapterError, match=r"lora_bias.*adapter_config.json: lora_bias"):
        load_adapter(fresh(), lora_bias)

    missing = copy("missing")
    (missing / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"missing.*adapter_model.safetensors: missing"):
        load_adapter(fresh(), missing)
    with pytest.raises(AdapterError, match=r"nowhere.*adapter_config.json: missing"):
        load_adapter(fresh(), tmp_path / "nowhere")

    with pytest.raises(ValueError, match="matches no linear layer"):
        add_lora(fresh(), LoraConfig(target_modules=("query",)))


def test_interrupted_save_keeps_existing_adapter_and_extras_round_trip(tiny_dirs, tmp_path):
    m = load_model(tiny_dirs["llama"], quantize="none")
    add_lora(m, LoraConfig(r=4))
    head = torch.randn(1, 64)
    out = save_adapter(m, tmp_path / "adapter", extra_tensors={"value_head.weight": head})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    randomise(m)
    with pytest.raises(AttributeError):
        save_adapter(m, out, extra_tensors={"value_head.weight": "not a tensor"})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert torch.equal(load_extra_tensors(out)["value_head.weight"], head)
    m2 = load_model(tiny_dirs["llama"], quantize="none")
    load_adapter(m2, out, name="reloaded", trainable=True)
    assert isinstance(m2.model.layers[0].self_attn.q_proj, LoRALinear)
    assert all(p.requires_grad for p in adapter_parameters(m2, "reloaded"))
