"""Fill fixed token budgets from a rolling buffer of tokenized samples.

Packed mode: one row of exactly `max_tokens` per micro-batch, filled best-fit-decreasing from the
buffer (longest sample that fits first, then the next longest that fits the remaining room, ...).
Every document gets `position_ids` restarting at 0, which is the document mask, and label -100 on
its first token, so nothing is trained across a boundary. The unfilled tail is one padding segment
(its own positions, label -100). Padded mode (`packing: false`): samples in arrival order, as many
as fit the budget counted with padding, right-padded to the longest, with an attention mask.
"""

from __future__ import annotations

import torch

from .records import Sample


def take_best_fit(buffer: list[Sample], budget: int) -> list[int]:
    """Indices of buffer samples chosen best-fit-decreasing for one bin of `budget` tokens."""
    order = sorted(range(len(buffer)), key=lambda i: (-len(buffer[i].input_ids), i))
    chosen, room = [], budget
    for i in order:
        n = len(buffer[i].input_ids)
        if n <= room:
            chosen.append(i)
            room -= n
            if room == 0:
                break
    return chosen


def take_in_order(buffer: list[Sample], budget: int) -> list[int]:
    """Leading buffer samples that fit `budget` tokens counted with padding (rows x longest)."""
    longest = 0
    for i, s in enumerate(buffer):
        longest = max(longest, len(s.input_ids))
        if longest * (i + 1) > budget:
            return list(range(max(i, 1)))
    return list(range(len(buffer)))


def pack_row(samples: list[Sample], budget: int, pad_id: int) -> dict:
    ids, labels, pos, lens = [], [], [], []
    for s in samples:
        n = len(s.input_ids)
        ids += s.input_ids
        labels += (-100,) + tuple(s.labels[1:])
        pos += range(n)
        lens.append(n)
    real = len(ids)
    tail = budget - real
    if tail > 0:
        ids += (pad_id,) * tail
        labels += (-100,) * tail
        pos += range(tail)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "doc_lens": lens,
        "num_tokens": real,
    }


def pad_batch(samples: list[Sample], pad_id: int) -> dict:
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        attn[i, :n] = 1
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": attn,
        "doc_lens": [len(s.input_ids) for s in samples],
        "num_tokens": int(attn.sum()),
    }


def make_batch(buffer: list[Sample], *, budget: int, pad_id: int, packing: bool) -> tuple[dict, list[Sample]]:
    """One micro-batch from the buffer; returns (batch, remaining buffer)."""
    chosen = take_best_fit(buffer, budget) if packing else take_in_order(buffer, budget)
    picked = set(chosen)
    samples = [buffer[i] for i in chosen]
    rest = [s for i, s in enumerate(buffer) if i not in picked]
    batch = pack_row(samples, budget, pad_id) if packing else pad_batch(samples, pad_id)
    return batch, rest
