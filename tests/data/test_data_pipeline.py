"""Data pillar: streaming sources, mixer, packing with document masking, exact-resume loader."""

import gzip
import json
import pickle
import subprocess
import sys

import pytest
import torch

from posttrain.config import ConfigError, DataConfig, DataSource, ModelConfig
from posttrain.data.loader import DataLoader, load_samples
from posttrain.data.packing import make_batch, pack_row, pad_batch, take_best_fit
from posttrain.data.records import Sample
from posttrain.data.sources import Source
from posttrain.data.tokenizer import load_tokenizer
from posttrain.model.load import load_model
from posttrain.model.loss import ce_sum

from conftest import DEMO_DATA, ROOT, write_jsonl


def numbered(tmp_path, n, name="n.jsonl", start=0):
    return write_jsonl(tmp_path / name, [{"i": i} for i in range(start, start + n)])


def drain(src):
    out = []
    while (item := src.next()) is not None:
        out.append(json.loads(item[1])["i"])
    return out


# ------------------------------------------------------------------------------------ sources
def test_source_streams_globs_and_gzip_shards_and_resumes(tmp_path):
    numbered(tmp_path, 25, "a.jsonl")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"i": i}) + "\n" for i in range(25, 40))
    src = Source(str(tmp_path / "*.jsonl*"), window=7, seed=3)
    order = drain(src)
    assert sorted(order) == list(range(40)) and order != list(range(40))  # shuffled, complete
    assert drain(Source(str(tmp_path / "*.jsonl*"), window=7, seed=3)) == order  # deterministic
    r0 = drain(Source(str(tmp_path / "*"), window=7, seed=3, rank=0, world_size=2))
    r1 = drain(Source(str(tmp_path / "*"), window=7, seed=3, rank=1, world_size=2))
    assert sorted(r0 + r1) == list(range(40)) and not set(r0) & set(r1) and len(r0) == len(r1)
    for k in (0, 3, 7, 24, 26, 39):  # resume mid-window, at window and file boundaries
        s = Source(str(tmp_path / "*"), window=7, seed=3)
        head = [json.loads(s.next()[1])["i"] for _ in range(k)]
        fresh = Source(str(tmp_path / "*"), window=7, seed=3)
        fresh.load_state_dict(pickle.loads(pickle.dumps(s.state_dict())))
        assert head + drain(fresh) == order
    src.start_epoch(1)
    assert sorted(e1 := drain(src)) == list(range(40)) and e1 != order  # reshuffled per epoch


def test_shuffle_order_does_not_depend_on_where_the_data_is(tmp_path):
    """The same files under two different folders shuffle the same way (a checkout or copy elsewhere
    trains in the same order); another place in data.sources (`index`) shuffles differently."""
    for d in ("here", "elsewhere/deeper"):
        (tmp_path / d).mkdir(parents=True)
        numbered(tmp_path / d, 30, "a.jsonl")
        numbered(tmp_path / d, 20, "b.jsonl", start=30)
    a, b = (drain(Source(str(tmp_path / d / "*.jsonl"), window=8, seed=5)) for d in ("here", "elsewhere/deeper"))
    assert a == b and a != list(range(50))
    assert drain(Source(str(tmp_path / "here" / "*.jsonl"), window=8, seed=5, index=1)) != a


def test_zstd_source(tmp_path):
    zstd = pytest.importorskip("zstandard")
    data = "".join(json.dumps({"i": i}) + "\n" for i in range(12)).encode()
    (tmp_path / "z.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(data))
    src = Source(str(tmp_path / "z.jsonl.zst"), window=5)
    head = [json.loads(src.next()[1])["i"] for _ in range(7)]
    again = Source(str(tmp_path / "z.jsonl.zst"), window=5)
    again.load_state_dict(src.state_dict())
    assert sorted(head + drain(again)) == list(range(12))


def test_source_errors_name_the_url(tmp_path):
    with pytest.raises(ConfigError, match="nope.jsonl"):
        Source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match=r"x\*.jsonl.*matches no file"):
        Source(str(tmp_path / "x*.jsonl"))


