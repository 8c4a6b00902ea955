"""Data layouts people have (folders of shards, JSON arrays, text, Arrow, `datasets` folders) and
record formats (ShareGPT, Alpaca): read completely, shuffled deterministically, sharded, resumed
exactly, mixed; an unknown layout is refused with the list of supported ones."""

import pickle

import pytest

from posttrain.config import ConfigError, DataConfig, DataSource, ModelConfig
from posttrain.data.formats import FormatError, alpaca_to_messages, sharegpt_to_messages
from posttrain.data.loader import DataLoader, load_samples
from posttrain.data.records import BadRecord
from posttrain.data.sources import Source, parse_record
from posttrain.data.tokenizer import load_tokenizer

from conftest import LAYOUTS, write_jsonl, write_layout

pytest.importorskip("datasets")
N = 40


def records(layout):
    return [{"text": f"doc {i}"} if layout.startswith("txt") else {"i": i, "text": f"doc {i}"} for i in range(N)]


def number(raw) -> int:
    rec = parse_record(raw)
    return rec["i"] if "i" in rec else int(rec["text"].split()[1])


def source(entry, **kw):
    return Source(entry["path"], sample_by=entry.get("sample_by", "line"), **kw)


def drain(src):
    out = []
    while (item := src.next()) is not None:
        out.append(number(item[1]))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_streams_shards_and_resumes_exactly(tmp_path, layout):
    entry = write_layout(tmp_path / "d", layout, records(layout))
    order = drain(source(entry, window=6, seed=3))
    assert sorted(order) == list(range(N)), order  # complete: nothing else read (README, hidden files, test split)
    assert order != list(range(N))  # shuffled
    assert drain(source(entry, window=6, seed=3)) == order  # deterministic
    assert sorted(drain(source(entry, window=6, seed=3, shuffle=False))) == list(range(N))
    ranks = [drain(source(entry, window=6, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(N)) and abs(len(ranks[0]) - len(ranks[1])) <= 1
    for k in (0, 5, 6, 17, N - 1):  # resume mid-window, at window and file boundaries
        s = source(entry, window=6, seed=3)
        head = [number(s.next()[1]) for _ in range(k)]
        fresh = source(entry, window=6, seed=3)
        fresh.load_state_dict(pickle.loads(pickle.dumps(s.state_dict())))
        assert head + drain(fresh) == order, k
    s = source(entry, window=6, seed=3)
    s.start_epoch(1)
    assert sorted(e1 := drain(s)) == list(range(N)) and e1 != order  # reshuffled per epoch


def test_folder_lists_supported_files_sorted_and_where_names_them(tmp_path):
    entry = write_layout(tmp_path / "d", "jsonl_folder", records("jsonl"))
    src = Source(entry["path"], shuffle=False)
    names = [f.rsplit("/d/", 1)[1] for f in src.files]
    assert names == ["more/part-2.jsonl", "part-0.jsonl", "part-1.jsonl.gz"]
    assert src.next()[0].endswith("/d/more/part-2.jsonl:1")
    entry = write_layout(tmp_path / "a", "json_array", records("json"))
    assert Source(entry["path"], shuffle=False).next()[0].endswith("data.json:record=0")


def test_unknown_layouts_are_refused_with_what_is_supported(tmp_path):
    (tmp_path / "data.bin").write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match=r"data.bin' is of no supported layout; supported: JSON Lines .*Parquet.*Arrow.*save_to_disk"):
        Source(str(tmp_path / "data.bin"))
    (tmp_path / "csvs").mkdir()
    (tmp_path / "csvs" / "a.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match=r"folder .*csvs' has no file of a supported layout \(found: \.csv\); supported: "):
        Source(str(tmp_path / "csvs"))
    (tmp_path / "fake.arrow").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ConfigError, match="fake.arrow: not an Arrow IPC file or stream"):
        drain(Source(str(tmp_path / "fake.arrow")))
    (tmp_path / "broken.json").write_text('[{"a": 1}, {"a": ')
    with pytest.raises(ConfigError, match=r"broken.json: not a valid JSON array file \(.* at line 1 column"):
        drain(Source(str(tmp_path / "broken.json")))


def test_dataset_dict_without_a_train_split_names_its_splits(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"text": "a"}])
    datasets.DatasetDict({"validation": ds, "test": ds}).save_to_disk(tmp_path / "dd")
    with pytest.raises(ConfigError, match=r"splits \['test', 'validation'\] and none is 'train'; give the split's folder"):
        drain(Source(str(tmp_path / "dd")))
    split = Source(str(tmp_path / "dd" / "test"))  # the split's own folder is a dataset folder
    assert split.kinds == {str(tmp_path / "dd" / "test"): "dataset"} and split.next()[1] == {"text": "a"}


# ------------------------------------------------------------------------------------ formats
SHAREGPT = {
    "system": "Be brief.",
    "conversations": [
        {"from": "human", "value": "Add 1 and 2."}, {"from": "gpt", "value": "3."},
        {"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "weather"}'},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."},
    ],
}


