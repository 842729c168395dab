"""Prompt tuning and P-tuning (qtune/peft/prompt.py) against `peft` on transformers' model of the same tiny
weights, and against the formula itself: the virtual tokens' embeddings P put in front of the input
embeddings, P = E (prompt tuning) or P = encoder(E) (P-tuning).

Positions: the virtual tokens hold positions 0..N-1 and each real token's position moves up by N (PEFT's
count for unpadded and right-padded input). With left padding PEFT on transformers counts the padding too,
so a row's output depends on its neighbours' lengths; qtune does not (each row decodes as it would alone),
which the tests check instead.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from virtual_tokens import (N_VIRTUAL, greedy_full_forward, hf_model, max_diff, qtune_with, recipe_for, token_ids,
                            weighted_sum)
from tiny import save_tiny, save_tiny_with_tokenizer

from qtune.generate import generate
from qtune.lora import adapter_parameters, adapters_disabled
from qtune.lora.peft import AdapterError
from qtune.peft import attach, load_adapter, merge_adapter_into_dir, save_adapter
from qtune.tokenizer import load_tokenizer
from qtune.weights.checkpoint import load_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TOL = 1e-4
KINDS = ("llama", "qwen3", "gemma2")  # GQA; q/k norms and head_dim != D / H; Gemma's scaled embeddings, windows


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {kind: save_tiny(kind, root / kind) for kind in KINDS}


def peft_config(method: str, **kw):
    if method == "prompt":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, **kw)
    return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=16, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,section", [("prompt", {}), ("p_tuning", {"encoder": "mlp"}),
                                            ("p_tuning", {"encoder": "lstm"})])
def test_saved_adapter_loads_in_peft_with_equal_logits(tiny_dirs, tmp_path, kind, method, section):
    m = qtune_with(method, tiny_dirs[kind], **section)
    out = save_adapter(m, tmp_path / "adapter", base_model_name_or_path=str(tiny_dirs[kind]))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == {"prompt": "PROMPT_TUNING", "p_tuning": "P_TUNING"}[method]
    assert saved["num_virtual_tokens"] == N_VIRTUAL and saved["token_dim"] == m.config.hidden_size
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dirs[kind]), out).eval()
    ids, mask = token_ids(1), torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0  # right padding, as training batches are
    with torch.no_grad():
        got = m(ids, mask)
        want = ref(input_ids=ids, attention_mask=mask).logits[:, N_VIRTUAL:]
        with adapters_disabled(m):
            base = m(ids, mask)
    real = mask.bool()
    assert max_diff(got[real], want[real]) <= TOL
    assert max_diff(base[real], want[real]) > 1e-2  # the virtual tokens matter, so the comparison can fail


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_peft_adapter_loads_in_qtune_with_equal_logits(tiny_dirs, tmp_path, method):
    torch.manual_seed(4)
    trained = peft.get_peft_model(hf_model(tiny_dirs["qwen3"]), peft_config(method))
    trained.save_pretrained(tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dirs["qwen3"]), tmp_path / "a").eval()
    m = load_model(tiny_dirs["qwen3"], quantize="none")
    load_adapter(m, tmp_path / "a")
    ids = token_ids(2)
    with torch.no_grad():
        assert max_diff(m(ids), ref(input_ids=ids).logits[:, N_VIRTUAL:]) <= TOL
    # and it saves back to the same file
    save_adapter(m, tmp_path / "b")
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / "a" / "adapter_model.safetensors")["prompt_embeddings"],
                       load_file(tmp_path / "b" / "adapter_model.safetensors")["prompt_embeddings"])


def test_prompt_tuning_outputs_and_gradients_equal_the_formula(tiny_dirs):
    """logits = f([P ; embed(x)]) at the real positions, computed by transformers from inputs_embeds; the
    gradient reaches P alone."""
    m = qtune_with("prompt", tiny_dirs["gemma2"])
    (P,) = adapter_parameters(m, "default")
    ids = token_ids(3, (2, 7))
    loss = weighted_sum(m(ids))
    loss.backward()
    ref = hf_model(tiny_dirs["gemma2"])
    P_ref = P.detach().clone().requires_grad_(True)
    embeds = torch.cat([P_ref.expand(2, -1, -1), ref.get_input_embeddings()(ids)], 1)
    logits = ref(inputs_embeds=embeds).logits[:, N_VIRTUAL:]
    weighted_sum(logits).backward()
    assert max_diff(P.grad, P_ref.grad) <= 1e-4 * P_ref.grad.abs().max().item()
    assert all(p.grad is None for n, p in m.named_parameters() if p is not P)


def plain_mlp_encoder(params: dict, E: torch.Tensor) -> torch.Tensor:
    """P-tuning's MLP encoder written out: W3 relu(W2 relu(W1 E + b1) + b2) + b3."""
    h = F.relu(E @ params["mlp_head.0.weight"].T + params["mlp_head.0.bias"])
    h = F.relu(h @ params["mlp_head.2.weight"].T + params["mlp_head.2.bias"])
    return h @ params["mlp_head.4.weight"].T + params["mlp_head.4.bias"]


