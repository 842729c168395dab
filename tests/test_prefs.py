"""Preference data: every record layout, tokenization with response masks, truncation, batches that keep a
ranking's pairs together, the train / held-out split, the shared data files, and bad input named by file and line."""

import gzip
import json

import numpy as np
import pytest
import torch
from shared_data import DPO_DEMO, HH_HARMLESS, SHARED_DATA
from test_data_tokenizer import load, make_tokenizer_dir

from qtune.data.batching import DataPosition
from qtune.data.kto import build_kto_data, load_kto_records
from qtune.data.prefs import (PreferenceData, TokenizedPreference, build_preference_data, collate_preferences,
                              load_preferences, parse_preference, tokenize_preference, tokenize_preferences, truncate)
from qtune.data.records import DataError
from qtune.recipe.align import PrefDataSection

IGNORE = -100
CHATML_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def item(prompt, *responses, margin=0.0, scores=None) -> TokenizedPreference:
    return TokenizedPreference(np.array(prompt, np.int32), tuple(np.array(r, np.int32) for r in responses), margin,
                               None if scores is None else np.array(scores, np.float32))


# ----------------------------------------------------------------------------- layouts

def test_pairs_with_margin_and_scores():
    row = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5, "chosen_score": 9, "rejected_score": 2}
    pref = parse_preference(row, "pairs", "f line 1")
    assert (pref.prompt, pref.responses, pref.margin, pref.scores) == ("2+2?", ["4", "5"], 1.5, [9.0, 2.0])


def test_ranking_keeps_best_first_order():
    pref = parse_preference({"prompt": "p", "responses": ["a", "b", "c"], "scores": [3, 2, 1]}, "ranking", "x")
    assert pref.responses == ["a", "b", "c"] and pref.scores == [3.0, 2.0, 1.0] and pref.margin == 0.0


def test_chat_pairs_accept_message_objects_and_lists():
    row = {"messages": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": {"role": "assistant", "content": "Go away."}}
    pref = parse_preference(row, "chat", "x")
    assert pref.prompt == [{"role": "user", "content": "Hi"}] and pref.responses == ["Hello!", "Go away."]


@SHARED_DATA
def test_sharegpt_pairs_of_the_dpo_demo():
    rows = json.loads(DPO_DEMO.read_text())
    prefs, skipped = load_preferences(str(DPO_DEMO))
    assert len(prefs) == 300 and skipped == []
    first = prefs[0]
    assert first.prompt == [{"role": "user", "content": rows[0]["conversations"][0]["value"]}]
    assert first.responses == [rows[0]["chosen"]["value"], rows[0]["rejected"]["value"]]
    system_first = next(p for p, r in zip(prefs, rows) if r["conversations"][0]["from"] == "system")
    assert system_first.prompt[0]["role"] == "system" and system_first.prompt[-1]["role"] == "user"


@SHARED_DATA
def test_hh_transcripts_split_at_the_last_assistant_turn():
    rows = [json.loads(line) for line in gzip.open(HH_HARMLESS)]
    prefs, skipped = load_preferences(str(HH_HARMLESS), bad_records="skip")
    assert len(prefs) == 2303 and len(skipped) == 9  # 4 empty chosen replies, 5 pairs differing earlier
    pref = prefs[0]
    assert pref.prompt.endswith("\n\nAssistant:") and pref.prompt.startswith("\n\nHuman:")
    assert pref.prompt + pref.responses[0] == rows[0]["chosen"] and pref.prompt + pref.responses[1] == rows[0]["rejected"]
    assert "\n\nAssistant:" not in pref.responses[0]


def test_auto_detects_every_layout(tmp_path):
    layouts = {
        "pairs": {"prompt": "p", "chosen": "a", "rejected": "b"},
        "ranking": {"prompt": "p", "responses": ["a", "b"]},
        "sharegpt": {"conversations": [{"from": "human", "value": "p"}], "chosen": {"from": "gpt", "value": "a"},
                     "rejected": {"from": "gpt", "value": "b"}},
        "chat": {"messages": [{"role": "user", "content": "p"}], "chosen": "a", "rejected": "b"},
        "hh": {"chosen": "\n\nHuman: p\n\nAssistant: a", "rejected": "\n\nHuman: p\n\nAssistant: b"},
    }
    for name, row in layouts.items():
        prefs, _ = load_preferences(write_jsonl(tmp_path / f"{name}.jsonl", [row]))
        assert prefs[0].responses in (["a", "b"], [" a", " b"]), name


# ----------------------------------------------------------------------------- bad input

GOOD = {
    "pairs": {"prompt": "p", "chosen": "a", "rejected": "b"},
    "ranking": {"prompt": "p", "responses": ["a", "b"]},
    "hh": {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: x\n\nAssistant: b"},
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
                 "rejected": {"from": "gpt", "value": "b"}},
    "chat": {"messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
}
BAD_RECORDS = [
    ("pairs", {"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    ("pairs", {"prompt": "p", "chosen": "   ", "rejected": "b"}, "'chosen' is empty"),
    ("pairs", {"prompt": "p", "chosen": "a"}, "'rejected' missing"),
    ("pairs", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": -1}, "'margin' is -1.0"),
    ("pairs", {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 1}, "give both chosen_score and rejected_score"),
    ("ranking", {"prompt": "p", "responses": ["only one"]}, "at least 2 responses"),
    ("ranking", {"prompt": "p", "responses": ["a", "b", "a"]}, "'responses[0]' and 'responses[2]' are identical"),
    ("hh", {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: y\n\nAssistant: b"}, "differ before"),
    ("hh", {"chosen": "\n\nHuman: x\n\nAssistant: ", "rejected": "\n\nHuman: x\n\nAssistant: b"},
     "the 'chosen' reply is empty"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}],
                  "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
     "must end with the user"),
    ("chat", {"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "user", "content": "a"},
              "rejected": "b"}, "a reply must come from"),
]


@pytest.mark.parametrize("layout,bad,message", BAD_RECORDS)
def test_bad_record_is_named_by_file_and_line(tmp_path, layout, bad, message):
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD[layout], GOOD[layout], bad])
    with pytest.raises(DataError) as err:
        load_preferences(path)
    assert f"{path} line 3: " in str(err.value) and message in str(err.value)
    assert 'data.bad_records = "skip"' in str(err.value)


def test_skipping_bad_records_counts_them(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "a"},
            {"prompt": "q", "chosen": "c", "rejected": "d"}]
    prefs, skipped = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), bad_records="skip")
    assert [p.where.rsplit(" ", 1)[1] for p in prefs] == ["1", "3"]
    assert len(skipped) == 1 and "line 2" in skipped[0]


