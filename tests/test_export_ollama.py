"""`qtune export-gguf --ollama`: the Modelfile's Go template renders conversations exactly as the Jinja
chat template does.

The reference on one side is the model's own Jinja template (rendered as transformers renders it); on the
other a small renderer, written here, of the Go-template subset Ollama's templates use ({{ .Field }},
range, if / else if / else, eq, variables declared with := and assigned with = (Go 1.11: an assignment inside
a range changes the variable declared outside it), and the {{- -}} whitespace trimming), fed the way Ollama
feeds it: the SYSTEM line first when the conversation has no system turn, then `.Messages`.
"""

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from qtune.cli.export_cmds import COMMANDS
from qtune.tokenizer import TokenizerError, load_tokenizer
from qtune.weights.ollama import modelfile_text
from test_data_tokenizer import CHATML, make_tokenizer_dir
from tiny import save_tiny_with_tokenizer

# Published chat templates of Llama 3 Instruct and Mistral Instruct v0.1 (data for the test, not code).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# google/gemma-2-*-it, microsoft/Phi-3-mini-*-instruct and microsoft/phi-4, as their tokenizer_config.json write them.
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4 = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>'"
    " + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# google/gemma-3-*-it and Qwen/Qwen3-*: the published templates kept as fixtures (sources in their SOURCES.md).
FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
PUBLISHED = {name: (FIXTURES / f"{name}.jinja").read_text()
             for name in ("gemma3", "qwen3", "llama3_1", "mixtral", "mistral_instruct_v0_2", "phi3_5")}
# Templates no fixed Go template can render as they do: refused, not written wrong.
UNWRITABLE = {name: (FIXTURES / f"{name}.jinja").read_text()
              for name in ("llama3_2",  # writes the day it renders on (strftime_now)
                           "mistral_nemo",  # moves the system text into the last user turn
                           "mistral_small_3_1")}  # a dated default system prompt

SYSTEM = {"role": "system", "content": "Answer briefly."}
TURNS = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?\nThink first."},
]
CONVERSATIONS = {"single": TURNS[:1], "multi": TURNS, "single-system": [SYSTEM, *TURNS[:1]],
                 "multi-system": [SYSTEM, *TURNS]}


# --- the Go-template subset ------------------------------------------------------------------------------

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


def lex(template: str) -> list[tuple[str, str]]:
    """[("text", ...), ("action", ...)], with `{{-` trimming the whitespace before and `-}}` after."""
    parts, pos, trim_next = [], 0, False
    for m in ACTION.finditer(template):
        text = template[pos:m.start()]
        text = text.lstrip() if trim_next else text
        parts += [("text", text.rstrip() if m[1] else text), ("action", m[2])]
        pos, trim_next = m.end(), bool(m[3])
    tail = template[pos:]
    return parts + [("text", tail.lstrip() if trim_next else tail)]


def parse(tokens, i=0):
    """Nodes up to the next end / else at tokens[i:]: text, ("field", f), ("range", f, body), ("if", branches)."""
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(value)
        elif value == "end" or value.startswith("else"):
            return nodes, i
        elif value.startswith("range "):
            body, i = parse(tokens, i + 1)
            nodes.append(("range", value.removeprefix("range "), body))
        elif value.startswith("if "):
            branches, condition = [], value.removeprefix("if ")
            while True:
                body, i = parse(tokens, i + 1)
                branches.append((condition, body))
                if tokens[i][1] == "end":
                    break
                condition = tokens[i][1].removeprefix("else if ") if tokens[i][1] != "else" else "true"
            nodes.append(("if", branches))
        elif re.fullmatch(r"\$\w+ :?= .*", value):
            name, _, expression = value.split(" ", 2)
            nodes.append(("set", name, expression))
        else:
            nodes.append(("field", value))
        i += 1
    return nodes, i


