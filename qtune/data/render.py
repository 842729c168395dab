"""Records -> token ids and labels: the Alpaca, chat, ShareGPT and plain-text formats.

`labels` has one entry per input token: the token id where the loss is taken, -100 elsewhere. Position t of
`labels` is the target for the model's prediction made at position t-1 (the training loss shifts by one, as
in Hugging Face), so `labels[0]` is always -100: nothing predicts the first token, and in a packed row
that keeps one example from being trained to predict the start of the next.
"""

import numpy as np

from qtune.data.records import DataError
from qtune.tokenizer import TokenizerError

IGNORE = -100

# Stanford Alpaca's training prompts, verbatim (tatsu-lab/stanford_alpaca, train.py, PROMPT_DICT).
# The response follows "### Response:" directly and ends with EOS.
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}

# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FORMAT_FIELDS = {"chat": "messages", "sharegpt": "conversations", "alpaca": "instruction + output", "text": "text"}


def detect_format(row: dict, where: str) -> str:
    """The format a record's fields imply: messages -> chat, conversations -> sharegpt, instruction -> alpaca."""
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    expected = "; ".join(f"{fmt}: {fields}" for fmt, fields in FORMAT_FIELDS.items())
    raise DataError(f"{where}: cannot tell the format from fields {sorted(row)}; expected one of ({expected}), "
                    "or set data.format")


def _string(row: dict, key: str, where: str, fmt: str, required: bool = True, nonempty: bool = False) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise DataError(f"{where}: {fmt} record has no {key!r} field (fields: {sorted(row)})")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise DataError(f"{where}: {key!r} is empty; every example needs a response to train on")
    return value


def alpaca_prompt(row: dict, where: str = "record") -> str:
    """The Stanford Alpaca prompt for an instruction record (with the input section only if input is set)."""
    instruction = _string(row, "instruction", where, "alpaca")
    text_input = _string(row, "input", where, "alpaca", required=False)
    if text_input != "":
        return PROMPT_DICT["prompt_input"].format(instruction=instruction, input=text_input)
    return PROMPT_DICT["prompt_no_input"].format(instruction=instruction)


def chat_turns(turns, where: str, key: str, sharegpt: bool) -> list[dict]:
    """Chat messages {role, content} from a record's `key`: role/content turns, or ShareGPT from/value ones.

    Every turn must be a system, user or assistant turn with string text; a DataError names `where` and the
    turn otherwise.
    """
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{{role_key}, {text_key}}} objects")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or not isinstance(turn.get(text_key), str):
            raise DataError(f"{where}: {key}[{k}] must be an object with {role_key!r} and {text_key!r} (a string)")
        if not isinstance(turn[role_key], str):
            raise DataError(f"{where}: {key}[{k}].{role_key} must be a string, got {turn[role_key]!r}")
        role = SHAREGPT_ROLES.get(turn[role_key]) if sharegpt else turn[role_key]
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: {key}[{k}] has {role_key}={turn[role_key]!r}; expected one of "
                            f"{', '.join(SHAREGPT_ROLES if sharegpt else ('system', 'user', 'assistant'))}")
        messages.append({"role": role, "content": turn[text_key]})
    return messages



def to_messages(row: dict, fmt: str, where: str) -> list[dict]:
    """Chat (`messages` with role/content) or ShareGPT (`conversations` with from/value) as chat messages."""
    key = "messages" if fmt == "chat" else "conversations"
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {fmt} record needs a non-empty list {key!r} (fields: {sorted(row)})")
    messages = chat_turns(turns, where, key, sharegpt=fmt == "sharegpt")
    for k, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{where}: {key}[{k}] is an empty assistant reply; every reply needs text to train on")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be trained")
    return messages