def test_transient_read_errors_are_retried(tmp_path, monkeypatch):
    import posttrain.data.sources as S

    numbered(tmp_path, 5)
    monkeypatch.setattr(S, "BACKOFF_S", 0.001)
    real_open, calls = S.fsspec.open, {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise ConnectionError("connection reset by peer")
        return real_open(*a, **k)

    monkeypatch.setattr(S.fsspec, "open", flaky)
    assert sorted(drain(Source(str(tmp_path / "n.jsonl")))) == list(range(5))
    assert calls["n"] == 3


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"i": list(range(30))}), tmp_path / "d.parquet", row_group_size=8)
    src = Source(str(tmp_path / "d.parquet"), seed=1)
    out = []
    for _ in range(11):
        out.append(src.next()[1]["i"])
    st = src.state_dict()
    rest = Source(str(tmp_path / "d.parquet"), seed=1)
    rest.load_state_dict(st)
    while (item := rest.next()) is not None:
        out.append(item[1]["i"])
    assert sorted(out) == list(range(30))


# ------------------------------------------------------------------------------------ packing
def _s(n, tag=0):
    return Sample(tuple(range(1, n + 1)), tuple(range(1, n + 1)), f"s{tag}")


def test_best_fit_decreasing_fills_the_budget():
    buf = [_s(n, i) for i, n in enumerate([50, 30, 70, 20, 10, 45, 5])]
    chosen = take_best_fit(buf, 100)
    assert [len(buf[i].input_ids) for i in chosen] == [70, 30]  # longest first, then the best gap filler
    assert take_best_fit(buf, 64) == [0, 4]  # 50, then 10 (14 left: 10 and 5 fit, the larger first)


def test_packed_row_layout():
    batch, rest = make_batch([_s(3, 0), _s(4, 1), _s(9, 2)], budget=8, pad_id=0, packing=True)
    assert [s.where for s in rest] == ["s2"]
    assert batch["input_ids"].shape == (1, 8) and batch["num_tokens"] == 7 and batch["doc_lens"] == [4, 3]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, 4, -100, 2, 3, -100]]  # no loss across a boundary
    assert "attention_mask" not in batch  # the document mask is the restarting positions


def test_packed_row_ends_at_a_multiple_of_the_real_length():
    """data.pack_to_multiple_of: no long padding tail for a row the data cannot fill."""
    samples = [_s(3, 0), _s(4, 1)]
    for multiple, width in ((None, 64), (4, 8), (5, 10), (64, 64), (128, 64)):
        batch, _ = make_batch(samples, budget=64, pad_id=0, packing=True, multiple_of=multiple)
        assert batch["input_ids"].shape == (1, width) and batch["num_tokens"] == 7, multiple
        assert batch["position_ids"][0, 7:].tolist() == list(range(width - 7))  # the tail: its own segment
        assert (batch["labels"][0, 7:] == -100).all()


def test_padded_mode_pads_to_longest_within_budget():
    batch, rest = make_batch([_s(3), _s(4), _s(9)], budget=10, pad_id=0, packing=False)
    assert batch["input_ids"].shape == (2, 4) and len(rest) == 1
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


@pytest.fixture(scope="module")
def demo_docs(tiny_qwen3, tiny_llama):
    out = {}
    for name, path in (("qwen3", tiny_qwen3), ("llama", tiny_llama)):
        tok = load_tokenizer(ModelConfig(path=str(path)))
        cfg = DataConfig(sources=[DataSource(path=str(DEMO_DATA))], shuffle=False, max_epochs=1)
        out[name] = (tok, load_samples(cfg, tok)[0][:40])
    return out


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("attn", ["auto", "sdpa"])
def test_packed_logits_and_nll_equal_unpacked(family, attn, demo_docs, request):
    tok, docs = demo_docs[family]
    path = request.getfixturevalue(f"tiny_{family}")
    model = load_model(ModelConfig(path=str(path), attn_implementation=attn), tok, device=torch.device("cpu"), dtype=torch.float32, packing=True)
    model.eval()
    docs = docs[:7]
    row = pack_row(docs, sum(len(d.input_ids) for d in docs) + 6, tok.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"]).logits[0]
        start = 0
        for d in docs:
            n = len(d.input_ids)
            alone = model(input_ids=torch.tensor([d.input_ids])).logits[0]
            torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=0)
            start += n
        # and the loss: packed CE sum == sum over documents run alone (token-mean identical)
        s, n = ce_sum(model, row, len(tok))
        ref = [ce_sum(model, pad_batch([d], tok.pad_token_id), len(tok)) for d in docs]
    assert n == sum(k for _, k in ref)
    torch.testing.assert_close(s, sum(v for v, _ in ref), atol=1e-4, rtol=1e-6)