def evaluate(nodes, dot, root, variables=None) -> str:
    variables = {} if variables is None else variables  # one scope: what the templates here need of Go's

    def field(name):
        if name.startswith("$"):
            return variables[name]
        if name.startswith('"'):
            return shlex.split(name)[0]
        assert name.startswith("."), name
        return (root if name == ".Messages" else dot)[name[1:]]

    def test(condition):
        if condition == "true":
            return True
        if condition.startswith("$"):
            return bool(variables[condition])  # Go: an empty string is false
        op, name, literal = shlex.split(condition)
        assert op == "eq", condition
        return field(name) == literal

    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "field":
            out.append(field(node[1]))
        elif node[0] == "set":
            variables[node[1]] = field(node[2])
        elif node[0] == "range":
            out += [evaluate(node[2], item, root, variables) for item in field(node[1])]
        else:
            taken = next((body for condition, body in node[1] if test(condition)), [])  # only the first true branch runs
            out.append(evaluate(taken, dot, root, variables))
    return "".join(out)


def ollama_render(modelfile: str, messages: list[dict]) -> str:
    """What Ollama sends llama.cpp for a chat request with `messages` (its SYSTEM first when none is given)."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M)[1]
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile, re.S | re.M)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system[1]}, *messages]
    root = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    nodes, _ = parse(lex(template))
    return evaluate(nodes, root, root)


def test_go_subset_renderer_hand_example():
    template = '{{- range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }}\n{{- else }} A:{{ .Content }}{{ end }}\n{{ end -}}\n!'
    root = {"Messages": [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": "yo"}]}
    assert evaluate(parse(lex(template))[0], root, root) == "U:hi\n A:yo\n!"


def test_go_subset_renderer_carries_a_variable_across_iterations():
    template = '{{- $last := "" }}{{ range .Messages }}[{{ $last }}>{{ .Content }}]{{ $last = .Content }}{{ end }}'
    root = {"Messages": [{"Content": "a"}, {"Content": "b"}, {"Content": "c"}]}
    assert evaluate(parse(lex(template))[0], root, root) == "[>a][a>b][b>c]"


# --- Modelfiles against the Jinja templates --------------------------------------------------------------


def tokenizer_with(tmp_path, template):
    return load_tokenizer(make_tokenizer_dir(tmp_path / "tok", chat_template=template, add_bos=template != CHATML))


TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "gemma2": GEMMA2, "phi3": PHI3, "phi4": PHI4,
             **PUBLISHED}


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_modelfile_renders_like_the_chat_template(tmp_path, template, conversation):
    tok = tokenizer_with(tmp_path, TEMPLATES[template])
    messages = CONVERSATIONS[conversation]
    try:
        want = tok.apply_chat_template(messages, add_generation_prompt=True)
    except TokenizerError:
        pytest.skip(f"{template}'s template refuses this conversation (system turns)")
    if tok.add_bos_token:  # llama.cpp adds BOS itself, so the Go template leaves it out
        want = want.removeprefix(tok.special_tokens["bos_token"])
    assert ollama_render(modelfile_text(tok, "m.gguf", []), messages) == want


REFUSED = {"plain": "{% for m in messages %}{{ m['content'] }}{% endfor %}", **UNWRITABLE}


@pytest.mark.parametrize("template", REFUSED)
def test_unknown_chat_format_is_refused(tmp_path, template):
    tok = tokenizer_with(tmp_path, REFUSED[template])
    with pytest.raises(ValueError, match="none of the formats"):
        modelfile_text(tok, "m.gguf", [])


def test_cli_writes_modelfile_with_stop_token(tmp_path):
    model_dir = save_tiny_with_tokenizer("qwen2", tmp_path / "model")
    out = tmp_path / "out" / "tiny.gguf"
    group = __import__("click").Group("qtune", commands={c.name: c for c in COMMANDS})
    result = CliRunner().invoke(group, ["export-gguf", str(model_dir), str(out), "--ollama"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile.splitlines()
    tok = load_tokenizer(model_dir)
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    assert ollama_render(modelfile, TURNS) == tok.apply_chat_template(TURNS, add_generation_prompt=True)
