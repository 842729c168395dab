"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): N trainable *virtual tokens* whose
embeddings go in front of the input embeddings, through the model's `virtual_tokens` slot.

    prompt tuning:  P = E                        E (N, D) trained directly (random, or a text's embeddings)
    P-tuning:       P = MLP(E) or MLP(BiLSTM(E))  the prompt encoder reparameterises E during training

On disk (PEFT's format, peft_type PROMPT_TUNING / P_TUNING): `prompt_embeddings` (N, D) = P, the encoder
folded away, as PEFT's `get_prompt_embedding_to_save` writes it; a loaded P-tuning adapter is that plain
table. The virtual tokens take positions 0..N-1 and attend only to each other; every real token attends to
them, in a packed row too (each packed example sees them as if it were alone). So they come first, as PEFT
puts them; P-tuning's `[peft.p_tuning] placement` may put some or all of them inside the example instead
(before the reply, as the paper's templates do: placement.py), a qtune field of adapter_config.json
(`qtune_placement`) that PEFT ignores, so PEFT serves only the leading placement the same.

Neither method changes a weight, so `qtune merge` refuses them: serve the adapter with --adapter.
"""

from pathlib import Path

import torch
from torch import nn

from qtune.lora.adapters import _check_new_name, set_active_adapter
from qtune.lora.host import AdapterHost
from qtune.lora.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError
from qtune.peft.base import PeftMethod
from qtune.peft.placement import prompt_with_virtual
from qtune.recipe.peft import parse_placement
from qtune.tokenizer import load_tokenizer
from qtune.weights.checkpoint import resolve

NOT_FOLDABLE = ("its virtual tokens are extra inputs, not a change of any weight; serve the base model with "
                "--adapter instead")
EMBEDDINGS_KEY = "prompt_embeddings"


class TokenTable(nn.Module):
    """A plain table of virtual-token vectors (N, dim), trained as they are (PEFT's `embedding.weight`)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(weight.float(), freeze=False)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (N, dim)


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder over N free embeddings E (N, D), as PEFT's `PromptEncoder` builds it:
    "mlp": Linear(D, h) ReLU Linear(h, h) ReLU Linear(h, D); "lstm": a 2-layer bidirectional LSTM of width h
    and then Linear(2h, 2h) ReLU Linear(2h, D). Parameter names are PEFT's."""

    def __init__(self, n: int, dim: int, hidden: int, kind: str):
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(n, dim)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight[None]  # (1, N, D)
        if self.kind == "lstm":
            e = self.lstm_head(e)[0]  # (1, N, 2h)
        return self.mlp_head(e)[0]  # (N, D)


class EncoderHost(AdapterHost):
    """A model slot carrying one virtual-token encoder per adapter (`encoders[name]()` -> its table) and the
    PEFT config fields each adapter was made with (`settings[name]`, written back on save)."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict()
        self.settings: dict[str, dict] = {}

    def add(self, name: str, method: str, encoder: nn.Module, settings: dict) -> None:
        self.encoders[name] = encoder
        self.methods[name] = method
        self.settings[name] = settings

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.encoders[name].parameters()) if name in self.encoders else []

    def active_table(self) -> torch.Tensor | None:
        """The active adapter's table, or None when the active adapter (if any) is not carried here."""
        return self.encoders[self.active]() if self.active in self.encoders else None


class VirtualTokens(EncoderHost):
    """The model's `virtual_tokens` slot: the active adapter's N virtual-token embeddings, in front of a batch
    (`forward`) or, for a P-tuning adapter placed inside the input, as the rows of ids V .. V+N-1 (`placed`)."""

    def __init__(self):
        super().__init__()
        self.vocab_size = 0  # V: the first id that names a placed virtual token
        self.placements: dict[str, tuple] = {}  # adapter -> ((anchor, count), ...) where not all lead

    def place(self, name: str, placement: tuple, vocab_size: int) -> None:
        """Put adapter `name`'s virtual tokens at `placement`'s anchors (nothing changes for all at "start")."""
        if placement != (("start", sum(c for _, c in placement)),):
            self.placements[name], self.vocab_size = placement, vocab_size

    def placement(self) -> tuple | None:
        """The active adapter's placement when its tokens go inside the input, else None."""
        return self.placements.get(self.active)

    def forward(self, batch_size: int) -> torch.Tensor | None:
        table = None if self.placement() else self.active_table()
        return None if table is None else table.unsqueeze(0).expand(batch_size, -1, -1)  # (B, N, D)

    def placed(self) -> torch.Tensor | None:
        """(N, D): the embeddings of ids V .. V+N-1 while the active adapter places its tokens in the input."""
        return self.active_table() if self.placement() else None

    def place_prompt(self, ids: list[int]) -> list[int]:
        """A prompt's ids as generation feeds them: with the placed virtual tokens, if any, at their anchors."""
        placement = self.placement()
        return ids if placement is None else prompt_with_virtual(ids, placement, self.vocab_size)


def slot_host(model: nn.Module, slot: str, make_host) -> EncoderHost:
    """The host in `model.<slot>`, put there on first use."""
    if getattr(model, slot, None) is None:
        setattr(model, slot, make_host().to(model.model.embed_tokens.weight.device))
    return getattr(model, slot)


def seeded(seed: int, build):
    """`build()` under a fixed seed, with PyTorch's default initialisers; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def check_packing(model: nn.Module, recipe, n: int) -> None:
    """Refuse packed rows where a sliding window is shorter than a row plus the n virtual positions: a packed
    example's distance to them grows with the examples before it, so the window could hide them where, alone,
    it would not."""
    data, window = getattr(recipe, "data", None), model.config.sliding_window
    if getattr(data, "packing", False) and window is not None and window < getattr(data, "max_seq_len", window) + n:
        raise ValueError(f"[peft] method = {recipe.peft.method!r} with data.packing = true on a model with a "
                         f"{window}-token sliding window: packed examples would lose sight of the virtual tokens; set "
                         "data.packing = false")


def add_encoder(model: nn.Module, slot: str, make_host, name: str, method: str, encoder: nn.Module,
                settings: dict) -> None:
    """Put adapter `name`'s encoder in the model's slot (fp32, on the model's device) and make it active."""
    _check_new_name(model, name)
    host = slot_host(model, slot, make_host)
    host.add(name, method, encoder.float().to(model.model.embed_tokens.weight.device), settings)
    set_active_adapter(model, name)


def host_of(model: nn.Module, slot: str, name: str) -> EncoderHost:
    host = getattr(model, slot, None)
    if host is None or name not in host.encoders:
        raise ValueError(f"no {slot} adapter {name!r} on this model")
    return host


def common_config(model: nn.Module, peft_type: str, n: int, token_dim: int, heads: int) -> dict:
    """The fields of PEFT's `PromptLearningConfig` for a causal LM."""
    cfg = model.config
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", "inference_mode": True, "revision": None,
            "auto_mapping": None, "modules_to_save": None, "num_virtual_tokens": n, "token_dim": token_dim,
            "num_transformer_submodules": 1, "num_attention_heads": heads, "num_layers": cfg.num_hidden_layers}


def saved_table(config: dict, tensors: dict, path: Path, peft_type: str, width: int, what: str) -> torch.Tensor:
    """The (N, width) `prompt_embeddings` of a saved virtual-token adapter, after checking its config fits."""
    where = path / ADAPTER_CONFIG
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterError(f"{where}: task_type is {config['task_type']!r}; qtune loads CAUSAL_LM adapters only")
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(f"{where}: num_transformer_submodules must be 1 for a decoder-only model")
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise AdapterError(f"{where}: num_virtual_tokens must be a positive integer, got {n!r}")
    if set(tensors) != {EMBEDDINGS_KEY}:
        raise AdapterError(f"{path / ADAPTER_WEIGHTS}: a {peft_type} adapter holds only {EMBEDDINGS_KEY!r}; found "
                           f"{sorted(tensors)[:4]}")
    table = tensors[EMBEDDINGS_KEY]
    if tuple(table.shape) != (n, width):
        raise AdapterError(f"adapter {path} does not match this base model ({EMBEDDINGS_KEY} is {list(table.shape)}; "
                           f"{n} virtual tokens of this model's {what} need [{n}, {width}]; it was trained on "
                           f"{config.get('base_model_name_or_path')!r})")
    return table


def init_text_ids(recipe, n: int) -> list[int]:
    """Token ids of `[peft.prompt] init_text` (tokenized as the model's tokenizer adds special tokens), cut or
    repeated to n, as PEFT's PromptTuningInit.TEXT does."""
    tokenizer = load_tokenizer(resolve(recipe.model.path))
    add_bos = tokenizer.add_bos_token and tokenizer.bos_id is not None
    ids = tokenizer.encode(recipe.peft.prompt.init_text, add_bos=add_bos)
    if not ids:
        raise ValueError(f"[peft.prompt] init_text {recipe.peft.prompt.init_text!r} has no tokens; give some text or "
                         "leave it empty for a random start")
    return (ids * -(-n // len(ids)))[:n]


class PromptTuningMethod(PeftMethod):
    """Prompt tuning: the recipe's `[peft.prompt]`."""

    name, peft_type, not_foldable = "prompt", "PROMPT_TUNING", NOT_FOLDABLE
    saved_fields = ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs")
    """The method's own adapter_config.json fields, kept from a loaded adapter for saving it again."""

    def attach(self, model, recipe, name, seed):
        section = recipe.peft.prompt
        check_packing(model, recipe, section.num_virtual_tokens)
        n, D = section.num_virtual_tokens, model.config.hidden_size
        if section.init_text:  # the text's input embeddings, as the model embeds tokens
            ids = torch.tensor([init_text_ids(recipe, n)], device=model.model.embed_tokens.weight.device)
            table = model.embed(ids)[0].detach().float()
        else:  # PEFT's RANDOM: nn.Embedding's own N(0, 1) start
            table = seeded(seed, lambda: nn.Embedding(n, D).weight.detach())
        settings = {"prompt_tuning_init": "TEXT" if section.init_text else "RANDOM",
                    "prompt_tuning_init_text": section.init_text or None,
                    "tokenizer_name_or_path": recipe.model.path if section.init_text else None,
                    "tokenizer_kwargs": None}
        add_encoder(model, "virtual_tokens", VirtualTokens, name, self.name, TokenTable(table), settings)

    def extra_positions(self, recipe):
        return getattr(recipe.peft, self.name).num_virtual_tokens

    def config_dict(self, model, name):
        host = host_of(model, "virtual_tokens", name)
        D = model.config.hidden_size
        n = host.encoders[name]().shape[0]
        return {**common_config(model, self.peft_type, n, D, model.config.num_attention_heads), **host.settings[name]}

    def state_dict(self, model, name):
        return {EMBEDDINGS_KEY: host_of(model, "virtual_tokens", name).encoders[name]().detach().float().cpu()}

    def load(self, model, config, tensors, path, name):
        table = saved_table(config, tensors, path, self.peft_type, model.config.hidden_size, "hidden size")
        settings = {k: config.get(k) for k in self.saved_fields}
        add_encoder(model, "virtual_tokens", VirtualTokens, name, self.name, TokenTable(table), settings)
        return config


class PTuningMethod(PromptTuningMethod):
    """P-tuning: the recipe's `[peft.p_tuning]`. Trains the prompt encoder; saves (and loads) its output and, as
    `qtune_placement`, where its virtual tokens go."""

    name, peft_type = "p_tuning", "P_TUNING"
    saved_fields = ("encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout",
                    "qtune_placement")

    def attach(self, model, recipe, name, seed):
        section = recipe.peft.p_tuning
        placement = parse_placement(section.placement, section.num_virtual_tokens)  # its data: the recipe's check
        check_packing(model, recipe, section.num_virtual_tokens)
        D = model.config.hidden_size
        encoder = seeded(seed, lambda: PromptEncoder(section.num_virtual_tokens, D, section.encoder_hidden_size,
                                                     section.encoder))
        settings = {"encoder_reparameterization_type": section.encoder.upper(),
                    "encoder_hidden_size": section.encoder_hidden_size, "encoder_num_layers": 2,
                    "encoder_dropout": 0.0, "qtune_placement": [f"{a}:{c}" for a, c in placement]}
        add_encoder(model, "virtual_tokens", VirtualTokens, name, self.name, encoder, settings)
        model.virtual_tokens.place(name, placement, model.model.embed_tokens.num_embeddings)

    def load(self, model, config, tensors, path, name):
        n, entries = config.get("num_virtual_tokens"), config.get("qtune_placement") or ["start"]  # PEFT's: all lead
        try:
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise ValueError(f"expected a list of strings such as [\"start:4\", \"response:16\"], got {entries!r}")
            placement = parse_placement(entries, n if isinstance(n, int) else 0)
        except ValueError as e:
            raise AdapterError(f"{path / ADAPTER_CONFIG}: qtune_placement: {e}") from None
        config = super().load(model, config, tensors, path, name)
        model.virtual_tokens.place(name, placement, model.model.embed_tokens.num_embeddings)
        return config
