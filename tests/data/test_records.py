"""Bad records: `error` stops with file:line and the reason; `skip` counts per reason. Overlong policy."""

import pytest

from posttrain.config import DataConfig, DataSource, ModelConfig
from posttrain.data.loader import load_samples
from posttrain.data.records import BadRecord
from posttrain.data.tokenizer import load_tokenizer

from conftest import write_jsonl

GOOD = {"messages": [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "1 + 2 = 3."}]}
BAD = [
    ('{"messages": [oops', "invalid_json"),
    ({"msgs": []}, "missing_field"),
    ({"messages": "hello"}, "wrong_type"),
    ({"messages": [{"role": "user", "content": 5}]}, "wrong_type"),
    ({"messages": [{"role": "user", "content": "no answer"}]}, "empty_mask"),
    ({"prompt": "p"}, "missing_field"),
    ({"prompt": "p", "completion": ["x"]}, "wrong_type"),
    ({"text": 3}, "wrong_type"),
    ("[1, 2]", "not_an_object"),
]


@pytest.fixture
def tok(tiny_qwen3):
    return load_tokenizer(ModelConfig(path=str(tiny_qwen3)))


def cfg(path, **kw):
    return DataConfig(sources=[DataSource(path=str(path))], **{"shuffle": False, **kw})


@pytest.mark.parametrize("i", range(len(BAD)))
def test_error_policy_names_file_line_and_reason(tmp_path, tok, i):
    record, reason = BAD[i]
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, record, GOOD])
    with pytest.raises(BadRecord) as e:
        load_samples(cfg(path), tok)
    assert e.value.reason == reason
    assert str(e.value).startswith(f"{path}:3: "), str(e.value)
    assert "on_bad_record" in str(e.value)


def test_skip_policy_counts_per_reason(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] + [r for r, _ in BAD] + ["", GOOD])
    samples, stats = load_samples(cfg(path, on_bad_record="skip"), tok)
    assert len(samples) == 2 and stats.kept == 2 and stats.seen == 2 + len(BAD)
    expected = {}
    for _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(stats.skipped) == expected
    assert "skipped: empty_mask=1" in stats.summary()


def test_formats_prompt_completion_and_text(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 1+1?", "completion": " 2"}, {"text": "plain text here"}])
    (pc, txt), _ = load_samples(cfg(path), tok)
    n_completion = len(tok(" 2", add_special_tokens=False)["input_ids"]) + 1  # + eos
    assert sum(lab != -100 for lab in pc.labels) == n_completion
    assert pc.labels[-1] == tok.eos_token_id
    assert all(lab != -100 for lab in txt.labels)


def test_overlong_truncate_and_drop(tmp_path, tok):
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, long, long_prompt])
    samples, stats = load_samples(cfg(path, max_seq_len=64, on_bad_record="skip"), tok)
    assert [len(s.input_ids) for s in samples][1] == 64 and stats.truncated == 1
    assert stats.skipped["empty_mask"] == 1  # the answer of long_prompt was truncated away
    samples, stats = load_samples(cfg(path, max_seq_len=64, overlong="drop", on_bad_record="skip"), tok)
    assert len(samples) == 1 and stats.skipped["overlong"] == 2
    with pytest.raises(BadRecord, match=r"d.jsonl:2: .*data.max_seq_len=64"):
        load_samples(cfg(path, max_seq_len=64, overlong="drop"), tok)


def test_transform_and_missing_file(tmp_path, tok):
    from posttrain.config import ConfigError

    with pytest.raises(ConfigError, match="missing.jsonl"):
        load_samples(cfg(tmp_path / "missing.jsonl"), tok)
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "Add 1 and 2.", "a": "3"}])
    c = cfg(path, transform="conftest:qa_to_messages")
    samples, _ = load_samples(c, tok)
    assert len(samples) == 1
