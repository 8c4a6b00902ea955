"""Padded micro-batches under a token budget, reshuffled deterministically every epoch.

A micro-batch holds as many samples as fit in `max_tokens_per_batch` tokens counted *with*
padding (rows x longest row), so memory per micro-batch is bounded whatever the length skew.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch

from .records import Sample


def group_by_budget(samples: list[Sample], max_tokens: int) -> list[list[Sample]]:
    groups: list[list[Sample]] = []
    cur: list[Sample] = []
    longest = 0
    for s in samples:
        n = len(s.input_ids)
        if n > max_tokens:
            raise ValueError(
                f"{s.where}: a {n}-token sample does not fit data.max_tokens_per_batch={max_tokens}; "
                "raise max_tokens_per_batch or lower data.max_seq_len"
            )
        if cur and max(longest, n) * (len(cur) + 1) > max_tokens:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(s)
        longest = max(longest, n)
    if cur:
        groups.append(cur)
    return groups


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; padding gets attention 0 and label -100."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    attn = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        attn[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


class PaddedBatches:
    """Endless iterator of micro-batches over epochs; `epoch` and `index` say where it is."""

    def __init__(self, samples: list[Sample], *, max_tokens: int, pad_id: int, seed: int, shuffle: bool = True):
        self.samples, self.max_tokens, self.pad_id, self.seed, self.shuffle = samples, max_tokens, pad_id, seed, shuffle
        self.epoch, self.index = 0, 0
        self._groups = self._epoch_groups(0)

    def _epoch_groups(self, epoch: int) -> list[list[Sample]]:
        order = list(self.samples)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return group_by_budget(order, self.max_tokens)

    def micro_batches_per_epoch(self) -> int:
        return len(self._groups)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self._groups):
            self.epoch, self.index = self.epoch + 1, 0
            self._groups = self._epoch_groups(self.epoch)
        group = self._groups[self.index]
        self.index += 1
        return collate(group, self.pad_id)
