"""Reading records and rendering them: Stanford Alpaca prompts, chat templates, label masks, truncation."""

import json

import numpy as np
import pytest
from test_data_tokenizer import ALPACA_DEMO, DPO_DEMO, SHARED_DATA, load, make_tokenizer_dir

from qtune.data import DataError, alpaca_prompt, detect_format, load_records, tokenize_record, tokenize_records

IGNORE = -100


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok_bos(tmp_path_factory):
    return load(make_tokenizer_dir(tmp_path_factory.mktemp("tok_bos"), add_bos=True))


def runs(tok, ids, labels) -> list[tuple[bool, str]]:
    """(trained, text) for each maximal run of tokens with the same trained flag, decoded with special tokens."""
    trained = [lab != IGNORE for lab in labels]
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or trained[t] != trained[start]:
            out.append((trained[start], tok.decode(list(ids[start:t]), skip_special=False)))
            start = t
    return out


def check_labels_copy_ids(ids, labels):
    for i, lab in zip(ids, labels):
        assert lab == IGNORE or lab == i


# ----------------------------------------------------------------------------- Alpaca

def test_alpaca_prompts_are_the_stanford_strings():
    with_input = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    assert alpaca_prompt(with_input) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:")
    assert alpaca_prompt({"instruction": "Name a color.", "input": "", "output": "Red"}) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:")
    assert alpaca_prompt({"instruction": "Name a color.", "output": "Red"}).endswith("Name a color.\n\n### Response:")


@pytest.mark.parametrize("bos", [False, True])
def test_alpaca_label_mask_token_by_token(tok, tok_bos, bos):
    tk = tok_bos if bos else tok
    row = {"instruction": "Name three primary colors.", "input": "", "output": "Red, blue and yellow."}
    ids, labels = tokenize_record(row, "alpaca", tk, train_on_input=False, where="r")
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nName three primary colors.\n\n### Response:")
    assert runs(tk, ids, labels) == [(False, ("<|endoftext|>" if bos else "") + prompt),
                                     (True, "Red, blue and yellow.<|im_end|>")]
    check_labels_copy_ids(ids, labels)
    assert ids[-1] == tk.eos_id and (ids[0] == tk.bos_id) == bos
    ids2, labels2 = tokenize_record(row, "alpaca", tk, train_on_input=True, where="r")
    assert ids2 == ids and labels2 == ids


@SHARED_DATA
def test_alpaca_demo_records_mask_exactly_the_prompt(tok):
    rows = json.loads(ALPACA_DEMO.read_text())[:40]
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)
    for row in rows:
        ids, labels = tokenize_record(row, "alpaca", tok, False, "r")
        head = "Below is an instruction that describes a task"
        if row["input"]:
            prompt = (f"{head}, paired with an input that provides further context. Write a response that "
                      f"appropriately completes the request.\n\n### Instruction:\n{row['instruction']}\n\n"
                      f"### Input:\n{row['input']}\n\n### Response:")
        else:
            prompt = (f"{head}. Write a response that appropriately completes the request.\n\n"
                      f"### Instruction:\n{row['instruction']}\n\n### Response:")
        assert runs(tok, ids, labels) == [(False, prompt), (True, row["output"] + "<|im_end|>")]


# ----------------------------------------------------------------------------- chat

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def test_multi_turn_chat_trains_every_assistant_turn_only(tok):
    ids, labels = tokenize_record({"messages": CONVERSATION}, "chat", tok, False, "r")
    assert runs(tok, ids, labels) == [
        (False, "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
                "<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Paris.<|im_end|>\n"),
        (False, "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "Rome.<|im_end|>\n"),
    ]
    check_labels_copy_ids(ids, labels)
    assert ids == tok.encode(tok.apply_chat_template(CONVERSATION))  # the template ends turns with EOS already
    _, all_labels = tokenize_record({"messages": CONVERSATION}, "chat", tok, True, "r")
    assert all_labels == ids


def test_template_without_end_token_gets_eos_id_appended(tmp_path):
    plain = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User:\n' + m['content'] + '\n' }}"
             "{% else %}{{ 'Bot:\n' + m['content'] + '\n' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'Bot:\n' }}{% endif %}")
    tk = load(make_tokenizer_dir(tmp_path, chat_template=plain))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, labels = tokenize_record({"messages": messages}, "chat", tk, False, "r")
    assert runs(tk, ids, labels) == [(False, "User:\nHi\nBot:\n"), (True, "Hello\n<|im_end|>")]
    assert ids[-1] == tk.eos_id


