"""Prefix tuning (qtune/peft/prefix.py) against `peft` on transformers' model of the same tiny weights, and
against the formula: every layer l attends over [P_k^l ; K] and [P_v^l ; V], the prefix taken from the table
P (N, 2 · layers · d_kv), reparameterised as P = W2 tanh(W1 E + b1) + b2 with `projection`.

The real tokens' positions move up by N (PEFT's count); a packed example sees the prefix as if alone.
"""

import json

import pytest
import torch
from virtual_tokens import N_VIRTUAL, greedy_full_forward, hf_model, max_diff, qtune_with, token_ids, weighted_sum
from tiny import save_tiny

from qtune.generate import generate
from qtune.lora import adapter_parameters, adapters_disabled
from qtune.lora.peft import AdapterError
from qtune.peft import load_adapter, merge_adapter_into_dir, save_adapter
from qtune.weights.checkpoint import load_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TOL = 1e-4
KINDS = ("llama", "qwen3", "gemma2")  # GQA; q/k norms and head_dim != D / H; Gemma's soft-capping and windows


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny(kind, root / kind) for kind in KINDS}


def peft_prefix(projection: bool):
    return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prefix_projection=projection,
                                   encoder_hidden_size=16)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("projection", [True, False])
def test_saved_adapter_loads_in_peft_with_equal_logits(tiny_dirs, tmp_path, kind, projection):
    m = qtune_with("prefix", tiny_dirs[kind], projection=projection)
    out = save_adapter(m, tmp_path / "adapter", base_model_name_or_path=str(tiny_dirs[kind]))
    saved = json.loads((out / "adapter_config.json").read_text())
    cfg = m.config
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["prefix_projection"] == projection
    assert saved["token_dim"] == cfg.num_key_value_heads * cfg.head_dim and saved["num_layers"] == cfg.num_hidden_layers
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dirs[kind]), out).eval()
    ids, mask = token_ids(1), torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        got, want = m(ids, mask), ref(input_ids=ids, attention_mask=mask).logits
        with adapters_disabled(m):
            base = m(ids, mask)
    real = mask.bool()
    assert max_diff(got[real], want[real]) <= TOL
    assert max_diff(base[real], want[real]) > 1e-2


def test_peft_adapter_loads_in_qtune_with_equal_logits(tiny_dirs, tmp_path):
    torch.manual_seed(4)
    peft.get_peft_model(hf_model(tiny_dirs["qwen3"]), peft_prefix(True)).save_pretrained(tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dirs["qwen3"]), tmp_path / "a").eval()
    m = load_model(tiny_dirs["qwen3"], quantize="none")
    load_adapter(m, tmp_path / "a")
    ids = token_ids(2)
    with torch.no_grad():
        assert max_diff(m(ids), ref(input_ids=ids).logits) <= TOL


def formula_logits(hf, table: torch.Tensor, ids: torch.Tensor, cfg) -> torch.Tensor:
    """transformers' model with the prefix written into its cache layer by layer, sliced out of the table as the
    format says (layer l: keys at [2l], values at [2l + 1], each (heads, head_dim)); the real tokens at
    positions N.."""
    B, T = ids.shape
    H, d = cfg.num_key_value_heads, cfg.head_dim
    cache = transformers.DynamicCache(config=hf.config)
    for layer in range(cfg.num_hidden_layers):
        k = table[:, (2 * layer) * H * d:(2 * layer + 1) * H * d].reshape(N_VIRTUAL, H, d).transpose(0, 1)
        v = table[:, (2 * layer + 1) * H * d:(2 * layer + 2) * H * d].reshape(N_VIRTUAL, H, d).transpose(0, 1)
        cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), layer)
    positions = torch.arange(N_VIRTUAL, N_VIRTUAL + T).expand(B, T)
    mask = torch.ones(B, N_VIRTUAL + T, dtype=torch.long)
    return hf(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_outputs_and_gradients_equal_the_formula(tiny_dirs, kind):
    m = qtune_with("prefix", tiny_dirs[kind], projection=False)
    (P,) = adapter_parameters(m, "default")
    ids = token_ids(3, (2, 7))
    got = m(ids)
    weighted_sum(got).backward()
    P_ref = P.detach().clone().requires_grad_(True)
    want = formula_logits(hf_model(tiny_dirs[kind]), P_ref, ids, m.config)
    assert max_diff(got, want) <= TOL
    weighted_sum(want).backward()
    assert max_diff(P.grad, P_ref.grad) <= 1e-4 * P_ref.grad.abs().max().item()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dirs):
    grads = []
    for checkpointing in (False, True):
        m = qtune_with("prefix", tiny_dirs["llama"])
        m.train()
        m.gradient_checkpointing = checkpointing
        weighted_sum(m(token_ids(4, (2, 6)))).backward()
        grads.append([p.grad for p in adapter_parameters(m, "default")])
    assert all(max_diff(a, b) <= 1e-6 for a, b in zip(*grads))


