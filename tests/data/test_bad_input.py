"""Issue 13, bad input: never hang, never a traceback for a user's mistake. Each case names the file,
record or key at fault, and says what to do."""

import json

import pytest

from posttrain.config import ConfigError, DataConfig, DataSource, ModelConfig
from posttrain.data.loader import SampleStream, load_samples
from posttrain.data.records import BadRecord
from posttrain.data.tokenizer import load_tokenizer

from conftest import job_dict, write_jsonl

GOOD = {"messages": [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "1 + 2 = 3."}]}


@pytest.fixture
def tok(tiny_qwen3):
    return load_tokenizer(ModelConfig(path=str(tiny_qwen3)))


def cfg(*paths, **kw):
    return DataConfig(sources=[DataSource(path=str(p)) for p in paths], **{"shuffle": False, **kw})


def drain(stream: SampleStream, limit: int = 2000) -> list:
    """Samples of the stream; a stream that reads `limit` records without ending or giving a sample
    is hung (today's restart-forever loop), which fails the test instead of hanging it."""
    calls, out, inner = [0], [], stream.mixer.next

    def counted():
        calls[0] += 1
        if calls[0] > limit and not out:
            raise AssertionError(f"hung: {limit} records read, no sample")
        return inner()

    stream.mixer.next = counted
    while (s := stream.next()) is not None:
        out.append(s)
        if len(out) >= 50:
            break
    return out


def _filter_all(rec):
    return None


DEAD = {
    "malformed": (['{"messages": [oops', "not json", '{"a":'], {}, "invalid_json=3"),
    "binary": ([b"\x00\xff\xfe\x01garbage".decode("latin-1")] * 2, {}, "invalid_json=2"),
    "no_assistant": ([{"messages": [{"role": "user", "content": "hi"}]}] * 3, {}, "empty_mask=3"),
    "filtered": ([GOOD] * 2, {"transform": f"{__name__}:_filter_all"}, "filtered=2"),
}


@pytest.mark.parametrize("case", list(DEAD))
def test_source_with_no_usable_record_stops_instead_of_restarting_forever(tmp_path, tok, case):
    records, kw, counts = DEAD[case]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    stream = SampleStream(cfg(path, on_bad_record="skip", **kw), tok, seed=0)
    with pytest.raises(ConfigError) as e:
        drain(stream)
    msg = str(e.value)
    assert "data.sources[0]" in msg and str(path) in msg and "no usable record" in msg, msg
    assert counts in msg, msg


def test_dead_source_among_good_ones_is_named(tmp_path, tok):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD] * 4)
    bad = write_jsonl(tmp_path / "bad.jsonl", ["nope"] * 3)
    stream = SampleStream(cfg(good, bad, on_bad_record="skip"), tok, seed=0)
    with pytest.raises(ConfigError, match=r"data.sources\[1\] .*bad.jsonl.*invalid_json=3"):
        for _ in range(100):
            stream.next()


def test_source_with_usable_records_restarts_as_before(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ["nope", GOOD, "nope"])
    stream = SampleStream(cfg(path, on_bad_record="skip"), tok, seed=0)
    assert len(drain(stream)) == 50  # many epochs, one sample each


def test_dead_pass_check_survives_state_round_trip(tmp_path, tok):
    """Resumed mid-pass after the pass's only good record: the pass is not judged as empty."""
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "nope", "nope"])
    a = SampleStream(cfg(path, on_bad_record="skip"), tok, seed=0)
    a.next()
    b = SampleStream(cfg(path, on_bad_record="skip"), tok, seed=0)
    b.load_state_dict(a.state_dict())
    assert len(drain(b)) == 50


def _no_template(tok):
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_no_chat_template_on_conversations_is_a_config_error_at_first_record(tmp_path, tok, policy):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    stream = SampleStream(cfg(path, on_bad_record=policy), _no_template(tok), seed=0)
    with pytest.raises(ConfigError) as e:
        drain(stream)
    msg = str(e.value)
    assert "model.path" in msg and "model.chat_template" in msg and f"{path}:1" in msg, msg
    assert stream.stats.seen == 1


