"""GRPO-family math against direct formulas written here, one sequence at a time with Python loops:
advantages, ratios (token and GSPO sequence level), clipping, KL estimators, importance correction,
the three loss aggregations, and the trainer's completion log-probs against the HF forward."""

import itertools
import math

import pytest
import torch

import posttrain.model.attention  # noqa: F401  (registers the posttrain_packed attention backend)
from posttrain.model.rl import (
    aggregate,
    clipped_surrogate,
    completion_logps,
    group_advantages,
    is_weights,
    kl_penalty,
    ratios,
    zero_variance_groups,
)

from conftest import load_padded


def _std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_direct_formula(scale):
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.0]
    G = 4
    batch_std = _std(rewards)
    want = []
    for g in range(0, len(rewards), G):
        grp = rewards[g : g + G]
        mean = sum(grp) / G
        for r in grp:
            s = {"group": _std(grp) + 1e-6, "batch": batch_std + 1e-6, "none": 1.0}[scale]
            want.append((r - mean) / s)
    got = group_advantages(torch.tensor(rewards), G, scale)
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert zero_variance_groups(torch.tensor(rewards), G).tolist() == [False, True, False]
    with pytest.raises(ValueError, match="do not split"):
        group_advantages(torch.tensor(rewards), 5)


# ----------------------------------------------------------------------------- a direct GRPO loss
def direct_loss(seqs, *, clip_low, clip_high, level, agg, beta, est, ent_coef, is_mode, cap, max_tokens, total_tokens, total_seqs):
    """The GRPO objective written out per sequence and token (floats, no vectorisation)."""
    out = 0.0
    for s in seqs:
        n = len(s["logp"])
        if level == "sequence":
            seq_ratio = math.exp(sum(lp - o for lp, o in zip(s["logp"], s["old"])) / n)
        terms = []
        for t in range(n):
            lp, old, beh = s["logp"][t], s["old"][t], s["behaviour"][t]
            r = seq_ratio if level == "sequence" else math.exp(lp - old)
            a = s["adv"]
            pg = -min(r * a, min(max(r, 1 - clip_low), 1 + clip_high) * a)
            w = math.exp(old - beh)
            if is_mode == "truncate":
                w = min(w, cap)
            elif is_mode == "mask":
                w = w if w <= cap else 0.0
            else:
                w = 1.0
            term = w * pg
            if beta:
                d = s["ref"][t] - lp
                term += beta * (lp - s["ref"][t] if est == "k1" else math.exp(d) - d - 1)
            term -= ent_coef * s["entropy"][t]
            terms.append(term)
        if agg == "token_mean":
            out += sum(terms) / total_tokens
        elif agg == "seq_mean_token_mean":
            out += sum(terms) / n / total_seqs
        else:
            out += sum(terms) / max_tokens / total_seqs
    return out


def random_seqs(seed, lens=(3, 5, 1, 4)):
    g = torch.Generator().manual_seed(seed)

    def r(n, scale=0.3):
        return (torch.randn(n, generator=g) * scale).tolist()

    seqs = []
    for i, n in enumerate(lens):
        old = [-1.0 + x for x in r(n)]
        seqs.append({"logp": [o + x for o, x in zip(old, r(n, 0.4))], "old": old, "behaviour": [o + x for o, x in zip(old, r(n, 0.5))],
                     "ref": [o + x for o, x in zip(old, r(n))], "entropy": [abs(x) for x in r(n)], "adv": [1.2, -0.7, 0.4, -1.5][i % 4]})
    return seqs


