"""Checkpoints and exact resume: kill -9 mid-run, resume (twice, across epochs) == uninterrupted."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.cli import run_job
from posttrain.compute.checkpoint import complete_checkpoints, find_latest, save_checkpoint
from posttrain.config import JobConfig

from conftest import DEMO_DATA, ROOT, job_dict, run_and_kill, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", DEMO_DATA.read_text().splitlines()[:40])


def _job(model, data, out, lora=False, **compute):
    return job_dict(model, data, out, train={"steps": 10, "lr": 2e-3}, compute={"checkpoint_every": 3, **compute},
                    data={"max_tokens_per_batch": 256, "buffer_size": 8, "shuffle_window": 16},
                    model={"lora": {"rank": 4}} if lora else {})


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("lora", [False, True])
def test_kill_and_resume_twice_equals_uninterrupted(tiny_qwen3, data, tmp_path, lora):
    run_job(JobConfig.model_validate(_job(tiny_qwen3, data, tmp_path / "ref", lora=lora)))
    ref_losses = _losses(tmp_path / "ref")
    assert len(ref_losses) == 10
    run_dir = tmp_path / "killed"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(_job(tiny_qwen3, data, run_dir, lora=lora)))
    run_and_kill(job_file, run_dir, kill_at=4)
    run_and_kill(job_file, run_dir, kill_at=8)
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(job_file)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed" in out.stderr
    assert _losses(run_dir) == ref_losses  # bitwise: every step, before and after both resumes
    got, want = load_file(run_dir / "hf" / "model.safetensors"), load_file(tmp_path / "ref" / "hf" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    meta = json.loads((find_latest(run_dir / "checkpoints") / "meta.json").read_text())
    assert meta["step"] == 9 and meta["config"]["train"]["steps"] == 10 and len(meta["tokenizer_fingerprint"]) == 64
    assert [d.name for d in complete_checkpoints(run_dir / "checkpoints")] == ["step_00000003", "step_00000006", "step_00000009"]


def test_retention_and_half_written_checkpoints_are_ignored(tiny_qwen3, data, tmp_path):
    run_job(JobConfig.model_validate(_job(tiny_qwen3, data, tmp_path / "r", keep_checkpoints=2)))
    root = tmp_path / "r" / "checkpoints"
    assert [d.name for d in complete_checkpoints(root)] == ["step_00000006", "step_00000009"]
    assert (root / "latest").read_text() == "step_00000009"
    # a save killed before its rename, and a dir without meta.json, are never picked up
    (root / ".step_00000012.tmp" / "model_optim").mkdir(parents=True)
    (root / "step_00000015").mkdir()
    assert find_latest(root).name == "step_00000009"
    (root / "latest").write_text("step_00000015")  # a stale pointer falls back to the newest complete
    assert find_latest(root).name == "step_00000009"


def test_failed_save_keeps_the_previous_checkpoint(tiny_qwen3, data, tmp_path, monkeypatch):
    import posttrain.compute.checkpoint as C

    run_job(JobConfig.model_validate(_job(tiny_qwen3, data, tmp_path / "r")))
    root = tmp_path / "r" / "checkpoints"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(C, "_write_flat", boom)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(root, 12, model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), data_state={}, meta={})
    assert find_latest(root).name == "step_00000009"


def test_resume_with_another_tokenizer_is_refused(tiny_qwen3, tiny_llama, data, tmp_path):
    from posttrain.data.tokenizer import TokenizerMismatchError

    job = _job(tiny_qwen3, data, tmp_path / "r")
    run_job(JobConfig.model_validate({**job, "train": {**job["train"], "steps": 3}}))
    job["train"]["steps"] = 6
    job["model"]["tokenizer"] = str(tiny_llama)
    with pytest.raises((TokenizerMismatchError, Exception), match="tokenizer"):
        run_job(JobConfig.model_validate(job))


@pytest.mark.parametrize("lora", [False, True])
def test_export_on_request_from_a_checkpoint(tiny_qwen3, data, tmp_path, capsys, lora):
    """`posttrain export RUN_DIR` rebuilds the model from the checkpoint's config and gives the same
    weights as the end-of-run export taken at that step."""
    from posttrain.cli import main

    job = _job(tiny_qwen3, data, tmp_path / "r", lora=lora)
    job["train"]["steps"] = 9  # the last step is a checkpoint step: the final export is that state
    run_job(JobConfig.model_validate(job))
    assert main(["export", str(tmp_path / "r")]) == 0
    assert "step_00000009" in capsys.readouterr().out
    got = load_file(tmp_path / "r" / "hf-step_00000009" / "model.safetensors")
    want = load_file(tmp_path / "r" / "hf" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert main(["export", str(tmp_path / "nothing")]) == 2
