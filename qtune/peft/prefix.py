"""Prefix tuning (Li & Liang 2021): N trainable key/value positions in front of every layer's attention, through
the model's `kv_prefix` slot.

Each layer l attends over [P_k^l ; K] and [P_v^l ; V]: the prefix keys are used as they are (no RoPE, no
k-norm), as PEFT puts them in transformers' cache. With `projection` the prefix is reparameterised during
training, P = W2 tanh(W1 E + b1) + b2 with E (N, d_kv), giving all 2 · layers · d_kv values per position (Li &
Liang's MLP, PEFT's `prefix_projection`); saving folds it away.

On disk (PEFT's format, peft_type PREFIX_TUNING): `prompt_embeddings` (N, 2 · layers · d_kv), d_kv = key/value
heads · head_dim (PEFT's token_dim, with num_attention_heads = the key/value heads); along the last axis,
layer by layer, its keys then its values, each (heads, head_dim). As PEFT counts them, the real tokens'
positions move up by N; a packed example sees the prefix as if it were alone. `qtune merge` refuses it.
"""

import torch
from torch import nn

from qtune.peft.prompt import (EMBEDDINGS_KEY, NOT_FOLDABLE, EncoderHost, TokenTable, add_encoder, check_packing,
                               common_config, host_of, saved_table, seeded)
from qtune.peft.base import PeftMethod


class PrefixEncoder(nn.Module):
    """Li & Liang's reparameterisation: E (N, d_kv) -> Linear(d_kv, h) tanh Linear(h, 2 · layers · d_kv).
    Parameter names are PEFT's (`embedding`, `transform`)."""

    def __init__(self, n: int, kv_dim: int, hidden: int, num_layers: int):
        super().__init__()
        self.embedding = nn.Embedding(n, kv_dim)
        self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * num_layers * kv_dim))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)  # (N, 2 · layers · d_kv)


class KVPrefix(EncoderHost):
    """The model's `kv_prefix` slot: the active adapter's per-layer prefix keys and values for a batch."""

    def __init__(self, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim

    def forward(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        table = self.active_table()  # (N, 2 · layers · d_kv)
        if table is None:
            return None
        n = table.shape[0]
        kv = table.view(n, -1, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)  # (2 · layers, H_kv, N, d)
        kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (2 · layers, B, H_kv, N, d)
        return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(kv.shape[0] // 2)]


def kv_prefix_host(cfg):
    """A `KVPrefix` type bound to the model's key/value heads and head size (what `add_encoder` builds)."""
    return lambda: KVPrefix(cfg.num_key_value_heads, cfg.head_dim)


class PrefixTuningMethod(PeftMethod):
    """Prefix tuning: the recipe's `[peft.prefix]`."""

    name, peft_type, not_foldable = "prefix", "PREFIX_TUNING", NOT_FOLDABLE

    def attach(self, model, recipe, name, seed):
        section, cfg = recipe.peft.prefix, model.config
        check_packing(model, recipe, section.num_virtual_tokens)
        kv_dim, layers = cfg.num_key_value_heads * cfg.head_dim, cfg.num_hidden_layers
        if section.projection:
            encoder = seeded(seed, lambda: PrefixEncoder(section.num_virtual_tokens, kv_dim,
                                                         section.encoder_hidden_size, layers))
        else:  # PEFT's table without projection: nn.Embedding's N(0, 1) start
            encoder = TokenTable(seeded(seed, lambda: nn.Embedding(section.num_virtual_tokens,
                                                                   2 * layers * kv_dim).weight.detach()))
        settings = {"prefix_projection": section.projection, "encoder_hidden_size": section.encoder_hidden_size,
                    "init_weights": None}
        add_encoder(model, "kv_prefix", kv_prefix_host(cfg), name, self.name, encoder, settings)

    def extra_positions(self, recipe):
        return recipe.peft.prefix.num_virtual_tokens

    def config_dict(self, model, name):
        host, cfg = host_of(model, "kv_prefix", name), model.config
        n = host.encoders[name]().shape[0]
        config = common_config(model, self.peft_type, n, cfg.num_key_value_heads * cfg.head_dim,
                               cfg.num_key_value_heads)
        return {**config, **host.settings[name]}

    def state_dict(self, model, name):
        return {EMBEDDINGS_KEY: host_of(model, "kv_prefix", name).encoders[name]().detach().float().cpu()}

    def load(self, model, config, tensors, path, name):
        cfg = model.config
        kv_dim = cfg.num_key_value_heads * cfg.head_dim
        width = 2 * cfg.num_hidden_layers * kv_dim
        table = saved_table(config, tensors, path, self.peft_type, width,
                            f"{cfg.num_hidden_layers} layers x keys and values of width {kv_dim}")
        settings = {k: config.get(k) for k in ("prefix_projection", "encoder_hidden_size", "init_weights")}
        add_encoder(model, "kv_prefix", kv_prefix_host(cfg), name, self.name, TokenTable(table), settings)
        return config