def test_no_chat_template_with_a_chat_format_is_refused_before_reading(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].*data.format: sharegpt.*model.chat_template"):
        SampleStream(cfg(path, format="sharegpt"), _no_template(tok), seed=0)


def test_no_chat_template_is_fine_for_text(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "plain text here"}])
    stream = SampleStream(cfg(path, max_epochs=1), _no_template(tok), seed=0)
    assert len(drain(stream)) == 1


# ------------------------------------------------------------------------ corrupt compressed files
def _compress(kind: str, data: bytes) -> bytes:
    import bz2
    import gzip
    import lzma

    if kind in ("gz", "bz2", "xz"):
        return {"gz": gzip, "bz2": bz2, "xz": lzma}[kind].compress(data)
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


def _broken(kind: str, how: str, n: int = 400) -> bytes:
    lines = b"".join(json.dumps({"text": f"line number {i} " + "x" * 50}).encode() + b"\n" for i in range(n))
    blob = _compress(kind, lines)
    if how == "truncated":
        return blob[: len(blob) * 2 // 3]
    bad = bytearray(blob)
    mid = len(bad) // 2
    bad[mid: mid + 64] = bytes(64)
    return bytes(bad)


KINDS = ["gz", "zst", "bz2", "xz"]
BROKEN = [(k, h) for k in KINDS for h in ("truncated", "corrupt")]


@pytest.fixture
def no_retry(monkeypatch):
    """A corrupt file is not a network error: retrying it (with_retries' backoff) fails the test."""
    import posttrain.data.sources as sources

    def sleep(s):
        raise AssertionError("a corrupt file was retried as if it were a network error")

    monkeypatch.setattr(sources.time, "sleep", sleep)


@pytest.mark.parametrize("kind,how", BROKEN)
def test_broken_compressed_file_is_a_bad_record_naming_file_and_line(tmp_path, tok, no_retry, kind, how):
    path = tmp_path / f"d.jsonl.{kind}"
    path.write_bytes(_broken(kind, how))
    with pytest.raises(BadRecord) as e:
        load_samples(cfg(path), tok)
    msg = str(e.value)
    assert e.value.reason == "corrupt_file" and msg.startswith(f"{path}:"), msg
    assert "truncated or corrupt" in msg and "compressed byte" in msg and "on_bad_record" in msg, msg
    line = int(e.value.where.rsplit(":", 1)[1])
    assert f"at line {line}" in msg and 1 <= line <= 400


@pytest.mark.parametrize("kind,how", BROKEN)
def test_broken_compressed_file_is_skipped_and_the_next_file_read(tmp_path, tok, no_retry, kind, how):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / f"a.jsonl.{kind}").write_bytes(_broken(kind, how))
    write_jsonl(tmp_path / "src" / "b.jsonl", [{"text": "the good file"}] * 3)
    samples, stats = load_samples(cfg(tmp_path / "src", on_bad_record="skip"), tok)
    assert stats.skipped["corrupt_file"] == 1, stats.summary()
    assert stats.kept == len(samples) and len(samples) >= 3 and stats.seen == stats.kept + 1
    assert len(samples) < 403  # the broken file's records after the break are not read


@pytest.mark.parametrize("kind", KINDS)
def test_intact_compressed_files_read_in_full_across_windows(tmp_path, tok, kind):
    """Also several concatenated members / frames (pigz, zstd -T, `cat a.zst b.zst`)."""
    path = tmp_path / f"d.jsonl.{kind}"
    parts = [b"".join(json.dumps({"text": f"t {i}"}).encode() + b"\n" for i in range(j, j + 100)) for j in (0, 100, 200)]
    path.write_bytes(b"".join(_compress(kind, p) for p in parts))
    samples, stats = load_samples(cfg(path, shuffle_window=64), tok)
    assert len(samples) == 300 and not stats.skipped
    assert [tok.decode(s.input_ids, skip_special_tokens=True).strip() for s in samples][::99] == ["t 0", "t 99", "t 198", "t 297"]


