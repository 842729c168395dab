"""P-tuning's virtual tokens placed at anchors of the example (`[peft.p_tuning] placement`, qtune/peft/placement.py)
against a plain reference: transformers' model of the same tiny weights run on input embeddings built by hand,
[P[:k] E(prompt) P[k:] E(reply)], with P the adapter's encoder output. Logits, gradients, the SFT loss, DPO's
log-probabilities (and its reference without the tokens), the reward head, KV-cache decoding and the saved
adapter; the leading placement stays PEFT's; bad placements are one `Error:` line naming the key."""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from virtual_tokens import N_VIRTUAL, hf_model, max_diff, qtune_with
from tiny import save_tiny, save_tiny_with_tokenizer

from qtune.align.reward_model import RewardModel, ScalarHead
from qtune.cli import main
from qtune.generate import generate
from qtune.lora import adapter_parameters, adapters_disabled
from qtune.peft import load_adapter, save_adapter
from qtune.peft.placement import place_in_batch
from qtune.train.common import lm_loss_sum
from qtune.train.dpo import reference_logprobs, sequence_logprobs
from qtune.weights.checkpoint import load_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TOL = 1e-4
SPLIT = ["start:1", "response:2"]  # N_VIRTUAL = 3: one before everything, two before the reply
PLACEMENTS = {"split": (SPLIT, 1), "response": (["response"], 0)}  # (recipe value, tokens at "start")
# (prompt, reply) token ids of a right-padded batch of two examples of different lengths
ROWS = [([1, 17, 40, 9, 23], [51, 60, 2]), ([1, 33, 8], [70, 12, 45, 2])]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("tiny_placement"))


def batch_of(rows) -> dict:
    """The right-padded batch `collate` makes: labels -100 on the prompt and the padding, segment ids, positions."""
    T = max(len(p) + len(r) for p, r in rows)
    batch = {"input_ids": torch.zeros(len(rows), T, dtype=torch.long),
             "labels": torch.full((len(rows), T), -100), "attention_mask": torch.zeros(len(rows), T, dtype=torch.long),
             "position_ids": torch.zeros(len(rows), T, dtype=torch.long)}
    for b, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        batch["input_ids"][b, :n] = torch.tensor(prompt + reply)
        batch["labels"][b, len(prompt):n] = torch.tensor(reply)
        batch["attention_mask"][b, :n] = 1
        batch["position_ids"][b, :n] = torch.arange(n)
    return batch


def reference_embeds(hf, table, prompt, reply, k_start) -> torch.Tensor:
    """(1, L, D): the virtual tokens spliced by hand, [P[:k] E(prompt) P[k:] E(reply)]."""
    embed = hf.get_input_embeddings()
    reply = torch.tensor(reply, dtype=torch.long)  # may be empty (greedy decoding's first step)
    parts = [table[:k_start], embed(torch.tensor(prompt)), table[k_start:], embed(reply)]
    return torch.cat(parts)[None]