@SHARED_DATA
def test_sharegpt_dpo_demo_conversations(tok):
    rows = [r for r in json.loads(DPO_DEMO.read_text()) if len(r["conversations"]) >= 3][:10]
    assert rows
    for row in rows:
        record = {"conversations": row["conversations"] + [row["chosen"]]}
        assert detect_format(record, "r") == "sharegpt"
        ids, labels = tokenize_record(record, "sharegpt", tok, False, "r")
        trained = [text for is_trained, text in runs(tok, ids, labels) if is_trained]
        replies = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
        assert trained == [reply + "<|im_end|>\n" for reply in replies]
        users = [t["value"] for t in record["conversations"] if t["from"] == "human"]
        assert tok.decode(ids, skip_special=False).count("<|im_start|>user\n") == len(users)


def test_template_that_rewrites_history_is_rejected(tmp_path):
    # Earlier assistant turns are shortened in the history, so turn 0 renders differently once turn 1 exists.
    rewriting = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                 "{{ '<|im_start|>assistant\n' + m['content'][:2] + '<|im_end|>\n' }}{% else %}"
                 "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tk = load(make_tokenizer_dir(tmp_path, chat_template=rewriting))
    with pytest.raises(DataError, match="not prefix-stable") as e:
        tokenize_record({"messages": CONVERSATION}, "chat", tk, False, "data.jsonl line 4")
    assert "data.jsonl line 4" in str(e.value)


def test_template_that_breaks_token_boundaries_is_rejected(tmp_path):
    glued = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
             "{% if add_generation_prompt %}{% endif %}")
    tk = load(make_tokenizer_dir(tmp_path, chat_template=glued))
    # A word whose first part tokenizes differently alone than inside the word, found with the tokenizer itself.
    words = ("instruction", "response", "describe", "following", "sentence", "example", "provide", "information")
    head, tail = next((w[:k], w[k:]) for w in words for k in range(1, len(w))
                      if tk.encode(w)[:len(tk.encode(w[:k]))] != tk.encode(w[:k]))
    messages = [{"role": "user", "content": head}, {"role": "assistant", "content": tail}]
    with pytest.raises(DataError, match="tokenizes differently"):
        tokenize_record({"messages": messages}, "chat", tk, False, "r")


def test_chat_data_without_template_is_a_clear_error(tmp_path):
    tk = load(make_tokenizer_dir(tmp_path, chat_template=None))
    with pytest.raises(DataError, match="no chat template|has none"):
        tokenize_record({"messages": CONVERSATION}, "chat", tk, False, "r")


# ----------------------------------------------------------------------------- bad records

@pytest.mark.parametrize("row, fmt, match", [
    ({"instruction": "x", "input": ""}, "alpaca", "no 'output' field"),
    ({"instruction": "x", "output": "  "}, "alpaca", "'output' is empty"),
    ({"instruction": 3, "output": "y"}, "alpaca", "'instruction' must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "chat", "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "chat",
     "empty assistant reply"),
    ({"messages": [{"role": "user"}]}, "chat", r"messages\[0\] must be an object with 'role' and 'content'"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, "sharegpt", "from='bot'"),
    ({"text": ""}, "text", "'text' is empty"),
])
def test_bad_records_are_named(tok, row, fmt, match):
    with pytest.raises(DataError, match=match) as e:
        tokenize_record(row, fmt, tok, False, "data.json record 7")
    assert "data.json record 7" in str(e.value)


@pytest.mark.parametrize("turns, match", [
    ([{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "yo"}], r"messages\[0\] has role='usr'"),
    ([{"role": "user", "content": "hi"}, {"role": "assitant", "content": "yo"}], r"messages\[1\] has role='assitant'"),
    ([{"role": ["user"], "content": "hi"}], r"messages\[0\].role must be a string"),
])
def test_chat_roles_outside_system_user_assistant_are_refused(tok, turns, match):
    """A misspelt role would otherwise render as a role of its own, or leave a reply untrained."""
    with pytest.raises(DataError, match=match) as e:
        tokenize_record({"messages": turns}, "chat", tok, False, "data.json record 3")
    assert "data.json record 3" in str(e.value)


