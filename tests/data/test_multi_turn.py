"""data.multi_turn: one sample per assistant turn through the loader: record accounting, the hint in
single mode's refusal, auto, the length policy per turn sample, and exact resume inside a record."""

import pytest
import torch

from posttrain.config import DataConfig, DataSource, ModelConfig
from posttrain.data.loader import DataLoader, load_samples
from posttrain.data.records import BadRecord
from posttrain.data.tokenizer import load_tokenizer

from conftest import write_jsonl

# Qwen3 style: reasoning is dropped from assistant turns that are not the last message.
STRIP_HISTORY = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] | trim }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# No end-of-turn marker after an answer: refused in every mode.
NO_EOT = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% if m.role != 'assistant' %}<|im_end|>{% endif %}"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conv(i: int, turns: int = 2, think: bool = True) -> dict:
    msgs = []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Question {i}.{t}: add {i} and {t}."})
        msgs.append({"role": "assistant", "content": (f"<think>{i} plus {t}</think>" if think else "") + f"It is {i + t}."})
    return {"messages": msgs}


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    return load_tokenizer(ModelConfig(path=str(tiny_qwen3), chat_template=STRIP_HISTORY))


def cfg(path, **kw):
    return DataConfig(sources=[DataSource(path=str(path))], **{"shuffle": False, "max_epochs": 1, **kw})


def trained(tok, s) -> str:
    return tok.decode([t for t in s.labels if t != -100])


def test_expand_one_sample_per_turn(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [conv(i, turns=1 + i % 3) for i in range(6)])
    with pytest.raises(BadRecord, match="does not appear|not a prefix|reasoning"):
        load_samples(cfg(path), tok)  # single: the reasoning of earlier turns is lost from history
    samples, stats = load_samples(cfg(path, multi_turn="expand"), tok)
    turns = [1 + i % 3 for i in range(6)]
    assert len(samples) == sum(turns) and stats.kept == 6 and stats.expanded == 6 and stats.turn_samples == sum(turns)
    assert "6 kept, 6 made into 12 samples (one per assistant turn)" in stats.summary()
    expected = [f"<think>{i} plus {t}</think>It is {i + t}.<|im_end|>" for i in range(6) for t in range(turns[i])]
    assert [trained(tok, s) for s in samples] == expected
    for s in samples:  # each sample renders its history as at inference: no reasoning of earlier turns
        assert tok.decode(s.input_ids).count("<think>") == 1
        assert s.where.endswith(tuple(f":{n}" for n in range(1, 7)))


def test_single_refusal_says_whether_expand_helps(tmp_path, tok, tiny_qwen3):
    path = write_jsonl(tmp_path / "d.jsonl", [conv(1)])
    with pytest.raises(BadRecord, match="trains correctly with data.multi_turn: expand") as e:
        load_samples(cfg(path), tok)
    assert e.value.reason == "template"
    no_eot = load_tokenizer(ModelConfig(path=str(tiny_qwen3), chat_template=NO_EOT))
    with pytest.raises(BadRecord, match="data.multi_turn: expand does not help here either") as e:
        load_samples(cfg(path), no_eot)
    with pytest.raises(BadRecord, match="not closed by any special token") as e:
        load_samples(cfg(path, multi_turn="expand"), no_eot)


def test_auto_expands_only_where_needed(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [conv(1, think=False), conv(2), {"messages": conv(3)["messages"][:2]}])
    samples, stats = load_samples(cfg(path, multi_turn="auto"), tok)
    assert len(samples) == 1 + 2 + 1 and stats.kept == 3 and stats.expanded == 1 and stats.turn_samples == 2
    assert trained(tok, samples[0]) == "It is 1.<|im_end|>It is 2.<|im_end|>"  # one sample, both turns


