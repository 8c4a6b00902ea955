"""The DPO example's files work end to end, on the tiny fixture model: every bundled pair (training
and held-out) is a well-formed preference record, the held-out numbers are never trained on,
examples/dpo_demo.yaml passes `posttrain validate` and runs (2 steps, its reference precomputed over
all training pairs) and exports, and examples/check_dpo.py scores the result (no threshold:
`make dpo-demo` checks the real accuracy)."""

import importlib.util
import json
import re

import pytest

from posttrain.cli import main as posttrain
from posttrain.config import ModelConfig
from posttrain.data.pairs import encode_pair
from posttrain.data.tokenizer import load_tokenizer

from conftest import ROOT

EXAMPLES = ROOT / "examples"
TRAIN, HELDOUT = EXAMPLES / "data" / "dpo_pairs.jsonl", EXAMPLES / "data" / "dpo_heldout.jsonl"


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _text(x):
    return x if isinstance(x, str) else x["content"] if isinstance(x, dict) else x[-1]["content"]


def _number(rec):
    return int(re.search(r"\d+", _text(rec["prompt"])).group())


def check_dpo():
    spec = importlib.util.spec_from_file_location("check_dpo", EXAMPLES / "check_dpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bundled_pairs_are_well_formed_and_held_out_is_unseen(tiny_qwen3):
    tok = load_tokenizer(ModelConfig(path=str(tiny_qwen3)))
    train, held = _records(TRAIN), _records(HELDOUT)
    assert len(train) >= 500 and len(held) >= 100
    for path, recs in ((TRAIN, train), (HELDOUT, held)):
        for i, rec in enumerate(recs, 1):
            encode_pair(tok, rec, f"{path.name}:{i}")  # raises BadRecord on a malformed pair
            n = _number(rec)
            assert _text(rec["chosen"]) == f"{n} is {'even' if n % 2 == 0 else 'odd'}.", rec
            assert _text(rec["rejected"]) == f"{n} is {'odd' if n % 2 == 0 else 'even'}.", rec
    assert not {_number(r) for r in train} & {_number(r) for r in held}  # unseen prompts, not only unseen pairs
    assert sum(_number(r) % 2 for r in held) == len(held) // 2  # half odd: a fixed preference scores 50%
    assert {type(r["prompt"]) for r in train} == {str, list}  # both record formats


@pytest.mark.slow
def test_dpo_example_validates_runs_and_checks(tiny_qwen3, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the job file's data path is relative to the repository root
    job = str(EXAMPLES / "dpo_demo.yaml")
    assert posttrain(["validate", job, f"model.path={tiny_qwen3}"]) == 0
    out = tmp_path / "run"
    assert posttrain(["run", job, f"model.path={tiny_qwen3}", f"compute.output_dir={out}", "compute.device=cpu",
                      "compute.progress=false", "train.steps=2", "train.log_every=1", "export.max_new_tokens=4"]) == 0
    assert (out / "hf" / "model.safetensors").is_file() and (out / "reference_logps.rank_00000.pt").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "rewards/accuracy" in rows[0]
    capsys.readouterr()

    script = check_dpo()
    assert not re.search(r"^\s*(from|import)\s+posttrain", (EXAMPLES / "check_dpo.py").read_text(), re.M)
    assert script.main([str(out / "hf")]) == 0
    m = re.search(r"prefers chosen on ([0-9.]+)% of (\d+) pairs.*margin .* = ([+-][0-9.]+) nats", capsys.readouterr().out)
    assert m and int(m[2]) == len(_records(HELDOUT)) and 0 <= float(m[1]) <= 100
    few = tmp_path / "few.jsonl"
    few.write_text("".join(HELDOUT.read_text().splitlines(keepends=True)[:4]))
    assert script.main([str(out / "hf"), "--pairs", str(few), "--min", "1.01"]) == 1  # below --min: exit 1