def tokenize_alpaca(row: dict, tokenizer, train_on_input: bool, where: str) -> tuple[list[int], list[int]]:
    """[BOS] prompt response EOS; loss on the response and EOS (and on the prompt with train_on_input).

    Prompt and response are encoded separately, so the response's first token is exactly what the model
    must produce after the prompt at inference time (when the prompt is all it has).
    """
    output = _string(row, "output", where, "alpaca", nonempty=True)
    prompt_ids = tokenizer.encode(alpaca_prompt(row, where), add_bos=tokenizer.add_bos_token)
    response_ids = tokenizer.encode(output) + [tokenizer.eos_id]
    prompt_labels = prompt_ids if train_on_input else [IGNORE] * len(prompt_ids)
    return prompt_ids + response_ids, prompt_labels + response_ids


def render_chat(tokenizer, messages: list[dict], where: str, add_generation_prompt: bool = False) -> str:
    """`messages` through the model's chat template; a template that fails is a DataError naming the record too."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except TokenizerError as e:
        raise DataError(f"{where}: {e}") from None


def _encode_prefix(tokenizer, full_ids: list[int], text: str, where: str, what: str) -> int:
    """Token count of `text`, checking that its tokens begin `full_ids` (the prefix property)."""
    count = _token_prefix_len(tokenizer, full_ids, text)
    if count is None:
        raise DataError(f"{where}: the conversation up to {what} tokenizes differently on its own than inside the "
                        "whole conversation, so the assistant tokens cannot be located; the chat template must end "
                        "each turn at a token boundary (e.g. with a special token)")
    return count


def _token_prefix_len(tokenizer, full_ids: list[int], text: str) -> int | None:
    """Token count of `text` if its tokens begin `full_ids`, else None."""
    ids = tokenizer.encode(text)
    return len(ids) if full_ids[:len(ids)] == ids else None


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _reply_span(tokenizer, messages: list[dict], i: int, where: str) -> tuple[str, int, int]:
    """(text, start, end): render(messages) and where message i's reply text lies in it.

    The conversation is rendered again with that reply replaced by one character that differs from the reply's
    first and last (trimmed or not): the two renders agree up to the reply and again after it, so the text
    between is the reply as the template wrote it, wherever the template put it.
    """
    text = render_chat(tokenizer, messages, where)
    content = messages[i]["content"]
    ends = {content[:1], content[-1:], content.strip()[:1], content.strip()[-1:]}
    probe = next(c for c in "\u00a7\u00b6\u00a4\u00b5\u00a9" if c not in ends)
    other = render_chat(tokenizer, [*messages[:i], {**messages[i], "content": probe}, *messages[i + 1:]], where)
    start = _common_prefix(text, other)
    tail = _common_prefix(text[start:][::-1], other[start:][::-1])
    return text, start, len(text) - tail


def _turn_bounds(tokenizer, messages: list[dict], full: str, ids: list[int], i: int, where: str) -> tuple[str, str]:
    """Texts that end where assistant turn i's trained tokens start and end, both prefixes of `full`.

    The turn starts after render(messages[:i], add_generation_prompt=True) and ends with
    render(messages[:i+1]) when both are prefixes of the whole conversation (most templates). Some templates
    render a turn differently once later turns follow: Qwen3 drops the empty reasoning block of earlier replies,
    Phi-3 ends the conversation with EOS, Mistral Nemo moves the system prompt into the last user turn. There
    the reply is located in the whole conversation itself, and the turn runs on for as much of the template's
    closing text (e.g. "<|end|>\\n") as both renders share, up to a token boundary of `ids` (the whole
    conversation's tokens). The reply as the conversation shows it must end the reply as the last turn shows it
    (an earlier reply may lose its reasoning, not its answer).
    """
    prompt = render_chat(tokenizer, messages[:i], where, add_generation_prompt=True)
    ending = render_chat(tokenizer, messages[:i + 1], where)
    if full.startswith(prompt) and full.startswith(ending):
        return prompt, ending
    _, reply_start, reply_end = _reply_span(tokenizer, messages, i, where)
    last, last_start, last_end = _reply_span(tokenizer, messages[:i + 1], i, where)
    # Qwen3 keeps only the answer of an earlier reply, dropping the reasoning before it; anything else is refused
    if not last[last_start:last_end].endswith(full[reply_start:reply_end]):
        raise DataError(f"{where}: the chat template renders the reply of turn {i} differently once later turns "
                        "follow (it is not prefix-stable), so the text to train on is ambiguous; use a template "
                        "that renders earlier replies as it renders the last one")
    closing = _common_prefix(last[last_end:], full[reply_end:])
    # The shared text may stop inside a token ("<|end|>\\n<|" of "<|end|>\\n<|endoftext|>" and "<|end|>\\n<|user|>")
    while closing and _token_prefix_len(tokenizer, ids, full[:reply_end + closing]) is None:
        closing -= 1
    start = len(prompt) if full.startswith(prompt) else reply_start
    return full[:start], full[:reply_end + closing]


def turn_token_span(tokenizer, messages: list[dict], full: str, ids: list[int], i: int, where: str) -> tuple[int, int]:
    """(start, end): the tokens of `ids` (the tokens of `full`, the render of `messages`) that assistant turn i
    writes, its reply and the template's end of turn; a DataError when either end falls inside a token."""
    start_text, end_text = _turn_bounds(tokenizer, messages, full, ids, i, where)
    start = _encode_prefix(tokenizer, ids, start_text, where, f"the prompt of turn {i}")
    return start, _encode_prefix(tokenizer, ids, end_text, where, f"the end of turn {i}")


def tokenize_chat(messages: list[dict], tokenizer, train_on_input: bool, where: str) -> tuple[list[int], list[int]]:
    """The conversation rendered with the model's chat template; loss on every assistant turn.

    Turn i's trained tokens run from the end of render(messages[:i], add_generation_prompt=True) to the end of
    render(messages[:i+1]), located in the whole conversation's render (see _turn_bounds for templates that
    render earlier turns differently). Each boundary must fall between tokens of the whole conversation;
    templates that break that are reported rather than guessed at.
    """
    if not tokenizer.has_chat_template:
        raise DataError(f"{where}: chat data needs a chat template, and the model's tokenizer has none; "
                        "use an instruct model or set data.format = \"alpaca\" with instruction/output records")
    full = render_chat(tokenizer, messages, where)
    ids = tokenizer.encode(full)
    labels = list(ids) if train_on_input else [IGNORE] * len(ids)
    last_end, last_span = 0, []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, last_end = turn_token_span(tokenizer, messages, full, ids, i, where)
        labels[start:last_end] = ids[start:last_end]
        last_span = ids[start:last_end]
    # Templates end assistant turns with their own end-of-turn token; add EOS only if the last turn lacks one.
    if not any(t in tokenizer.eos_ids for t in last_span):
        ids = ids[:last_end] + [tokenizer.eos_id] + ids[last_end:]
        labels = labels[:last_end] + [tokenizer.eos_id] + labels[last_end:]
    return ids, labels


def tokenize_text(row: dict, tokenizer, where: str) -> tuple[list[int], list[int]]:
    """Plain text: [BOS] text EOS, every token trained."""
    text = _string(row, "text", where, "text", nonempty=True)
    ids = tokenizer.encode(text, add_bos=tokenizer.add_bos_token) + [tokenizer.eos_id]
    return ids, list(ids)


def tokenize_record(row: dict, fmt: str, tokenizer, train_on_input: bool, where: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record in format `fmt` (alpaca | chat | sharegpt | text), untruncated."""
    if fmt == "alpaca":
        return tokenize_alpaca(row, tokenizer, train_on_input, where)
    if fmt in ("chat", "sharegpt"):
        return tokenize_chat(to_messages(row, fmt, where), tokenizer, train_on_input, where)
    if fmt == "text":
        return tokenize_text(row, tokenizer, where)
    raise ValueError(f"unknown format {fmt!r}")


def finish_example(ids: list[int], labels: list[int], max_seq_len: int):
    """Truncate to max_seq_len and mask the first label -> (ids, labels, truncated), or None if nothing is trained."""
    truncated = len(ids) > max_seq_len
    ids, labels = np.asarray(ids[:max_seq_len], np.int32), np.asarray(labels[:max_seq_len], np.int32)
    labels[0] = IGNORE
    if not (labels != IGNORE).any():
        return None
    return ids, labels, truncated
