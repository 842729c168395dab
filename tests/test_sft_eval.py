"""The quickstart's generated tasks and the held-out measures: response loss and exact match.

References are independent: answers recomputed from the instruction text, the response loss computed with
transformers and a plain log-softmax over the Alpaca prompt built here, greedy completions by transformers.
"""

import json
import math
import re

import pytest
import torch
from click.testing import CliRunner
from shared_data import ALPACA_DEMO, SHARED_DATA
from tiny import save_tiny_with_tokenizer

from qtune.weights.checkpoint import load_model
from qtune.data.records import DataError, load_records
from qtune.data.tasks import FAMILIES, generate_tasks
from qtune.data.tokenized import tokenize_records
from qtune.train.evaluate import alpaca_response_loss, exact_match, prompt_and_reference
from qtune.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny_eval"), seed=3)


def solve(instruction: str) -> str:
    """Each family's answer, recomputed from the instruction text alone."""
    args = instruction.split(":", 1)[1].strip().rstrip("?") if ":" in instruction else ""
    if instruction.startswith("Reverse"):
        return " ".join(args.split()[::-1])
    if instruction.startswith("What is the last word"):
        return args.split()[-1]
    if instruction.startswith("Which number is larger"):
        return str(max(int(n) for n in re.findall(r"\d+", instruction)))
    if instruction.startswith("Sort"):
        return " ".join(str(n) for n in sorted(int(x) for x in args.split()))
    if instruction.startswith("What number comes next"):
        seq = [int(x) for x in args.split(",")]
        return str(seq[-1] + (seq[1] - seq[0]))
    if instruction.startswith("Write these words in capital"):
        return args.upper()
    raise AssertionError(f"unknown instruction {instruction!r}")


def test_generated_tasks_have_correct_answers_and_are_deterministic():
    records = generate_tasks(300, seed=7)
    assert records == generate_tasks(300, seed=7)
    assert records != generate_tasks(300, seed=8)
    assert {r["family"] for r in records} == set(FAMILIES)
    instructions = [r["messages"][1]["content"] for r in records]
    assert len(set(instructions)) == len(instructions)
    for r in records:
        system, user, assistant = r["messages"]
        assert (system["role"], user["role"], assistant["role"]) == ("system", "user", "assistant")
        assert assistant["content"] == r["answer"] == solve(user["content"])


def test_generated_data_path_and_its_errors():
    records = load_records("qtune:checkable-tasks?count=20&seed=1&families=larger_number,last_word")
    assert [r["family"] for r in records.rows].count("larger_number") == 10
    assert records.rows == generate_tasks(20, seed=1, families=("larger_number", "last_word"))
    for path, match in [("qtune:checkable-tasks?count=x", "integers"), ("qtune:other", "unknown generated"),
                        ("qtune:checkable-tasks?families=nope", "unknown task families"),
                        ("qtune:checkable-tasks?size=3", "unknown parameter")]:
        with pytest.raises(DataError, match=match):
            load_records(path)


def test_prompt_and_reference_split_a_chat_example(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    rows = generate_tasks(4, seed=0)
    from qtune.data.records import Records

    examples = tokenize_records(Records("t", rows, None, "h"), "chat", tok, 256, False)
    for i, row in enumerate(rows):
        prompt, reference = prompt_and_reference(examples.example(i))
        prompt_text = tok.apply_chat_template(row["messages"][:2], add_generation_prompt=True)
        assert prompt == tok.encode(prompt_text)
        assert tok.decode(reference).strip() == row["answer"]


def test_exact_match_counts_greedy_completions_equal_to_the_reference(tiny_dir):
    """References built from transformers' own greedy continuations score 1, altered ones 0."""
    import numpy as np

    from qtune.data.tokenized import Example

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model, tok = load_model(tiny_dir, quantize="none"), load_tokenizer(tiny_dir)
    right, wrong = [], []
    for text in ["Name a color.", "Which number is larger, 12 or 40?", "Reverse: a b"]:
        prompt = tok.encode(text)
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_id,
                          pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
        for response in (out, tok.encode("zzz ") + out):  # the model's own answer, then a different one
            ids = np.array(prompt + response, np.int32)
            labels = np.array([-100] * len(prompt) + response, np.int32)
            (right if response is out else wrong).append(Example(ids, labels))
    scored = exact_match(model, tok, right, max_new_tokens=6)
    assert scored["exact_match"] == 1.0 and scored["correct"] == 3 and scored["examples"] == 3
    assert exact_match(model, tok, wrong, max_new_tokens=6)["exact_match"] == 0.0


def reference_alpaca_loss(hf, tokenizer_file, rows, max_seq_len) -> tuple[float, int]:
    """Response-token loss with transformers logits and a plain log-softmax, prompts built here."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    eos = tok.token_to_id("<|im_end|>")
    head = "Below is an instruction that describes a task"
    total, count = 0.0, 0
    for r in rows:
        if r.get("input"):
            prompt = (f"{head}, paired with an input that provides further context. Write a response that "
                      f"appropriately completes the request.\n\n### Instruction:\n{r['instruction']}\n\n"
                      f"### Input:\n{r['input']}\n\n### Response:")
        else:
            prompt = (f"{head}. Write a response that appropriately completes the request.\n\n"
                      f"### Instruction:\n{r['instruction']}\n\n### Response:")
        p_ids = tok.encode(prompt, add_special_tokens=False).ids
        ids = (p_ids + tok.encode(r["output"], add_special_tokens=False).ids + [eos])[:max_seq_len]
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
        for t in range(len(p_ids), len(ids)):
            total -= logp[t - 1, ids[t]].item()
            count += 1
    return total / count, count


@SHARED_DATA
def test_alpaca_response_loss_equals_transformers(tiny_dir):
    rows = json.loads(ALPACA_DEMO.read_text())[:6]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    want, count = reference_alpaca_loss(hf, tiny_dir / "tokenizer.json", rows, max_seq_len=160)
    model, tok = load_model(tiny_dir, quantize="none"), load_tokenizer(tiny_dir)
    got = alpaca_response_loss(model, tok, str(ALPACA_DEMO), max_seq_len=160, batch_size=4, limit=6)
    assert got["tokens"] == count and got["examples"] + got["skipped"] == 6 and got["examples"] >= 4
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(want), rel=1e-5)


@SHARED_DATA
def test_eval_command_prints_the_loss_as_json(tiny_dir):
    from qtune.cli import main

    result = CliRunner().invoke(main, ["eval", str(tiny_dir), "--quantize", "none", "--data", str(ALPACA_DEMO),
                                       "--limit", "4", "--max-seq-len", "160"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    model, tok = load_model(tiny_dir, quantize="none"), load_tokenizer(tiny_dir)
    direct = alpaca_response_loss(model, tok, str(ALPACA_DEMO), max_seq_len=160, limit=4)
    assert out["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert out["examples"] == direct["examples"] and out["examples"] + out["skipped"] == 4
