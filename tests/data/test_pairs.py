"""Preference pairs: TRL records -> units of two documents (chosen, rejected) that the packer never
splits; each side rendered exactly as the chat template renders prompt + completion."""

import pickle
import re

import pytest
import torch

from posttrain.config import DataConfig, DataSource, ModelConfig
from posttrain.data.loader import DataLoader, load_samples
from posttrain.data.packing import make_batch, target_doc_index
from posttrain.data.pairs import encode_pair, encode_pair_record, fit_pair, pair_max_len
from posttrain.data.records import BadRecord, RecordStats, Sample
from posttrain.data.tokenizer import load_tokenizer
from posttrain.tiny import build_tokenizer

from conftest import write_jsonl

EOT = {"qwen3": "<|im_end|>", "llama": "<|eot_id|>"}
PROMPT_STR = "What is the capital of France?"
PROMPT_MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT_STR}]
CHOSEN, REJECTED = "The capital of France is Paris.", "It is Lyon, I think."


@pytest.fixture(scope="module")
def toks(tiny_qwen3, tiny_llama):
    return {"qwen3": load_tokenizer(ModelConfig(path=str(tiny_qwen3))),
            "llama": load_tokenizer(ModelConfig(path=str(tiny_llama)))}


def sides(s: Sample):
    n = s.doc_lens[0]
    return (s.input_ids[:n], s.labels[:n]), (s.input_ids[n:], s.labels[n:])


def as_completion(text, form):
    msg = {"role": "assistant", "content": text}
    return {"str": text, "message": msg, "list": [msg]}[form]


