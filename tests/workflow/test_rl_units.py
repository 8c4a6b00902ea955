"""GRPO's packing units (`Rollouts._units`): a prompt's completions form one unit, its prompt computed
once (data.share_prefix), cut where the next completion would overflow the micro-batch budget."""

from types import SimpleNamespace

from posttrain.workflow.rl import Rollouts


def units_of(items, budget, share=True):
    r = object.__new__(Rollouts)  # only the packing: no engine, no rewards
    r.job = SimpleNamespace(share_prefix=share)
    return r._units(items, budget)


def item(prompt, completion, where):
    return tuple(prompt), tuple(completion), [0.0] * len(completion), 1.0, where


def names(units):
    return [[it[4] for it in u] for u, _ in units]


def test_a_group_is_one_unit_where_it_fits_and_cut_where_it_does_not():
    p = [1, 2, 3, 4, 5]
    group = [item(p, [10 + i, 20 + i, 30 + i], f"f:1#{i}") for i in range(4)]
    units = units_of(group + [item([7, 8], [9], "f:2#0")], 64)
    assert names(units) == [[f"f:1#{i}" for i in range(4)], ["f:2#0"]]
    assert units[0][1].doc_lens == (8, 3, 3, 3) and units[0][1].doc_starts == (0, 5, 5, 5)  # the prompt once
    # 14 tokens: the first completion with the prompt (8) and two branches (3 each); the fourth
    # completion starts a unit of its own, with its prompt
    units = units_of(group, 14)
    assert names(units) == [["f:1#0", "f:1#1", "f:1#2"], ["f:1#3"]]
    assert [s.doc_lens for _, s in units] == [(8, 3, 3), (8,)]
    assert units[1][1].input_ids == (1, 2, 3, 4, 5, 13, 23, 33)
    # without sharing, one unit per completion
    assert names(units_of(group, 64, share=False)) == [[f"f:1#{i}"] for i in range(4)]
