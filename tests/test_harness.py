"""The lm-evaluation-harness backend (`qtune eval-harness`, lm-eval's `qtune` model) against transformers + peft.

References: log-probabilities of the same tiny model and adapter computed by transformers with peft's
adapter; a local YAML task (a JSONL file, no download) run through the CLI, whose accuracy is recomputed
from the reference log-likelihoods.
"""

import json
import math

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


RECORDS = [
    {"instruction": "Name the colour of the sky.", "input": "", "output": "The sky is blue on a clear day."},
    {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "Five, since 2 + 3 = 5."},
    {"instruction": "Say hello.", "input": "", "output": "Hello, and welcome!"},
]
LL_TASK = """task: qtune_tiny_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
"""


def test_loglikelihoods_equal_qtune_eval_on_the_same_examples(model_and_adapter, backend, tmp_path):
    """`qtune eval` scores each Alpaca record's response and EOS after its prompt (mean loss over those tokens);
    lm-eval, through `qtune eval-harness` and a local loglikelihood task over the same (prompt, response + EOS)
    pairs, reports perplexity = exp(-mean log-likelihood per document). Both CLIs, same adapter, same sums."""
    from qtune.cli.eval_cmds import COMMANDS as HARNESS
    from qtune.cli.model_cmds import COMMANDS as MODEL
    from qtune.data.render import alpaca_prompt, tokenize_alpaca

    model_dir, adapter = model_and_adapter
    group = __import__("click").Group("qtune", commands={c.name: c for c in HARNESS + MODEL})
    common = ["--adapter", str(adapter), "--quantize", "none", "--dtype", "float32"]
    eos = backend.tok.decode([backend.tok.eos_id], skip_special=False)
    pairs, own = [], []
    for i, record in enumerate(RECORDS):
        pairs.append({"context": alpaca_prompt(record), "continuation": record["output"] + eos})
        ctx, cont = backend.encode_pair(pairs[-1]["context"], pairs[-1]["continuation"])
        ids, labels = tokenize_alpaca(record, backend.tok, train_on_input=False, where="record")
        assert ctx + cont == ids and cont == [t for t in labels if t != -100]  # the same tokens are scored
        data = tmp_path / f"record{i}.jsonl"
        data.write_text(json.dumps(record) + "\n")
        result = CliRunner().invoke(group, ["eval", str(model_dir), *common, "--data", str(data)],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        scored = json.loads(result.stdout.strip().splitlines()[-1])
        assert scored["tokens"] == len(cont)
        own.append(-scored["loss"] * scored["tokens"])  # the record's summed log-likelihood
    docs = tmp_path / "pairs.jsonl"
    docs.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "ll.yaml").write_text(LL_TASK.format(data=docs))
    result = CliRunner().invoke(group, ["eval-harness", str(model_dir), *common, "--tasks", "qtune_tiny_loglikelihood",
                                        "--include-path", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    perplexity = json.loads(result.stdout.strip().splitlines()[-1])["qtune_tiny_loglikelihood"]["perplexity,none"]
    assert -math.log(perplexity) == pytest.approx(sum(own) / len(own), rel=1e-5)
    # and one document at a time, through the backend lm-eval calls
    got = backend.loglikelihood(instances("loglikelihood", [(p["context"], p["continuation"]) for p in pairs]))
    assert [logp for logp, _ in got] == pytest.approx(own, rel=1e-5)


DISCOVERY = """
import sys
from lm_eval.api.registry import get_model
try:
    get_model("qtune")
    print("found", "qtune" in sys.modules)
except ValueError:
    import qtune.train.harness
    print("not found;", get_model("qtune").__name__)
"""


def test_lm_eval_does_not_discover_installed_backends_so_qtune_registers_on_import():
    """README ("Use your model elsewhere"): the installed lm-eval fills its model registry from its own table
    and from modules already imported, never from installed packages, so `lm_eval --model qtune` typed
    directly cannot find the backend; importing qtune.train.harness (as `qtune eval-harness` does) registers
    it. A fresh interpreter that has not imported qtune shows both. If this fails with "found", lm-eval has
    learnt plugin discovery: wire qtune into it and update the README."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", DISCOVERY], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "not found; QtuneLM"
