"""Tokenizers of Hugging Face model directories, and their Jinja chat templates.

One `Tokenizer` over either backend a model directory can hold:
  - `tokenizer.json`   -> the `tokenizers` library (BPE, byte-level or byte-fallback, unigram ...)
  - `tokenizer.model`  -> the `sentencepiece` library (Llama-1/2, Mistral v0.1 ...)
`tokenizer.json` wins when both are present, as it does in `transformers`.

Special tokens come from `tokenizer_config.json` (then `special_tokens_map.json`), the extra ids that end
generation from `generation_config.json`. The chat template is rendered the way `transformers` renders it
(sandboxed Jinja, trim_blocks + lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that does not
escape HTML), so a prompt built here tokenizes to exactly what the model saw in training.
"""

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qtune.weights.hub import ALIASES, resolve_model_path

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

# A protobuf suffix that sets ModelProto.normalizer_spec (field 3) .add_dummy_prefix (field 3) = false.
# Protobuf merges a repeated occurrence of an embedded message into the first one, so appending these
# bytes to a serialized sentencepiece model turns off the leading "▁" and changes nothing else.
_NO_DUMMY_PREFIX = bytes([0x1A, 0x02, 0x18, 0x00])


class TokenizerError(ValueError):
    """A tokenizer file qtune cannot use, or a chat template that fails; the message names the file and the fix."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err}); re-download or re-convert the model") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}; re-download or "
                             "re-convert the model")
    return data


def _token_content(value, source: Path, key: str) -> str | None:
    """A special token as configs spell it: a string, or an AddedToken dict with a "content" key."""
    content = value.get("content") if isinstance(value, dict) else value
    if content is not None and not isinstance(content, str):
        raise TokenizerError(f"{source}: {key} must be a token (a string, or an object with a string 'content'), "
                             f"got {value!r:.60}")
    return content


def _added_tokens(config: dict, source: Path) -> dict[int, dict]:
    """tokenizer_config.json's added_tokens_decoder: {"id": {"content": token, "special": bool, ...}}."""
    declared = config.get("added_tokens_decoder", {})
    added = {}
    for i, spec in (declared.items() if isinstance(declared, dict) else [(None, declared)]):
        if not (isinstance(i, str) and i.isdigit() and isinstance(spec, dict) and isinstance(spec.get("content"), str)
                and spec["content"] and all(isinstance(spec.get(flag, False), bool) for flag in ("special", "normalized"))):
            raise TokenizerError(f"{source}: added_tokens_decoder must map token ids (\"32000\") to objects with a "
                                 f"non-empty string 'content' (and true/false 'special', 'normalized'); found "
                                 f"{i!r}: {spec!r:.60}")
        added[int(i)] = spec
    return added


class _HFTokenizerJson:
    """The `tokenizers` backend: added tokens, normalizer and pre-tokenizer all live in tokenizer.json."""

    def __init__(self, path: Path, added_tokens: dict[int, dict]):
        from tokenizers import AddedToken, Tokenizer as RustTokenizer

        try:
            self.tok = RustTokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception for any file it cannot read
            raise TokenizerError(f"{path}: not a tokenizer the tokenizers library can read ({err}); re-download "
                                 "or re-convert the model") from None
        # tokenizer_config.json may declare added tokens that tokenizer.json lacks; transformers adds them too.
        for spec in added_tokens.values():
            if self.tok.token_to_id(spec["content"]) is None:
                special = spec.get("special", False)
                added = AddedToken(spec["content"], special=special, normalized=spec.get("normalized", not special))
                if special:
                    self.tok.add_special_tokens([added])
                else:
                    self.tok.add_tokens([added])

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def id_limit(self) -> int:
        """One past the largest id (ids of added tokens need not follow the vocabulary's without a gap)."""
        return max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)


