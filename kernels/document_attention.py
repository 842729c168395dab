"""Attention over packed batches (document masking) whose memory is linear in the sequence length.

A packed row holds several examples; segment ids (B, T) say which (0 = padding). Query t may attend to key s
when s <= t, both are in the same example (and s is no padding), and, on a sliding-window layer, t - s < window;
a padding query sees itself only, which keeps its softmax finite (its output is unused). Keys with id -1 (a prompt
adapter's virtual tokens, in front of every row) are seen by every query after them, as in model.attention_mask_4d.
Any key outside those rules must get exactly zero weight: a packed example that sees its neighbour trains on text
it was never given.

`reference_document_attention` is the spec: each example of each row run through causal SDPA on its own.
`document_attention` computes the same thing in one call with PyTorch's flex attention: the mask is a function
of (row, query, key) (`document_mask_mod`), turned once per forward pass into a block mask (which 128 x 128
tiles are empty, full or partial: O(T^2 / 128^2) entries); the compiled kernel skips empty tiles and never
materialises a T x T score or mask tensor. On CUDA it runs compiled (linear memory); on a CPU (tests) the same
mask runs through flex attention's eager path, which does materialise the scores.

Gemma 2 soft-caps the scores, cap · tanh(scale · q kᵀ / cap), which no fused SDPA kernel offers: flex attention
applies it as a `score_mod` on each tile of scores in the kernel (`softcap_score_mod`), so soft-capped layers
(sliding or not, packed or not) keep the same linear memory instead of a materialised T x T mask and scores.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def reference_document_attention(q, k, v, segments, scale: float, window: int | None = None,
                                 softcap: float | None = None) -> torch.Tensor:
    """Each example of each row attended on its own: q (B, H, T, d), k and v (B, H_kv, T, d), segments (B, T)
    -> (B, T, H, d), with scores cap · tanh(s / cap) when `softcap` = cap. Examples are the maximal runs of
    equal non-zero ids; padding queries return their own v."""
    B, H, T, d = q.shape
    groups = H // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, T, d)
    out = v.transpose(1, 2).clone()  # padding rows: attention to themselves only
    for b in range(B):
        for seg in segments[b].unique().tolist():
            if seg == 0:
                continue
            idx = (segments[b] == seg).nonzero().squeeze(1)  # positions of this example
            qs, ks, vs = q[b:b + 1, :, idx], k[b:b + 1, :, idx], v[b:b + 1, :, idx]
            n = idx.numel()
            mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril_()
            if window is not None:
                pos = idx[:, None] - idx[None, :]
                mask &= pos < window
            scores = qs @ ks.transpose(-1, -2) * scale  # (1, H, n, n)
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            y = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vs  # (1, H, n, d)
            out[b, idx] = y[0].transpose(0, 1)
    return out


@dataclass
class DocumentMask:
    """The attention rule of a packed batch and its block mask, built once per forward pass."""

    segments: torch.Tensor  # (B, T) segment ids, 0 = padding
    window: int | None  # sliding window of the layers using this mask, None for full attention
    block_mask: object  # flex attention's BlockMask


def document_mask_mod(segments: torch.Tensor, window: int | None):
    """flex attention's mask_mod for segment ids (B, T): True where query q_idx of row b may attend to kv_idx."""
    def allows(b, h, q_idx, kv_idx):
        seg_q, seg_k = segments[b, q_idx], segments[b, kv_idx]
        allowed = (kv_idx <= q_idx) & (((seg_q == seg_k) & (seg_k != 0)) | (seg_k < 0))  # -1: virtual tokens
        if window is not None:
            allowed = allowed & (q_idx - kv_idx < window)
        return allowed | (q_idx == kv_idx)

    return allows


def document_mask(segments: torch.Tensor, window: int | None = None) -> DocumentMask:
    """The DocumentMask of segment ids (B, T), with its block mask (made tile by tile, compiled, on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = segments.shape
    block = create_block_mask(document_mask_mod(segments, window), B, None, T, T, device=segments.device,
                              _compile=segments.is_cuda)
    return DocumentMask(segments, window, block)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # a new length recompiles once, then runs with dynamic shapes


def softcap_score_mod(cap: float):
    """flex attention's score_mod for soft-capped scores: s -> cap · tanh(s / cap) (s already scaled)."""
    def capped(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return capped


def document_attention(q, k, v, mask: DocumentMask, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Attention of a packed batch: q (B, H, T, d), k and v (B, H_kv, T, d) -> (B, T, H, d), equal to
    `reference_document_attention` (with its scores soft-capped at `softcap` when given)."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = _compiled_flex_attention() if q.is_cuda else flex_attention
    score_mod = None if softcap is None else softcap_score_mod(softcap)
    y = attend(q, k, v, score_mod=score_mod, block_mask=mask.block_mask, scale=scale,
               enable_gqa=q.shape[1] != k.shape[1])
    return y.transpose(1, 2)
