"""The model's logits equal transformers' (an independent implementation) on tiny random checkpoints."""

import json

import pytest
import torch

from qtune.weights.checkpoint import CheckpointError, load_model
from qtune.config import ConfigError, ModelConfig
from qtune.model import KVCache, RMSNorm
from tiny import TINY_CONFIGS, save_tiny

transformers = pytest.importorskip("transformers")
KINDS = list(TINY_CONFIGS)


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    d = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    ours = load_model(d, quantize="none", dtype="float32")
    return request.param, d, hf, ours


def test_logits_match_transformers(pair):
    kind, _, hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(3, 160, (3, 100))  # past the llama3 config's original context (64) so scaling matters
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (ref - got).abs().max().item() <= 1e-4, kind


def test_rope_scaling_is_applied(pair):
    kind, d, _, ours = pair
    cfg = json.loads((d / "config.json").read_text())
    if kind == "llama3":
        plain = ModelConfig.from_dict({**cfg, "rope_scaling": None, "rope_parameters": None})
        from qtune.model import rope_inv_freq

        assert not torch.allclose(rope_inv_freq(plain), ours.rope_inv_freq)


def test_left_padding_matches_transformers(pair):
    kind, _, hf, ours = pair
    torch.manual_seed(2)
    ids = torch.randint(3, 160, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on the first row
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask, position_ids=pos)
    real = mask.bool()
    assert (ref[real] - got[real]).abs().max().item() <= 1e-4


def test_packed_rows_equal_separate_sequences(pair):
    """Segment ids in the mask plus restarting positions make packed examples independent."""
    _, _, _, ours = pair
    torch.manual_seed(3)
    a, b = torch.randint(3, 160, (1, 5)), torch.randint(3, 160, (1, 7))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[1] * 5 + [2] * 7])
    pos = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        got = ours(packed, attention_mask=seg, position_ids=pos)
        ref = torch.cat([ours(a), ours(b)], 1)
    assert (ref - got).abs().max().item() <= 1e-5


def test_kv_cache_decoding_equals_full_forward(pair):
    _, _, _, ours = pair
    torch.manual_seed(4)
    ids = torch.randint(3, 160, (2, 12))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, 16)
        steps = [ours(ids[:, :8], kv_cache=cache)]
        for t in range(8, 12):
            steps.append(ours(ids[:, t:t + 1], kv_cache=cache))
    assert isinstance(cache, KVCache) and cache.length == 12
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


def test_gradient_checkpointing_gives_same_gradients(pair):
    _, _, _, ours = pair
    ids = torch.randint(3, 160, (2, 10))
    emb = ours.model.embed_tokens.weight
    grads = []
    for ckpt in (False, True):
        ours.gradient_checkpointing = ckpt
        ours.train()
        emb.requires_grad_(True)
        emb.grad = None
        ours(ids).square().mean().backward()
        grads.append(emb.grad.clone())
        emb.requires_grad_(False)
    ours.gradient_checkpointing = False
    ours.eval()
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bad_config_names_file_and_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match=r"config.json.*vocab_size"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="gpt2"):
        ModelConfig.from_json(tmp_path)


GOOD_CONFIG = {"model_type": "llama", "vocab_size": 160, "hidden_size": 64, "intermediate_size": 88,
               "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.mark.parametrize("config, expected", [
    ([1, 2], "expected a JSON object of model settings, got list"),
    ("llama", "expected a JSON object of model settings, got str"),
    ({**GOOD_CONFIG, "model_type": ["llama"]}, "model_type ['llama'] is not supported"),
    ({**GOOD_CONFIG, "num_key_value_heads": "2"}, "'num_key_value_heads' must be a positive integer or absent (found '2')"),
    ({**GOOD_CONFIG, "head_dim": 0}, "'head_dim' must be a positive integer"),
    ({**GOOD_CONFIG, "max_position_embeddings": 4096.5}, "'max_position_embeddings' must be a positive integer"),
    ({**GOOD_CONFIG, "rms_norm_eps": "1e-5"}, "'rms_norm_eps' must be a small positive number"),
])
def test_malformed_config_is_a_config_error_naming_file_and_field(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and expected in str(e.value), str(e.value)
    (tmp_path / "config.json").write_text(json.dumps(GOOD_CONFIG))
    assert ModelConfig.from_json(tmp_path).num_key_value_heads == 4  # the good one still loads


def test_shape_mismatch_and_missing_shard(tmp_path):
    d = save_tiny("llama", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors.*mlp.*shape"):
        load_model(d, quantize="none")
    sharded = save_tiny("llama", tmp_path / "s", max_shard_size="100KB")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1].name}.*missing"):
        load_model(sharded, quantize="none")