class _SentencePieceModel:
    """The `sentencepiece` backend, with added/special tokens matched whole in the text as transformers does.

    `legacy` is transformers' flag: True encodes every stretch of text between special tokens as if it began
    the input (with sentencepiece's leading "▁"); False gives only the first stretch that "▁".
    """

    def __init__(self, path: Path, added_tokens: dict[int, dict], legacy: bool):
        import sentencepiece

        proto = path.read_bytes()
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as err:
            raise TokenizerError(f"{path}: not a sentencepiece model ({err}); re-download or re-convert the "
                                 "model") from None
        self.sp_no_prefix = sentencepiece.SentencePieceProcessor(model_proto=proto + _NO_DUMMY_PREFIX)
        self.legacy = legacy
        n = self.sp.get_piece_size()
        # Control pieces (<s>, </s>) are special; user-defined pieces are added but not special.
        self.added = {spec["content"]: i for i, spec in added_tokens.items()}
        self.special_ids = {i for i, spec in added_tokens.items() if spec.get("special", True)}
        for i in range(n):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                self.added.setdefault(self.sp.id_to_piece(i), i)
                self.special_ids.add(i)
        self.id_to_added = {i: token for token, i in self.added.items()}
        self.vocab_size = self.id_limit = max([n, *[i + 1 for i in self.id_to_added]])
        # Longest first, so "<|im_start|>" wins over a shorter token that is its prefix.
        alternatives = sorted(self.added, key=len, reverse=True)
        self.split_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None

    def encode(self, text: str) -> list[int]:
        pieces = self.split_re.split(text) if self.split_re else [text]
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2 == 1:  # re.split puts the matched separators at odd positions
                ids.append(self.added[piece])
            elif piece:
                first = k == 0
                ids += (self.sp if self.legacy or first else self.sp_no_prefix).encode(piece)
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        # Pieces -> bytes ("▁" is a space, "<0x0A>" a raw byte), then drop the one leading space the
        # dummy prefix added: the same steps as transformers' Llama decoder.
        out = bytearray()
        for i in ids:
            if i in self.id_to_added:
                if not (skip_special and i in self.special_ids):
                    out += self.id_to_added[i].encode()
            elif self.sp.is_byte(i):
                out.append(int(self.sp.id_to_piece(i)[3:5], 16))
            else:
                out += self.sp.id_to_piece(i).replace("\u2581", " ").encode()
        text = out.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None  # unknown pieces map to <unk>'s id

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self.id_to_added:
            return self.id_to_added[token_id]
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.sp.get_piece_size() else None


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text in some templates; it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _pick_chat_template(model_dir: Path, config: dict) -> tuple[str | None, Path]:
    """The template from chat_template.jinja, else tokenizer_config's `chat_template` (a string or named list),
    and the file it came from."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), jinja_file
    source = model_dir / "tokenizer_config.json"
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        if not all(isinstance(entry, dict) and {"name", "template"} <= entry.keys() for entry in template):
            raise TokenizerError(f"{source}: chat_template is a list, so each entry must be an object with "
                                 "'name' and 'template'")
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{source}: chat_template must be a string (or a list of named templates), got "
                             f"{type(template).__name__}")
    return template, source


class Tokenizer:
    """Text <-> token ids for one model directory, with its special tokens and chat template.

    Attributes: bos_id, eos_id, pad_id (falls back to eos), unk_id; eos_ids (every id that ends generation);
    vocab_size; add_bos_token (whether the model expects BOS at the start of a sequence); has_chat_template.
    """

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        config = _read_json(self.model_dir / "tokenizer_config.json")
        special_map = _read_json(self.model_dir / "special_tokens_map.json")
        added_tokens = _added_tokens(config, self.model_dir / "tokenizer_config.json")
        if (self.model_dir / "tokenizer.json").is_file():
            self._backend = _HFTokenizerJson(self.model_dir / "tokenizer.json", added_tokens)
        elif (self.model_dir / "tokenizer.model").is_file():
            legacy = config.get("legacy", True)
            self._backend = _SentencePieceModel(self.model_dir / "tokenizer.model", added_tokens, legacy)
        else:
            raise FileNotFoundError(
                f"{self.model_dir}: no tokenizer.json or tokenizer.model; a model directory needs one of them"
            )
        self._check_fits_embedding()
        self._set_special_tokens(config, special_map)
        self.add_bos_token = bool(config.get("add_bos_token", isinstance(self._backend, _SentencePieceModel)))
        self.chat_template, self.chat_template_file = _pick_chat_template(self.model_dir, config)

    def _check_fits_embedding(self) -> None:
        """Every id must index a row of the model's embedding (config.json's vocab_size), or the model fails on
        the first such token with an index error."""
        rows = _read_json(self.model_dir / "config.json").get("vocab_size")
        limit = self._backend.id_limit
        if isinstance(rows, int) and not isinstance(rows, bool) and 0 < rows < limit:
            raise TokenizerError(
                f"{self.model_dir}: the tokenizer's ids run up to {limit - 1}, but config.json's vocab_size is {rows} "
                "(the embedding has that many rows): the tokenizer files and the weights belong to different models; "
                "put the model's own tokenizer.json / tokenizer.model beside its weights")

    def _fallback_ids(self, generation: dict) -> dict[str, int]:
        """Special-token ids for keys the tokenizer configs do not mention at all."""
        model_config = _read_json(self.model_dir / "config.json")
        ids = {}
        for key in ("bos_token", "eos_token"):
            token_id = generation.get(f"{key}_id", model_config.get(f"{key}_id"))
            ids[key] = token_id[0] if isinstance(token_id, list) else token_id
        if isinstance(self._backend, _SentencePieceModel):  # the ids the sentencepiece model was trained with
            sp = self._backend.sp
            trained = (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())  # -1 when the model has none
            ids.update({key: i for key, i in zip(SPECIAL_TOKEN_KEYS, trained) if i >= 0})
        return {key: i for key, i in ids.items() if i is not None}

    def _set_special_tokens(self, config: dict, special_map: dict) -> None:
        generation = _read_json(self.model_dir / "generation_config.json")
        fallback = self._fallback_ids(generation)
        self.special_tokens: dict[str, str] = {}
        ids: dict[str, int | None] = {}
        for key in SPECIAL_TOKEN_KEYS:
            if key in config or key in special_map:  # an explicit null means "this model has none"
                source = self.model_dir / ("tokenizer_config.json" if key in config else "special_tokens_map.json")
                content = _token_content(config[key] if key in config else special_map[key], source, key)
                token_id = self._backend.token_to_id(content) if content is not None else None
                if content is not None and token_id is None:
                    raise TokenizerError(
                        f"{self.model_dir}/tokenizer_config.json: {key}={content!r} is not in the vocabulary"
                    )
            else:
                token_id = fallback.get(key)
                content = self._backend.id_to_token(token_id) if token_id is not None else None
            ids[key] = token_id
            if content is not None:
                self.special_tokens[key] = content
        self.bos_id, self.eos_id, self.unk_id = ids["bos_token"], ids["eos_token"], ids["unk_token"]
        self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id
        extra_eos = generation.get("eos_token_id", [])
        extra_eos = extra_eos if isinstance(extra_eos, list) else [extra_eos]
        self.eos_ids = {i for i in [self.eos_id, *extra_eos] if i is not None}

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. "<|im_end|>") become their ids."""
        ids = self._backend.encode(text)
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.model_dir}: add_bos=True but the tokenizer has no bos_token")
            ids = [self.bos_id, *ids]
        if add_eos:
            if self.eos_id is None:
                raise TokenizerError(f"{self.model_dir}: add_eos=True but the tokenizer has no eos_token")
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless `skip_special=False`."""
        return self._backend.decode(list(ids), skip_special)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (or added token), None when it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **template_vars) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's own chat template.

        The result already holds the template's special tokens (e.g. BOS), so encode it with add_bos=False.
        Extra keyword arguments reach the template as variables (e.g. `tools=[...]`).
        """
        if not self.has_chat_template:
            raise TokenizerError(
                f"{self.model_dir}: the tokenizer has no chat template; add `chat_template` to tokenizer_config.json "
                "or a chat_template.jinja file, or format prompts yourself"
            )
        variables = {"tools": None, "documents": None, **self.special_tokens, **template_vars}
        try:
            template = _compile_chat_template(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        # A syntax error, the template's raise_exception, a sandbox refusal, or a bug in the template's own code
        # (1 / 0, a list + a number): the template is the model's data, so its failure is the user's error.
        except Exception as err:
            raise TokenizerError(f"{self.chat_template_file}: the chat template failed "
                                 f"({type(err).__name__}: {err}); fix the template or use the model's original "
                                 "one") from None


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory or alias (tokenizer.json preferred over tokenizer.model)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        if str(model_dir) not in ALIASES:
            raise FileNotFoundError(f"{model_dir}: not a directory; pass a model directory or an alias "
                                    f"({', '.join(ALIASES)}; see `qtune pull`)")
        model_dir = Path(resolve_model_path(str(model_dir)))
    return Tokenizer(model_dir)
