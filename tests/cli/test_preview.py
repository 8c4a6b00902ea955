"""`posttrain preview`: samples with the trained tokens marked, and token statistics, without weights."""

import math
import re

import pytest
import yaml

from posttrain.cli import main
from posttrain.config import load_config
from posttrain.data import preview as preview_mod
from posttrain.data.loader import DataLoader, load_samples
from posttrain.data.tokenizer import load_tokenizer

from conftest import job_dict, write_jsonl

QA = [("What is the capital of France?", "The capital of France is Paris."),
      ("Add 3 and 4.", "3 + 4 = 7."),
      ("Spell the word moon.", "m-o-o-n.")]


def _job(tmp_path, tiny_qwen3, **data):
    recs = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA * 10]
    recs.append({"messages": [{"role": "user", "content": "tell a story"},
                              {"role": "assistant", "content": "once upon a time " * 40}]})  # truncated at 64
    recs.append("{not json")
    recs.append({"messages": [{"role": "user", "content": "only a question"}]})  # nothing to train on
    data_file = write_jsonl(tmp_path / "d.jsonl", recs)
    job = job_dict(tiny_qwen3, data_file, tmp_path / "run",
                   data={"max_seq_len": 64, "max_tokens_per_batch": 256, "on_bad_record": "skip", "shuffle": False,
                         "pack_to_multiple_of": 32, **data},
                   train={"grad_accum": 2})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return tmp_path / "job.yaml"


def test_preview_marks_trained_tokens_and_reports_statistics(tiny_qwen3, tmp_path, capsys, monkeypatch):
    job = _job(tmp_path, tiny_qwen3)
    # no weights: loading the model would fail
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("preview loaded the model")))
    assert main(["preview", str(job), "-n", "3"]) == 0
    out = capsys.readouterr().out
    # the three samples shown: each assistant answer and its end-of-turn token marked, the user's not
    for q, a in QA:
        assert f"«{a}<|im_end|>" in out, out
        assert q in out and f"«{q}" not in out
    marked = re.findall(r"«(.*?)»", out.split("(trained tokens are between")[0], flags=re.S)
    assert len(marked) == 3 and all("user" not in m for m in marked)
    assert "── sample 1 (" in out and "── sample 4" not in out

    # statistics, checked against the loader itself
    cfg = load_config(job)
    tok = load_tokenizer(cfg.model)
    samples, stats = load_samples(cfg.data, tok, seed=cfg.train.seed)
    assert stats.truncated == 1 and stats.skipped == {"invalid_json": 1, "empty_mask": 1}
    assert "statistics over one full pass" in out
    assert f"records: {len(QA) * 10 + 3} read, {len(QA) * 10 + 1} kept, 1 truncated; skipped: empty_mask=1, invalid_json=1" in out
    lens = sorted(len(s.input_ids) for s in samples)
    assert f"p50 {lens[math.ceil(len(lens) / 2) - 1]}" in out and f"max {max(lens)}" in out and max(lens) == 64
    loader = DataLoader(cfg.data.model_copy(update={"max_epochs": 1}), tok, seed=cfg.train.seed, background=False)
    batches = list(loader)
    real = sum(int(b["num_tokens"]) for b in batches)
    slots = sum(b["input_ids"].numel() for b in batches)
    assert real == sum(lens) and slots > real
    assert f"packing: efficiency {real / slots:.1%} (real tokens / token slots: {real:,} / {slots:,}); " \
           f"{len(batches)} micro-batches" in out
    assert f"steps per epoch: {math.ceil(len(batches) / 2)} (2 micro-batches per step" in out


def test_preview_padding_mode_and_sample_limit(tiny_qwen3, tmp_path):
    job = _job(tmp_path, tiny_qwen3, packing=False)
    cfg = load_config(job)
    lines = []
    preview_mod.preview(cfg, n=1, records=5, out=lines.append)
    text = "\n".join(lines)
    assert "statistics over the first 5 samples" in text
    assert "padding (data.packing: false): efficiency" in text
    assert "steps for these 5 samples" in text
    assert text.count("── sample") == 1


def test_preview_rich_on_a_terminal(tiny_qwen3, tmp_path, capsys, monkeypatch):
    job = _job(tmp_path, tiny_qwen3)
    monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
    cfg = load_config(job)
    preview_mod.preview(cfg, n=1, records=5)
    out = capsys.readouterr().out
    assert "«" not in out and QA[0][1] in out and "statistics over" in out
    # the trained text carries a style of its own (ANSI codes), the prompt another
    styled = re.search(r"\x1b\[([0-9;]+)m" + re.escape(QA[0][1]), out)
    prompt = re.search(r"\x1b\[([0-9;]+)m[^\x1b]*" + re.escape(QA[0][0]), out)
    assert styled and prompt and styled.group(1) != prompt.group(1), repr(out[:400])


def test_preview_dpo_pairs_show_chosen_then_rejected(tiny_qwen3, tmp_path):
    from conftest import make_pairs

    pairs = make_pairs(4)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    job = job_dict(tiny_qwen3, data, tmp_path / "run", recipe="dpo", data={"shuffle": False})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    lines = []
    preview_mod.preview(load_config(tmp_path / "job.yaml"), n=1, records=10, out=lines.append)
    sample = lines[1]  # the header, then the sample's documents
    marked = re.findall(r"«(.*?)»", sample, flags=re.S)
    assert marked == [f"{pairs[0]['chosen']}<|im_end|>", f"{pairs[0]['rejected']['content']}<|im_end|>"], sample
    assert "statistics over one full pass" in "\n".join(lines)


def test_preview_of_grpo_prompts(tiny_qwen3, tmp_path, capsys):
    """GRPO's data are prompts: rendered with the generation prompt, as the engine receives them, with
    the fields the rewards read and prompt statistics (an overlong prompt counted as a bad record)."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Add 3 and 4.", "answer": "7"}] * 5
                          + [{"prompt": "long " * 200, "answer": "x"}])
    job = tmp_path / "grpo.yaml"
    job.write_text(yaml.safe_dump(job_dict(tiny_qwen3, prompts, tmp_path / "run", recipe="grpo",
                                           data={"max_seq_len": 64, "on_bad_record": "skip", "shuffle": False},
                                           grpo={"rewards": [{"fn": "conftest:qa_to_messages"}], "prompts_per_step": 2,
                                                 "sampling": {"max_new_tokens": 16}})))
    assert main(["preview", str(job), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>user\nAdd 3 and 4.<|im_end|>\n<|im_start|>assistant\n" in out
    assert "fields the rewards receive: answer='7'" in out and "then up to 16 generated" in out
    assert "6 read, 5 kept" in out and "overlong=1" in out and "48 tokens is a bad record" in out
    assert "steps per epoch: 3 (2 prompts x" in out


def test_overrides_may_follow_the_options():
    from posttrain.cli import _parse

    args = _parse(["run", "job.yaml", "train.lr=1e-4", "--overwrite", "train.steps=3"])
    assert args.overwrite and args.overrides == ["train.lr=1e-4", "train.steps=3"]
    with pytest.raises(SystemExit):
        _parse(["run", "job.yaml", "--overwrite", "--no-such-flag"])
    with pytest.raises(SystemExit):
        _parse(["generate", "model", "hello", "train.lr=1e-4"])  # a command without overrides
