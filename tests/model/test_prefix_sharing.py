"""Shared-prefix packing (data.share_prefix): units whose documents start with the same prompt keep it
once; every target's log-prob and every gradient equal the unshared unit's, the FLOP count follows the
tokens computed, and the setup probe refuses backends that would cut a branch off its prefix."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import ConfigError, JobConfig
from posttrain.data.packing import pack_row, share_prefix, target_doc_index, target_rows
from posttrain.data.pairs import encode_pair_record
from posttrain.data.records import Sample
from posttrain.model.attention import check_prefix_sharing, segments
from posttrain.model.flops import FlopCounter, causal_pairs
from posttrain.model.preference import document_logps
from posttrain.workflow.engine import Engine

from conftest import job_dict, make_pairs, write_jsonl


def unit(prompt, completions, where="f:1"):
    """A unit of documents prompt + completion each, only the completions trained."""
    ids, labels, lens = (), (), []
    for c in completions:
        ids += tuple(prompt) + tuple(c)
        labels += (-100,) * len(prompt) + tuple(c)
        lens.append(len(prompt) + len(c))
    return Sample(ids, labels, where, tuple(lens))


def test_share_prefix_keeps_each_branch_from_its_first_own_token():
    p = [5, 6, 7, 8]
    s = share_prefix(unit(p, [[1, 2], [3], [9, 9, 9]]))
    assert s.doc_lens == (6, 1, 3) and s.doc_starts == (0, 4, 4)
    assert s.input_ids == (5, 6, 7, 8, 1, 2, 3, 9, 9, 9)
    assert s.labels == (-100,) * 4 + (1, 2) + (3,) + (9, 9, 9)
    b = pack_row([s, unit([4], [[2, 2]])], 64, 0, 8)
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 4, 4, 5, 6, 0, 1, 2, 0, 1, 2]
    assert b["doc_starts"] == [0, 4, 4, 0]
    # a branch's first token is a target (a root's never is: nothing is predicted across a boundary)
    assert b["labels"][0].tolist() == [-100] * 4 + [1, 2, 3, 9, 9, 9, -100, 2, 2] + [-100] * 3
    # the attention reads: root, two branches of it (prefix 4), a new root, the padding tail
    assert segments(b["position_ids"]) == [[(0, 6, 0, 0), (6, 7, 0, 4), (7, 10, 0, 4), (10, 13, 10, 0), (13, 16, 13, 0)]]
    # each target's prediction: the position before it, or for a branch's first token the root's
    # output at the last prompt position (index 3), as for the root's own first completion token
    assert target_rows(b).tolist() == [3, 4, 3, 3, 7, 8, 10, 11]
    assert target_doc_index(b).tolist() == [0, 0, 1, 2, 2, 2, 3, 3]
    assert share_prefix(s) is s  # already shared
    one = unit(p, [[1]])
    assert share_prefix(one) is one


def test_a_branch_that_would_continue_the_previous_document_keeps_its_last_shared_token():
    # doc 1 is the prompt alone (ends at position 2); doc 2 shares 3 tokens, so its own tokens would
    # start at position 3, continuing doc 1: it starts at 2 instead, from its last shared (untrained) token
    s = share_prefix(Sample((1, 2, 3, 4, 1, 2, 3, 1, 2, 3, 5), (-100, -100, -100, 4, -100, -100, -100, -100, -100, -100, 5),
                            "f:1", (4, 3, 4)))
    assert s.doc_starts == (0, 2, 2) and s.doc_lens == (4, 1, 2)
    assert s.input_ids == (1, 2, 3, 4, 3, 3, 5) and s.labels == (-100, -100, -100, 4, -100, -100, 5)
    b = pack_row([s], 64, 0, 8)
    assert b["position_ids"][0].tolist()[:7] == [0, 1, 2, 3, 2, 2, 3]
    assert target_rows(b).tolist() == [2, 5]  # 4 from the root's position 2; 5 from the branch's own 3


def test_share_prefix_never_shares_a_trained_token_and_a_new_prompt_is_a_new_root():
    # the sides share ids 1 2 3, but 3 is trained on the second side: only 1 2 is shared
    s = share_prefix(Sample((1, 2, 3, 4, 1, 2, 3, 5), (-100, -100, 3, 4, -100, -100, 3, 5), "f:1", (4, 4)))
    assert s.doc_starts == (0, 2) and s.input_ids == (1, 2, 3, 4, 3, 5) and s.labels[4:] == (3, 5)
    s = share_prefix(Sample((1, 2, 3, 1, 2, 3, 7, 2, 3), (-100, -100, 3, -100, -100, 3, -100, -100, 3), "f:1", (3, 3, 3)))
    # doc 1 repeats doc 0 up to its trained token; doc 2 starts differently: a root of its own
    assert s.doc_starts == (0, 2, 0) and s.doc_lens == (3, 1, 3)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_branches_give_the_unshared_log_probs_and_gradients(request, family):
    path = request.getfixturevalue(f"tiny_{family}")
    rng = random.Random(0)
    tok = lambda n: [rng.randrange(3, 300) for _ in range(n)]  # noqa: E731
    units = [unit(tok(9), [tok(5), tok(12), tok(1), tok(7)]), unit(tok(3), [tok(4)]), unit(tok(20), [tok(6), tok(30)])]
    outs = {}
    for shared in (False, True):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="posttrain_packed", dtype=torch.float32)
        batch = pack_row([share_prefix(u) if shared else u for u in units], 512, 0, 16)
        sums, counts = document_logps(m, batch, 300, chunk_tokens=8)
        (sums * torch.arange(1, len(sums) + 1)).sum().backward()  # every document's gradient, weighted apart
        outs[shared] = sums.detach(), counts, {n: p.grad for n, p in m.named_parameters()}, batch["num_tokens"]
    (s0, c0, g0, n0), (s1, c1, g1, n1) = outs[False], outs[True]
    assert n1 == n0 - 3 * 9 - 20  # the prompts of 3 + 1 documents are not computed again, not even their last token
    assert torch.equal(c0, c1)
    torch.testing.assert_close(s1, s0, atol=1e-5, rtol=1e-6)
    for n in g0:  # float reordering, relative to each gradient's scale (the embedding's sums over tokens: up to 42,
        # where an AVX-512 machine's kernels differed by 1e-5 between the two layouts)
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6 * max(1.0, g0[n].abs().max().item()), rtol=1e-4, msg=n)


def test_the_probe_refuses_backends_that_cut_a_branch_off_its_prefix(tiny_qwen3, tiny_gemma3):
    def probe(path, attn):
        return check_prefix_sharing(AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn), 300)

    assert probe(tiny_qwen3, "posttrain_packed") < 1e-5
    assert probe(tiny_qwen3, "sdpa") > 1e-3  # dense masks from positions: the branch sees no prefix
    assert probe(tiny_gemma3, "posttrain_packed") > 1e-3  # sliding-window layers take the dense path


def test_flops_count_a_branch_against_its_prefix():
    from transformers import Qwen3Config

    cfg = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    c = FlopCounter.from_config(cfg)
    shared = c.breakdown([10, 4], 12, doc_starts=[0, 6])
    per_pair = 4.0 * 16 * 4 * 2  # QK^T and AV, heads, layers
    assert shared["attention"]["forward"] == per_pair * (causal_pairs(10) + causal_pairs(10) - causal_pairs(6))
    assert shared["layers"]["forward"] == c.breakdown([14], 12)["layers"]["forward"]  # projections follow the tokens


def test_a_frozen_model_that_cannot_read_branches_turns_sharing_off_or_is_refused(tiny_qwen3, tiny_gemma3, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(4))
    job = job_dict(tiny_qwen3, pairs, tmp_path / "r", recipe="dpo")
    job["dpo"] = {}
    cfg = JobConfig.model_validate(job)
    e = Engine.setup(cfg, tmp_path / "r")
    assert e.share_prefix
    e.frozen(str(tiny_gemma3))  # a reference with sliding-window layers, loaded before any data
    assert not e.share_prefix and "data.share_prefix: off" in " ".join(capsys.readouterr().err.split())
    assert set(next(e.loader(encode_pair_record))["doc_starts"]) == {0}  # pairs unshared
    e = Engine.setup(cfg, tmp_path / "r2")
    e.loader(encode_pair_record)
    with pytest.raises(ConfigError, match="data already shares prompts; set data.share_prefix: false"):
        e.frozen(str(tiny_gemma3))