def ours(seqs, *, clip_low, clip_high, level, agg, beta, est, ent_coef, is_mode, cap, max_tokens, total_tokens, total_seqs):
    flat = lambda k: torch.tensor([x for s in seqs for x in s[k]], dtype=torch.float64)  # noqa: E731
    doc = torch.tensor([i for i, s in enumerate(seqs) for _ in s["logp"]])
    logp = flat("logp").requires_grad_(True)
    old = flat("old")
    adv = torch.tensor([s["adv"] for s in seqs], dtype=torch.float64)[doc]
    pg, _ = clipped_surrogate(ratios(logp, old, doc, len(seqs), level), adv, clip_low, clip_high)
    per = is_weights(old, flat("behaviour"), is_mode, cap) * pg
    if beta:
        per = per + beta * kl_penalty(logp, flat("ref"), est)
    per = per - ent_coef * flat("entropy")
    loss = aggregate(per, doc, len(seqs), agg, total_tokens=total_tokens, total_seqs=total_seqs, max_tokens=max_tokens)
    return loss, logp


OPTIONS = list(itertools.product(["token", "sequence"], ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"],
                                 [(0.0, "k3"), (0.05, "k1"), (0.05, "k3")], [None, "truncate", "mask"]))


@pytest.mark.parametrize("level,agg,kl,is_mode", OPTIONS)
def test_loss_equals_direct_formula_for_every_option(level, agg, kl, is_mode):
    seqs = random_seqs(0)
    kw = dict(clip_low=0.2, clip_high=0.28, level=level, agg=agg, beta=kl[0], est=kl[1], ent_coef=0.01, is_mode=is_mode, cap=1.3,
              max_tokens=8, total_tokens=sum(len(s["logp"]) for s in seqs), total_seqs=len(seqs))
    loss, logp = ours(seqs, **kw)
    assert loss.item() == pytest.approx(direct_loss(seqs, **kw), rel=1e-9, abs=1e-12)
    # gradient against finite differences of the direct formula (clip boundaries avoided by the data)
    loss.backward()
    eps, i = 1e-6, 0
    for si, s in enumerate(seqs):
        for t in range(len(s["logp"])):
            up = [dict(x, logp=list(x["logp"])) for x in seqs]
            up[si]["logp"][t] += eps
            down = [dict(x, logp=list(x["logp"])) for x in seqs]
            down[si]["logp"][t] -= eps
            if level == "sequence":  # GSPO's gradient flows through sg[s_i] * pi_t / sg[pi_t]: compare to it
                continue
            fd = (direct_loss(up, **kw) - direct_loss(down, **kw)) / (2 * eps)
            assert logp.grad[i].item() == pytest.approx(fd, rel=1e-4, abs=1e-7)
            i += 1


