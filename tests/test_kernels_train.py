"""Two QLoRA training steps on a tiny model: the Triton kernels (interpreted) equal the plain-torch path."""

import pytest
import torch

from qtune.weights.checkpoint import load_model
from qtune.lora import LoraConfig, add_lora, adapter_parameters, mark_trainable
from qtune.train.common import lm_loss_sum
from tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("qwen2", tmp_path_factory.mktemp("kt"), seed=3)  # q/k/v biases, tied embeddings, GQA


def nf4_lora_model(model_dir, kernels: str, dtype: str = "float32", device: str = "cpu"):
    """The model in NF4 with r=4 adapters on every linear, B drawn non-zero; returns (model, adapter params)."""
    model = load_model(model_dir, quantize="nf4", dtype=dtype, kernels=kernels, device=device)
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), seed=7)
    mark_trainable(model, "default")
    params = adapter_parameters(model)
    with torch.no_grad():  # a non-zero B so that every adapter path carries signal from the first step
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))).to(p.device) * 0.05)
    return model, params


def two_steps(model_dir, kernels: str):
    model, params = nf4_lora_model(model_dir, kernels)
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 160, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(24).expand(2, 24)}
    if kernels == "triton":  # the fused QKV and MLP blocks are the ones taking the step
        from qtune.kernels.lora import fused_path

        layer = model.model.layers[0]
        assert fused_path("triton", ids.float(), layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
        assert fused_path("triton", ids.float(), layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
    model.train()
    losses, grads = [], []
    for _ in range(2):
        loss_sum, n = lm_loss_sum(model, batch)  # the kernel choice is model.kernels, set by load_model
        (loss_sum / n).backward()
        losses.append(loss_sum.item() / n)
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad()
    return losses, grads


def test_triton_kernels_train_like_plain_torch(tiny_dir):
    ref_losses, ref_grads = two_steps(tiny_dir, "torch")
    got_losses, got_grads = two_steps(tiny_dir, "triton")
    assert got_losses == pytest.approx(ref_losses, rel=1e-5)
    for step_ref, step_got in zip(ref_grads, got_grads):
        for r, g in zip(step_ref, step_got):
            assert (r - g).abs().max().item() <= 1e-5 * max(r.abs().max().item(), 1e-3)