def reference_reply_logprobs(hf, table, prompt, reply, k_start) -> torch.Tensor:
    """log p(reply | prompt) summed, with the reference's logits at the positions before each reply token."""
    logits = hf(inputs_embeds=reference_embeds(hf, table, prompt, reply, k_start)).logits[0]  # (L, V)
    before = logits[len(prompt) + N_VIRTUAL - 1:-1]  # the last virtual token predicts reply[0]
    return F.log_softmax(before, -1).gather(1, torch.tensor(reply)[:, None]).sum()


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_logits_and_gradients_equal_the_hand_spliced_reference(tiny_dir, placement):
    value, k_start = PLACEMENTS[placement]
    m = qtune_with("p_tuning", tiny_dir, placement=value)
    hf = hf_model(tiny_dir)
    encoder = m.virtual_tokens.encoders["default"]
    batch = place_in_batch(m, batch_of(ROWS))
    assert batch["input_ids"].shape[1] == batch_of(ROWS)["input_ids"].shape[1] + N_VIRTUAL
    logits = m(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    real = batch["attention_mask"] != 0
    (logits * weights * real[..., None]).sum().backward()
    got = [p.grad.clone() for p in encoder.parameters()]
    for p in encoder.parameters():
        p.grad = None
    total = 0
    for b, (prompt, reply) in enumerate(ROWS):
        L = len(prompt) + len(reply) + N_VIRTUAL
        want = hf(inputs_embeds=reference_embeds(hf, encoder(), prompt, reply, k_start)).logits[0]  # (L, V)
        assert max_diff(logits[b, :L].detach(), want.detach()) <= TOL
        total = total + (want * weights[b, :L]).sum()
        # the labels: -100 on every virtual token and on the prompt, the reply where the reference has it
        labels = batch["labels"][b, :L]
        assert labels[len(prompt) + N_VIRTUAL:].tolist() == reply and (labels[:len(prompt) + N_VIRTUAL] == -100).all()
    total.backward()
    for g, p in zip(got, encoder.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5, rtol=1e-4)


def test_sft_loss_and_dpo_logprobs_equal_the_reference(tiny_dir):
    m = qtune_with("p_tuning", tiny_dir, placement=SPLIT)
    hf = hf_model(tiny_dir)
    table = m.virtual_tokens.encoders["default"]().detach()
    with torch.no_grad():
        want = torch.stack([reference_reply_logprobs(hf, table, p, r, 1) for p, r in ROWS])
        loss_sum, count = lm_loss_sum(m, batch_of(ROWS))
        assert count == sum(len(r) for _, r in ROWS)
        assert abs(loss_sum.item() + want.sum().item()) <= TOL * count
        assert max_diff(sequence_logprobs(m, batch_of(ROWS)), want) <= TOL
        # DPO's reference runs the base without any virtual token, on the plain batch
        plain = torch.stack([F.log_softmax(hf(torch.tensor([p + r])).logits[0, len(p) - 1:-1], -1)
                             .gather(1, torch.tensor(r)[:, None]).sum() for p, r in ROWS])
        assert max_diff(reference_logprobs(m, batch_of(ROWS)), plain) <= TOL


def test_reward_head_reads_the_reply_after_the_placed_tokens(tiny_dir):
    m = qtune_with("p_tuning", tiny_dir, placement=SPLIT)
    hf = hf_model(tiny_dir)
    head = ScalarHead(m.config.hidden_size, seed=4)
    table = m.virtual_tokens.encoders["default"]().detach()
    with torch.no_grad():
        got = RewardModel(m, "default", head).score(batch_of(ROWS))
        last = [hf.model(inputs_embeds=reference_embeds(hf, table, p, r, 1)).last_hidden_state[0, -1] for p, r in ROWS]
        want = head.linear(torch.stack(last)).squeeze(-1)
    assert max_diff(got, want) <= TOL


def greedy_reference(hf, table, prompt: list[int], k_start: int, steps: int) -> list[int]:
    """Greedy decoding by full forward passes over the hand-spliced embeddings [P[:k] E(prompt) P[k:] E(out)]."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = hf(inputs_embeds=reference_embeds(hf, table, prompt, out, k_start)).logits
            out.append(int(logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_cached_decoding_equals_the_reference_and_survives_save_and_load(tiny_dir, tmp_path, placement):
    value, k_start = PLACEMENTS[placement]
    m = qtune_with("p_tuning", tiny_dir, placement=value)
    hf = hf_model(tiny_dir)
    table = m.virtual_tokens.encoders["default"]().detach()
    prompts = [p for p, _ in ROWS]
    batched = generate(m, prompts, max_new_tokens=4, greedy=True)  # left-padded together, KV cache
    for prompt, out in zip(prompts, batched):
        assert out.token_ids == greedy_reference(hf, table, prompt, k_start, 4)
    save_adapter(m, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["qtune_placement"] == [f"{a}:{c}" for a, c in ((("start", 1), ("response", 2)) if k_start
                                                               else (("response", 3),))]
    again = load_model(tiny_dir, quantize="none")
    load_adapter(again, tmp_path / "a")
    assert [g.token_ids for g in generate(again, prompts, max_new_tokens=4, greedy=True)] == \
        [g.token_ids for g in batched]
    with torch.no_grad():
        assert abs(lm_loss_sum(again, batch_of(ROWS))[0] - lm_loss_sum(m, batch_of(ROWS))[0]) <= TOL


def test_leading_placement_is_peft_with_the_qtune_field_ignored(tiny_dir, tmp_path):
    m = qtune_with("p_tuning", tiny_dir, placement=["start:3"])
    save_adapter(m, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["qtune_placement"] == ["start:3"]
    ref = peft.PeftModel.from_pretrained(hf_model(tiny_dir), tmp_path / "a").eval()
    ids = torch.randint(3, 160, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(m(ids), ref(input_ids=ids).logits[:, N_VIRTUAL:]) <= TOL  # PEFT's has the virtual ones too
        plain = batch_of(ROWS)
        assert place_in_batch(m, plain) is plain and m.virtual_tokens.placement() is None
    with adapters_disabled(m):
        assert m.virtual_tokens.placed() is None


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny_placement_cli"), seed=1)


BAD = [("peft.p_tuning.placement=[\"middle\"]", "peft.p_tuning.placement", "unknown anchor 'middle'"),
       ("peft.p_tuning.placement=[\"start:2\",\"response:5\"]", "peft.p_tuning.placement", "sum to 7, not"),
       ("peft.p_tuning.placement=[\"start\",\"response\"]", "peft.p_tuning.placement", "positive count"),
       ("peft.prompt.placement=[\"response\"]", "peft.prompt.placement", "unknown key"),
       ("data.packing=true", "peft.p_tuning.placement", "data.packing = false"),
       ("data.train_on_input=true", "peft.p_tuning.placement", "data.train_on_input = false")]


@pytest.mark.parametrize("override,key,message", BAD)
def test_bad_placement_is_one_error_line_naming_the_key(cli_dir, tmp_path, override, key, message):
    args = ["sft", "quickstart", f"model.path={cli_dir}", f"output.dir={tmp_path / 'out'}", "peft.method=p_tuning",
            "peft.p_tuning.num_virtual_tokens=4", "peft.p_tuning.placement=[\"response\"]", override]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and key in errors[0] and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_sft_dpo_reward_train_through_the_cli_and_generate_and_eval_serve_it(cli_dir, tmp_path):
    from peft_cli import preference_files, serve_with_adapter, two_steps_and_resume

    data = preference_files(tmp_path / "data")
    settings = ("peft.method=p_tuning", "peft.p_tuning.num_virtual_tokens=4", "peft.p_tuning.encoder_hidden_size=16",
                "peft.p_tuning.placement=[\"start:1\",\"response:3\"]")
    for verb, quantize in (("sft", "nf4"), ("dpo", "none"), ("reward", "nf4")):
        tensors = two_steps_and_resume(verb, cli_dir, tmp_path / verb, data, quantize, *settings)
        assert tensors["prompt_embeddings"].shape == (4, 64)
        saved = json.loads((tmp_path / verb / "adapter" / "adapter_config.json").read_text())
        assert saved["qtune_placement"] == ["start:1", "response:3"]
    with_adapter, without = serve_with_adapter(cli_dir, tmp_path / "sft" / "adapter", "none", tmp_path)
    assert abs(with_adapter - without) > 1e-4


def test_eval_harness_scores_continuations_after_the_placed_tokens(cli_dir, tmp_path):
    """lm-eval's log-likelihood of a continuation: the "response" tokens go between context and continuation."""
    pytest.importorskip("lm_eval")
    from qtune.train.harness import QtuneLM

    m = qtune_with("p_tuning", cli_dir, placement=SPLIT)
    save_adapter(m, tmp_path / "a")
    backend = QtuneLM(pretrained=str(cli_dir), adapter=str(tmp_path / "a"), quantize="none", dtype="float32",
                      batch_size=2)
    hf = hf_model(cli_dir)
    table = m.virtual_tokens.encoders["default"]().detach()
    with torch.no_grad():
        want = [reference_reply_logprobs(hf, table, p, r, 1).item() for p, r in ROWS]
    got = [logp for logp, _ in backend.score(ROWS)]
    assert max(abs(a - b) for a, b in zip(got, want)) <= TOL


@pytest.mark.parametrize("bad", [["middle"], ["start:1", "response:1"], "response", [3]])
def test_saved_placement_that_does_not_fit_is_refused_naming_the_file(tiny_dir, tmp_path, bad):
    from qtune.lora.peft import AdapterError

    save_adapter(qtune_with("p_tuning", tiny_dir, placement=SPLIT), tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "qtune_placement": bad}))
    (tmp_path / "a" / "qtune-manifest.json").unlink()  # as a hand-edited (or peft-written) directory has none
    m = load_model(tiny_dir, quantize="none")
    with pytest.raises(AdapterError, match="adapter_config.json: qtune_placement"):
        load_adapter(m, tmp_path / "a")
    assert m.virtual_tokens is None
