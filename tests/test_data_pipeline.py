"""The SFT data pipeline: batches, packing, length grouping, resume, mixtures, cache and the preview command."""

import json

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_data_tokenizer import ALPACA_DEMO, C4_DEMO, DPO_DEMO, SHARED_DATA, load, make_tokenizer_dir

from qtune.cli.recipe_cmds import COMMANDS
from qtune.data import (DataPosition, Example, build_sft_data, collate, epoch_batches, mixture_counts,
                        pack_rows)
from qtune.recipe.sections import DataSource, SFTDataSection

IGNORE = -100


def ex(ids, labels) -> Example:
    return Example(np.array(ids, np.int32), np.array(labels, np.int32))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load(tok_dir)


@pytest.fixture(scope="module")
def sharegpt_file(tmp_path_factory):
    """The DPO demo conversations completed with their chosen reply, as an SFT ShareGPT file."""
    rows = json.loads(DPO_DEMO.read_text())
    path = tmp_path_factory.mktemp("sharegpt") / "chats.jsonl"
    path.write_text("".join(json.dumps({"conversations": r["conversations"] + [r["chosen"]]}) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- batches

def test_collate_right_pads_and_numbers_segments():
    a, b, c = ex([5, 6, 7], [IGNORE, 6, 7]), ex([8, 9], [IGNORE, 9]), ex([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4])
    batch = collate([[a, b], [c]], pad_id=0)
    assert all(t.dtype == torch.int64 and t.shape == (2, 5) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9], [IGNORE, IGNORE, 3, 4, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]


def test_packed_row_gives_each_example_its_own_logits():
    from qtune.config import ModelConfig
    from qtune.model import CausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = CausalLM(cfg).eval()
    examples = [ex(list(range(3, 3 + n)), [IGNORE] + list(range(4, 3 + n))) for n in (7, 5, 9)]
    packed = collate([examples], pad_id=0)
    with torch.no_grad():
        logits = model(packed["input_ids"], packed["attention_mask"], packed["position_ids"])  # (1, 21, V)
        start = 0
        for e in examples:
            alone = model(torch.from_numpy(e.input_ids).long()[None])  # (1, n, V), plain causal from 0
            n = len(e.input_ids)
            torch.testing.assert_close(logits[0, start:start + n], alone[0], rtol=1e-5, atol=1e-5)
            start += n


def test_pack_rows_fits_every_example_once():
    lengths = np.random.default_rng(0).integers(5, 120, size=500)
    rows = pack_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert max(lengths[row].sum() for row in rows) <= 128
    assert len(rows) <= 1.1 * np.ceil(lengths.sum() / 128)  # within 10% of the lower bound
    assert pack_rows(np.array([128, 1, 127, 64, 64]), 128) == [[0], [2, 1], [3, 4]]


def test_length_grouping_covers_the_epoch_and_cuts_padding():
    lengths = np.random.default_rng(1).integers(1, 500, size=1000)
    grouped = epoch_batches(lengths, 8, seed=3, epoch=0, shuffle=True, group_by_length=True)
    plain = epoch_batches(lengths, 8, seed=3, epoch=0, shuffle=True, group_by_length=False)
    for batches in (grouped, plain):
        assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert lengths[grouped[0]].max() == lengths.max()  # the longest batch comes first

    def padding(batches):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)

    assert padding(grouped) < padding(plain) / 5
    again = epoch_batches(lengths, 8, seed=3, epoch=0, shuffle=True, group_by_length=True)
    assert all(np.array_equal(x, y) for x, y in zip(grouped, again))
    other = epoch_batches(lengths, 8, seed=3, epoch=1, shuffle=True, group_by_length=True)
    assert not all(np.array_equal(x, y) for x, y in zip(grouped, other))


def small_data(tok, tmp_path, **kw):
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i + 1)))}
            for i in range(23)]
    path = tmp_path / "count.json"
    path.write_text(json.dumps(rows))
    return build_sft_data(SFTDataSection(path=str(path), cache_dir="", **kw), tok, seed=5)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_reproduces_the_uninterrupted_stream(tok, tmp_path, packing):
    data = small_data(tok, tmp_path, packing=packing, max_seq_len=160)
    per_epoch = data.batches_per_epoch(4)
    straight = [batch for _, (_, batch) in zip(range(3 * per_epoch), data.batches(4, seed=7))]
    it = data.batches(4, seed=7)
    first = [next(it) for _ in range(per_epoch + 2)]
    position = DataPosition.from_dict(json.loads(json.dumps(first[-1][0].to_dict())))
    assert position == DataPosition(1, 2)
    rest = [batch for _, (_, batch) in zip(range(2 * per_epoch - 2), data.batches(4, 7, position))]
    resumed = [batch for _, batch in first] + rest
    for x, y in zip(straight, resumed, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    positions = [position for _, (position, _) in zip(range(per_epoch), data.batches(4, 7))]
    assert positions[-1] == DataPosition(1, 0)


def test_val_split_and_val_batches(tok, tmp_path):
    data = small_data(tok, tmp_path, val_size=5)
    assert len(data.val) == 5 and len(data.train) == 18
    train_ids = {tuple(e.input_ids) for e in data.train}
    assert not any(tuple(e.input_ids) in train_ids for e in data.val)
    batches = list(data.val_batches(2))
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert all(b["attention_mask"].max() == 1 for b in batches)


def test_same_seed_same_data_other_seed_other_split(tok, tmp_path):
    a, b = small_data(tok, tmp_path, val_fraction=0.2), small_data(tok, tmp_path, val_fraction=0.2)
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a.train, b.train, strict=True))
    path = tmp_path / "count.json"
    c = build_sft_data(SFTDataSection(path=str(path), cache_dir="", val_fraction=0.2), tok, seed=6)
    assert {tuple(e.input_ids) for e in c.val} != {tuple(e.input_ids) for e in a.val}