def test_sharegpt_roles_and_system_become_messages():
    msgs = sharegpt_to_messages(SHAREGPT)["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "tool", "assistant"]
    assert msgs[0]["content"] == "Be brief." and msgs[-1]["content"] == "Sunny."
    own = {"conversations": [{"from": "system", "value": "Own."}, {"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}
    assert [m["content"] for m in sharegpt_to_messages({**own, "system": "Top."})["messages"]] == ["Own.", "x", "y"]
    roles = sharegpt_to_messages({"conversations": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    assert [m["role"] for m in roles["messages"]] == ["user", "assistant"]  # role/content turns too
    with pytest.raises(FormatError, match=r"conversations\[1\].from 'narrator' is not a ShareGPT role \(known: system, human"):
        sharegpt_to_messages({"conversations": [{"from": "human", "value": "x"}, {"from": "narrator", "value": "y"}]})
    assert sharegpt_to_messages({**SHAREGPT, "tools": '[{"name": "weather"}]'})["tools"] == [{"name": "weather"}]


def test_alpaca_becomes_a_chat():
    rec = {"instruction": "Translate to French.", "input": "cat", "output": "chat", "system": "You translate.",
           "history": [["Hi", "Hello"]]}
    assert alpaca_to_messages(rec)["messages"] == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Translate to French.\ncat"}, {"role": "assistant", "content": "chat"},
    ]
    assert alpaca_to_messages({"instruction": "Say hi.", "input": "", "output": "hi"})["messages"][0] == {"role": "user", "content": "Say hi."}
    with pytest.raises(FormatError, match="needs 'instruction' and 'output' \\(missing 'output'\\)"):
        alpaca_to_messages({"instruction": "x"})


@pytest.fixture
def tok(tiny_qwen3):
    return load_tokenizer(ModelConfig(path=str(tiny_qwen3)))


def test_formats_detected_or_set_per_source_train_like_messages(tmp_path, tok):
    chat = [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "3."}]
    write_jsonl(tmp_path / "m.jsonl", [{"messages": chat}])
    write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "Add 1 and 2."}, {"from": "gpt", "value": "3."}]}])
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add 1 and 2.", "input": "", "output": "3."}])

    def one(path, fmt=None, data_format="auto"):
        cfg = DataConfig(sources=[DataSource(path=str(path), format=fmt)], format=data_format, shuffle=False)
        (s,), _ = load_samples(cfg, tok)
        return s.input_ids, s.labels

    ref = one(tmp_path / "m.jsonl")
    assert one(tmp_path / "s.jsonl") == one(tmp_path / "a.jsonl") == ref  # detected
    assert one(tmp_path / "s.jsonl", "sharegpt", data_format="text") == ref  # the source's format wins over data.format
    with pytest.raises(BadRecord, match=r"a.jsonl:1: sharegpt record needs 'conversations'"):
        one(tmp_path / "a.jsonl", "sharegpt")
    with pytest.raises(BadRecord, match=r"m.jsonl:1: record has none of 'messages', 'conversations' \(sharegpt\), 'instruction'"):
        write_jsonl(tmp_path / "m.jsonl", [{"question": "?"}])
        one(tmp_path / "m.jsonl")


def test_text_that_is_not_utf8_is_a_bad_record(tmp_path, tok):
    (tmp_path / "t.txt").write_bytes("fine line\n".encode() + b"\xff\xfe broken\n" + "last line\n".encode())
    cfg = DataConfig(sources=[DataSource(path=str(tmp_path / "t.txt"))], shuffle=False, on_bad_record="skip")
    samples, stats = load_samples(cfg, tok)
    assert len(samples) == 2 and stats.skipped == {"not_utf8": 1}
    with pytest.raises(BadRecord, match=r"t.txt:2: not UTF-8 text \(byte 0xff at position 0\)"):
        load_samples(cfg.model_copy(update={"on_bad_record": "error"}), tok)


def test_loader_mixes_new_layouts_and_resumes_exactly(tmp_path, tok):
    chats = [{"messages": [{"role": "user", "content": f"Add {i} and 1."}, {"role": "assistant", "content": f"{i + 1}."}]} for i in range(30)]
    shares = [{"conversations": [{"from": "human", "value": f"Double {i}."}, {"from": "gpt", "value": f"{2 * i}."}]} for i in range(30)]
    texts = [{"text": f"Number {i} comes after {i - 1}."} for i in range(30)]
    sources = [DataSource(**write_layout(tmp_path / "a", "hf_dataset", chats), weight=2.0),
               DataSource(**write_layout(tmp_path / "b", "json_array", shares), format="sharegpt"),
               DataSource(**write_layout(tmp_path / "c", "txt_documents", texts))]
    cfg = DataConfig(sources=sources, max_tokens_per_batch=128, buffer_size=8, shuffle_window=8, max_seq_len=64)
    ref_loader = DataLoader(cfg, tok, seed=5)
    ref = [next(ref_loader) for _ in range(30)]
    ref_loader.close()
    assert len({b["epoch"] for b in ref}) >= 2
    first = DataLoader(cfg, tok, seed=5)
    got = [next(first) for _ in range(11)]
    state = pickle.dumps(first.state_dict())
    first.close()
    second = DataLoader(cfg, tok, seed=5, background=False)
    second.load_state_dict(pickle.loads(state))
    got += [next(second) for _ in range(19)]
    for x, y in zip(got, ref):
        assert x["input_ids"].tolist() == y["input_ids"].tolist() and x["labels"].tolist() == y["labels"].tolist()
    props = second.proportions()
    assert props[sources[0].path] > props[sources[1].path] and all(v > 0 for v in props.values())
