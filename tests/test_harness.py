"""The lm-evaluation-harness backend (`qtune eval-harness`, lm-eval's `qtune` model) against transformers + peft.

References: log-probabilities of the same tiny model and adapter computed by transformers with peft's
adapter; a local YAML task (a JSONL file, no download) run through the CLI, whose accuracy is recomputed
from the reference log-likelihoods.
"""

import json

import pytest
import torch
from click.testing import CliRunner

from qtune.lora import LoraConfig, add_lora, adapter_parameters
from qtune.peft import save_adapter
from qtune.weights.checkpoint import load_model
from tiny import save_tiny_with_tokenizer

lm_eval = pytest.importorskip("lm_eval")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

DOCS = [
    {"question": "Colour of the sky?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "Two plus two is", "choices": ["five", "four"], "answer": 1},
    {"question": "The opposite of hot is", "choices": ["cold", "warm", "tepid"], "answer": 0},
]
CHOICE_TASK = """task: qtune_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_TASK = """task: qtune_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The local task must not need the network."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    model_dir = save_tiny_with_tokenizer("llama", root / "model")
    model = load_model(model_dir, quantize="none", dtype=torch.float32)
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model_dir, save_adapter(model, root / "adapter")


@pytest.fixture(scope="module")
def reference(model_and_adapter):
    model_dir, adapter = model_and_adapter
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter).eval()


def reference_logprob(model, ids: list[int], n_cont: int) -> float:
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
    targets = torch.tensor(ids[1:])
    return float(logp[torch.arange(len(ids) - 1), targets][-n_cont:].sum())


@pytest.fixture(scope="module")
def backend(model_and_adapter):
    from qtune.train.harness import QtuneLM

    model_dir, adapter = model_and_adapter
    return QtuneLM(pretrained=str(model_dir), adapter=str(adapter), quantize="none", dtype="float32", batch_size=2)


def instances(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, i) for i, args in enumerate(args_list)]


def test_loglikelihood_equals_transformers_with_peft(backend, reference):
    pairs = [("Colour of the sky?", " blue"), ("Hello ", "world, and more words"), ("One", " two three four")]
    got = backend.loglikelihood(instances("loglikelihood", pairs))
    for (context, continuation), (logp, _) in zip(pairs, got):
        ctx, cont = backend.encode_pair(context, continuation)
        assert logp == pytest.approx(reference_logprob(reference, ctx + cont, len(cont)), abs=1e-4)


def test_loglikelihood_of_a_soft_capped_family_equals_transformers(tmp_path):
    """Gemma 2 caps its final logits (tiny: at 0.5, where tanh bends them): the scores are of the capped logits."""
    from qtune.train.harness import QtuneLM

    model_dir = save_tiny_with_tokenizer("gemma2", tmp_path / "gemma2")
    backend = QtuneLM(pretrained=str(model_dir), quantize="none", dtype="float32", batch_size=2)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pairs = [("Colour of the sky?", " blue"), ("One", " two three four")]
    got = backend.loglikelihood(instances("loglikelihood", pairs))
    for (context, continuation), (logp, _) in zip(pairs, got):
        ctx, cont = backend.encode_pair(context, continuation)
        assert logp == pytest.approx(reference_logprob(reference, ctx + cont, len(cont)), abs=1e-4)


def test_rolling_loglikelihood_scores_every_token_after_the_prefix(backend, reference):
    text = "A short document whose every token is scored."
    [got] = backend.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    ids = backend.tok.encode(text)
    assert got == pytest.approx(reference_logprob(reference, [backend.prefix, *ids], len(ids)), abs=1e-4)


def test_local_tasks_through_the_cli(model_and_adapter, backend, reference, tmp_path):
    from qtune.cli.eval_cmds import COMMANDS

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "choice.yaml").write_text(CHOICE_TASK.format(data=data))
    (tmp_path / "gen.yaml").write_text(GEN_TASK.format(data=data))
    model_dir, adapter = model_and_adapter
    group = __import__("click").Group("qtune", commands={c.name: c for c in COMMANDS})
    result = CliRunner().invoke(group, ["eval-harness", str(model_dir), "--adapter", str(adapter), "--quantize", "none",
                                        "--dtype", "float32", "--tasks", "qtune_tiny_choice,qtune_tiny_gen",
                                        "--include-path", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout.strip().splitlines()[-1])
    correct = []
    for doc in DOCS:  # lm-eval joins question and choice with " "
        scores = []
        for choice in doc["choices"]:
            ctx, cont = backend.encode_pair(doc["question"], " " + choice)
            scores.append(reference_logprob(reference, ctx + cont, len(cont)))
        correct.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert results["qtune_tiny_choice"]["acc,none"] == pytest.approx(sum(correct) / len(DOCS))
    assert "exact_match,none" in results["qtune_tiny_gen"]  # generation ran


def test_unknown_task_and_missing_package_are_one_error_line(model_and_adapter, monkeypatch):
    from qtune.cli.eval_cmds import COMMANDS

    group = __import__("click").Group("qtune", commands={c.name: c for c in COMMANDS})
    args = ["eval-harness", str(model_and_adapter[0]), "--quantize", "none", "--tasks", "no_such_task_here"]
    result = CliRunner().invoke(group, args, catch_exceptions=False)
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(error_lines) == 1 and error_lines[0].startswith("Error: --tasks no_such")
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # as if the extra were not installed
    result = CliRunner().invoke(group, args, catch_exceptions=False)
    assert result.exit_code == 1 and result.output == "Error: lm-evaluation-harness is not installed; install it " \
                                                      "with: pip install 'qtune[eval]'\n"