# ----------------------------------------------------------------------------- mixtures

def test_mixture_counts_are_examples_proportional_with_cap():
    # m_i = round(w_i * min(n_i, K_i)), hand-computed.
    assert mixture_counts([1000, 100, 10], [1.0, 1.0, 2.0], [200, 0, 0]) == [200, 100, 20]
    assert mixture_counts([50, 50], [0.5, 3.0], [0, 20]) == [25, 60]


@SHARED_DATA
def test_mixture_of_alpaca_and_sharegpt_files(tok, sharegpt_file, tmp_path):
    section = SFTDataSection(sources=[DataSource(path=str(ALPACA_DEMO), max_examples=300),
                                      DataSource(path=str(sharegpt_file), weight=0.5)],
                             max_seq_len=1024, cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    data = build_sft_data(section, tok, seed=0)
    alpaca, chats = data.stats["sources"]
    assert (alpaca["format"], chats["format"]) == ("alpaca", "sharegpt")
    n_chat_train = chats["examples"] - chats["val"]
    assert alpaca["train"] == 300 and chats["train"] == round(0.5 * n_chat_train)
    im_start = tok.encode("<|im_start|>")[0]
    from_chats = sum(int(im_start in e.input_ids) for e in data.train)
    assert (from_chats, len(data.train) - from_chats) == (chats["train"], 300)
    assert len(data.val) == alpaca["val"] + chats["val"] == round(0.1 * alpaca["examples"]) + chats["val"]


@SHARED_DATA
def test_pretrain_text_fraction(tok, tmp_path):
    section = SFTDataSection(path=str(ALPACA_DEMO), max_seq_len=256, cache_dir="", pretrain_path=str(C4_DEMO),
                             pretrain_fraction=0.2)
    data = build_sft_data(section, tok, seed=0)
    n_sft = data.stats["sources"][0]["train"]
    n_text = data.stats["pretrain"]["train"]
    assert n_text == round(n_sft * 0.2 / 0.8)
    assert abs(n_text / len(data.train) - 0.2) < 0.002
    fully_trained = [e for e in data.train if np.all(e.labels[1:] == e.input_ids[1:])]
    assert len(fully_trained) == n_text  # plain text trains every token; SFT examples mask their prompt
    assert max(len(e.input_ids) for e in fully_trained) == 256  # long documents are cut into max_seq_len pieces


# ----------------------------------------------------------------------------- cache

def test_cache_hit_and_miss(tok, tok_dir, tmp_path):
    rows = [{"text": f"Line number {i} of the corpus."} for i in range(30)]
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "cache"

    def build(tokenizer=tok, **kw):
        section = SFTDataSection(path=str(path), cache_dir=str(cache), **kw)
        return build_sft_data(section, tokenizer, seed=0)

    first = build()
    assert first.stats["sources"][0]["cached"] is False
    second = build()
    assert second.stats["sources"][0]["cached"] is True
    assert all(np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.labels, y.labels)
               for x, y in zip(first.train, second.train, strict=True))
    files = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert files == ["input_ids.npy", "labels.npy", "offsets.npy", "stats.json"]
    assert build(max_seq_len=8).stats["sources"][0]["cached"] is False  # other settings
    path.write_text(path.read_text() + json.dumps({"text": "one more"}) + "\n")
    assert build().stats["sources"][0]["cached"] is False  # other content
    other_dir = make_tokenizer_dir(tmp_path / "tok2", chat_template="{{ messages[0]['content'] }}")
    assert build(load(other_dir)).stats["sources"][0]["cached"] is False  # other tokenizer files
    assert build().stats["sources"][0]["cached"] is True
    assert len(list(cache.iterdir())) == 4 and not list(cache.glob("*.tmp-*"))


# ----------------------------------------------------------------------------- preview

@SHARED_DATA
def test_data_preview_command(tok_dir, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\npath = "{tok_dir}"\n[data]\npath = "{ALPACA_DEMO}"\ncache_dir = ""\n')
    group = click.Group(commands=COMMANDS)
    result = CliRunner().invoke(group, ["data", "preview", str(recipe), "data.max_seq_len=128", "-n", "2"])
    assert result.exit_code == 0, result.output
    assert "example 0" in result.output and "example 1" in result.output and "example 2" not in result.output
    assert "### Instruction:" in result.output and "trained" in result.output
    assert "truncated" in result.output and "999" in result.output
    bad = CliRunner().invoke(group, ["data", "preview", str(recipe), "data.path=/nowhere/x.json"])
    assert bad.exit_code != 0 and "no such file" in bad.output
