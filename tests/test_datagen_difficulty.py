"""Instruction-following difficulty: answer losses equal transformers' loss, IFD ratios, quantile drops."""

import math

import pytest
import torch

from qtune.weights.checkpoint import load_model
from qtune.data.render import alpaca_prompt
from qtune.datagen.difficulty import (ABOVE_MAX, ALONE_PREFIX, EASIEST, HARDEST, UNSCORED, answer_losses,
                                      difficulty_drops, ifd_scores)
from qtune.tokenizer import load_tokenizer
from tiny import make_hf_model, save_tiny, save_tiny_with_tokenizer


def _hf_answer_loss(hf, prefix: list[int], answer: list[int]) -> float:
    """transformers' own mean cross-entropy over the answer positions (prefix labels masked)."""
    ids = torch.tensor([prefix + answer])
    labels = ids.clone()
    labels[0, :len(prefix)] = -100
    with torch.no_grad():
        return hf(input_ids=ids, labels=labels).loss.item()


def make_hf_model_with_vocab(model_dir):
    """The same tiny checkpoint read by transformers (the independent reference)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()


def test_answer_losses_equal_transformers_with_right_padding(tmp_path):
    model = load_model(save_tiny("llama", tmp_path / "tiny"), quantize="none", dtype="float32")
    hf = make_hf_model("llama")
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(3, 160, (p,), generator=g).tolist(), torch.randint(3, 160, (a,), generator=g).tolist())
            for p, a in [(5, 3), (1, 9), (12, 1), (7, 7), (2, 2)]]
    ours = answer_losses(model, seqs, batch_size=3)  # batches of unequal lengths: padding must not leak in
    for (prefix, answer), got in zip(seqs, ours):
        assert got == pytest.approx(_hf_answer_loss(hf, prefix, answer), rel=1e-5)


def test_ifd_is_the_ratio_of_conditioned_and_alone_losses(tmp_path):
    d = save_tiny_with_tokenizer("llama", tmp_path / "tok")
    model, tok = load_model(d, quantize="none", dtype="float32"), load_tokenizer(d)
    hf = make_hf_model_with_vocab(d)
    examples = [{"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
                {"instruction": "Say hello.", "input": "", "output": "Hello there, friend!"},
                {"instruction": "Empty answer.", "input": "", "output": ""},
                {"instruction": "Too long " * 200, "input": "", "output": "x"}]
    scores = ifd_scores(model, tok, examples, batch_size=2, max_length=256)
    bos = [tok.bos_id] if tok.add_bos_token and tok.bos_id is not None else []
    for ex, s in zip(examples[:2], scores[:2]):
        answer = tok.encode(ex["output"])
        cond = _hf_answer_loss(hf, bos + tok.encode(alpaca_prompt(ex)), answer)
        alone = _hf_answer_loss(hf, bos + tok.encode(ALONE_PREFIX), answer)
        assert (s.loss_cond, s.loss_alone) == (pytest.approx(cond, rel=1e-5), pytest.approx(alone, rel=1e-5))
        assert s.ifd == pytest.approx(cond / alone, rel=1e-5)
    assert math.isnan(scores[2].ifd) and math.isnan(scores[3].ifd)


def test_difficulty_drops_quantiles_by_hand():
    ifds = [0.5, 0.1, float("nan"), 0.9, 1.2, 0.3, 0.7, 0.2, 0.8, 0.6, 0.4, 1.0]
    reasons = difficulty_drops(ifds, drop_easiest=0.2, drop_hardest=0.1, max_ifd=1.0)
    # Scored and below 1.0: 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 (n = 9) -> drop floor(1.8) = 1 easiest
    # (0.1) and floor(0.9) = 0 hardest.
    assert reasons == [None, EASIEST, UNSCORED, None, ABOVE_MAX, None, None, None, None, None, None, ABOVE_MAX]
    reasons = difficulty_drops(ifds, drop_easiest=0.25, drop_hardest=0.25, max_ifd=0)
    # max_ifd off: 11 scored -> floor(2.75) = 2 at each end: 0.1, 0.2 easiest; 1.0, 1.2 hardest.
    assert [i for i, r in enumerate(reasons) if r == EASIEST] == [1, 7]
    assert [i for i, r in enumerate(reasons) if r == HARDEST] == [4, 11]
    assert difficulty_drops([], 0.1, 0.1, 1.0) == []