def test_p_tuning_mlp_encoder_equals_the_formula(tiny_dirs):
    m = qtune_with("p_tuning", tiny_dirs["llama"], encoder="mlp")
    encoder = m.virtual_tokens.encoders["default"]
    params = dict(encoder.named_parameters())
    P = m.virtual_tokens(1)[0]
    assert max_diff(P, plain_mlp_encoder(params, params["embedding.weight"])) <= 1e-6


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_outputs_and_gradients_equal_peft_in_training(tiny_dirs, encoder):
    """The same encoder weights in PEFT's PromptEncoder (training mode, encoder live): equal logits and equal
    gradients for every encoder parameter."""
    m = qtune_with("p_tuning", tiny_dirs["llama"], encoder=encoder)
    ref = peft.get_peft_model(hf_model(tiny_dirs["llama"]),
                              peft_config("p_tuning", encoder_reparameterization_type=encoder.upper()))
    theirs = ref.prompt_encoder["default"]
    ours = m.virtual_tokens.encoders["default"]
    theirs.load_state_dict(ours.state_dict())
    ids = token_ids(4, (2, 6))
    got, want = m(ids), ref(input_ids=ids).logits[:, N_VIRTUAL:]
    assert max_diff(got, want) <= TOL
    weighted_sum(got).backward()
    weighted_sum(want).backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert max_diff(p.grad, grads[name].grad) <= 1e-4 * (grads[name].grad.abs().max().item() + 1e-6), name


def test_init_text_starts_from_the_texts_embeddings_like_peft(tmp_path):
    model_dir = save_tiny_with_tokenizer("llama", tmp_path / "tiny")
    text = "Classify the sentiment"
    m = qtune_with("prompt", model_dir, init_text=text, num_virtual_tokens=20)
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text=text, tokenizer_name_or_path=str(model_dir))
    ref = peft.get_peft_model(hf_model(model_dir), cfg)
    assert torch.equal(m.virtual_tokens(1)[0], ref.prompt_encoder["default"].embedding.weight)
    tok = load_tokenizer(model_dir)
    ids = tok.encode(text)
    assert len(ids) < 20  # the text is repeated to the length, as PEFT does
    want = m.model.embed_tokens.weight[(ids * 20)[:20]]
    assert torch.equal(m.virtual_tokens(1)[0], want)


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_packed_row_gives_each_example_what_it_gets_alone(tiny_dirs, method):
    m = qtune_with(method, tiny_dirs["qwen3"])
    a, b = token_ids(5, (1, 5)), token_ids(6, (1, 4))
    packed = torch.cat([a, b], 1)
    segments = torch.tensor([[1] * 5 + [2] * 4])
    positions = torch.tensor([list(range(5)) + list(range(4))])
    with torch.no_grad():
        got = m(packed, segments, positions)
        assert max_diff(got[:, :5], m(a)) <= TOL and max_diff(got[:, 5:], m(b)) <= TOL


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_cached_generation_equals_full_forward_and_peft(tiny_dirs, tmp_path, method):
    """qtune's KV-cache decoding of left-padded batches equals each prompt decoded alone, the full forward
    without a cache, and PEFT's model on transformers."""
    m = qtune_with(method, tiny_dirs["llama"])
    save_adapter(m, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dirs["llama"]), tmp_path / "a").eval()
    prompts = [token_ids(7, (1, 6))[0].tolist(), token_ids(8, (1, 3))[0].tolist()]
    batched = generate(m, prompts, max_new_tokens=5, greedy=True)  # left-padded together, KV cache
    for prompt, out in zip(prompts, batched):
        alone = generate(m, [prompt], max_new_tokens=5, greedy=True)[0]
        assert out.token_ids == alone.token_ids == greedy_full_forward(m, prompt, 5)
        # PEFT's greedy decoding by full forward passes. (Its `generate` is no reference with peft 0.21.2 on
        # transformers 5.25: it looks for `past_key_values` where transformers now passes `cache`, so every
        # step re-feeds the virtual tokens' worth of input and the tokens drift from its own forward.)
        assert greedy_full_forward(ref, prompt, 5) == out.token_ids