def test_gspo_gradient_equals_sequence_objective():
    """With seq_mean_token_mean, GSPO-token's loss and gradient equal GSPO's sequence objective
    -min(s_i A_i, clip(s_i) A_i) averaged over sequences, s_i = exp(mean_t log pi/pi_old)."""
    seqs = random_seqs(1)
    doc = torch.tensor([i for i, s in enumerate(seqs) for _ in s["logp"]])
    logp = torch.tensor([x for s in seqs for x in s["logp"]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([x for s in seqs for x in s["old"]], dtype=torch.float64)
    adv = torch.tensor([s["adv"] for s in seqs], dtype=torch.float64)
    pg, _ = clipped_surrogate(ratios(logp, old, doc, len(seqs), "sequence"), adv[doc], 0.2, 0.2)
    aggregate(pg, doc, len(seqs), "seq_mean_token_mean", total_tokens=0, total_seqs=len(seqs)).backward()

    logp2 = logp.detach().clone().requires_grad_(True)
    lens = torch.bincount(doc).double()
    s = torch.exp(torch.zeros(len(seqs), dtype=torch.float64).index_add(0, doc, logp2 - old) / lens)
    direct = -torch.minimum(s * adv, s.clamp(0.8, 1.2) * adv).mean()
    direct.backward()
    assert torch.allclose(logp.grad, logp2.grad, atol=1e-12)


def test_token_mean_is_invariant_to_the_split_over_workers_and_micro_batches():
    """The same tokens as 2 workers x 2 micro-batches or 1 x 4: summed shares give the same loss."""
    seqs = random_seqs(2, lens=(3, 5, 1, 4, 2, 6, 3, 2))
    kw = dict(clip_low=0.2, clip_high=0.2, level="token", beta=0.05, est="k3", ent_coef=0.0, is_mode="truncate", cap=2.0, max_tokens=8,
              total_tokens=sum(len(s["logp"]) for s in seqs), total_seqs=len(seqs))
    for agg in ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]:
        whole = ours(seqs, agg=agg, **kw)[0].item()
        four = sum(ours(seqs[i : i + 2], agg=agg, **kw)[0].item() for i in range(0, 8, 2))  # 1 worker x 4 micro
        workers = [seqs[0::2], seqs[1::2]]  # 2 workers x 2 micro-batches, interleaved
        two_by_two = sum(ours(w[i : i + 2], agg=agg, **kw)[0].item() for w in workers for i in (0, 2))
        assert four == pytest.approx(whole, rel=1e-12) and two_by_two == pytest.approx(whole, rel=1e-12)


def test_clip_fraction_and_importance_weights():
    r = torch.tensor([0.5, 0.9, 1.5, 1.1, 0.7])
    a = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0])
    loss, active = clipped_surrogate(r, a, 0.2, 0.3)
    assert active.tolist() == [True, False, True, False, False]
    assert loss.tolist() == pytest.approx([0.8, -0.9, -1.3, 1.1, -0.7])
    old, beh = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.0, -1.0, 1.0])
    assert is_weights(old, beh, "truncate", 2.0).tolist() == pytest.approx([1.0, 2.0, math.exp(-1)])
    assert is_weights(old, beh, "mask", 2.0).tolist() == pytest.approx([1.0, 0.0, math.exp(-1)])
    assert is_weights(old, beh, None, 2.0).tolist() == [1.0, 1.0, 1.0]
    assert kl_penalty(torch.tensor([-1.0]), torch.tensor([-1.0]), "k3").item() == 0.0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_equal_hf_forward_at_temperature(tiny_qwen3, temperature):
    """Packed rows (prompt unlabelled, completion labelled), padded vocab rows that would leak into
    the softmax: log-probs and entropies equal a plain HF forward per sequence, over the real vocab."""
    from posttrain.data.packing import pack_row
    from posttrain.data.records import Sample

    model, V = load_padded(tiny_qwen3, pad_rows=13)
    g = torch.Generator().manual_seed(0)
    seqs = [(torch.randint(3, V, (p,), generator=g).tolist(), torch.randint(3, V, (c,), generator=g).tolist()) for p, c in [(5, 4), (7, 1), (3, 6)]]
    batch = pack_row([Sample(tuple(p + c), (-100,) * len(p) + tuple(c), "x") for p, c in seqs], 64, 0)
    model.config._attn_implementation = "posttrain_packed"
    lp, ent = completion_logps(model, batch, V, temperature=temperature, entropy=True)
    model.config._attn_implementation = "sdpa"
    want_lp, want_ent = [], []
    with torch.no_grad():
        for p, c in seqs:
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1, :V] / temperature
            logp = torch.log_softmax(logits, -1)
            want_lp += logp.gather(1, torch.tensor(c)[:, None])[:, 0].tolist()
            want_ent += (-(logp.exp() * logp).sum(-1)).tolist()
    assert torch.allclose(lp.detach(), torch.tensor(want_lp), atol=1e-5)
    assert torch.allclose(ent.detach(), torch.tensor(want_ent), atol=1e-5)
    # entropy as a metric only: the same values, and the backward does not go through them
    model.config._attn_implementation = "posttrain_packed"
    lp_m, ent_m = completion_logps(model, batch, V, temperature=temperature, entropy="metric")
    assert lp_m.requires_grad and not ent_m.requires_grad
    assert torch.equal(lp_m.detach(), lp.detach()) and torch.equal(ent_m, ent.detach())
    assert "ExpBackward0" in _graph_nodes(lp.grad_fn) and "ExpBackward0" not in _graph_nodes(lp_m.grad_fn)


def _graph_nodes(fn) -> set[str]:
    """Names of the autograd nodes reachable from `fn`."""
    seen, todo = set(), [fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            todo += [g for g, _ in f.next_functions]
    return {type(f).__name__ for f in seen}
