"""Fill fixed token budgets from a rolling buffer of tokenized samples.

The buffer holds *units* (`Sample`s): an SFT sample is a unit of one document, a preference pair a
unit of two (chosen, rejected). A unit is never split: it goes into a micro-batch whole or not at all.

Packed mode: one row of at most `max_tokens` per micro-batch, filled best-fit-decreasing from the
buffer (longest unit that fits first, then the next longest that fits the remaining room, ...).
Every document of every unit gets `position_ids` restarting at 0, which is the document mask, and
label -100 on its first token, so nothing is trained across a boundary. The unfilled tail is one
padding segment (its own positions, label -100), up to the real length rounded up to
`data.pack_to_multiple_of` (default 64: a row the data cannot fill does no work on a long tail), or
to exactly `max_tokens` when that is null (fixed shapes). Padded mode (`packing: false`): units in arrival
order, each document its own row, as many units as fit the budget counted with padding (rows x
longest row), right-padded to the longest, with an attention mask.

Every batch carries `epoch`: the oldest pass over the data (0-based) with units not yet trained on,
in this batch or still in the buffer; every unit of an earlier pass has been taken. It counts what
the training consumed, not how far the reader read ahead. Also `doc_lens` (each document's length,
in order) and `unit_docs` (the number of documents of each unit, in order; sum(unit_docs) ==
len(doc_lens)). `target_doc_index` maps each loss target to its document.

Shared prefixes (`share_prefix`, `data.share_prefix`): the documents of a unit that begin with the
same untrained tokens as its first document (a pair's two sides, a GRPO group's completions, after
one prompt) keep only their own tokens, as *branches*: their positions continue from the prefix
(`doc_starts`, in the batch too), the packed attention (`posttrain.model.attention`) lets each
branch attend to the first document's prefix, and a branch's first token is predicted by the
output of its root at the prefix's last position (`target_rows`). Every logit and gradient is the
one of the unshared unit; the prompt's forward and backward are done once.
"""

from __future__ import annotations

import torch

from .records import Sample


def take_best_fit(buffer: list[Sample], budget: int) -> list[int]:
    """Indices of buffer units chosen best-fit-decreasing (by a unit's total length) for one bin."""
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
    """Leading buffer units whose documents, one row each, fit `budget` tokens counted with padding
    (rows x longest row). At least one unit is always taken."""
    longest, rows = 0, 0
    for i, s in enumerate(buffer):
        docs = s.docs
        longest = max(longest, max(docs))
        rows += len(docs)
        if longest * rows > budget:
            return list(range(max(i, 1)))
    return list(range(len(buffer)))


def share_prefix(sample: Sample) -> Sample:
    """`sample` with documents 1.. turned into branches of the latest unshared document (document 0
    for a pair or a group after one prompt) where they share its first
    tokens: a branch keeps its own tokens, at their original positions, and its first token's
    prediction is the root's output at the last shared position (`target_rows`), the one the
    unshared document computes from the same tokens. Only untrained tokens are shared (the branch's
    labels before its kept part are all -100), and each branch starts no later than the position
    the previous document ended at, so a position that does not continue the previous one is always
    a new document (`attention.segments`); where its own tokens would start just past that, it keeps
    the last shared token(s) too (untrained: that token's output then predicts its first own token).
    A unit of one document, or one already shared, is returned as it is.

    Not repeating the last shared token saves a token per branch in every layer: a GRPO step of the
    benchmark's (8 prompts x 8 completions of 32 tokens, one packed row) computes 56 fewer of ~2,120
    positions."""
    docs = sample.docs
    if len(docs) < 2 or sample.doc_starts is not None:
        return sample
    offsets = [0]
    for n in docs[:-1]:
        offsets.append(offsets[-1] + n)
    root = sample.input_ids[: docs[0]]
    ids, labels = list(sample.input_ids[: docs[0]]), list(sample.labels[: docs[0]])
    lens, starts, prev_end = [docs[0]], [0], docs[0] - 1  # prev_end: the last position of the previous document
    for n, off in zip(docs[1:], offsets[1:]):
        d_ids, d_labels = sample.input_ids[off : off + n], sample.labels[off : off + n]
        k = 0
        while k < min(n - 1, len(root)) and d_ids[k] == root[k] and d_labels[k] == -100:
            k += 1
        s = k if 0 < k <= prev_end else min(max(k - 1, 0), prev_end)  # never continue the previous document
        ids += d_ids[s:]
        labels += d_labels[s:]
        lens.append(n - s)
        starts.append(s)
        prev_end = n - 1
        if s == 0:  # nothing shared: a document of its own, the root of any later branch
            root = d_ids
    if not any(starts):
        return sample
    return Sample(tuple(ids), tuple(labels), sample.where, tuple(lens), sample.epoch, tuple(starts))


