"""Block causal attention (CPU fp32 training) against SDPA with repeated K/V as the reference."""

import pytest
import torch
import torch.nn.functional as F

from qtune.kernels.cpu.attention import (BlockCausalAttentionFn, block_attention_applies, block_causal_attention,
                                         block_size, saved_scores_per_token)
from qtune.config import ModelConfig
from qtune.memory.build import add_trainable_lora, random_model
from qtune.model import attention_mask_4d


def reference(q, k, v, mask):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None).transpose(1, 2)


def segment_mask(B, T, window):
    seg = torch.ones(B, T, dtype=torch.long)
    seg[0, T // 3:] = 2  # two packed examples in row 0
    seg[-1, -5:] = 0  # padding at the end of the last row
    return attention_mask_4d(seg, seg, 0, window)


@pytest.mark.parametrize("B,H,KV,T,d", [(2, 6, 2, 37, 8), (1, 4, 4, 70, 16), (2, 9, 3, 300, 8)])
@pytest.mark.parametrize("masked", [False, True])
def test_output_and_gradients_match_sdpa(B, H, KV, T, d, masked):
    g = torch.Generator().manual_seed(T + masked)
    q = torch.randn(B, H, T, d, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(B, KV, T, d, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(B, KV, T, d, dtype=torch.float64, generator=g, requires_grad=True)
    check_against_reference(q, k, v, segment_mask(B, T, window=16) if masked else None, g)


def check_against_reference(q, k, v, mask, g):
    y, ref = block_causal_attention(q, k, v, mask), reference(q, k, v, mask)
    assert y.shape == ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    go = torch.randn(y.shape, dtype=torch.float64, generator=g)
    for a, b in zip(torch.autograd.grad(y, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_strided_inputs_as_rope_leaves_them():
    # q/k/v come out of the projections as (B, T, H, d) memory viewed as (B, H, T, d)
    B, H, KV, T, d = 2, 4, 2, 50, 8
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, T, H, d, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, KV, d, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, KV, d, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()
    check_against_reference(q, k, v, None, g)


def test_saved_probabilities_cover_only_causal_blocks():
    B, H, KV, T, d = 1, 2, 1, 100, 4
    q = torch.randn(B, H, T, d, requires_grad=True)
    k, v = torch.randn(B, KV, T, d, requires_grad=True), torch.randn(B, KV, T, d, requires_grad=True)
    y = block_causal_attention(q, k, v)
    saved = y.grad_fn.saved_tensors
    L = block_size(T)
    probs = saved[3::2]  # k, v, then (q block, P block) per block
    assert len(probs) == -(-T // L)
    assert [p.shape[-1] for p in probs] == [min(j0 + L, T) for j0 in range(0, T, L)]  # keys up to the block end
    assert sum(p.numel() for p in probs) == B * saved_scores_per_token(H, T) * T


def test_routing():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    q = torch.zeros(1, 4, 16, 8, requires_grad=True)
    assert block_attention_applies(q, None, cfg.intermediate_size)
    assert not block_attention_applies(q, object(), cfg.intermediate_size)  # decoding with a KV cache
    assert not block_attention_applies(q.bfloat16(), None, cfg.intermediate_size)  # 16-bit: flash attention
    with torch.no_grad():  # a frozen reference model scores as the policy does
        assert block_attention_applies(q, None, cfg.intermediate_size)
    long = torch.zeros(1, 4, 64, 8, requires_grad=True)  # 4 heads x ~36 keys per token > I = 64
    assert saved_scores_per_token(4, 64) > cfg.intermediate_size
    assert not block_attention_applies(long, None, cfg.intermediate_size)


def graph_nodes(t):
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("padded", [False, True])
def test_training_model_takes_block_path_with_sdpa_gradients(padded, monkeypatch):
    cfg = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    model = random_model(cfg, torch.float32, quantize="none", seed=3)
    params = add_trainable_lora(model, 4, "all-linear", seed=3)
    for p in params:  # non-zero B so every adapter gradient is informative
        p.data.normal_(0, 0.05)
    model.train()
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = None
    if padded:
        mask = torch.ones(2, 20, dtype=torch.long)
        mask[1, 14:] = 0

    def run():
        y = model(ids, attention_mask=mask)
        grads = torch.autograd.grad(y.square().mean(), params)
        return y.detach(), grads, graph_nodes(y)

    y_block, g_block, nodes = run()
    assert nodes.count("BlockCausalAttentionFnBackward") == cfg.num_hidden_layers
    monkeypatch.setattr("qtune.kernels.cpu.attention.block_attention_applies", lambda *a: False)
    y_ref, g_ref, nodes_ref = run()
    assert "BlockCausalAttentionFnBackward" not in nodes_ref
    torch.testing.assert_close(y_block, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_block, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_function_is_the_autograd_node():
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    k, v = torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)
    assert isinstance(block_causal_attention(q, k, v).grad_fn, BlockCausalAttentionFn._backward_cls)