# ------------------------------------------------------------------------------ rendering
@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("prompt_form", ["str", "messages", "messages_alias"])
@pytest.mark.parametrize("completion_form", ["str", "message", "list"])
def test_each_side_is_the_chat_template_render_and_scores_only_the_completion(toks, family, prompt_form, completion_form):
    tok = toks[family]
    rec = {"chosen": as_completion(CHOSEN, completion_form), "rejected": as_completion(REJECTED, completion_form)}
    if prompt_form == "str":
        rec["prompt"] = PROMPT_STR
    else:
        rec["prompt" if prompt_form == "messages" else "messages"] = PROMPT_MSGS
    s = encode_pair(tok, rec, "d.jsonl:1")
    assert s.doc_lens == (len(sides(s)[0][0]), len(sides(s)[1][0])) and sum(s.doc_lens) == len(s.input_ids)
    prompt_msgs = [{"role": "user", "content": PROMPT_STR}] if prompt_form == "str" else PROMPT_MSGS
    for (ids, labels), text in zip(sides(s), (CHOSEN, REJECTED)):
        msgs = prompt_msgs + [{"role": "assistant", "content": text}]
        want = list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
        assert list(ids) == want
        scored = [i for i, lab in enumerate(labels) if lab != -100]
        assert scored == list(range(scored[0], scored[-1] + 1))  # one contiguous span
        assert all(labels[i] == ids[i] for i in scored)
        assert tok.decode([ids[i] for i in scored], skip_special_tokens=False) == text + EOT[family]
        # everything before the span is the prompt with the generation header
        prompt_ids = list(tok.apply_chat_template(prompt_msgs, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"])
        assert list(ids[: scored[0]]) == prompt_ids


def test_pair_without_chat_template_uses_the_plain_text_path(tmp_path):
    tok = load_tokenizer(ModelConfig(path=str(build_tokenizer(tmp_path / "plain", chat_template=None))))
    assert not tok.chat_template
    s = encode_pair(tok, {"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"}, "d.jsonl:1")
    p = list(tok("Q: 1+1?", add_special_tokens=True)["input_ids"])
    for (ids, labels), c in zip(sides(s), (" 2", " 3")):
        comp = list(tok(c, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        assert list(ids) == p + comp
        assert list(labels) == [-100] * len(p) + comp
    with pytest.raises(BadRecord) as e:
        encode_pair(tok, {"prompt": PROMPT_MSGS, "chosen": "a", "rejected": "b"}, "d.jsonl:2")
    assert e.value.reason == "template" and "chat template" in str(e.value)


def test_identical_after_rendering(toks):
    # the llama template trims content: different strings, same tokens
    with pytest.raises(BadRecord) as e:
        encode_pair(toks["llama"], {"prompt": "p", "chosen": "Paris", "rejected": "Paris  "}, "d.jsonl:4")
    assert e.value.reason == "identical_pair" and str(e.value).startswith("d.jsonl:4: ")
    encode_pair(toks["qwen3"], {"prompt": "p", "chosen": "Paris", "rejected": "Paris  "}, "d.jsonl:4")  # chatml keeps them


# ------------------------------------------------------------------------------ length policy
def test_fit_pair_truncates_each_side_or_drops(toks):
    tok = toks["qwen3"]
    s = encode_pair(tok, {"prompt": "hi", "chosen": "word " * 40, "rejected": "short"}, "d.jsonl:1")
    c_len, r_len = s.doc_lens
    assert r_len < 30 < c_len
    stats = RecordStats()
    t = fit_pair(s, 30, "truncate", stats)
    assert t.doc_lens == (30, r_len) and stats.truncated == 1
    assert t.input_ids == s.input_ids[:30] + s.input_ids[c_len:] and t.labels == s.labels[:30] + s.labels[c_len:]
    assert fit_pair(s, c_len, "truncate", stats) is s and stats.truncated == 1
    with pytest.raises(BadRecord) as e:
        fit_pair(s, 30, "drop", stats)
    assert e.value.reason == "overlong" and "'chosen' has" in str(e.value) and "max_len_per_side=30" in str(e.value)
    long_prompt = encode_pair(tok, {"prompt": "word " * 40, "chosen": "a", "rejected": "b"}, "d.jsonl:2")
    with pytest.raises(BadRecord) as e:
        fit_pair(long_prompt, 30, "truncate", stats)
    assert e.value.reason == "empty_mask"
    cfg = DataConfig(sources=[DataSource(path="x")], max_seq_len=100, max_tokens_per_batch=64)
    assert pair_max_len(cfg) == 32 and pair_max_len(cfg.model_copy(update={"max_seq_len": 20})) == 20


# ------------------------------------------------------------------------------ packing
def _pair(c, r, tag):
    """A hand-made unit: chosen = c tokens, rejected = r tokens, labels = ids (tags 100*tag + k)."""
    ids = tuple(100 * tag + k for k in range(c)) + tuple(100 * tag + 50 + k for k in range(r))
    return Sample(ids, ids, f"p{tag}", (c, r))


def _sft(n, tag):
    ids = tuple(100 * tag + k for k in range(n))
    return Sample(ids, ids, f"s{tag}")


def test_packed_row_with_pairs_layout():
    buf = [_sft(3, 1), _pair(4, 2, 2), _pair(6, 6, 3)]
    batch, rest = make_batch(buf, budget=11, pad_id=0, packing=True)
    assert [s.where for s in rest] == ["p3"]  # the 12-token pair fits no 11-token row: never split
    assert batch["doc_lens"] == [4, 2, 3] and batch["unit_docs"] == [2, 1] and batch["num_tokens"] == 9
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 201, 202, 203, -100, 251, -100, 101, 102, -100, -100]]
    assert target_doc_index(batch).tolist() == [0, 0, 0, 1, 2, 2]
    batch, _ = make_batch([_pair(6, 6, 3)], budget=12, pad_id=0, packing=True)
    assert batch["unit_docs"] == [2] and batch["doc_lens"] == [6, 6] and batch["num_tokens"] == 12
    sft, _ = make_batch([_sft(3, 1), _sft(4, 2)], budget=8, pad_id=0, packing=True)
    assert sft["unit_docs"] == [1, 1]


def test_padded_rows_with_pairs():
    buf = [_pair(4, 2, 1), _sft(3, 2), _pair(5, 1, 3)]
    batch, rest = make_batch(buf, budget=12, pad_id=0, packing=False)  # 3 rows x 4 = 12; + the next pair: 5 x 5 > 12
    assert [s.where for s in rest] == ["p3"]
    assert batch["doc_lens"] == [4, 2, 3] and batch["unit_docs"] == [2, 1] and batch["input_ids"].shape == (3, 4)
    assert batch["input_ids"].tolist() == [[100, 101, 102, 103], [150, 151, 0, 0], [200, 201, 202, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert target_doc_index(batch).tolist() == [0, 0, 0, 1, 2, 2]
    batch, rest = make_batch([_pair(9, 2, 1), _sft(3, 2)], budget=12, pad_id=0, packing=False)
    assert batch["unit_docs"] == [2] and batch["input_ids"].shape == (2, 9) and len(rest) == 1  # a unit alone always goes


def brute_doc_index(batch):
    labels = batch["labels"].tolist()
    out = []
    if "attention_mask" in batch:
        for r, row in enumerate(labels):
            out += [r for t in range(1, len(row)) if row[t] != -100]
    else:
        starts, acc = [], 0
        for n in batch["doc_lens"]:
            starts.append(acc)
            acc += n
        for t in range(1, len(labels[0])):
            if labels[0][t] != -100:
                out.append(max(d for d, s in enumerate(starts) if s <= t))
    return out


PAIR_RE = re.compile(r"Q(\d+):")


def pair_records(n):
    recs = []
    for i in range(n):
        recs.append({
            "prompt": f"Q{i}: " + "tell me " * (i % 6),
            "chosen": f"yes{i} " + "good " * ((i * 7) % 23),
            "rejected": f"no{i} " + "bad " * ((i * 5) % 31),
        })
    return recs


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pair_records(40))


def _pair_cfg(path, **kw):
    base = dict(sources=[DataSource(path=str(path))], max_tokens_per_batch=96, buffer_size=12, shuffle_window=16,
                max_seq_len=128)
    return DataConfig(**{**base, **kw})


def _docs_of(batch):
    """[(ids, labels, position_ids or None)] per document, in doc_lens order."""
    docs = []
    if "attention_mask" in batch:
        for r, n in enumerate(batch["doc_lens"]):
            assert int(batch["attention_mask"][r].sum()) == n
            docs.append((batch["input_ids"][r, :n].tolist(), batch["labels"][r, :n].tolist(), None))
    else:
        start = 0
        for n in batch["doc_lens"]:
            sl = slice(start, start + n)
            docs.append((batch["input_ids"][0, sl].tolist(), batch["labels"][0, sl].tolist(), batch["position_ids"][0, sl].tolist()))
            start += n
    return docs


@pytest.mark.parametrize("packing", [True, False])
def test_pairs_are_never_split_and_documents_are_isolated(toks, pair_data, packing):
    tok = toks["qwen3"]
    cfg = _pair_cfg(pair_data, packing=packing, on_exhausted="drop", shuffle=True)
    loader = DataLoader(cfg, tok, seed=3, encode=encode_pair_record, background=False)
    seen, n_batches = [], 0
    for batch in loader:
        n_batches += 1
        assert set(batch["unit_docs"]) == {2} and sum(batch["unit_docs"]) == len(batch["doc_lens"])
        assert max(batch["doc_lens"]) <= pair_max_len(cfg)
        if packing:
            width = batch["input_ids"].shape[1]  # the real tokens rounded up to 64, at most the budget
            assert width == min(96, -(-batch["num_tokens"] // 64) * 64) and sum(batch["doc_lens"]) == batch["num_tokens"] <= width
        else:
            assert batch["input_ids"].numel() <= 96
        docs = _docs_of(batch)
        for d, (ids, labels, pos) in enumerate(docs):
            if pos is not None:
                assert pos == list(range(len(ids)))  # positions restart per document
                assert labels[0] == -100  # nothing predicted across a boundary
        for u in range(len(docs) // 2):
            (c_ids, c_lab, _), (r_ids, r_lab, _) = docs[2 * u], docs[2 * u + 1]
            c_text, r_text = tok.decode(c_ids), tok.decode(r_ids)
            i = int(PAIR_RE.search(c_text).group(1))
            assert int(PAIR_RE.search(r_text).group(1)) == i  # same record
            scored_c = tok.decode([t for t in c_lab[1:] if t != -100], skip_special_tokens=False)
            scored_r = tok.decode([t for t in r_lab[1:] if t != -100], skip_special_tokens=False)
            assert scored_c.startswith(f"yes{i}") and scored_r.startswith(f"no{i}")
            seen.append(i)
        idx = target_doc_index(batch)
        assert idx.tolist() == brute_doc_index(batch)
        per_doc = torch.zeros(len(batch["doc_lens"]), dtype=torch.long).index_add_(0, idx, torch.ones_like(idx))
        assert per_doc.tolist() == [sum(t != -100 for t in lab[1:]) for _, lab, _ in docs]
        assert (per_doc > 0).all()
    assert sorted(seen) == list(range(40)) and n_batches > 5
    assert loader.stats.kept == 40 and loader.stats.truncated > 0


# ------------------------------------------------------------------------------ bad pairs
GOOD = {"prompt": "Add 1 and 2.", "chosen": "3", "rejected": "4"}
BAD = [
    ('{"prompt": oops', "invalid_json"),
    ({"prompt": "p", "chosen": "a"}, "missing_field"),
    ({"chosen": "a", "rejected": "b"}, "missing_field"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "wrong_type"),
    ({"messages": "p", "chosen": "a", "rejected": "b"}, "wrong_type"),
    ({"prompt": "p", "messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}, "wrong_type"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "wrong_type"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "wrong_type"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical_pair"),
    ({"prompt": "p", "chosen": "a", "rejected": {"role": "user", "content": "not an answer"}}, "empty_mask"),
    ({"prompt": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "chosen": "a", "rejected": "b"}, "template"),
    ({"prompt": "word " * 80, "chosen": "a", "rejected": "b"}, "empty_mask"),  # prompt longer than a side may be
]


def _cfg(path, **kw):
    return DataConfig(sources=[DataSource(path=str(path))], **{"shuffle": False, "max_seq_len": 64, **kw})


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_pair_error_names_file_line_and_reason(tmp_path, toks, i):
    record, reason = BAD[i]
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, record, GOOD])
    with pytest.raises(BadRecord) as e:
        load_samples(_cfg(path), toks["qwen3"], encode=encode_pair_record)
    assert e.value.reason == reason, str(e.value)
    assert str(e.value).startswith(f"{path}:3: ") and "on_bad_record" in str(e.value)


def test_bad_pairs_skipped_and_counted_per_reason(tmp_path, toks):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] + [r for r, _ in BAD] + [GOOD])
    samples, stats = load_samples(_cfg(path, on_bad_record="skip"), toks["qwen3"], encode=encode_pair_record)
    assert len(samples) == 2 and stats.kept == 2 and stats.seen == 2 + len(BAD)
    expected = {}
    for _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(stats.skipped) == expected
    assert all(s.doc_lens is not None and len(s.doc_lens) == 2 for s in samples)
    long = {"prompt": "p", "chosen": "word " * 80, "rejected": "b"}
    path = write_jsonl(tmp_path / "e.jsonl", [GOOD, long])
    samples, stats = load_samples(_cfg(path, on_bad_record="skip", overlong="drop"), toks["qwen3"], encode=encode_pair_record)
    assert len(samples) == 1 and dict(stats.skipped) == {"overlong": 1}


# ------------------------------------------------------------------------------ exact resume
def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k], k


@pytest.mark.parametrize("packing", [True, False])
def test_loader_resume_with_pairs_is_exact(toks, pair_data, packing):
    tok = toks["qwen3"]
    cfg = _pair_cfg(pair_data, packing=packing)
    ref_loader = DataLoader(cfg, tok, seed=5, encode=encode_pair_record)
    ref = [next(ref_loader) for _ in range(30)]
    ref_loader.close()
    assert ref_loader.state_dict()["stream"]["mixer"]["sources"][0]["cursor"]["epoch"] >= 1  # the reader crossed an epoch
    first = DataLoader(cfg, tok, seed=5, encode=encode_pair_record)
    got = [next(first) for _ in range(11)]
    state = pickle.dumps(first.state_dict())
    first.close()
    assert any(s.doc_lens for s in pickle.loads(state)["buffer"])  # the buffer holds pair units
    second = DataLoader(cfg, tok, seed=5, encode=encode_pair_record)
    second.load_state_dict(pickle.loads(state))
    got += [next(second) for _ in range(19)]
    second.close()
    _same(got, ref)
