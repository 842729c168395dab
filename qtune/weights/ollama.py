"""Ollama `Modelfile` for an exported GGUF: FROM, TEMPLATE, SYSTEM, PARAMETER stop.

Ollama renders prompts with Go templates, not the Jinja chat template inside the GGUF, so each chat
format qtune's families use is written here once in Go-template syntax (over Ollama's `.Messages`, with
`.Role` and `.Content`). A template's default system prompt (ChatML templates insert one when the
conversation has none) becomes the SYSTEM line, which Ollama puts first when a request has no system turn.
BOS is not in the Go templates: llama.cpp adds it itself when the file's add_bos_token says so.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from qtune.tokenizer import Tokenizer, TokenizerError


@dataclass(frozen=True)
class ChatFormat:
    """One chat format: how to recognise its Jinja template and how Ollama writes it."""

    marker: str
    """A string only this format's Jinja templates contain."""
    template: str
    """The Go template; `{eos}` stands for the tokenizer's EOS token."""
    unlike: str | None = None
    """A string that rules the format out although the marker is there (a variant this template does not write)."""


# The chat formats of the families qtune trains, one row each; the first whose marker the template contains wins.
CHAT_FORMATS = {
    # Phi-4: ChatML's tokens, role and text separated by <|im_sep|> instead of a newline.
    "phi4": ChatFormat("<|im_sep|>", "{{- range .Messages }}<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>"
                                     "{{ end }}<|im_start|>assistant<|im_sep|>"),
    # Qwen2, SmolLM2 and every other ChatML model.
    "chatml": ChatFormat("<|im_start|>", "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                                         "{{ end }}<|im_start|>assistant\n"),
    # Llama 3.1 Instruct: a system header always opens the prompt, with the knowledge and (fixed) date lines, then
    # the system turn's text. Llama 3.2's template writes the day it renders on (strftime_now): no fixed template can.
    "llama3.1": ChatFormat("Cutting Knowledge Date", '{{- $system := "" }}{{- range .Messages }}'
                           '{{- if eq .Role "system" }}{{ $system = .Content }}{{- end }}{{- end }}'
                           "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                           "Today Date: 26 Jul 2024\n\n{{ $system }}<|eot_id|>"
                           '{{- range .Messages }}{{- if eq .Role "system" }}{{- else }}<|start_header_id|>{{ .Role }}'
                           "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{- end }}{{- end }}"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n", unlike="strftime_now"),
    # Llama 3 Instruct.
    "llama3": ChatFormat("<|start_header_id|>", "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>"
                                                "\n\n{{ .Content }}<|eot_id|>{{ end }}"
                                                "<|start_header_id|>assistant<|end_header_id|>\n\n",
                         unlike="Cutting Knowledge Date"),
    # Mistral Instruct v0.2 / v0.3: " [INST] " with spaces, the system text opening the first user turn.
    "mistral-v0.2": ChatFormat("' [INST] ' + system_message", '{{- $system := "" }}{{- range .Messages }}'
                               '{{- if eq .Role "system" }}{{ $system = .Content }}'
                               '{{- else if eq .Role "user" }} [INST] '
                               '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ .Content }} [/INST]'
                               '{{- else if eq .Role "assistant" }} {{ .Content }}{eos}{{- end }}{{- end }}'),
    # Mistral Instruct v0.1, Mixtral, Llama 2: [INST] user turns, assistant turns closed by EOS. (Mistral Nemo and
    # Small 3 write "[INST]" without spaces, move the system text or insert a dated default: none is written here.)
    "mistral": ChatFormat("'[INST] ' + message['content'] + ' [/INST]'",
                          '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
                          '{{ else if eq .Role "assistant" }}{{ .Content }}{eos}{{ end }}{{ end }}'),
    # Gemma 3 Instruct: Gemma's turns, and a system turn's text opens the first user turn, followed by a blank
    # line (its Jinja template's first_user_prefix). Go templates can assign to a variable declared outside a range
    # (Go 1.11), which carries the system text to the next turn.
    "gemma3": ChatFormat("first_user_prefix", '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}'
                                              '{{ $system = .Content }}{{- else }}<start_of_turn>'
                                              '{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
                                              '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}'
                                              "{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n"),
    # Gemma 2 Instruct: the assistant's role is "model", every turn closed by <end_of_turn> (no system turns).
    "gemma": ChatFormat("<start_of_turn>", '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model'
                                           '{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}'
                                           "<start_of_turn>model\n"),
    # Phi-3 / 3.5 Instruct: <|role|> headers, every turn closed by <|end|>.
    "phi3": ChatFormat("<|end|>", "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n"),
}


def chat_format(tok: Tokenizer) -> ChatFormat | None:
    """The row of CHAT_FORMATS the tokenizer's chat template follows, None when none does."""
    template = tok.chat_template or ""
    return next((f for f in CHAT_FORMATS.values() if f.marker in template and not (f.unlike and f.unlike in template)),
                None)


def default_system_prompt(tok: Tokenizer) -> str | None:
    """The system prompt the Jinja template inserts when a conversation has none (None when it inserts none).

    The template renders a conversation with a probe system turn and one without; the text that stands
    where the probe stood in the first is the default."""
    probe, user = "\x00qtune-probe\x00", [{"role": "user", "content": "Hi"}]
    try:
        with_probe = tok.apply_chat_template([{"role": "system", "content": probe}, *user])
    except TokenizerError:  # a template that refuses system turns (Mistral's) has no default either
        return None
    before, after = with_probe.split(probe)
    without = tok.apply_chat_template(user)
    if without.startswith(before) and without.endswith(after) and len(without) > len(before) + len(after):
        return without[len(before):len(without) - len(after)]
    return None


def modelfile_text(tok: Tokenizer, gguf_name: str, stop_tokens: list[str]) -> str:
    """The Modelfile for the GGUF file `gguf_name` (next to it) of a model with tokenizer `tok`."""
    fmt = chat_format(tok)
    if fmt is None:
        raise ValueError(f"{tok.model_dir}: its chat template is none of the formats qtune writes for Ollama "
                         f"({', '.join(CHAT_FORMATS)}); write the Modelfile's TEMPLATE by hand")
    template = fmt.template.replace("{eos}", tok.special_tokens.get("eos_token", ""))
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    system = default_system_prompt(tok)
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    return "\n".join(lines) + "\n"


def write_modelfile(text: str, gguf_path: Path) -> Path:
    """Write `text` as `Modelfile` beside `gguf_path` (all or nothing) and return its path."""
    path = Path(gguf_path).parent / "Modelfile"
    tmp = path.with_name(f".Modelfile.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
