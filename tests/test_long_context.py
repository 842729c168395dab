"""Long-context switches: offloaded checkpoints and the sequence-tiled MLP are exact (loss and adapter gradients
equal those of the plain path), and packed attention equals per-example attention on every packed example."""

import pytest
import torch

import qtune.tiled_mlp
from qtune.config import ModelConfig
from qtune.kernels.document_attention import document_attention, document_mask, reference_document_attention
from qtune.lora import LoraConfig, add_lora, adapter_parameters, mark_trainable
from qtune.memory.build import random_model
from qtune.model import MLP, attention_mask_4d
from qtune.tiled_mlp import tiled_mlp
from qtune.train.common import lm_loss_sum


def tiny_cfg(act="silu", **extra) -> ModelConfig:
    return ModelConfig.from_dict({"model_type": "gemma2" if act != "silu" else "llama", "vocab_size": 96,
                                  "hidden_size": 48, "intermediate_size": 72, "num_hidden_layers": 3,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": act,
                                  "max_position_embeddings": 512, **extra})


def adapted_model(cfg, dropout=0.0, seed=0):
    model = random_model(cfg, torch.float32, quantize="none", seed=seed)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"), name="ctx", seed=1)
    mark_trainable(model, "ctx")
    with torch.no_grad():  # B = 0 at init would hide the adapters' gradients through the layers above
        for p in adapter_parameters(model, "ctx"):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    model.set_kernels("torch")
    return model.train()


def loss_and_grads(model, batch, seed=3):
    torch.manual_seed(seed)  # the adapters' dropout draws the same masks in every variant
    loss, count = lm_loss_sum(model, batch)
    (loss / count).backward()
    grads = [p.grad.clone() for p in adapter_parameters(model, "ctx")]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def max_abs_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def batch_of(cfg, B, T, seed=0, segments=None):
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if segments is not None:
        batch["attention_mask"] = segments
    return batch


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offloaded_checkpoints_equal_checkpointing_and_no_checkpointing(dropout):
    cfg = tiny_cfg()
    model = adapted_model(cfg, dropout)
    batch = batch_of(cfg, 2, 40)
    model.gradient_checkpointing = True
    ref_loss, ref_grads = loss_and_grads(model, batch)
    model.offload_checkpoints = True
    loss, grads = loss_and_grads(model, batch)
    assert loss.item() == ref_loss.item()
    assert max_abs_diff(grads, ref_grads) <= 1e-6 * max(g.abs().max().item() for g in ref_grads)
    if dropout == 0:  # without checkpointing at all: the same numbers
        model.gradient_checkpointing = model.offload_checkpoints = False
        plain_loss, plain_grads = loss_and_grads(model, batch)
        torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
        assert max_abs_diff(grads, plain_grads) <= 1e-5 * max(g.abs().max().item() for g in plain_grads)


def test_offload_frees_device_inputs_and_keeps_host_copies():
    from qtune.offload import HostCheckpoints, offloaded_checkpoint

    store = HostCheckpoints(torch.device("cpu"))
    x = torch.randn(3, 8, requires_grad=True)
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    y = offloaded_checkpoint(block, x, store)
    assert len(store.host) == 1 and store.host[0].data_ptr() != x.data_ptr()
    torch.testing.assert_close(store.host[0], x.detach())
    y.sum().backward()
    assert store.host[0] is None  # released once brought back
    ref_x = x.detach().clone().requires_grad_()
    block.zero_grad()
    block(ref_x).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("adapted", [False, True])