def test_length_policy_per_turn_sample(tmp_path, tok):
    rec = conv(7, turns=3)
    path = write_jsonl(tmp_path / "d.jsonl", [rec])
    full, _ = load_samples(cfg(path, multi_turn="expand"), tok)
    lens = [len(s.input_ids) for s in full]
    limit = lens[1]  # the third turn's sample is longer than this
    samples, stats = load_samples(cfg(path, multi_turn="expand", max_seq_len=limit, overlong="drop"), tok)
    assert samples == full[:2] and stats.truncated == 1 and stats.turn_samples == 2
    samples, stats = load_samples(cfg(path, multi_turn="expand", max_seq_len=lens[0] - 1, overlong="drop",
                                      on_bad_record="skip"), tok)
    assert samples == [] and stats.skipped["overlong"] == 1 and stats.kept == 0
    samples, stats = load_samples(cfg(path, multi_turn="expand", max_seq_len=lens[0] + 2), tok)  # truncate
    assert [trained(tok, s) for s in samples] == [trained(tok, full[0])] and stats.truncated == 1
    with pytest.raises(BadRecord, match="every assistant turn's sample") as e:
        load_samples(cfg(path, multi_turn="expand", max_seq_len=8), tok)
    assert e.value.reason == "empty_mask"  # truncation to 8 tokens cuts off every turn


def _batches(loader, n=None):
    out = []
    for b in loader:
        out.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()})
        if n is not None and len(out) == n:
            break
    return out


@pytest.mark.parametrize("background", [False, True])
def test_exact_resume_inside_an_expanded_record(tmp_path, tok, background):
    path = write_jsonl(tmp_path / "d.jsonl", [conv(i, turns=3) for i in range(5)])
    c = cfg(path, multi_turn="expand", buffer_size=1, max_tokens_per_batch=256, max_seq_len=256, max_epochs=2)
    ref_loader = DataLoader(c, tok, seed=0, background=background)
    ref = _batches(ref_loader)
    ref_loader.close()
    assert len(ref) == 2 * 5 * 3
    for cut in (1, 4, 8):  # inside a record (its remaining turns pending) and at a record's start
        first = DataLoader(c, tok, seed=0, background=background)
        head = _batches(first, cut)
        state = first.state_dict()
        first.close()
        assert len(state["stream"]["pending"]) == (3 - cut % 3) % 3
        again = DataLoader(c, tok, seed=0, background=background)
        again.load_state_dict(state)
        tail = _batches(again)
        again.close()
        got = head + tail
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


# Nemotron-3 style: the generation prompt opens <think> unless enable_thinking is false; an answer
# without reasoning renders as <think></think>answer.
THINK_SWITCH = (
    "{%- set enable_thinking = enable_thinking if enable_thinking is defined else true %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and '<think>' not in m.content %}<think></think>{% endif %}{{ m.content }}<|im_end|>\n"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking %}<think>\n{% else %}<think></think>{% endif %}{% endif %}"
)


def test_chat_template_kwargs_reach_every_render(tmp_path, tiny_qwen3):
    from posttrain.data.pairs import encode_pair_record
    from posttrain.data.prompts import make_prompt_encoder
    from posttrain.data.records import RecordStats

    tok = load_tokenizer(ModelConfig(path=str(tiny_qwen3), chat_template=THINK_SWITCH))
    path = write_jsonl(tmp_path / "d.jsonl", [conv(4, think=False)])
    for mode in ("single", "expand"):  # a forced <think> the answers do not have: nothing is what is served
        with pytest.raises(BadRecord, match="enable_thinking: false"):
            load_samples(cfg(path, multi_turn=mode), tok)
    off = {"enable_thinking": False}
    samples, _ = load_samples(cfg(path, chat_template_kwargs=off), tok)
    assert [trained(tok, s) for s in samples] == ["It is 4.<|im_end|>It is 5.<|im_end|>"]
    samples, _ = load_samples(cfg(path, multi_turn="expand", chat_template_kwargs=off), tok)
    assert [trained(tok, s) for s in samples] == ["It is 4.<|im_end|>", "It is 5.<|im_end|>"]
    c = cfg(path, chat_template_kwargs=off)
    prompt = make_prompt_encoder(1000)(tok, {"prompt": "Add 1 and 2."}, "x:1", c, RecordStats())
    assert tok.decode(prompt.ids).endswith("assistant\n<think></think>")
    pair = encode_pair_record(tok, {"prompt": "Add 1 and 2.", "chosen": "3", "rejected": "4"}, "x:1", c, RecordStats())
    assert tok.decode(pair.input_ids).count("<think></think>3<|im_end|>") == 1