# ---------------------------------------------------------------------------- corrupt model weights
CORRUPT_WEIGHTS = {
    "truncated": lambda b: b[: len(b) // 2],
    "zeroed": lambda b: bytes(len(b)),
    "bad_header": lambda b: b[:8] + b"{not json" + b[17:],
}


@pytest.mark.parametrize("how", list(CORRUPT_WEIGHTS))
def test_corrupt_safetensors_is_one_line_naming_the_file(tiny_qwen3, tmp_path, capsys, how):
    import shutil

    import yaml

    from posttrain.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_qwen3, model)
    weights = model / "model.safetensors"
    weights.write_bytes(CORRUPT_WEIGHTS[how](weights.read_bytes()))
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 4)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(model, data, tmp_path / "run")))
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert f"model.path: the weights file {weights} is corrupt or truncated" in " ".join(err.split()), err
    assert line.startswith("error: model.path:") and "again" in err


# ------------------------------------------------------------------------- resume with other sources
def _write_job(tmp_path, model, sources, **sections):
    import yaml

    job = job_dict(model, sources[0], tmp_path / "run", **sections)
    job["data"]["sources"] = [{"path": str(p)} for p in sources]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.parametrize("change", ["path", "added", "weight"])
def test_resume_after_data_sources_changed_says_what_changed(tiny_qwen3, tmp_path, capsys, change):
    from posttrain.cli import main

    a = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 8)
    b = write_jsonl(tmp_path / "b.jsonl", [GOOD] * 8)
    kw = {"train": {"steps": 1}, "compute": {"checkpoint_every": 1}, "export": {"enabled": False}}
    assert main(["run", str(_write_job(tmp_path, tiny_qwen3, [a], **kw))]) == 0
    capsys.readouterr()
    kw["train"] = {"steps": 2}
    job = _write_job(tmp_path, tiny_qwen3, {"path": [b], "added": [a, b], "weight": [a]}[change], **kw)
    if change == "weight":
        text = job.read_text().replace(f"path: {a}", f"path: {a}\n    weight: 2.0")
        job.write_text(text)
    assert main(["run", str(job)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and "error: data.sources changed since checkpoint" in err, err
    expected = {"path": f"[0].path: '{a}' -> '{b}'", "added": f"[1] added ('{b}')", "weight": "[0].weight: 1.0 -> 2.0"}
    assert expected[change] in err and "--overwrite" in err and f"old sources ('{a}')" in err, err


# ------------------------------------------------------------------------------------ unknown roles
def _chat(*roles):
    return {"messages": [{"role": r, "content": f"turn {i} as {r}"} for i, r in enumerate(roles)]}


def test_unknown_role_is_an_error_naming_file_line_and_role(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, _chat("human", "assistant")])
    with pytest.raises(BadRecord) as e:
        load_samples(cfg(path), tok)
    msg = str(e.value)
    assert e.value.reason == "unknown_role" and msg.startswith(f"{path}:2: messages[0].role 'human'"), msg
    assert "data.unknown_roles" in msg


def test_unknown_role_in_prompt_completion_lists_is_named(tmp_path, tok):
    rec = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "gpt", "content": "a"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [rec])
    with pytest.raises(BadRecord, match=r":1: completion\[0\].role 'gpt'"):
        load_samples(cfg(path), tok)


@pytest.mark.parametrize("policy", ["error", "map", "drop", "keep"])
def test_unknown_roles_policies(tmp_path, tok, policy):
    aliased = _chat("developer", "human", "gpt")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, aliased, _chat("user", "narrator", "assistant")])
    samples, stats = load_samples(cfg(path, on_bad_record="skip", unknown_roles=policy), tok)
    by_line = {s.where.rsplit(":", 1)[1]: s for s in samples}
    if policy == "error":
        assert list(by_line) == ["1"] and dict(stats.skipped) == {"unknown_role": 2}
    elif policy == "map":  # line 2 renders exactly as the same chat with the documented roles; 'narrator' has no mapping
        known = {"messages": [{**m, "role": r} for m, r in zip(aliased["messages"], ["system", "user", "assistant"])]}
        expect = load_samples(cfg(write_jsonl(tmp_path / "m.jsonl", [known])), tok)[0][0]
        assert list(by_line) == ["1", "2"] and by_line["2"].input_ids == expect.input_ids
        assert dict(stats.skipped) == {"unknown_role": 1}
    elif policy == "drop":  # line 2 loses every turn (nothing to train on); line 3 loses 'narrator'
        assert list(by_line) == ["1", "3"] and dict(stats.skipped) == {"empty_mask": 1}
        text = tok.decode(by_line["3"].input_ids)
        assert "narrator" not in text and "turn 0 as user" in text and "turn 2 as assistant" in text
    else:  # kept as they are, never trained: line 2 has no assistant turn
        assert list(by_line) == ["1", "3"] and dict(stats.skipped) == {"empty_mask": 1}
        assert "turn 1 as narrator" in tok.decode(by_line["3"].input_ids)