def test_tiled_mlp_gradients_equal_the_untiled_block(act, adapted):
    cfg = tiny_cfg(act)
    model = adapted_model(cfg) if adapted else random_model(cfg, torch.float32, quantize="none").requires_grad_()
    mlp = model.model.layers[0].mlp.double()
    mlp.kernels = "torch"
    params = [p for p in mlp.parameters() if p.requires_grad]
    assert len(params) == (6 if adapted else 3)  # A and B of gate, up, down; or the three weights
    x = torch.randn(2, 37, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    y_ref = mlp.untiled(x)
    go = torch.randn_like(y_ref)
    ref = torch.autograd.grad(y_ref, [x, *params], go)
    y = tiled_mlp(mlp, x, chunk_tokens=10)  # 74 rows: 8 chunks, the last one short
    got = torch.autograd.grad(y, [x, *params], go)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_tiled_model_step_equals_untiled(monkeypatch):
    monkeypatch.setattr(qtune.tiled_mlp, "CHUNK_TOKENS", 16)
    cfg = tiny_cfg()
    model = adapted_model(cfg)  # without dropout: chunks draw their masks piecewise, a different (equally likely) draw
    model.gradient_checkpointing = True
    batch = batch_of(cfg, 2, 40, seed=4)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    for m in model.modules():
        if isinstance(m, MLP):
            m.tiling = "on"
    for offload in (False, True):
        model.offload_checkpoints = offload
        loss, grads = loss_and_grads(model, batch)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        assert max_abs_diff(grads, ref_grads) <= 1e-5 * max(g.abs().max().item() for g in ref_grads)


def test_auto_tiling_leaves_short_batches_alone():
    x = torch.zeros(1, qtune.tiled_mlp.AUTO_MIN_TOKENS, 4)
    assert not qtune.tiled_mlp.tiles("auto", x) and qtune.tiled_mlp.tiles("on", x)
    assert qtune.tiled_mlp.tiles("auto", torch.zeros(2, qtune.tiled_mlp.AUTO_MIN_TOKENS, 4))
    assert not qtune.tiled_mlp.tiles("off", torch.zeros(2, qtune.tiled_mlp.AUTO_MIN_TOKENS, 4))


# ---- packed batches --------------------------------------------------------------------------------------------

PACKED = torch.tensor([[1] * 9 + [2] * 14 + [3] * 7 + [0] * 3,  # three examples and padding
                       [1] * 20 + [2] * 13])


def per_example_logits(model, ids, segments):
    """Each packed example run on its own (positions from 0): [(row, positions, logits)]."""
    out = []
    for b in range(ids.shape[0]):
        for seg in segments[b].unique().tolist():
            if seg == 0:
                continue
            idx = (segments[b] == seg).nonzero().squeeze(1)
            out.append((b, idx, model(ids[b:b + 1, idx])[0]))
    return out


def packed_positions(segments):
    """Positions restarting at 0 for every packed example (what the packing collator gives)."""
    pos = torch.zeros_like(segments)
    for b in range(segments.shape[0]):
        for seg in segments[b].unique().tolist():
            idx = (segments[b] == seg).nonzero().squeeze(1)
            pos[b, idx] = torch.arange(idx.numel())
    return pos


@pytest.mark.parametrize("kind", [dict(), dict(sliding_window=6)])
def test_packed_batch_equals_each_example_alone_cpu(kind):
    cfg = tiny_cfg(**kind)
    model = adapted_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, PACKED.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        packed = model(ids, PACKED, packed_positions(PACKED))
        for b, idx, alone in per_example_logits(model, ids, PACKED):
            torch.testing.assert_close(packed[b, idx], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_document_attention_equals_reference_and_masked_sdpa(window):
    g = torch.Generator().manual_seed(7)
    B, H, KV, T, d = 2, 4, 2, PACKED.shape[1], 8
    q = torch.randn(B, H, T, d, dtype=torch.float64, generator=g)
    k = torch.randn(B, KV, T, d, dtype=torch.float64, generator=g)
    v = torch.randn(B, KV, T, d, dtype=torch.float64, generator=g)
    ref = reference_document_attention(q, k, v, PACKED, d ** -0.5, window)
    flex = document_attention(q, k, v, document_mask(PACKED, window), d ** -0.5)
    torch.testing.assert_close(flex, ref, rtol=0, atol=1e-10)
    mask = attention_mask_4d(PACKED, PACKED, 0, window)  # the CPU path's materialised mask
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(sdpa, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("window", [None, 5])
def test_softcapped_document_attention_equals_transformers_gemma2(window):
    """Gemma 2's soft-capped scores through flex attention's score_mod (what CUDA runs instead of a T x T mask)
    equal transformers' Gemma 2 eager attention with the materialised mask, on packed rows with padding, and
    the per-example reference (flex attention has no backward on a CPU: the CUDA test below checks gradients)."""
    from types import SimpleNamespace

    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    g = torch.Generator().manual_seed(11)
    B, H, KV, T, d, cap, scale = 2, 4, 2, PACKED.shape[1], 8, 1.5, 0.7  # a small cap: tanh far from linear
    q = 3 * torch.randn(B, H, T, d, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, KV, T, d, dtype=torch.float64, generator=g) for _ in range(2))
    flex = document_attention(q, k, v, document_mask(PACKED, window), scale, softcap=cap)
    allowed = attention_mask_4d(PACKED, PACKED, 0, window)  # (B, 1, T, T)
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill_(~allowed, float("-inf"))
    module = SimpleNamespace(num_key_value_groups=H // KV, training=False, head_dim=d)
    theirs, _ = eager_attention_forward(module, q, k, v, additive, scaling=scale, softcap=cap)
    torch.testing.assert_close(flex, theirs, rtol=0, atol=1e-6)  # transformers takes the softmax in fp32
    ref = reference_document_attention(q, k, v, PACKED, scale, window, softcap=cap)
    real = PACKED > 0  # padding queries differ by design (the reference returns their own v)
    torch.testing.assert_close(flex[real], ref[real], rtol=0, atol=1e-10)
    assert not torch.allclose(flex, document_attention(q, k, v, document_mask(PACKED, window), scale))  # capped


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 5])
def test_softcapped_flex_attention_and_gradients_equal_the_materialised_path_cuda(window):
    """On CUDA, soft-capped layers take compiled flex attention (no T x T mask): outputs and q/k/v gradients equal
    the materialised soft-capped attention's, on packed rows with padding."""
    from qtune.model import softcapped_attention

    g = torch.Generator().manual_seed(12)
    B, H, KV, T, d, cap, scale = 2, 4, 2, PACKED.shape[1], 16, 1.5, 0.7
    q = 3 * torch.randn(B, H, T, d, generator=g)
    k, v = (torch.randn(B, KV, T, d, generator=g) for _ in range(2))
    q, k, v = (t.cuda().requires_grad_() for t in (q, k, v))
    segments = PACKED.cuda()
    flex = document_attention(q, k, v, document_mask(segments, window), scale, softcap=cap)
    dense = softcapped_attention(q, k, v, attention_mask_4d(segments, segments, 0, window), scale, cap)
    real = segments > 0
    torch.testing.assert_close(flex[real], dense[real], rtol=1e-4, atol=1e-4)
    upstream = torch.randn(flex.shape, generator=g).cuda() * real[:, :, None, None]
    for got, want in zip(torch.autograd.grad((flex * upstream).sum(), (q, k, v)),
                         torch.autograd.grad((dense * upstream).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_reference_sees_no_neighbour():
    # the reference itself: changing example 2's keys and values leaves examples 1 and 3 unchanged
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 33, 4, generator=g) for _ in range(3))
    seg = PACKED[:1]
    before = reference_document_attention(q, k, v, seg, 0.5)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 9:23] += 3.0
    v2[:, :, 9:23] -= 2.0
    after = reference_document_attention(q, k2, v2, seg, 0.5)
    outside = torch.cat([torch.arange(9), torch.arange(23, 33)])
    torch.testing.assert_close(after[0, outside], before[0, outside], rtol=0, atol=0)
    assert not torch.allclose(after[0, 9:23], before[0, 9:23])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", [dict(), dict(act="gelu_pytorch_tanh", attn_logit_softcapping=2.0, sliding_window=6)])
