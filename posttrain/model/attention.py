"""Attention over packed rows whose cost follows the documents, not the row.

A packed row holds several documents; `position_ids` restart at 0 at each one. transformers' own
sdpa path turns that into a dense T x T block-diagonal mask and computes every score of the row, so
packing short documents pays for attention between documents it then masks away (measured with TRL
on CPU: packing slower than padding on low-skew data). `packed_sdpa` instead runs SDPA per
document, batching documents of similar length together (right-padded to a shared bucket width),
with `is_causal=True` and no mask (a prefix-shared branch: its own queries over its root's prefix and
its own keys, under a causal mask aligned to the end): the same result as the dense-mask path for a
fraction of the work. On GPU use flash_attention_2/3 (varlen)
or flex_attention, which do the same natively.

Registered with transformers' AttentionInterface as `posttrain_packed`, so any model family that
routes attention through the interface gets it by `attn_implementation="posttrain_packed"`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from .hf import unwrap

NAME = "posttrain_packed"


def _documents(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The documents of one row from its positions `pos` [T] (T > 0): their starts, ends, roots and
    prefixes (see `segments`), as arrays."""
    starts = np.concatenate(([0], np.flatnonzero(np.diff(pos) != 1) + 1))
    ends = np.append(starts[1:], len(pos))
    prefix = pos[starts].copy()
    prefix[0] = 0  # a row's first document is a root whatever its positions
    root = np.maximum.accumulate(np.where(prefix == 0, starts, 0))  # a branch reads the latest root
    return starts, ends, root, prefix


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """Per row, every document as (start, end, root, prefix). A document starts wherever the position
    does not continue the previous one (pos[i] != pos[i-1] + 1; `packing.share_prefix` guarantees it
    drops, pos[i] <= pos[i-1]). One starting at 0 is a root (root = start, prefix = 0); one starting
    at p > 0 is a branch of the latest root: it attends to that root's first p tokens, then itself."""
    rows = position_ids.cpu().numpy().astype(np.int64, copy=False)
    return [list(zip(*(a.tolist() for a in _documents(row)))) if len(row) else [] for row in rows]