def test_unknown_fields_cannot_be_detected():
    with pytest.raises(DataError, match=r"cannot tell the format from fields \['prompt', 'response'\]"):
        detect_format({"prompt": "a", "response": "b"}, "x.json record 0")


def test_malformed_jsonl_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"\n{"text": "four"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 4: not valid JSON"):
        load_records(str(path))


def test_malformed_json_array_and_non_objects(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(DataError, match=r"bad.json line 3"):
        load_records(str(bad))
    scalars = tmp_path / "scalars.json"
    scalars.write_text('[{"text": "a"}, 5]')
    with pytest.raises(DataError, match=r"scalars.json record 1: expected a JSON object"):
        load_records(str(scalars))


def test_missing_field_reports_the_jsonl_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n')
    records = load_records(str(path))
    with pytest.raises(DataError, match=r"d.jsonl line 3: alpaca record has no 'output' field"):
        tokenize_records(records, "alpaca", tok, 64, False)


def test_json_file_holding_json_lines_and_gzip(tmp_path):
    import gzip

    lines = '{"text": "a"}\n{"text": "b"}\n'
    (tmp_path / "lines.json").write_text(lines)
    assert [r["text"] for r in load_records(str(tmp_path / "lines.json")).rows] == ["a", "b"]
    (tmp_path / "lines.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    records = load_records(str(tmp_path / "lines.jsonl.gz"))
    assert records.where(1) == f"{tmp_path / 'lines.jsonl.gz'} line 2"


def test_parquet_and_datasets_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    assert load_records(str(tmp_path / "train.parquet")).rows == rows
    directory = tmp_path / "ds"
    (directory / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), directory / "data" / "train-00000-of-00001.parquet")
    assert load_records(str(directory), split="train").rows == rows  # resolved by datasets.load_dataset


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "absent.json"))


# ----------------------------------------------------------------------------- truncation

@SHARED_DATA
def test_truncation_and_dropped_counts(tok):
    records = load_records(str(ALPACA_DEMO))
    records.rows = records.rows[:200]
    L = 128
    out = tokenize_records(records, "auto", tok, L, False)
    # Expected from the tokenizer directly: an example is dropped when its prompt fills all L tokens
    # (no response token lands at positions 1..L-1), truncated when it is longer than L but keeps one.
    prompt_lens = [len(tok.encode(alpaca_prompt(r))) for r in records.rows]
    full_lens = [p + len(tok.encode(r["output"])) + 1 for p, r in zip(prompt_lens, records.rows)]
    dropped = sum(p >= L for p in prompt_lens)
    truncated = sum(f > L and p < L for p, f in zip(prompt_lens, full_lens))
    assert out.stats["format"] == "alpaca" and out.stats["records"] == 200
    assert (out.stats["dropped"], out.stats["truncated"]) == (dropped, truncated)
    assert dropped > 0 and truncated > 0
    assert len(out) == 200 - dropped and out.lengths.max() == L
    assert out.stats["trained_tokens"] == int((out.labels != IGNORE).sum())
    for i in range(len(out)):
        ex = out.example(i)
        assert ex.labels[0] == IGNORE and (ex.labels != IGNORE).any()
        assert np.all((ex.labels == IGNORE) | (ex.labels == ex.input_ids))


def test_damaged_gzip_files_are_errors_naming_them(tmp_path):
    import gzip

    good = gzip.compress(("\n".join(json.dumps({"text": f"row {i}"}) for i in range(300)) + "\n").encode())
    assert len(load_records(str(_write(tmp_path / "good.jsonl.gz", good)))) == 300
    cases = {"truncated.jsonl.gz": (good[: len(good) // 2], "truncated or corrupt"),
             "plain.jsonl.gz": (b'{"text": "not compressed"}\n', "not gzip data"),
             "corrupt.jsonl.gz": (good[:10] + bytes(len(good) - 10), "truncated or corrupt")}
    for name, (content, expected) in cases.items():
        with pytest.raises(DataError) as e:
            load_records(str(_write(tmp_path / name, content)))
        assert name in str(e.value) and expected in str(e.value), str(e.value)


def _write(path, content: bytes):
    path.write_bytes(content)
    return path
