"""KV-cache generation against transformers' greedy decoding, batching invariance and the samplers' support."""

import pytest
import torch

from qtune.weights.checkpoint import load_model
from qtune.generate import Sampling, generate, next_token
from tiny import save_tiny

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = save_tiny("llama", tmp_path_factory.mktemp("gen"), seed=5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    return hf, load_model(d, quantize="none", dtype="float32")


PROMPTS = [[5, 17, 33, 9], [40, 41], [7, 8, 9, 10, 11, 12, 13], [99]]


def test_greedy_equals_transformers(models):
    hf, ours = models
    got = generate(ours, PROMPTS, max_new_tokens=12, greedy=True, stop_ids={2}, batch_size=4)
    for p, g in zip(PROMPTS, got):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
        ref_new = ref[0, len(p):].tolist()
        assert g.token_ids == ref_new
        assert g.finish_reason == ("eos" if ref_new[-1] == 2 else "length")


def test_batched_left_padding_equals_one_by_one(models):
    _, ours = models
    batched = generate(ours, PROMPTS, max_new_tokens=10, greedy=True, stop_ids=set(), batch_size=4)
    single = [generate(ours, [p], max_new_tokens=10, greedy=True, stop_ids=set())[0] for p in PROMPTS]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]


def test_early_finishers_leave_the_batch(models):
    """A row that stops early must not change the others' continuations."""
    _, ours = models
    free = generate(ours, PROMPTS, max_new_tokens=8, greedy=True, stop_ids=set())
    stop_tok = free[1].token_ids[2]  # make row 1 stop at its third token
    stopped = generate(ours, PROMPTS, max_new_tokens=8, greedy=True, stop_ids={stop_tok})
    for f, s in zip(free, stopped):
        cut = next((i + 1 for i, t in enumerate(f.token_ids) if t == stop_tok), len(f.token_ids))
        assert s.token_ids == f.token_ids[:cut]


def test_seeded_sampling_is_reproducible(models):
    _, ours = models
    a = generate(ours, PROMPTS, max_new_tokens=8, temperature=1.5, seed=3, stop_ids=set())
    b = generate(ours, PROMPTS, max_new_tokens=8, temperature=1.5, seed=3, stop_ids=set())
    c = generate(ours, PROMPTS, max_new_tokens=8, temperature=1.5, seed=4, stop_ids=set())
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    k2 = next_token(logits, Sampling(top_k=2), gen)
    assert set(k2.tolist()) == {0, 1}
    # softmax: p = [0.636, 0.234, 0.086, 0.032, 0.012]; top_p=0.8 keeps the first two (0.870 >= 0.8)
    p8 = next_token(logits, Sampling(top_p=0.8), gen)
    assert set(p8.tolist()) == {0, 1}
    full = next_token(logits, Sampling(temperature=1.0), gen)
    assert set(full.tolist()) == {0, 1, 2, 3, 4}
    freq0 = (full == 0).float().mean().item()
    assert abs(freq0 - torch.softmax(logits[0], -1)[0].item()) < 0.04
    assert next_token(logits[:1], Sampling(greedy=True), None).item() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=0).check()
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0).check()


CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                "List three primary colors, separated by commas."]


def test_smollm2_greedy_chat_completions_equal_transformers(smollm2_dir):
    """The converted real model decodes exactly as transformers decodes the same directory."""
    from qtune.generate import generate_text
    from qtune.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    ours = load_model(smollm2_dir, quantize="none", dtype="float32")
    got = generate_text(ours, tok, CHAT_PROMPTS, chat=True, max_new_tokens=16, greedy=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32).eval()
    for prompt, g in zip(CHAT_PROMPTS, got):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = torch.tensor([tok.encode(text)])
        ref = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=sorted(tok.eos_ids),
                          pad_token_id=tok.pad_id)[0, ids.shape[1]:].tolist()
        assert g.token_ids == ref, prompt
    assert "Paris" in got[0].text