# ---------------------------------------------------------------------------------- huge records
def _prose(n_words: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    words = ["the", "model", "answer", "is", "42", "café", "naïve", "東京", "😀", "\n", "  ", "x=1;", "", "don't", "(a+b)"]
    return " ".join(rng.choice(words) + rng.choice(["", ",", ".", "!"]) for _ in range(n_words))


@pytest.fixture
def tokenized_chars(monkeypatch, tok):
    """Characters the tokenizer was called on, in total (its own call, and the chat encoder's direct
    calls of its backend for ids and offsets)."""
    from posttrain.data import chat

    seen = [0]
    cls = type(tok)
    call = cls.__call__
    ids_offsets = chat._ids_offsets

    def spy(self, text=None, *a, **kw):
        if isinstance(text, str):
            seen[0] += len(text)
        return call(self, text, *a, **kw)

    def spy_offsets(tok, text):
        seen[0] += len(text)
        return ids_offsets(tok, text)

    monkeypatch.setattr(cls, "__call__", spy)
    monkeypatch.setattr(chat, "_ids_offsets", spy_offsets)
    return seen


@pytest.mark.parametrize("field", ["text", "prompt", "completion"])
def test_a_huge_record_is_tokenized_only_as_far_as_max_seq_len_needs(tmp_path, tok, tokenized_chars, field):
    huge = _prose(80_000)  # ~400 KB of text, of which 128 tokens are kept
    rec = {"text": huge} if field == "text" else {"prompt": "Q?", "completion": huge} if field == "completion" else \
        {"prompt": huge, "completion": "A."}
    path = write_jsonl(tmp_path / "d.jsonl", [rec, {"text": "short"}])
    samples, stats = load_samples(cfg(path, max_seq_len=128, max_tokens_per_batch=512, on_bad_record="skip"), tok)
    assert tokenized_chars[0] < 20_000, tokenized_chars[0]
    assert stats.capped == 1 and "(1 so long that only their first characters were tokenized)" in stats.summary()
    if field == "prompt":  # the prompt fills max_seq_len: nothing to train on, as with full tokenization
        assert len(samples) == 1 and dict(stats.skipped) == {"empty_mask": 1}
        return
    full = tok(huge)["input_ids"] if field == "text" else tok("Q?")["input_ids"] + tok(huge, add_special_tokens=False)["input_ids"]
    assert list(samples[0].input_ids) == full[:128] and stats.truncated == 1


HUGE_CHATS = {
    "answer": lambda huge: [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": huge}],
    "question": lambda huge: [{"role": "user", "content": huge}, {"role": "assistant", "content": "A."}],
    "history": lambda huge: [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"},
                             {"role": "assistant", "content": "Short."}, {"role": "user", "content": "More?"},
                             {"role": "assistant", "content": huge}, {"role": "user", "content": "And?"},
                             {"role": "assistant", "content": "Done."}],
}


@pytest.mark.parametrize("kind", list(HUGE_CHATS))
def test_a_huge_conversation_is_tokenized_only_as_far_as_max_seq_len_needs(tmp_path, tok, tokenized_chars, kind):
    """A 400 KB chat record: its render is tokenized only as far as max_seq_len needs, and the kept ids
    and labels equal those of the whole render tokenized and masked, then truncated."""
    import time

    from posttrain.data.chat import encode_messages

    huge = _prose(80_000)
    messages = HUGE_CHATS[kind](huge)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}, {"text": "short"}])
    t0 = time.perf_counter()
    samples, stats = load_samples(cfg(path, max_seq_len=128, max_tokens_per_batch=512, on_bad_record="skip"), tok)
    elapsed = time.perf_counter() - t0
    assert tokenized_chars[0] < 20_000, tokenized_chars[0]
    assert stats.capped == 1
    full = encode_messages(tok, messages)  # uncapped: the whole render tokenized
    assert tokenized_chars[0] > len(huge)  # the whole render, once
    if kind == "question":  # the question fills max_seq_len: nothing to train on, as uncapped
        assert len(samples) == 1 and dict(stats.skipped) == {"empty_mask": 1}
        return
    labels = [t if m else -100 for t, m in zip(full.input_ids, full.loss_mask)]
    assert list(samples[0].input_ids) == full.input_ids[:128] and list(samples[0].labels) == labels[:128]
    assert any(lab != -100 for lab in samples[0].labels) and stats.truncated == 1
    assert elapsed < 5, elapsed  # about 0.03 s here


