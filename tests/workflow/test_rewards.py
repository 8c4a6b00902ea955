"""Reward functions: weights, async functions, TRL's calling convention, and every way one can fail
(raises, NaN, wrong count, not a number) is an error naming it, or zero + counted with on_error: zero."""

import asyncio
import math

import pytest
import torch

from posttrain.config import ConfigError
from posttrain.workflow.rewards import RemoteRewardModel, RewardError, Rewards, RewardSpec
from posttrain.workflow.rollout import node_cores

CALLS = {}


def length_reward(completions, **_):
    return [float(len(c)) for c in completions]


def answer_reward(prompts, completions, completion_ids, answer, **_):
    CALLS["answer"] = dict(prompts=prompts, completion_ids=completion_ids, answer=answer)
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


async def async_reward(completions, **_):
    await asyncio.sleep(0.01)
    return [0.5 for _ in completions]


def raises(completions, **_):
    raise KeyError("boom")


def nan_second(completions, **_):
    return [1.0, math.nan, 1.0][: len(completions)]


def wrong_count(completions, **_):
    return [1.0]


def not_applicable(completions, **_):
    return [None, 1, True]


def spec(fn, **kw):
    return RewardSpec(fn=f"{__name__}:{fn}", **kw)


def call(rewards):
    return rewards(["p1", "p2", "p3"], ["4", "x", "12"], [[1], [2], [3, 4]], {"answer": ["4", "5", "12"]})


def test_weighted_sum_async_and_columns():
    r = Rewards([spec("answer_reward", weight=2.0), spec("length_reward", weight=0.5), spec("async_reward")])
    out = call(r)
    assert out.total.tolist() == pytest.approx([2 + 0.5 + 0.5, 0 + 0.5 + 0.5, 2 + 1.0 + 0.5])
    assert out.per_fn["answer_reward"].tolist() == [1.0, 0.0, 1.0]
    assert CALLS["answer"] == {"prompts": ["p1", "p2", "p3"], "completion_ids": [[1], [2], [3, 4]], "answer": ["4", "5", "12"]}
    assert out.errors == {"answer_reward": 0, "length_reward": 0, "async_reward": 0}
    assert call(Rewards([spec("not_applicable")])).total.tolist() == [0.0, 1.0, 1.0]  # None scores 0, bools count


@pytest.mark.parametrize("fn,msg", [
    ("raises", r"reward function 'raises' raised KeyError: 'boom'"),
    ("nan_second", r"reward function 'nan_second' returned nan for completion 1"),
    ("wrong_count", r"reward function 'wrong_count' returned 1 values for 3 completions"),
])
def test_failures_name_the_function_or_are_zeroed_and_counted(fn, msg):
    with pytest.raises(RewardError, match=msg):
        call(Rewards([spec(fn), spec("length_reward")]))
    if fn == "wrong_count":  # a wrong count is a bug in the function, never zeroed
        with pytest.raises(RewardError, match=msg):
            call(Rewards([spec(fn)], on_error="zero"))
        return
    out = call(Rewards([spec(fn), spec("length_reward")], on_error="zero"))
    assert out.errors[fn] == (3 if fn == "raises" else 1)
    assert out.total.tolist() == pytest.approx({"raises": [1.0, 1.0, 2.0], "nan_second": [2.0, 1.0, 3.0]}[fn])


def test_bad_specs_are_config_errors():
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\].fn: module 'tests' has no attribute|grpo.rewards\[0\].fn"):
        Rewards([RewardSpec(fn=f"{__name__}:missing")], key="grpo.rewards")
    with pytest.raises(ConfigError, match="share the name"):
        Rewards([spec("length_reward"), spec("length_reward")])


def test_a_reward_model_scores_each_completion_as_its_own_forward(tiny_qwen3, tmp_path):
    """`model: DIR`: a sequence-classification reward model; batched scores (right-padded, pooled at
    the last real token) equal each conversation scored alone by the model's own forward."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_qwen3, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = ["Add 3 and 4.", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Spell moon."}], "Hi"]
    completions = ["3 + 4 = 7.", "m-o-o-n.", "a much longer answer than the others, to make padding matter"]
    r = Rewards([RewardSpec(model=str(tmp_path / "rm"), weight=2.0, batch_size=2)])
    out = r(prompts, completions, [[1]] * 3, {})
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for i, (p, c) in enumerate(zip(prompts, completions)):
        msgs = ([{"role": "user", "content": p}] if isinstance(p, str) else p) + [{"role": "assistant", "content": c}]
        ids = tok(tok.apply_chat_template(msgs, tokenize=False), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            alone = float(rm(**ids).logits[0, 0])
        assert out.per_fn["reward_model"][i].item() == pytest.approx(alone, abs=1e-5)
        assert out.total[i].item() == pytest.approx(2 * alone, abs=2e-5)
    with pytest.raises(ValueError, match="exactly one of `fn`"):
        RewardSpec(fn=f"{__name__}:length_reward", model=str(tmp_path / "rm"))
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\].model: no such directory"):
        Rewards([RewardSpec(model=str(tmp_path / "nope"))], key="grpo.rewards")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\].model: cannot load a sequence-classification reward model"):
        Rewards([RewardSpec(model=str(tmp_path / "empty"))], key="grpo.rewards", on_error="zero")(["p"], ["c"], [[1]], {})


def test_a_reward_model_placed_apart_scores_like_one_in_process(tiny_qwen3, tmp_path):
    """`placement: separate`: the reward model in its own Ray actor (started on the first call, awaited
    beside the other functions) gives the scores the in-process one gives; one that does not load is
    the same config error, raised from the actor's start; close() stops the actor and the local Ray."""
    import ray
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_qwen3, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    cfg.pad_token_id = tok.pad_token_id
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    (tmp_path / "empty").mkdir()
    prompts, completions = ["Add 3 and 4.", "Hi", "Spell moon."], ["7", "hello there, how are you", "m-o-o-n"]
    with pytest.raises(ValueError, match="placement: separate places a reward model"):
        RewardSpec(fn=f"{__name__}:length_reward", placement="separate")
    here = Rewards([RewardSpec(model=str(tmp_path / "rm"), batch_size=2), spec("length_reward")])
    apart = Rewards([RewardSpec(model=str(tmp_path / "rm"), batch_size=2, placement="separate"), spec("length_reward")])
    assert not ray.is_initialized()  # started on the first call, not before
    try:
        a, b = here(prompts, completions, [[1]] * 3, {}), apart(prompts, completions, [[1]] * 3, {})
        assert ray.is_initialized() and torch.allclose(a.total, b.total, atol=1e-6)
        assert torch.allclose(a.per_fn["reward_model"], b.per_fn["reward_model"], atol=1e-6)
        actor = next(fn for _, _, fn in apart.fns if isinstance(fn, RemoteRewardModel)).actor
        # Ray starts it with OMP_NUM_THREADS = its 1 reserved cpu; it scores while the trainer waits
        assert ray.get(actor.__ray_call__.remote(lambda _: torch.get_num_threads())) == node_cores()
        bad = Rewards([RewardSpec(model=str(tmp_path / "empty"), placement="separate")], key="grpo.rewards", on_error="zero")
        with pytest.raises(ConfigError, match=r"grpo.rewards\[0\].model: cannot load a sequence-classification reward model"):
            bad(["p"], ["c"], [[1]], {})
    finally:
        apart.close()
    assert not ray.is_initialized()