def pack_row(samples: list[Sample], budget: int, pad_id: int, multiple_of: int | None = None,
             drop_last: bool = False) -> dict:
    """One row: the units end to end, then a padding segment up to `budget`, or (`multiple_of`) only
    up to the real length rounded up to that multiple (never beyond `budget`).

    `drop_last`: each document's last token is left out of the row the model computes (`input_ids`,
    `position_ids`), where that changes no result. Its output predicts nothing (the next position
    starts another document, which it never predicts), and under the document mask its keys and
    values are read only by itself; a shared-prefix branch reads its root's first tokens only, never
    the root's last (`share_prefix` shares fewer tokens than the root has). So every target's logits
    are those of the full row, one position per document cheaper in every layer (a GRPO step of 64
    completions: 64 of ~2,100 positions). The token is still a target: `labels` keep the full
    layout, and `out_index` maps a position of it to its place in the computed row (-1: not
    computed), which `target_rows` applies. A document is kept whole where dropping would make the
    next document continue its positions (a branch starting right after its new end:
    `attention.segments` would read one document), and where it is a single token."""
    docs = []  # (ids, labels, first position) per document, in row order
    units = []
    for s in samples:
        start = 0
        for n, p in zip(s.docs, s.starts):
            # nothing is predicted across a boundary: a document's first token is no target, except a
            # branch's, predicted from its root's prefix (`target_rows`)
            lab = tuple(s.labels[start : start + n]) if p > 0 else (-100,) + tuple(s.labels[start + 1 : start + n])
            docs.append((s.input_ids[start : start + n], lab, p))
            start += n
        units.append(len(s.docs))
    ids, labels, pos, lens, starts, kept, out_index = [], [], [], [], [], [], []
    for i, (d_ids, lab, p) in enumerate(docs):
        n = len(d_ids)
        nxt = docs[i + 1][2] if i + 1 < len(docs) else 0
        drop = drop_last and n > 1 and nxt != p + n - 1
        m = n - drop
        out_index += range(len(ids), len(ids) + m)
        if drop:
            out_index.append(-1)
        ids += d_ids[:m]
        pos += range(p, p + m)
        labels += lab
        lens.append(n)
        kept.append(m)
        starts.append(p)
    real, computed = len(labels), len(ids)

    def width(n: int) -> int:
        return budget if multiple_of is None else min(budget, -(-n // multiple_of) * multiple_of)

    tail = width(computed) - computed
    if tail > 0:
        ids += (pad_id,) * tail
        pos += range(tail)
    labels += (-100,) * (width(real) - real)
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "doc_lens": lens,
        "doc_starts": starts,  # position of each document's first token (> 0: a branch)
        "unit_docs": units,
        "unit_where": [smp.where for smp in samples],  # file:line of each unit (a stable key)
        "num_tokens": real,
    }
    if computed < real:
        batch["doc_kept"] = kept  # the positions of each document the model computes
        batch["out_index"] = torch.tensor(out_index + [-1] * (width(real) - real), dtype=torch.long)
    return batch


def computed_lens(batch: dict) -> list[int]:
    """Each document's positions in the row the model computes (`pack_row`'s `drop_last`)."""
    return batch.get("doc_kept") or batch["doc_lens"]


def pad_batch(samples: list[Sample], pad_id: int) -> dict:
    """Each document of each unit its own row (a pair: chosen row, then rejected row), right-padded."""
    rows = []  # (input_ids, labels) per document
    for s in samples:
        if s.doc_starts is not None and any(s.doc_starts):
            raise ValueError(f"{s.where}: a unit with shared-prefix branches can only be packed (data.packing: true)")
        start = 0
        for n in s.docs:
            rows.append((s.input_ids[start : start + n], s.labels[start : start + n]))
            start += n
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r_ids, r_labels) in enumerate(rows):
        n = len(r_ids)
        ids[i, :n] = torch.tensor(r_ids)
        labels[i, :n] = torch.tensor(r_labels)
        attn[i, :n] = 1
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": attn,
        "doc_lens": [len(r[0]) for r in rows],
        "unit_docs": [len(s.docs) for s in samples],
        "unit_where": [s.where for s in samples],
        "num_tokens": int(attn.sum()),
    }


