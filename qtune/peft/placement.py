"""P-tuning's virtual tokens placed inside the example, at anchors of its template (Liu et al. 2021 put
pseudo tokens before the input and between the input and the output: "[P0..Pi] x [Pi+1..Pm] y").

A placement is ((anchor, count), ...) in the order the anchors occur (qtune/recipe/peft.py `parse_placement`):
"start" is before everything (BOS included, where PEFT puts all of them), "response" is after the prompt, just
before the first token the example trains (the reply; a conversation's first assistant turn, while generation
puts them at the end of whatever prompt it is given). The virtual tokens become ordinary input positions: the
model embeds id V + j (V the vocabulary size) as row j of the adapter's table (qtune/model.py `embed`), so
positions, masks and the KV cache count them as they count any token, and they attend to what precedes them.

    training batch   [P0..Pi] BOS prompt [Pi+1..Pm] reply EOS pad..   labels -100 on every virtual token
    generation       [P0..Pi] BOS prompt [Pi+1..Pm] -> the reply is generated after them

The training loops splice them into each batch (`place_in_batch`, called where the policy runs, so DPO's
reference with adapters off sees the plain batch); `qtune generate` / `qtune eval` splice prompts through
the slot's `place_prompt`. The reply's start is the first trained label, so examples that train on their
prompt too (data.train_on_input) have no "response" anchor, and packed rows would grow past max_seq_len: the
recipe check refuses both.
"""

import torch

IGNORE = -100


def prompt_with_virtual(ids: list[int], placement, first_id: int) -> list[int]:
    """A prompt's token ids with the virtual tokens (ids first_id, first_id + 1, ...) at their anchors; the
    prompt ends where the reply starts, so "response" tokens go at its end."""
    counts = dict(placement)
    k_start, k_reply = counts.get("start", 0), counts.get("response", 0)
    return [*range(first_id, first_id + k_start), *ids, *range(first_id + k_start, first_id + k_start + k_reply)]


def splice(batch: dict, placement, first_id: int) -> dict:
    """A right-padded batch (input_ids, labels, optional attention_mask / position_ids, each (B, T); one
    example per row) with the virtual tokens spliced in: (B, T + N), labels -100 on them, the attention mask's
    segment id of their row, positions counting them. Nested batches (KTO's) are spliced alike; the other
    entries (per-sequence indices) are kept."""
    out = {k: splice(v, placement, first_id) if isinstance(v, dict) else v for k, v in batch.items()}
    if "input_ids" not in batch:
        return out
    if "labels" not in batch:
        raise ValueError("this P-tuning adapter places virtual tokens before the response, and the batch does not say "
                         "where responses start (no labels): use it for sft / dpo / reward, generate and eval")
    counts = dict(placement)
    k_start, k_reply = counts.get("start", 0), counts.get("response", 0)
    ids, labels = batch["input_ids"], batch["labels"]
    B, T = ids.shape
    N, device = k_start + k_reply, ids.device
    t = torch.arange(T, device=device)
    reply = (labels != IGNORE).int().argmax(1)  # (B,) the first trained token: where the reply starts
    shift = k_start + k_reply * (t[None] >= reply[:, None])  # (B, T) how far each real column moves right
    dest = t[None] + shift  # (B, T) its new column
    virtual = torch.cat([torch.arange(k_start, device=device).expand(B, k_start),
                         reply[:, None] + k_start + torch.arange(k_reply, device=device)], 1)  # (B, N) their columns
    out["input_ids"] = _scatter(ids, dest, virtual, first_id + torch.arange(N, device=device).expand(B, N))
    out["labels"] = _scatter(labels, dest, virtual, torch.full((B, N), IGNORE, device=device, dtype=labels.dtype))
    mask = batch.get("attention_mask")
    if mask is not None:  # the virtual tokens belong to the example's own segment
        out["attention_mask"] = _scatter(mask, dest, virtual, mask.gather(1, reply[:, None]).expand(B, N))
    if mask is not None or batch.get("position_ids") is not None:
        positions = batch.get("position_ids")
        positions = t.expand(B, T) if positions is None else positions
        # every real token moves up by the virtual tokens before it; the virtual ones continue from their anchor
        before = positions.gather(1, reply[:, None]) + k_start  # (B, 1) position of the first "response" token
        placed = torch.cat([torch.arange(k_start, device=device).expand(B, k_start),
                            before + torch.arange(k_reply, device=device)], 1)
        moved = positions + shift.masked_fill(mask == 0, 0) if mask is not None else positions + shift
        out["position_ids"] = _scatter(moved, dest, virtual, placed)
    return out


def _scatter(values: torch.Tensor, dest: torch.Tensor, virtual: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(B, T + N): `values` (B, T) at columns `dest`, `fill` (B, N) at columns `virtual` (together every column)."""
    B, T = values.shape
    out = values.new_empty(B, T + virtual.shape[1])
    out.scatter_(1, dest, values)
    return out.scatter_(1, virtual, fill.to(values.dtype))


def place_in_batch(model, batch: dict) -> dict:
    """`batch` as the model's active adapter sees it: with a P-tuning adapter's placed virtual tokens spliced in;
    `batch` itself for every other adapter, and with adapters off."""
    slot = getattr(model, "virtual_tokens", None)
    placement = slot.placement() if slot is not None and hasattr(slot, "placement") else None
    return batch if placement is None else splice(batch, placement, slot.vocab_size)