def test_packed_attention_gradients_equal_dense_mask_path(tiny_qwen3, demo_docs):
    tok, docs = demo_docs["qwen3"]
    row = pack_row(docs[:6], 200, tok.pad_token_id)
    grads = {}
    for attn in ("auto", "sdpa"):
        torch.manual_seed(0)
        m = load_model(ModelConfig(path=str(tiny_qwen3), attn_implementation=attn), tok, device=torch.device("cpu"), dtype=torch.float32)
        s, _ = ce_sum(m, row, len(tok))
        s.backward()
        grads[attn] = {k: p.grad.clone() for k, p in m.named_parameters()}
    for k, g in grads["sdpa"].items():
        torch.testing.assert_close(grads["auto"][k], g, atol=1e-5, rtol=1e-4, msg=k)


def test_backend_that_leaks_across_documents_is_refused(tiny_qwen3):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    def leaky(module, q, k, v, attention_mask, **kw):  # plain causal over the whole row
        kw.pop("position_ids", None)
        return sdpa_attention_forward(module, q, k, v, None, **kw)

    AttentionInterface.register("leaky_test", leaky)
    ALL_MASK_ATTENTION_FUNCTIONS.register("leaky_test", lambda *a, **k: None)
    tok = load_tokenizer(ModelConfig(path=str(tiny_qwen3)))
    with pytest.raises(ConfigError, match="'leaky_test' does not isolate packed documents"):
        load_model(ModelConfig(path=str(tiny_qwen3), attn_implementation="leaky_test"), tok,
                   device=torch.device("cpu"), dtype=torch.float32, packing=True)


# --------------------------------------------------------------------------------- the loader
def _loader_cfg(paths, **kw):
    base = dict(sources=[DataSource(path=str(p)) for p in paths], max_tokens_per_batch=256, buffer_size=16,
                shuffle_window=32, max_seq_len=128)
    return DataConfig(**{**base, **kw})