def make_batch(buffer: list[Sample], *, budget: int, pad_id: int, packing: bool,
               multiple_of: int | None = None) -> tuple[dict, list[Sample]]:
    """One micro-batch from the buffer; returns (batch, remaining buffer)."""
    chosen = take_best_fit(buffer, budget) if packing else take_in_order(buffer, budget)
    picked = set(chosen)
    samples = [buffer[i] for i in chosen]
    rest = [s for i, s in enumerate(buffer) if i not in picked]
    batch = pack_row(samples, budget, pad_id, multiple_of) if packing else pad_batch(samples, pad_id)
    batch["epoch"] = min(s.epoch for s in samples + rest)  # every unit of an earlier pass has been taken
    return batch, rest


def target_rows(batch: dict) -> torch.LongTensor:
    """For every loss target, in the order `labels[:, 1:] != -100` selects them (row-major), the flat
    index into [rows x width] of the position whose output predicts it: the position before it,
    except at a shared-prefix branch's first token (`share_prefix`), predicted by its root's output
    at the branch's start position - 1. The root is the latest document starting at position 0, as
    `attention.segments` reads the row."""
    labels = batch["labels"]
    rows, width = labels.shape
    src = torch.arange(-1, rows * width - 1, device=labels.device).view(rows, width)
    starts = batch.get("doc_starts")
    if starts is not None and any(starts) and batch.get("attention_mask") is None:
        at, to, off, root = [], [], 0, 0
        for n, p in zip(batch["doc_lens"], starts):
            if p == 0 or off == 0:
                root = off
            else:
                at.append(off)
                to.append(root + p - 1)
            off += n
        src[0, at] = torch.tensor(to, device=labels.device)
    src = src[:, 1:][labels[:, 1:] != -100]
    out = batch.get("out_index")
    return src if out is None else out.index_select(0, src)


def target_doc_index(batch: dict) -> torch.LongTensor:
    """For every loss target, in the order `labels[:, 1:] != -100` selects them (row-major, as
    `posttrain.model.loss.target_hidden`), the index into `batch["doc_lens"]` of its document.

    Packed batches (no attention_mask): one row, the documents end to end, then a padding tail.
    Padded batches: row i is document i. Per-document sums of per-token values:
    `torch.zeros(len(batch["doc_lens"])).index_add_(0, target_doc_index(batch), values)`.
    """
    labels = batch["labels"]
    lens = [int(n) for n in batch["doc_lens"]]
    rows, width = labels.shape
    device = labels.device
    if batch.get("attention_mask") is None:  # packed
        if rows != 1:
            raise ValueError(f"target_doc_index: a packed batch has one row, got {rows}")
        total = sum(lens)
        if total > width:
            raise ValueError(f"target_doc_index: doc_lens sum to {total} > row width {width}")
        doc = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))
        doc = torch.cat([doc, torch.full((width - total,), len(lens), dtype=torch.long, device=device)])[None]
    else:  # padded: one document per row
        if rows != len(lens):
            raise ValueError(f"target_doc_index: a padded batch has one row per document, got {rows} rows and {len(lens)} documents")
        doc = torch.arange(rows, device=device)[:, None].expand(rows, width)
    return doc[:, 1:][labels[:, 1:] != -100]