def test_projection_equals_the_formula_and_peft_in_training(tiny_dirs):
    """P = W2 tanh(W1 E + b1) + b2; the same weights in PEFT's PrefixEncoder (training, projection live) give
    equal logits and gradients for E, W1, b1, W2, b2."""
    m = qtune_with("prefix", tiny_dirs["llama"], projection=True)
    ours = m.kv_prefix.encoders["default"]
    p = dict(ours.named_parameters())
    E = p["embedding.weight"]
    want_table = torch.tanh(E @ p["transform.0.weight"].T + p["transform.0.bias"]) @ p["transform.2.weight"].T \
        + p["transform.2.bias"]
    assert max_diff(ours(), want_table) <= 1e-6
    ref = peft.get_peft_model(hf_model(tiny_dirs["llama"]), peft_prefix(True))
    theirs = ref.prompt_encoder["default"]
    theirs.load_state_dict(ours.state_dict())
    ids = token_ids(5, (2, 6))
    got, want = m(ids), ref(input_ids=ids).logits
    assert max_diff(got, want) <= TOL
    weighted_sum(got).backward()
    weighted_sum(want).backward()
    ref_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        assert max_diff(param.grad, ref_grads[name].grad) <= 1e-4 * ref_grads[name].grad.abs().max().item(), name


def test_packed_row_gives_each_example_what_it_gets_alone(tiny_dirs):
    m = qtune_with("prefix", tiny_dirs["qwen3"])
    a, b = token_ids(5, (1, 5)), token_ids(6, (1, 4))
    segments = torch.tensor([[1] * 5 + [2] * 4])
    positions = torch.tensor([list(range(5)) + list(range(4))])
    with torch.no_grad():
        got = m(torch.cat([a, b], 1), segments, positions)
        assert max_diff(got[:, :5], m(a)) <= TOL and max_diff(got[:, 5:], m(b)) <= TOL


def test_cached_generation_equals_full_forward_and_peft(tiny_dirs, tmp_path):
    """KV-cache decoding of left-padded batches equals each prompt alone, the full forward, PEFT's model on
    transformers decoded by full forward passes."""
    m = qtune_with("prefix", tiny_dirs["llama"])
    save_adapter(m, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dirs["llama"]), tmp_path / "a").eval()
    prompts = [token_ids(7, (1, 6))[0].tolist(), token_ids(8, (1, 3))[0].tolist()]
    batched = generate(m, prompts, max_new_tokens=5, greedy=True)
    for prompt, out in zip(prompts, batched):
        alone = generate(m, [prompt], max_new_tokens=5, greedy=True)[0]
        assert out.token_ids == alone.token_ids == greedy_full_forward(m, prompt, 5)
        # (PEFT's own `generate` is no reference with peft 0.21.2 on transformers 5.25, which passes the cache as
        # `cache` where PEFT injects its prefix as `past_key_values`: its tokens differ from its own forward.)
        assert greedy_full_forward(ref, prompt, 5) == out.token_ids


def test_merge_is_refused_and_a_wrong_model_is_named(tiny_dirs, tmp_path):
    m = qtune_with("prefix", tiny_dirs["llama"])
    save_adapter(m, tmp_path / "a")
    with pytest.raises(AdapterError, match="serve the base model with --adapter"):
        merge_adapter_into_dir(tiny_dirs["llama"], tmp_path / "a", tmp_path / "merged")
    other = load_model(tiny_dirs["gemma2"], quantize="none")  # three layers, not two
    with pytest.raises(AdapterError, match="does not match this base model"):
        load_adapter(other, tmp_path / "a")


def test_packing_on_a_sliding_window_model_is_refused(tiny_dirs):
    """A packed example's distance to the prefix grows with the examples before it, so a sliding window would
    hide the prefix from it where alone it would not: refused, with the fix."""
    with pytest.raises(ValueError, match="data.packing = false"):
        qtune_with("prefix", tiny_dirs["gemma2"], packing=True)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["prompt", "p_tuning", "prefix"])
def test_nf4_bf16_on_cuda_trains_and_decodes(tiny_dirs, method):
    """On a GPU (NF4 base, bf16 compute, the Triton route): the fp32 adapter's gradients arrive finite under
    autocast, the logits stay near the fp32 CPU model's, and cached decoding equals the full forward."""
    from qtune.peft import attach
    from virtual_tokens import recipe_for

    m = load_model(tiny_dirs["llama"], quantize="nf4", dtype=torch.bfloat16, device="cuda")
    attach(m, recipe_for(method, tiny_dirs["llama"]), "default", 1)
    ids = token_ids(12, (2, 9)).cuda()
    m.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m(ids).float().logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in adapter_parameters(m, "default")]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    m.eval()
    ref = load_model(tiny_dirs["llama"], quantize="nf4")  # the same NF4 weights, fp32 on the CPU
    attach(ref, recipe_for(method, tiny_dirs["llama"]), "default", 1)
    with torch.no_grad():
        got, want = m(ids).float().cpu(), ref(ids.cpu())
    assert max_diff(got, want) <= 0.05 * want.abs().max().item()  # bf16 rounding, not a different model
    prompt = ids[0, :5].tolist()
    assert generate(m, [prompt], max_new_tokens=4, greedy=True)[0].token_ids == greedy_full_forward(m, prompt, 4)



@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_cache_in_pieces_with_default_positions_equals_one_pass(tiny_dirs, method):
    """Without position_ids the positions count from the cache, which holds the virtual tokens: three calls
    (5 tokens, 1, 2) give the logits of one pass over the 8."""
    m = qtune_with(method, tiny_dirs["llama"])
    ids = token_ids(13, (2, 8))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 8)
        pieces = [m(ids[:, a:b], kv_cache=cache) for a, b in ((0, 5), (5, 6), (6, 8))]
    assert max_diff(torch.cat(pieces, 1), full) <= TOL and cache.length == 8 + N_VIRTUAL