def bucket_length(n: int) -> int:
    """Documents are batched by length rounded up to 4 buckets per octave (at most ~25% extra
    positions, a few SDPA calls per row instead of one per distinct length); 5-16 tokens share 16."""
    if n <= 16:
        return 16 if n > 4 else n
    q = 1 << (n.bit_length() - 3)  # a quarter of the octave's base
    return -(-n // q) * q


_plan_cache: dict = {}


def _row_plan(pos: np.ndarray, device: torch.device) -> tuple:
    """One row's plan from its positions `pos` [T] (see `_plans`), in a few array operations per bucket
    instead of Python over every position: on the GRPO benchmark's row (2,128 positions, 8 roots and 56
    branches) 0.3 instead of 1.6 ms, on a uniform SFT row of 1,664 positions 0.2 instead of 0.7 ms, once
    per step (the plan is cached for every layer and the backward). Documents as `segments` reads them
    (`_documents`); tests/model/test_attention.py checks the plan against one written out per position.

    A document padded to a bucket's width reads the positions after its end (clamped to the row's last),
    which its real queries never see (causal mask) and whose outputs are dropped."""
    T = len(pos)
    if T == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return [], empty, empty, empty
    starts, ends, root, prefix = _documents(pos)
    lens = ends - starts
    keylen = prefix + lens
    widths = np.array([bucket_length(int(n)) for n in keylen])
    branch = prefix > 0
    # buckets in the order of their first document, documents in row order within each
    key = widths * 2 + branch
    _, first = np.unique(key, return_index=True)
    shapes, q_parts, kv_parts, out_index, base = [], [], [], np.empty(T, dtype=np.int64), 0
    for k in key[np.sort(first)]:
        docs = np.flatnonzero(key == k)
        width, is_branch = int(widths[docs[0]]), bool(branch[docs[0]])
        s, e, p, r, n = starts[docs, None], ends[docs, None], prefix[docs, None], root[docs, None], lens[docs, None]
        col = np.arange(width)[None]
        past = np.minimum(e + col - (p + n), T - 1)  # padding: the positions after the end
        kv_parts.append(np.where(col < p, r + col, np.where(col < p + n, s + col - p, past)).ravel())
        q_width = int(n.max()) if is_branch else width
        col = np.arange(q_width)[None]
        q = np.where(col < n, s + col, np.minimum(e + col - n, T - 1))
        q_parts.append(q.ravel())
        real = col < n
        out_index[q[real]] = (base + np.arange(len(docs))[:, None] * q_width + col)[real]
        mask = None
        if is_branch:  # own query a sees keys 0 .. p + a
            pre = torch.from_numpy(prefix[docs]).to(device)
            mask = (torch.arange(width, device=device)[None, None, :]
                    <= pre[:, None, None] + torch.arange(q_width, device=device)[None, :, None])[:, None]
        shapes.append((q_width, width, len(docs), mask))
        base += len(docs) * q_width
    kv_idx, q_idx = np.concatenate(kv_parts), np.concatenate(q_parts)
    kv = torch.from_numpy(kv_idx).to(device)
    return (shapes, kv if np.array_equal(q_idx, kv_idx) else torch.from_numpy(q_idx).to(device), kv,
            torch.from_numpy(out_index).to(device))


def _plans(position_ids: torch.Tensor) -> list:
    """Per row: the buckets [(query width, key width, number of documents, mask or None)], the query
    and key/value gather indices over all of them (bucket after bucket), and the index that puts every
    position's output back in place. Built once per forward (every layer shares position_ids).

    Roots are batched by their length rounded up (`bucket_length`) and attend causally (no mask).
    A branch reads its root's first p positions and then its own as keys/values, but only its own
    positions are queries: branches are batched by their key length rounded up, their queries padded to
    the longest branch of the bucket, with a mask letting own query a see keys 0 .. p + a (a causal
    mask aligned to the end), instead of recomputing the prefix's queries under a plain causal mask and
    dropping their outputs. One layer's attention, fwd + bwd, on a GRPO row (8 prompts of 18 tokens, 8
    completions of 32 each, 2,248 positions; interleaved in-process A/B): 7.1 vs 8.7 ms."""
    rows = position_ids.cpu().numpy()
    key = (tuple(position_ids.shape), rows.tobytes())  # by content: addresses get reused
    if key in _plan_cache:
        return _plan_cache[key]
    plans = [_row_plan(row.astype(np.int64, copy=False), position_ids.device) for row in rows.reshape(-1, rows.shape[-1])]
    _plan_cache.clear()  # keep only the current batch's plan
    _plan_cache[key] = plans
    return plans


class _Gather(torch.autograd.Function):
    """`t.index_select(0, idx)` whose backward adds with `index_add_` into one zero-filled gradient.
    Advanced indexing's own backward is an accumulating `index_put_`, which on CPU took ~2.3 ms per
    call under the profiler against ~0.3 ms (12 calls per step of the demo model; -1.5% per step in an
    A/B). Both accumulate where an index repeats: a prefix-shared root's positions, read again by each
    of its branches, and the padding slots past a document's end (whose gradient is exactly zero: their
    outputs are dropped and every real query is causally before them)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.length = t.shape[0]
        return t.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.length, *grad.shape[1:])
        return out.index_add_(0, idx, grad), None


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    """Same contract as transformers' sdpa_attention_forward: (B, H, T, D) in, (B, T, H, D) out."""
    position_ids = kwargs.get("position_ids")
    q_len = query.shape[2]
    simple = (
        position_ids is not None
        and position_ids.shape[-1] == q_len == key.shape[2]  # training forward, no cache
        and not kwargs.get("sliding_window")  # windows and soft-capping need the dense path
        and getattr(module, "attn_logit_softcapping", None) is None
        and getattr(module, "is_causal", True)
    )
    if not simple:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    dropout = dropout if module.training else 0.0
    rows = []
    # Positions first: each row's (T, H, D) view (the projections' own memory order: HF transposes
    # (B, T, H, D) to (B, H, T, D) as a view), so every gather and scatter moves whole positions, and
    # the output comes out as (B, T, H, D) with no transpose copy. One gather per tensor and row, split
    # into buckets: the backward is one scatter per tensor, not a zero-filled full-size gradient per
    # bucket (and per row) summed up. Measured against gathering along T of the (H, T, D) views, with
    # unbind, split and an output stacked and transposed back (fwd + bwd of one layer's attention, 4
    # query and 2 KV heads of 64, interleaved in-process A/B): the row of a GRPO step (64
    # prefix-shared completions, 2,192 tokens, one bucket) 10.7 vs 16.6 ms, a uniform SFT row (1,664
    # tokens, two buckets) 14.7 vs 16.8 ms; the SDPA kernels alone take 8.5-9.1 and 9.7-11.6 ms.
    # A single row and a single bucket skip unbind, stack and split: their backwards are copies.
    batch = [(query.squeeze(0), key.squeeze(0), value.squeeze(0))] if query.shape[0] == 1 else zip(query.unbind(0), key.unbind(0), value.unbind(0))
    for (shapes, q_idx, kv_idx, out_index), (q, k, v) in zip(_plans(position_ids), batch):
        parts = [_Gather.apply(t.transpose(0, 1), i) for t, i in ((q, q_idx), (k, kv_idx), (v, kv_idx))]  # (positions, H, D)
        if len(shapes) > 1:  # per bucket
            q_sizes, kv_sizes = [n * qw for qw, _, n, _ in shapes], [n * w for _, w, n, _ in shapes]
            parts = [parts[0].split(q_sizes), parts[1].split(kv_sizes), parts[2].split(kv_sizes)]
        else:
            parts = [(t,) for t in parts]
        outs = []
        for (q_width, width, n, mask), qb, kb, vb in zip(shapes, *parts):
            o = F.scaled_dot_product_attention(
                qb.unflatten(0, (n, q_width)).transpose(1, 2),  # (n, H, q_width, D)
                kb.unflatten(0, (n, width)).transpose(1, 2), vb.unflatten(0, (n, width)).transpose(1, 2),
                attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None and width > 1, enable_gqa=groups > 1,
            )
            outs.append(o.transpose(1, 2).reshape(n * q_width, o.shape[1], o.shape[3]))  # (n * q_width, H, D)
        both = outs[0] if len(outs) == 1 else torch.cat(outs)
        rows.append(both.index_select(0, out_index))  # (T, H, D), every position from its slot
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows), None