def test_sharded_checkpoint_loads(tmp_path):
    single = load_model(save_tiny("mistral", tmp_path / "a"), quantize="none")
    sharded = load_model(save_tiny("mistral", tmp_path / "b", max_shard_size="100KB"), quantize="none")
    ids = torch.randint(3, 160, (1, 6))
    with torch.no_grad():
        assert torch.equal(single(ids), sharded(ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_closed_form_backward_equals_autograd(dtype):
    """RMSNorm's hand-written backward against autograd through the plain formula, evaluated in fp64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 40, generator=gen).to(dtype)
    weight = (torch.randn(40, generator=gen) * 0.2 + 1).to(dtype)
    grad_y = torch.randn(3, 5, 40, generator=gen).to(dtype)
    norm = RMSNorm(40, 1e-5).to(dtype)
    norm.weight.data.copy_(weight)
    x_ours = x.clone().requires_grad_()
    (norm(x_ours) * grad_y).sum().backward()
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    y64 = w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    (y64 * grad_y.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the result is rounded to 8 bits
    for ours, ref in ((x_ours.grad, x64.grad), (norm.weight.grad, w64.grad)):
        assert ours.dtype == dtype
        assert (ours.double() - ref).abs().max() <= tol * ref.abs().max()


def _without(feature):
    """A change that switches one family feature off in a loaded model."""
    def apply(model):
        for layer in model.model.layers:
            attn = layer.self_attn
            if feature == "logit_softcap":
                model.logit_softcap = None
            elif feature == "attention_softcap":
                attn.softcap = None
            elif feature == "sliding_window":
                attn.window = None
            elif feature == "qk_norm":
                del attn.q_norm, attn.k_norm
                attn.qk_norm = False
            elif feature == "local_rope":
                model.rope_local_inv_freq = model.rope_inv_freq
            elif feature == "long_rope":
                model.rope_long_inv_freq = model.rope_inv_freq
    return apply


@pytest.mark.parametrize("kind, feature", [
    ("gemma2", "logit_softcap"), ("gemma2", "attention_softcap"), ("gemma2", "sliding_window"),
    ("gemma3", "sliding_window"), ("gemma3", "local_rope"), ("gemma3", "qk_norm"), ("qwen3", "qk_norm"),
    ("phi3", "long_rope")])
def test_each_family_feature_is_exercised(tmp_path, kind, feature):
    """The tiny configs make every feature matter, so the logit comparisons above could fail without it."""
    d = save_tiny(kind, tmp_path / kind)
    ours = load_model(d, quantize="none", dtype="float32")
    ids = torch.randint(3, 160, (2, 40), generator=torch.Generator().manual_seed(5))  # past Phi-3's 32
    with torch.no_grad():
        full = ours(ids)
        _without(feature)(ours)
        assert (ours(ids) - full).abs().max().item() > 1e-3


def test_gemma3_image_text_checkpoint_loads_its_language_model(tmp_path, capfd):
    from tiny import hf_config

    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=hf_config("gemma3").to_dict(), vision_config=vision.to_dict(),
                                    mm_tokens_per_image=4, image_token_index=150, boi_token_index=151,
                                    eoi_token_index=152)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, quantize="none", dtype="float32")
    assert "vision tower" in capfd.readouterr().err
    ids = torch.randint(3, 140, (2, 20))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)).abs().max().item() <= 1e-4
    # `qtune quantize` writes the language model alone, as a gemma3_text directory
    from qtune.weights.checkpoint import quantize_checkpoint

    out = quantize_checkpoint(tmp_path, tmp_path / "nf4", dtype="float32")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma3_text"
    with torch.no_grad():
        assert torch.equal(load_model(out)(ids), load_model(tmp_path, quantize="nf4", dtype="float32")(ids))


@pytest.mark.parametrize("change, expected", [
    ({"model_type": "phi4"}, "model_type 'phi4' is not supported (supported: llama, mistral, qwen2, qwen3, gemma2"),
    ({"final_logit_softcapping": 30.0}, "field 'final_logit_softcapping' is a Gemma setting"),
    ({"model_type": "gemma2", "attn_logit_softcapping": "50"}, "'attn_logit_softcapping' must be a positive number"),
    ({"model_type": "gemma2", "hidden_activation": "relu"}, "hidden_activation 'relu' is not supported"),
    ({"model_type": "gemma2", "layer_types": ["full_attention"]}, "'layer_types' must list one of"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
    ({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0}, "Gemma 3 does not soft-cap attention"),
    ({"model_type": "gemma3", "vocab_size": 5}, "needs a 'text_config' object"),
    ({"model_type": "qwen3", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"model_type": "phi3", "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0]}},
     "longrope needs 'original_max_position_embeddings'"),
    ({"model_type": "phi3", "partial_rotary_factor": 0}, "'partial_rotary_factor' must be a number in (0, 1]"),
    ({"model_type": "gemma3_text", "rope_local_base_freq": -1.0}, "field 'rope_local_base_freq' must be a positive"),
    ({"model_type": "gemma3_text", "rope_parameters": {"full_attention": {"rope_theta": 1e6},
                                                       "sliding_attention": {"rope_theta": "10000"}}},
     "field 'rope_parameters.sliding_attention.rope_theta' must be a positive number"),
    ({"model_type": "qwen3", "rope_theta": 0}, "field 'rope_theta' must be a positive number"),
])
def test_unsupported_family_settings_name_the_field(tmp_path, change, expected):
    (tmp_path / "config.json").write_text(json.dumps({**GOOD_CONFIG, **change}))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and expected in str(e.value), str(e.value)


@pytest.mark.parametrize("kind", ["qwen3", "gemma2", "gemma3", "mistral-nemo", "phi3", "qwen3-moe", "mixtral"])
def test_config_round_trips_through_to_dict(kind, tmp_path):
    """What merge and quantize write back describes the same model to qtune and to transformers."""
    d = save_tiny(kind, tmp_path / kind)
    cfg = ModelConfig.from_json(d)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    hf = transformers.AutoConfig.for_model(**cfg.to_dict())
    theirs = transformers.AutoConfig.from_pretrained(d)
    for key in ("layer_types", "sliding_window", "head_dim", "query_pre_attn_scalar", "final_logit_softcapping",
                "attn_logit_softcapping", "rope_parameters", "tie_word_embeddings", "num_local_experts",
                "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
        if key == "head_dim" and getattr(theirs, key, None) is None:
            continue  # Phi3Config and MixtralConfig leave it to be hidden / heads
        assert getattr(hf, key, None) == getattr(theirs, key, None), key


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_training_loss_equals_transformers_loss_with_soft_capped_logits(tmp_path, kernels):
    """SFT's fused loss caps Gemma 2's logits inside the op as transformers' forward does before its loss."""
    from qtune.train.common import lm_loss_sum

    d = save_tiny("gemma2", tmp_path / "gemma2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ours = load_model(d, quantize="none", dtype="float32", kernels=kernels)
    ids = torch.randint(3, 160, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        loss_sum, count = lm_loss_sum(ours, {"input_ids": ids, "labels": ids})
        assert abs(loss_sum.item() / count - hf(ids, labels=ids).loss.item()) <= 1e-5
        ours.logit_softcap = None
        assert abs(lm_loss_sum(ours, {"input_ids": ids, "labels": ids})[0].item() - loss_sum.item()) > 1e-3
