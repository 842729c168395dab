"""Held-out evaluation: response loss on Alpaca-format data, and exact match of greedy completions.

    alpaca_response_loss(model, tok, "heldout.json", max_seq_len=1024)  # {"loss", "ppl", "tokens", "examples"}
    exact_match(model, tok, data.val[:64])                                # {"exact_match", "correct", ...}

Both read examples the way training renders them (qtune/data): the loss is taken on exactly the tokens
training would train (the response and its end-of-sequence token), and exact match prompts the model with
exactly the tokens that precede a response in training.
"""

import math
from dataclasses import replace

import torch

from qtune.data.batching import collate
from qtune.data.records import Records, load_records
from qtune.data.render import IGNORE
from qtune.data.tokenized import Example, tokenize_records
from qtune.generate import generate
from qtune.train.common import lm_loss_sum, to_device


@torch.no_grad()
def response_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8) -> dict:
    """Mean next-token loss (natural log) over the trained tokens of `examples`, in eval mode.

    loss = sum over examples and trained positions of -log p(token) / number of trained tokens.
    """
    device = model.model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = to_device(collate([[ex] for ex in examples[i:i + batch_size]], pad_id), device)
        loss_sum, n = lm_loss_sum(model, batch)
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": count, "examples": len(examples)}


def alpaca_response_loss(model, tokenizer, data_path: str, max_seq_len: int = 1024, batch_size: int = 8,
                         limit: int | None = None) -> dict:
    """Loss and perplexity of `model` on the responses of an Alpaca-format file (instruction / input / output).

    Each record is rendered with Stanford Alpaca's prompt exactly as `data.format = "alpaca"` trains it, and
    only response tokens (plus EOS) count. Records longer than max_seq_len are cut at the end; one with no
    response token left is skipped. Returns loss (nats per token), ppl = exp(loss), tokens and examples.
    """
    records = load_records(str(data_path))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        records = with_limit(records, limit)
    tokenized = tokenize_records(records, "alpaca", tokenizer, max_seq_len, train_on_input=False)
    examples = [tokenized.example(i) for i in range(len(tokenized))]
    result = response_loss(model, examples, tokenizer.pad_id, batch_size)
    return {**result, "truncated": tokenized.stats["truncated"], "skipped": tokenized.stats["dropped"]}


def prompt_and_reference(example: Example) -> tuple[list[int], list[int]] | None:
    """Split a tokenized example at its first trained token: (prompt ids, ids of the first response).

    The response is the first contiguous run of trained tokens (the first assistant turn of a conversation);
    None when nothing precedes it (train_on_input examples have no prompt to complete).
    """
    trained = (example.labels != IGNORE).tolist()
    if True not in trained:
        return None
    start = trained.index(True)
    end = trained.index(False, start) if False in trained[start:] else len(trained)
    if start <= 1:  # labels[0] is never trained, so start == 1 means the whole text is trained
        return None
    return example.input_ids[:start].tolist(), example.input_ids[start:end].tolist()


def normalise_answer(text: str) -> str:
    """Answers compare after stripping surrounding white space and a final period."""
    return text.strip().removesuffix(".").strip()


def exact_match(model, tokenizer, examples: list[Example], max_new_tokens: int = 32, batch_size: int = 16) -> dict:
    """Fraction of `examples` whose greedy completion equals the reference response.

    Both sides are decoded without special tokens and compared after `normalise_answer`. Returns
    exact_match (0..1), correct, examples and `samples`: (prompt, completion, reference) texts of each.
    """
    pairs = [p for p in (prompt_and_reference(ex) for ex in examples) if p is not None]
    if not pairs:
        raise ValueError("no example has a prompt before its response to complete (is data.train_on_input set?)")
    outs = generate(model, [prompt for prompt, _ in pairs], tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                    greedy=True, batch_size=batch_size)
    samples, correct = [], 0
    for (prompt, reference), out in zip(pairs, outs):
        ref_text = normalise_answer(tokenizer.decode(reference))
        got = normalise_answer(out.text)
        correct += got == ref_text
        samples.append({"prompt": tokenizer.decode(prompt), "completion": got, "reference": ref_text})
    return {"exact_match": correct / len(pairs), "correct": correct, "examples": len(pairs), "samples": samples}


def with_limit(records: Records, limit: int) -> Records:
    """The first `limit` records."""
    lines = records.lines[:limit] if records.lines is not None else None
    return replace(records, rows=records.rows[:limit], lines=lines)
