"""The feed-forward block over chunks of tokens, so that its wide activations exist for one chunk at a time.

A gated MLP, down(act(gate x) * up x), saves three or four (N, I) tensors for its backward (gate x, act(gate x),
up x and the product): I = 14,336 for Llama-3.1-8B, 3.5 times the hidden size, so at 100,000 tokens in bf16
they are 11 GB, the largest part of a long-context step. Every token's output depends on that token alone, so
the block can run over row chunks of the (N, D) input:

    y[c] = mlp(x[c])   for each chunk c of `CHUNK_TOKENS` rows, each chunk checkpointed

Each chunk keeps only its input (a view of x); backward recomputes one chunk's activations, takes its
gradients and frees them before the next chunk, so the block's peak is one chunk's (CHUNK_TOKENS, I) tensors.
The gradients equal the untiled block's (each row's arithmetic is the same; the adapter gradients are sums
over chunks instead of one product, so they may differ in the last bits). The price is one more forward of
the block per step. Dropout inside a chunk draws the same masks when recomputed (checkpoint restores the RNG);
an adapter's dropout draws its masks chunk by chunk, so with dropout a tiled step draws other (equally likely)
masks than an untiled one.

Modes (`train.tiled_mlp`): "on" tiles every batch longer than one chunk, "off" never tiles, "auto" tiles
batches of more than `AUTO_MIN_TOKENS` tokens, so the default short-context step is unchanged.
"""

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 1024  # rows per chunk: (1024, 14336) bf16 tensors are 29 MB for Llama-3.1-8B
AUTO_MIN_TOKENS = 8192  # "auto" tiles batches of more tokens than this (eight chunks)
MODES = ("auto", "on", "off")


def tiling_applies(mode: str, tokens: int) -> bool:
    """Whether a block in `mode` ("auto" | "on" | "off") tiles a batch of `tokens` tokens."""
    return mode != "off" and tokens > (AUTO_MIN_TOKENS if mode == "auto" else CHUNK_TOKENS)


def tiles(mode: str, x: torch.Tensor) -> bool:
    """Whether a block in `mode` tiles input x (..., D)."""
    return tiling_applies(mode, x.numel() // x.shape[-1])


def tiled_mlp(mlp: torch.nn.Module, x: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """mlp.untiled(x) computed over chunks of `chunk_tokens` rows, each checkpointed when gradients are
    recorded (without them, as in an offloaded checkpoint's forward, a chunk's activations die with it):
    x (..., D) -> (..., D). chunk_tokens: CHUNK_TOKENS unless given."""
    chunk_tokens = chunk_tokens or CHUNK_TOKENS
    rows = x.reshape(-1, x.shape[-1])  # (N, D)
    if torch.is_grad_enabled():
        outputs = [checkpoint(mlp.untiled, chunk, use_reentrant=False) for chunk in rows.split(chunk_tokens)]
    else:
        outputs = [mlp.untiled(chunk) for chunk in rows.split(chunk_tokens)]
    return torch.cat(outputs).view(*x.shape[:-1], -1)