# Under compute.compile the layers around it are compiled; this function stays eager (its plan comes
# from the data through .tolist(), which would break the graph anyway).
AttentionInterface.register(NAME, torch.compiler.disable(packed_sdpa))


def packed_mask(*args, **kwargs):
    """The mask builder: sdpa's dense [T, T] mask, built only where `packed_sdpa` falls back to dense
    SDPA (sliding-window layers, attention logit soft-capping, decoding with a cache). The
    per-document path never reads a mask, and building one per forward costs more than the
    attention itself for a packed row (~50 ms at 4k tokens on CPU)."""
    config = kwargs.get("config")
    dense = (
        config is None
        or kwargs.get("local_size") is not None  # a sliding-window layer's mask
        or getattr(config, "attn_logit_softcapping", None) is not None
        or kwargs.get("q_length") != kwargs.get("kv_length")
        or kwargs.get("q_offset", 0) or kwargs.get("kv_offset", 0)
    )
    return sdpa_mask(*args, **kwargs) if dense else None


ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, packed_mask)

def default_attention(device: torch.device) -> str:
    """`auto`: flash-attention varlen on CUDA when installed, else our per-document SDPA."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return NAME


@torch.no_grad()
def _probe_diff(model: torch.nn.Module, row: torch.Tensor, pos: torch.Tensor, tail: int, alone: torch.Tensor) -> float:
    """Max abs difference between the logits of the last `tail` positions of a packed `row` and those
    of `alone` (the same document unpacked, its last `tail` positions)."""
    base = unwrap(model)
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    try:
        got = base(input_ids=row[None].to(device), position_ids=pos[None].to(device), use_cache=False).logits[:, -tail:].float()
        ref = base(input_ids=alone[None].to(device), use_cache=False).logits[:, -tail:].float()
    finally:
        base.train(was_training)
    return float((got - ref).abs().max())


def check_document_isolation(model: torch.nn.Module, vocab_size: int) -> float:
    """Probe the configured backend: a document's logits must not change when another document is
    packed before it. Returns the max abs difference (the caller fails closed above tolerance)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, vocab_size, (5,), generator=g), torch.randint(0, vocab_size, (7,), generator=g)
    return _probe_diff(model, torch.cat([a, b]), torch.cat([torch.arange(5), torch.arange(7)]), 7, b)


def check_prefix_sharing(model: torch.nn.Module, vocab_size: int) -> float:
    """Probe shared-prefix rows (`packing.share_prefix`): a branch's logits must equal those of its
    document unshared (prefix + own tokens). Only `packed_sdpa`'s per-document path reads branches;
    dense attention (sliding-window layers, soft-capped scores) and other backends cut the branch off
    its prefix and fail this. Returns the max abs difference."""
    g = torch.Generator().manual_seed(1)
    prefix, a, b = (torch.randint(0, vocab_size, (n,), generator=g) for n in (4, 3, 5))
    row = torch.cat([prefix, a, prefix[-1:], b])  # root = prefix + a; branch = last prefix token + b
    pos = torch.cat([torch.arange(7), torch.arange(3, 9)])
    return _probe_diff(model, row, pos, 6, torch.cat([prefix, b]))