@pytest.mark.parametrize("seed", range(6))
def test_capped_tokenization_keeps_exactly_the_tokens_of_full_tokenization(tok, seed):
    """Normal records around and past the cap: the kept tokens equal full tokenization's."""
    from posttrain.data.records import cap_text

    max_tokens = 32
    for n_words in (5, 40, 120, 400, 3000):
        text = _prose(n_words, seed)
        cut, capped = cap_text(tok, text, max_tokens, add_special_tokens=True)
        assert text.startswith(cut) and (capped or cut == text)
        assert tok(cut)["input_ids"][:max_tokens] == tok(text)["input_ids"][:max_tokens], (seed, n_words)


def test_capped_record_under_overlong_drop_is_dropped(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": _prose(100_000)}, {"text": "short"}])
    samples, stats = load_samples(cfg(path, max_seq_len=64, overlong="drop", on_bad_record="skip"), tok)
    assert len(samples) == 1 and stats.skipped["overlong"] == 1 and stats.capped == 1


def test_dead_source_on_the_cli_is_one_line_not_a_hang(tiny_qwen3, tmp_path, capsys, monkeypatch):
    """The error is raised in the loader's background thread; the CLI prints it as one line. (A
    mixer that reads 2000 records without a sample fails the test instead of hanging it.)"""
    from posttrain.cli import main
    from posttrain.data.mixer import Mixer

    calls, inner = [0], Mixer.next

    def counted(self):
        calls[0] += 1
        if calls[0] > 2000:
            raise AssertionError("hung: 2000 records read, no sample")
        return inner(self)

    monkeypatch.setattr(Mixer, "next", counted)
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops"] * 5)
    job = _write_job(tmp_path, tiny_qwen3, [bad], data={"on_bad_record": "skip"})
    assert main(["run", str(job)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and f"error: data.sources[0] '{bad}': a whole pass" in err and "invalid_json=5" in err, err


@pytest.mark.parametrize("policy", ["error", "map"])
def test_unknown_role_in_a_preference_pair(tmp_path, tok, policy):
    from posttrain.data.pairs import encode_pair_record

    rec = {"prompt": [{"role": "human", "content": "2+2?"}], "chosen": "4", "rejected": "5"}
    path = write_jsonl(tmp_path / "d.jsonl", [rec])
    if policy == "error":
        with pytest.raises(BadRecord, match=r"d.jsonl:1: prompt\[0\].role 'human' is not one of"):
            load_samples(cfg(path), tok, encode=encode_pair_record)
        return
    (got,), _ = load_samples(cfg(path, unknown_roles="map"), tok, encode=encode_pair_record)
    known = write_jsonl(tmp_path / "k.jsonl", [{**rec, "prompt": [{"role": "user", "content": "2+2?"}]}])
    (want,), _ = load_samples(cfg(known), tok, encode=encode_pair_record)
    assert got.input_ids == want.input_ids and got.labels == want.labels


@pytest.mark.parametrize("kind", KINDS)
def test_broken_compressed_json_array_names_the_file(tmp_path, tok, no_retry, kind):
    path = tmp_path / f"d.json.{kind}"
    blob = _compress(kind, json.dumps([{"text": f"record {i} " + "y" * 40} for i in range(400)]).encode())
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ConfigError) as e:
        load_samples(cfg(path), tok)
    msg = str(e.value)
    assert msg.startswith(f"{path}: the ") and "file is truncated or corrupt" in msg and "not a valid JSON" not in msg, msg