def _batches(loader, n):
    return [next(loader) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    lines = DEMO_DATA.read_text().splitlines()[:60]
    return write_jsonl(tmp_path_factory.mktemp("small") / "d.jsonl", lines)


@pytest.mark.parametrize("packing", [True, False])
def test_loader_resume_is_exact_across_epochs_and_twice(tiny_qwen3, small_data, packing):
    tok = load_tokenizer(ModelConfig(path=str(tiny_qwen3)))
    cfg = _loader_cfg([small_data], packing=packing)
    ref_loader = DataLoader(cfg, tok, seed=7)
    ref = _batches(ref_loader, 40)
    ref_loader.close()
    assert len({b["epoch"] for b in ref}) >= 2  # the run crosses epoch boundaries
    first = DataLoader(cfg, tok, seed=7)
    got = _batches(first, 13)
    state = pickle.dumps(first.state_dict())
    first.close()
    second = DataLoader(cfg, tok, seed=7)
    second.load_state_dict(pickle.loads(state))
    got += _batches(second, 14)
    state = pickle.dumps(second.state_dict())
    second.close()
    third = DataLoader(cfg, tok, seed=7, background=False)
    third.load_state_dict(pickle.loads(state))
    got += _batches(third, 13)
    _same(got, ref)


def test_loader_resume_in_a_fresh_process(tiny_qwen3, small_data, tmp_path):
    tok = load_tokenizer(ModelConfig(path=str(tiny_qwen3)))
    cfg = _loader_cfg([small_data])
    loader = DataLoader(cfg, tok, seed=1)
    _batches(loader, 5)
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    expected = _batches(loader, 4)
    loader.close()
    script = f"""
import torch, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from posttrain.config import DataConfig, ModelConfig
from posttrain.data.loader import DataLoader
from posttrain.data.tokenizer import load_tokenizer
cfg = DataConfig.model_validate_json({cfg.model_dump_json()!r})
tok = load_tokenizer(ModelConfig(path={str(tiny_qwen3)!r}))
loader = DataLoader(cfg, tok, seed=1)
loader.load_state_dict(torch.load({str(tmp_path / 'state.pt')!r}, weights_only=False))
torch.save([next(loader) for _ in range(4)], {str(tmp_path / 'next.pt')!r})
loader.close()
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    _same(torch.load(tmp_path / "next.pt", weights_only=False), expected)


def test_mixer_weights_and_exhaustion(tiny_qwen3, tmp_path):
    tok = load_tokenizer(ModelConfig(path=str(tiny_qwen3)))
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i}"} for i in range(400)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"beta {i}"} for i in range(400)])
    cfg = DataConfig(sources=[DataSource(path=str(a), weight=3), DataSource(path=str(b), weight=1)],
                     max_tokens_per_batch=64, buffer_size=8)
    loader = DataLoader(cfg, tok, seed=0)
    _batches(loader, 60)
    props = loader.proportions()
    loader.close()
    assert abs(props[str(a)] - 0.75) < 0.06, props
    # drop: each source is read once, then the loader ends; every record seen exactly once
    cfg = cfg.model_copy(update={"on_exhausted": "drop"})
    loader = DataLoader(cfg, tok, seed=0)
    n_docs = sum(len(b["doc_lens"]) for b in loader)
    assert n_docs == 800 and loader.stats.kept == 800
    # restart with max_epochs=2: twice through each source
    loader = DataLoader(cfg.model_copy(update={"on_exhausted": "restart", "max_epochs": 2}), tok, seed=0)
    assert sum(len(b["doc_lens"]) for b in loader) == 1600


def test_worker_exception_surfaces_with_traceback(tiny_qwen3, small_data):
    tok = load_tokenizer(ModelConfig(path=str(tiny_qwen3)))
    loader = DataLoader(_loader_cfg([small_data], transform="conftest:explode_on_third"), tok, seed=0)
    from posttrain.data.records import BadRecord

    # a transform's exception is a bad record naming transform, source and record (data.on_bad_record:
    # error), raised in the training loop with the transform's own traceback as its cause
    with pytest.raises(BadRecord, match=r"d.jsonl:\d+: transform 'conftest:explode_on_third' of source .*RuntimeError: boom on record 3") as e:
        _batches(loader, 3)
    assert e.value.reason == "transform" and isinstance(e.value.__cause__, RuntimeError)
    assert any(f.name == "explode_on_third" for f in __import__("traceback").extract_tb(e.value.__cause__.__traceback__))


def test_bad_record_error_policy_through_the_background_loader(tiny_qwen3, tmp_path):
    from posttrain.data.records import BadRecord

    tok = load_tokenizer(ModelConfig(path=str(tiny_qwen3)))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, "{bad", {"text": "ok"}])
    loader = DataLoader(_loader_cfg([path], shuffle=False), tok, seed=0)
    with pytest.raises(BadRecord, match=r"d.jsonl:2: invalid JSON"):
        _batches(loader, 2)
    loader = DataLoader(_loader_cfg([path], shuffle=False, on_bad_record="skip", on_exhausted="drop"), tok, seed=0)
    list(loader)
    assert loader.stats.skipped["invalid_json"] == 1 and loader.stats.kept == 2


def test_bucketed_per_document_attention_equals_dense_mask(tiny_llama):
    """Documents of different lengths sharing a bucket (17 and 20 -> width 20; 33 and 40 -> 40) are
    right-padded together; outputs and gradients equal transformers' dense block-mask sdpa path."""
    from transformers import AutoModelForCausalLM

    lens = [17, 20, 33, 40, 3, 1, 70]
    ids = torch.randint(0, 300, (1, sum(lens)), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    outs = {}
    for attn in ("posttrain_packed", "sdpa"):
        m = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn)
        logits = m(input_ids=ids, position_ids=pos, use_cache=False).logits
        logits.square().mean().backward()
        outs[attn] = (logits.detach(), m.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(outs["posttrain_packed"][0], outs["sdpa"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["posttrain_packed"][1], outs["sdpa"][1], atol=1e-6, rtol=1e-4)