def test_missing_field_in_a_json_array_names_the_record(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]))
    with pytest.raises(DataError, match=f"{path} record 1: a 'pairs' record needs"):
        load_preferences(str(path))


def test_unknown_layout_lists_the_expected_fields(tmp_path):
    with pytest.raises(DataError, match=r"line 1: cannot tell the preference layout .*ranking: prompt, responses"):
        load_preferences(write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "a"}]))


def test_pointwise_loss_needs_scores(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2)
    data = PrefDataSection(path=path, cache_dir="")
    with pytest.raises(DataError, match=f"{path} line 1: the pointwise loss needs scores"):
        build_preference_data(data, tok, seed=0, need_scores=True)


# ----------------------------------------------------------------------------- tokens

def test_text_prompt_tokens_and_response_eos(tok):
    pref = parse_preference({"prompt": "Name a colour.", "chosen": " Red.", "rejected": " Seven."}, "pairs", "x")
    out, truncated = tokenize_preference(pref, tok, 512)
    assert not truncated
    assert out.prompt_ids.tolist() == tok.encode("Name a colour.")
    assert [r.tolist() for r in out.response_ids] == [tok.encode(" Red.") + [tok.eos_id], tok.encode(" Seven.") + [tok.eos_id]]


def test_chat_prompt_is_rendered_with_the_template(tok):
    pref = parse_preference({"messages": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Bye."},
                            "chat", "x")
    out, _ = tokenize_preference(pref, tok, 512)
    assert tok.decode(out.prompt_ids.tolist(), skip_special=False) == \
        CHATML_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert [tok.decode(r.tolist(), skip_special=False) for r in out.response_ids] == \
        ["Hello!<|im_end|>\n", "Bye.<|im_end|>\n"]


def test_truncation_keeps_the_end_of_the_prompt_then_cuts_responses():
    prompt, long, short = list(range(1, 11)), [50] * 8, [60] * 3
    # longest response 8 leaves 4 prompt tokens, but the prompt keeps at least 12 // 2 = 6
    assert truncate(prompt, [long, short], 12) == ([5, 6, 7, 8, 9, 10], [[50] * 6, [60] * 3])
    assert truncate(prompt, [[1], [2]], 11) == (prompt, [[1], [2]])
    # a short prompt is kept whole and the responses take the rest
    assert truncate([1, 2], [[7] * 20, [8]], 10) == ([1, 2], [[7] * 8, [8]])


def test_truncation_says_whether_responses_lost_their_end(tok):
    # Counted from the token lists themselves: a prompt cut is a shorter prompt, a response cut a shorter reply.
    rows = [("one two three four five six seven eight nine ten", "yes", "no"),  # only the prompt is cut
            ("p", "a rather long reply made of many different words", "no"),  # the long reply is cut
            ("p", "yes", "no")]  # nothing is cut
    prefs = [parse_preference({"prompt": p, "chosen": c, "rejected": r}, "pairs", f"f line {i}")
             for i, (p, c, r) in enumerate(rows)]
    L = len(tok.encode("p")) + len(tok.encode("yes")) + 1 + 4
    expected = []
    for (p, c, r), pref in zip(rows, prefs):
        out, cut = tokenize_preference(pref, tok, L)
        full = [tok.encode(c) + [tok.eos_id], tok.encode(r) + [tok.eos_id]]
        prompt_cut = len(out.prompt_ids) < len(tok.encode(p))
        responses_cut = any(len(a) < len(b) for a, b in zip(out.response_ids, full))
        assert (cut.prompt_cut, cut.responses_cut, bool(cut)) == (prompt_cut, responses_cut, prompt_cut or responses_cut)
        assert all(len(out.prompt_ids) + len(a) <= L for a in out.response_ids)
        expected.append((prompt_cut, responses_cut))
    assert expected == [(True, False), (False, True), (False, False)]
    _, stats = tokenize_preferences(prefs, tok, L)
    assert (stats["truncated"], stats["responses_cut"]) == (2, 1)


def test_records_whose_responses_become_identical_are_dropped(tok):
    prefs = [parse_preference({"prompt": "p", "chosen": "the same start then A", "rejected": "the same start then B"},
                              "pairs", "f line 1"),
             parse_preference({"prompt": "p", "chosen": "yes", "rejected": "no"}, "pairs", "f line 2")]
    items, stats = tokenize_preferences(prefs, tok, 4)
    assert len(items) == 1 and stats["dropped"] == 1 and stats["dropped_where"] == ["f line 1"]
    assert stats["truncated"] == 1 and stats["responses_cut"] == 1 and stats["pairs"] == 1


# ----------------------------------------------------------------------------- batches

def test_collate_lays_out_sequences_masks_and_all_pairs_of_a_ranking():
    ranking = item([1, 2], [3], [4, 5], [6], margin=0.5, scores=[3, 2, 1])
    pair = item([7], [8, 9], [10])
    batch = collate_preferences([ranking, pair], pad_id=0, indices=[4, 9])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 2, 4, 5], [1, 2, 6, 0], [7, 8, 9, 0], [7, 10, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 3, IGNORE], [IGNORE, IGNORE, 4, 5], [IGNORE, IGNORE, 6, IGNORE],
                                        [IGNORE, 8, 9, IGNORE], [IGNORE, 10, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3]] * 5
    assert batch["ranking"].tolist() == [0, 0, 0, 1, 1] and batch["rank"].tolist() == [0, 1, 2, 0, 1]
    # K(K−1)/2 = 3 pairs for the ranking, 1 for the pair, all within this batch
    assert list(zip(batch["better"].tolist(), batch["worse"].tolist())) == [(0, 1), (0, 2), (1, 2), (3, 4)]
    assert batch["pair_ranking"].tolist() == [0, 0, 0, 1]
    assert batch["margin"].tolist() == [0.5, 0.0] and batch["n_responses"].tolist() == [3, 2]
    assert batch["index"].tolist() == [4, 9]
    assert batch["score"][:3].tolist() == [3.0, 2.0, 1.0] and torch.isnan(batch["score"][3:]).all()


