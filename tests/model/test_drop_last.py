"""`pack_row(drop_last=True)`: each document's last token is not computed (its output predicts nothing
and only it reads its keys and values); every target's log-prob and every gradient equal those of the
full row, the targets, their documents and order are unchanged, and the FLOP count follows the
positions computed."""

import random

import pytest
import torch
from test_prefix_sharing import unit
from transformers import AutoModelForCausalLM

from posttrain.data.packing import computed_lens, pack_row, share_prefix, target_doc_index, target_rows
from posttrain.data.records import Sample
from posttrain.model.attention import segments
from posttrain.model.preference import document_logps


def test_the_row_leaves_out_each_documents_last_token_and_targets_keep_their_predictions():
    p = [5, 6, 7, 8]
    s = share_prefix(unit(p, [[1, 2], [3], [9, 9, 9]]))  # root 5 6 7 8 1 2; branches (3), (9 9 9) at position 4
    full = pack_row([s, unit([4], [[2, 2]])], 64, 0, 8)
    b = pack_row([s, unit([4], [[2, 2]])], 64, 0, 8, drop_last=True)
    # the root loses its 2, the one-token branch stays whole, the branch 9 9 9 loses its last 9, and
    # the new root 4 2 2 its last 2; the padding tail rounds the computed row up to the multiple of 8
    assert b["input_ids"][0].tolist() == [5, 6, 7, 8, 1, 3, 9, 9, 4, 2] + [0] * 6
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 4, 4, 5, 0, 1, 0, 1, 2, 3, 4, 5]
    assert segments(b["position_ids"]) == [[(0, 5, 0, 0), (5, 6, 0, 4), (6, 8, 0, 4), (8, 10, 8, 0), (10, 16, 10, 0)]]
    assert torch.equal(b["labels"], full["labels"]) and b["doc_lens"] == full["doc_lens"] and b["num_tokens"] == 13
    assert computed_lens(b) == [5, 1, 2, 2] and computed_lens(full) == [6, 1, 3, 3]
    # each target's prediction, in the computed row: 1 <- 8, 2 <- 1, 3 <- 8 (root), 9 <- 8 (root), 9 <- 9, 9 <- 9, 2 <- 4, 2 <- 2
    assert target_rows(b).tolist() == [3, 4, 3, 3, 6, 7, 8, 9]
    assert target_doc_index(b).tolist() == target_doc_index(full).tolist()


def test_a_document_followed_by_a_branch_that_would_continue_it_stays_whole():
    # the prompt alone (positions 0-3), then a branch from its last token (position 3, as
    # `share_prefix` makes it): with the prompt's last token dropped, the branch would continue
    # positions 0-2 and be read as one document with it
    s = Sample((1, 2, 3, 4, 4, 8), (-100, -100, -100, -100, -100, 8), "f:1", (4, 2), doc_starts=(0, 3))
    b = pack_row([s], 16, 0, 8, drop_last=True)
    assert b["input_ids"][0].tolist()[:5] == [1, 2, 3, 4, 4] and computed_lens(b) == [4, 1]
    assert segments(b["position_ids"])[0][:2] == [(0, 4, 0, 0), (4, 5, 0, 3)]
    assert target_rows(b).tolist() == [4]


# gemma3's sliding-window layers take the dense path, which reads no branches (the probe refuses it)
@pytest.mark.parametrize("family,shared", [("qwen3", False), ("qwen3", True), ("llama", False), ("llama", True), ("gemma3", False)])
def test_log_probs_and_gradients_equal_the_full_rows(request, family, shared):
    path = request.getfixturevalue(f"tiny_{family}")
    rng = random.Random(0)
    tok = lambda n: [rng.randrange(3, 300) for _ in range(n)]  # noqa: E731
    units = [unit(tok(9), [tok(5), tok(12), tok(1), tok(7)]), unit(tok(3), [tok(4)]), unit(tok(20), [tok(6), tok(30)])]
    units = [share_prefix(u) if shared else u for u in units]
    outs = {}
    for drop in (False, True):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="posttrain_packed", dtype=torch.float32)
        batch = pack_row(units, 512, 0, 16, drop_last=drop)
        sums, counts = document_logps(m, batch, 300, chunk_tokens=8)
        (sums * torch.arange(1, len(sums) + 1)).sum().backward()  # every document's gradient, weighted apart
        outs[drop] = sums.detach(), counts, {n: p.grad for n, p in m.named_parameters()}, sum(computed_lens(batch))
    (s0, c0, g0, n0), (s1, c1, g1, n1) = outs[False], outs[True]
    docs = sum(len(u.docs) for u in units)
    assert n1 == n0 - docs + (1 if shared else 0)  # a one-token branch stays whole
    assert torch.equal(c0, c1)
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6 * max(1.0, g0[n].abs().max().item()), rtol=1e-4, msg=n)


def test_grpo_completion_log_probs_and_gradients_equal_the_full_rows(tiny_qwen3):
    """The GRPO layout (`Rollouts._pack`): prompts with their completions as shared-prefix branches,
    completions of one token and completions that end the row among them."""
    from posttrain.model.rl import completion_logps

    rng = random.Random(1)
    tok = lambda n: [rng.randrange(3, 300) for _ in range(n)]  # noqa: E731
    units = [share_prefix(unit(tok(7), [tok(rng.randint(1, 9)) for _ in range(4)])) for _ in range(3)]
    outs = {}
    for drop in (False, True):
        m = AutoModelForCausalLM.from_pretrained(tiny_qwen3, attn_implementation="posttrain_packed", dtype=torch.float32)
        batch = pack_row(units, 512, 0, 64, drop_last=drop)
        lp, ent = completion_logps(m, batch, 300, entropy=True)
        (lp * torch.arange(1, len(lp) + 1) + ent).sum().backward()
        outs[drop] = lp.detach(), ent.detach(), {n: p.grad for n, p in m.named_parameters()}, batch
    (lp0, e0, g0, b0), (lp1, e1, g1, b1) = outs[False], outs[True]
    assert sum(computed_lens(b1)) < sum(computed_lens(b0)) and torch.equal(b1["labels"], b0["labels"])
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6 * max(1.0, g0[n].abs().max().item()), rtol=1e-4, msg=n)
