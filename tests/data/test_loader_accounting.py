"""What the loader reports is what the training consumed: the epoch of the batch (not of the
reader's read-ahead), and record counts that include records skipped before the data ran out."""

import pytest

from posttrain.config import DataConfig, DataSource, ModelConfig
from posttrain.data.loader import DataLoader
from posttrain.data.packing import make_batch
from posttrain.data.tokenizer import load_tokenizer

from conftest import DEMO_DATA, write_jsonl


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    return load_tokenizer(ModelConfig(path=str(tiny_qwen3)))


@pytest.fixture(scope="module")
def forty(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", DEMO_DATA.read_text().splitlines()[:40])


def _cfg(path, **kw):
    return DataConfig(sources=[DataSource(path=str(path))], max_seq_len=128, max_tokens_per_batch=256, **kw)


@pytest.mark.parametrize("background", [True, False])
def test_epoch_is_the_consumed_batch_epoch_not_the_read_ahead(tok, forty, background):
    # the default buffer (256 samples) reads the 40-record file 3 times before the first batch
    loader = DataLoader(_cfg(forty, max_epochs=3), tok, seed=0, background=background)
    epochs = [b["epoch"] for b in loader]
    loader.close()
    assert epochs[0] == 0 and epochs == sorted(epochs) and epochs[-1] == 2


def test_epoch_k_means_every_unit_of_earlier_passes_was_trained_on(tok, forty, monkeypatch):
    import posttrain.data.loader as L

    taken = []  # the pass of the units of each batch, seen where the packer picks them

    def spy(buffer, **kw):
        batch, rest = make_batch(buffer, **kw)
        left = {id(s) for s in rest}
        taken.append([s.epoch for s in buffer if id(s) not in left])
        return batch, rest

    monkeypatch.setattr(L, "make_batch", spy)
    loader = DataLoader(_cfg(forty, max_epochs=3, buffer_size=16), tok, seed=0, background=False)
    epochs = [b["epoch"] for b in loader]
    assert epochs == sorted(epochs) and epochs[0] == 0 and epochs[-1] >= 1
    for i, k in enumerate(epochs):
        before = [e for units in taken[:i] for e in units]
        upto = before + taken[i]
        assert all(upto.count(p) == 40 for p in range(k))  # every unit of the earlier passes was trained on
        assert before.count(k) < 40  # pass k was not complete before this batch
    assert sorted(e for units in taken for e in units) == [0] * 40 + [1] * 40 + [2] * 40


@pytest.mark.parametrize("background", [True, False])
def test_summary_counts_records_skipped_when_no_batch_was_made(tok, tmp_path, background):
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops"] * 30 + [{"nothing": 1}] * 12)
    loader = DataLoader(_cfg(bad, max_epochs=2, on_bad_record="skip"), tok, seed=0, background=background)
    assert list(loader) == []
    assert loader.stats.summary() == "records: 84 read, 0 kept, 0 truncated; skipped: invalid_json=60, missing_field=24"
    loader.close()