def test_every_ranking_arrives_whole_and_batches_resume_exactly():
    rng = np.random.default_rng(0)
    train = [item([1] * int(rng.integers(1, 5)), *[[10 + k] * int(rng.integers(1, 4)) for k in range(int(rng.integers(2, 6)))])
             for _ in range(11)]
    data = PreferenceData(train, [], {}, pad_id=0)
    stream = data.batches(3, seed=5)
    seen = []
    for _ in range(data.batches_per_epoch(3)):
        position, batch = next(stream)
        for g, index in enumerate(batch["index"].tolist()):
            k = len(train[index].response_ids)
            assert int((batch["pair_ranking"] == g).sum()) == k * (k - 1) // 2
            assert int((batch["ranking"] == g).sum()) == k
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(11)) and position == DataPosition(1, 0)
    later = list(zip(range(3), data.batches(3, seed=5, start=DataPosition(0, 2))))
    again = data.batches(3, seed=5)
    for _ in range(2):
        next(again)
    for (_, (pos_a, a)), (pos_b, b) in zip(later, again):
        assert pos_a == pos_b and torch.equal(a["input_ids"], b["input_ids"])


def test_split_is_seeded_and_disjoint(tmp_path, tok):
    rows = [{"prompt": f"question {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    data = PrefDataSection(path=write_jsonl(tmp_path / "p.jsonl", rows), val_size=5, cache_dir="")
    a, b, c = (build_preference_data(data, tok, seed=s) for s in (0, 0, 1))

    def prompts(d):
        return [tuple(it.prompt_ids) for it in d.val]

    assert prompts(a) == prompts(b) != prompts(c)
    assert len(a.val) == 5 and len(a.train) == 15
    assert not set(prompts(a)) & {tuple(it.prompt_ids) for it in a.train}
    assert a.stats["train_pairs"] == 15 and a.stats["val_pairs"] == 5


@SHARED_DATA
def test_shared_files_tokenize_with_a_chat_template(tok):
    prefs, _ = load_preferences(str(DPO_DEMO))
    items, stats = tokenize_preferences(prefs[:40], tok, 256)
    assert len(items) + stats["dropped"] == 40 and stats["truncated"] > 0
    assert all(len(it.prompt_ids) + max(map(len, it.response_ids)) <= 256 for it in items)
    assert all(tok.decode(it.prompt_ids.tolist(), skip_special=False).endswith("<|im_start|>assistant\n")
               for it in items)


# ----------------------------------------------------------------------------- KTO: unpaired records

KTO_ROWS = [{"prompt": "2+2?", "completion": " 4", "label": True},
            {"prompt": [{"role": "user", "content": "Hi"}],
             "completion": [{"role": "assistant", "content": "Go away."}], "label": False},
            {"prompt": "Name a colour.", "completion": {"role": "assistant", "content": " Red."}, "label": True}]


def test_kto_records_in_text_and_chat_form(tmp_path):
    usable, skipped = load_kto_records(write_jsonl(tmp_path / "k.jsonl", KTO_ROWS))
    assert skipped == []
    assert [(p.prompt, p.responses, desirable) for p, desirable in usable] == [
        ("2+2?", [" 4"], True), ([{"role": "user", "content": "Hi"}], ["Go away."], False),
        ("Name a colour.", [" Red."], True)]


@pytest.mark.parametrize("bad,message", [({"prompt": "p", "completion": "c"}, "'label' missing"),
                                         ({"prompt": "p", "completion": "c", "label": 1}, "got 1"),
                                         ({"prompt": "p", "completion": "c", "label": "true"}, "got 'true'"),
                                         ({"prompt": "p", "completion": "", "label": True}, "'completion' is empty")])
def test_bad_kto_record_is_named_by_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "k.jsonl", [KTO_ROWS[0], bad])
    with pytest.raises(DataError, match=f"k.jsonl line 2: .*{message}"):
        load_kto_records(path)
    usable, skipped = load_kto_records(path, bad_records="skip")
    assert len(usable) == 1 and len(skipped) == 1


def test_kto_batches_pair_each_prompt_with_the_previous_completion(tmp_path, tok):
    rows = [{"prompt": f"question {i}", "completion": f" answer {i}", "label": i % 3 != 0} for i in range(9)]
    data = PrefDataSection(path=write_jsonl(tmp_path / "k.jsonl", rows), format="kto", val_size=3, cache_dir="")
    kto = build_kto_data(data, tok, seed=0)
    assert (len(kto.train), len(kto.val)) == (6, 3) and "held-out KTO records" in kto.describe()
    assert kto.stats["desirable"] + kto.stats["undesirable"] == 6
    _, batch = next(kto.batches(3, seed=0))
    items = [kto.train[i] for i in batch["index"].tolist()]
    assert batch["desirable"].tolist() == [it.desirable for it in items]
    for sub, completions in (("completions", [it.completion_ids for it in items]),
                             ("kl", [items[g - 1].completion_ids for g in range(3)])):
        seqs = batch[sub]
        for s, it in enumerate(items):
            tokens = seqs["input_ids"][s][seqs["attention_mask"][s] == 1].tolist()
            assert tokens == it.prompt_ids.tolist() + completions[s].tolist()
            assert seqs["labels"][s][seqs["labels"][s] != IGNORE].tolist() == completions[s].tolist()