def test_adapters_disabled_runs_the_bare_base_for_dpos_reference(tiny_dirs):
    m = qtune_with("prompt", tiny_dirs["llama"])
    base = load_model(tiny_dirs["llama"], quantize="none")
    ids = token_ids(9)
    with torch.no_grad(), adapters_disabled(m):
        assert torch.equal(m(ids), base(ids))


def test_merge_is_refused_with_the_reason(tiny_dirs, tmp_path):
    m = qtune_with("p_tuning", tiny_dirs["llama"])
    save_adapter(m, tmp_path / "a")
    with pytest.raises(AdapterError, match="--adapter"):
        merge_adapter_into_dir(tiny_dirs["llama"], tmp_path / "a", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_adapter_of_another_width_is_refused(tiny_dirs, tmp_path):
    """A PEFT directory (no manifest) whose table is 32 wide, for a model 64 wide: one AdapterError naming it."""
    from safetensors.torch import save_file

    d = tmp_path / "a"
    d.mkdir()
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": N_VIRTUAL, "token_dim": 32}
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file({"prompt_embeddings": torch.zeros(N_VIRTUAL, 32)}, str(d / "adapter_model.safetensors"))
    m = load_model(tiny_dirs["llama"], quantize="none")
    with pytest.raises(AdapterError, match="prompt_embeddings is \\[3, 32\\]"):
        load_adapter(m, d)
    assert m.virtual_tokens is None


def test_second_adapter_name_switches_like_lora(tiny_dirs):
    m = qtune_with("prompt", tiny_dirs["llama"])
    attach(m, recipe_for("p_tuning", tiny_dirs["llama"]), "other", 2)
    ids = token_ids(10)
    from qtune.lora import use_adapter
    with torch.no_grad():
        other = m(ids)
        with use_adapter(m, "default"):
            first = m(ids)
    assert max_diff(other, first) > 1e-3


@pytest.mark.parametrize("method", ["prompt", "p_tuning", "prefix"])
def test_training_loss_equals_peft_and_no_virtual_position_carries_one(tiny_dirs, tmp_path, method):
    """qtune's SFT loss over a right-padded batch equals PEFT's `labels=` loss, which puts -100 on the virtual
    positions: the virtual tokens carry no loss, and every real target carries one."""
    from qtune.train.common import count_targets, lm_loss_sum

    m = qtune_with(method, tiny_dirs["llama"])
    save_adapter(m, tmp_path / "a")
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dirs["llama"]), tmp_path / "a").eval()
    ids, mask = token_ids(11), torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt part without loss
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "position_ids": torch.arange(11).expand(2, 11)}
    with torch.no_grad():
        loss_sum, count = lm_loss_sum(m, batch)
        want = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert count == count_targets(batch) == int((labels[:, 1:] != -100).sum())
    assert abs(loss_sum.item() / count - want.item()) <= 1e-4