def test_packed_batch_equals_each_example_alone_cuda(kind):
    cfg = tiny_cfg(**kind)
    model = adapted_model(cfg).cuda().eval()
    model.set_rope_tables("cuda")
    ids = torch.randint(0, cfg.vocab_size, PACKED.shape, generator=torch.Generator().manual_seed(5)).cuda()
    segments = PACKED.cuda()
    with torch.no_grad():
        mask = model._mask(ids, segments, None, None)
        assert type(mask).__name__ == "DocumentMask"  # flex attention, no T x T tensor
        packed = model(ids, segments, packed_positions(segments))
        for b, idx, alone in per_example_logits(model, ids, segments):
            torch.testing.assert_close(packed[b, idx], alone, rtol=1e-4, atol=1e-4)


def test_document_mask_lets_every_example_see_the_virtual_tokens():
    """A prompt adapter's N virtual tokens (segment id -1) lead every row; flex attention's mask lets each packed
    example see them and nothing of its neighbours, as the CPU path's materialised mask does."""
    g = torch.Generator().manual_seed(9)
    n = 3
    segments = torch.cat([torch.full((PACKED.shape[0], n), -1), PACKED], 1)
    B, H, T, d = PACKED.shape[0], 2, segments.shape[1], 8
    q, k, v = (torch.randn(B, H, T, d, dtype=torch.float64, generator=g) for _ in range(3))
    flex = document_attention(q, k, v, document_mask(segments), d ** -0.5)
    mask = attention_mask_4d(segments, segments, 0, None)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-10)
    seen = attention_mask_4d(segments, segments, 0, None)[:, 0]  # (B, T, T)
    real = segments > 0
    assert seen[real][:, :n].all()  # every real token sees all virtual tokens
