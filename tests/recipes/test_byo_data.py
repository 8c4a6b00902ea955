"""Bring your own data: every source layout and record format trains 2 SFT steps end to end."""

import json

import pytest

from posttrain.cli import run_job
from posttrain.config import JobConfig

from conftest import DEMO_DATA, LAYOUTS, job_dict, write_layout

pytest.importorskip("datasets")


def chats(n=24):
    return [json.loads(ln) for ln in DEMO_DATA.read_text().splitlines()[:n]]


def as_format(rec, fmt):
    msgs = rec["messages"]
    if fmt == "sharegpt":
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in msgs]}
    if fmt == "alpaca":
        return {"instruction": msgs[-2]["content"], "input": "", "output": msgs[-1]["content"]}
    if fmt == "text":
        return {"text": " ".join(m["content"] for m in msgs)}
    return rec


CASES = [(layout, "text" if layout.startswith("txt") else "messages") for layout in LAYOUTS]
CASES += [("jsonl_folder", "sharegpt"), ("json_array", "alpaca"), ("hf_dataset", "sharegpt")]


@pytest.mark.parametrize("layout,fmt", CASES)
def test_layout_and_format_train_two_steps(tiny_qwen3, tmp_path, capfd, layout, fmt):
    source = write_layout(tmp_path / "data", layout, [as_format(r, fmt) for r in chats()])
    job = job_dict(tiny_qwen3, "unused", tmp_path / "run", train={"steps": 2}, export={"enabled": False},
                   data={"buffer_size": 16, "max_tokens_per_batch": 256})
    job["data"]["sources"] = [source]
    res = run_job(JobConfig.model_validate(job))
    assert len(res["losses"]) == 2 and all(loss > 0 for loss in res["losses"])
    steps = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(s["target_tokens"] > 0 for s in steps), steps
    out = " ".join(capfd.readouterr().err.split())
    assert "kept, 0 truncated; skipped: none" in out, out  # every record of the layout was read and trained
