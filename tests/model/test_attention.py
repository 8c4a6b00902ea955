"""`packed_sdpa` against attention written out per document: several rows, several length buckets,
prefix-shared branches, grouped KV heads; outputs and the gradients of q, k and v."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.model.attention import _plans, bucket_length, packed_sdpa, segments


class _Module:
    training = True
    is_causal = True

    def __init__(self, groups: int):
        self.num_key_value_groups = groups


def _positions(docs: list[tuple[int, int]]) -> list[int]:
    """(first position, length) per document: a root starts at 0, a branch at its shared prefix length."""
    return [p for first, n in docs for p in range(first, first + n)]


def _reference(q, k, v, position_ids, scale):
    """Every document's queries over its keys (a branch: its root's first p positions, then its own),
    causal, in float64: (B, T, H, D)."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    rows = []
    for b, spans in enumerate(segments(position_ids)):
        out = torch.zeros(q.shape[2], q.shape[1], q.shape[3], dtype=torch.float64)
        for s, e, root, p in spans:
            keys = list(range(root, root + p)) + list(range(s, e))
            scores = torch.einsum("htd,hkd->htk", q[b][:, s:e], k[b][:, keys]) * scale
            allowed = torch.arange(len(keys))[None, :] <= (p + torch.arange(e - s))[:, None]
            attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            out[s:e] = torch.einsum("htk,hkd->thd", attn, v[b][:, keys])
        rows.append(out)
    return torch.stack(rows)


@pytest.mark.parametrize("rows", [1, 2])
def test_packed_sdpa_equals_attention_per_document(rows):
    torch.manual_seed(0)
    layouts = [
        [(0, 5), (0, 20), (0, 3), (0, 37), (0, 1), (0, 14)],  # documents in three length buckets
        [(0, 12), (9, 6), (9, 8), (11, 4), (0, 30), (0, 9), (3, 11)],  # roots with branches after them
    ][:rows]
    pos = torch.tensor([_positions(d) for d in layouts])
    assert pos.shape[1] == 80
    H, KV, D, T = 4, 2, 16, pos.shape[1]
    # as transformers hands them over: (B, T, H, D) projections transposed to (B, H, T, D) views
    q, k, v = (torch.randn(rows, T, h, D).transpose(1, 2).requires_grad_() for h in (H, KV, KV))
    weights = torch.randn(rows, T, H, D)
    out, _ = packed_sdpa(_Module(H // KV), q, k, v, None, scaling=1 / math.sqrt(D), position_ids=pos)
    (out * weights).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = _reference(*leaves, pos, 1 / math.sqrt(D))
    (want * weights.double()).sum().backward()
    assert out.shape == (rows, T, H, D)
    assert (out.double() - want).abs().max() < 1e-5
    for g, leaf in zip(got, leaves):
        assert (g.double() - leaf.grad).abs().max() < 1e-5


def _plan_per_position(row: list[int]):
    """The plan of one row written out position by position (what `_row_plan` computes with arrays):
    buckets by (branch, rounded key length) in order of first appearance, each document's key/value and
    query positions padded with the positions after its end (clamped to the row), the output slots."""
    (spans,) = segments(torch.tensor([row]))
    T = len(row)
    buckets: dict = {}
    for s, e, root, p in spans:
        buckets.setdefault((p > 0, bucket_length(p + e - s)), []).append((s, e, root, p))
    shapes, q_idx, kv_idx, out_index, base = [], [], [], [0] * T, 0
    for (branch, width), docs in buckets.items():
        q_width = max(e - s for s, e, _, _ in docs) if branch else width
        for j, (s, e, root, p) in enumerate(docs):
            keys = list(range(root, root + p)) + list(range(s, e))
            kv_idx += keys + [min(e + k, T - 1) for k in range(width - len(keys))]
            q_idx += list(range(s, e)) + [min(e + k, T - 1) for k in range(q_width - (e - s))]
            out_index[s:e] = range(base + j * q_width, base + j * q_width + (e - s))
        shapes.append((q_width, width, len(docs), [p for _, _, _, p in docs] if branch else None))
        base += len(docs) * q_width
    return shapes, q_idx, kv_idx, out_index


def test_plan_equals_plan_written_per_position():
    import random

    rng = random.Random(0)
    layouts = [
        [(0, 1)], [(0, 7)], [(0, 5), (0, 20), (0, 3), (0, 37), (0, 1), (0, 14)],
        [(0, 12), (9, 6), (9, 8), (11, 4), (0, 30), (0, 9), (3, 11)],
        [(3, 4), (0, 6)],  # a row starting inside a document: its first document is a root
        [(0, 49)] + [(18, 31)] * 7 + [(0, 50)] + [(17, 33)] * 7,  # GRPO: prompts with their completions' branches
    ]
    for _ in range(30):  # random mixes of roots and branches, lengths across several buckets
        docs, root = [], 0
        while sum(n for _, n in docs) < 600:
            if root and rng.random() < 0.4:
                docs.append((rng.randint(1, root), rng.randint(1, 40)))
            else:
                root = rng.randint(1, 300)
                docs.append((0, root))
        layouts.append(docs)
    for docs in layouts:
        row = _positions(docs)
        (shapes, q, kv, out), = _plans(torch.tensor([row]))
        want_shapes, want_q, want_kv, want_out = _plan_per_position(row)
        assert [(qw, w, n) for qw, w, n, _ in shapes] == [(qw, w, n) for qw, w, n, _ in want_shapes], docs
        assert q.tolist() == want_q and kv.tolist() == want_kv and out.tolist() == want_out, docs
        for (qw, w, n, mask), (*_, prefixes) in zip(shapes, want_shapes):
            if prefixes is None:
                assert mask is None
            else:  # own query a sees keys 0 .. p + a
                want = torch.tensor([[[key <= p + a for key in range(w)] for a in range(qw)] for p in prefixes])[:, None]
                assert torch.equal(mask, want)
