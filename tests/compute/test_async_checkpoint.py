"""compute.async_checkpoint: periodic checkpoints written in the background while training goes on.

The state is the step's (the weights and optimizer moments staged at the step, not those of the
steps trained while the write runs): resuming from any of them continues bitwise as the
uninterrupted run; the checkpoint becomes visible only when finished, so a kill -9 during a
background write leaves the previous checkpoint as the resume point and the rerun is still exact."""

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.cli import run_job
from posttrain.compute.checkpoint import complete_checkpoints, find_latest
from posttrain.config import JobConfig

from conftest import DEMO_DATA, ROOT, job_dict, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", DEMO_DATA.read_text().splitlines()[:40])


def _job(model, data, out, steps=7, **compute):
    return job_dict(model, data, out, train={"steps": steps, "lr": 2e-3},
                    data={"max_tokens_per_batch": 256, "buffer_size": 8, "shuffle_window": 16},
                    compute={"checkpoint_every": 2, "keep_checkpoints": None, **compute})


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a, b):
    wa, wb = load_file(a / "hf" / "model.safetensors"), load_file(b / "hf" / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tiny_qwen3, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sync") / "run"
    run_job(JobConfig.model_validate(_job(tiny_qwen3, data, out)))
    return out


def test_background_checkpoints_hold_their_steps_state_and_resume_exactly(tiny_qwen3, data, tmp_path, reference, capsys):
    out = tmp_path / "async"
    run_job(JobConfig.model_validate(_job(tiny_qwen3, data, out, async_checkpoint=True)))
    assert "checkpoints: every 2 steps and every 30 min, written in the background" in capsys.readouterr().err
    assert _losses(out) == _losses(reference) and _same_weights(out, reference)
    assert [c.name for c in complete_checkpoints(out / "checkpoints")] == ["step_00000002", "step_00000004", "step_00000006"]
    assert not list((out / "checkpoints").glob(".step_*.tmp"))
    for step in (2, 4):  # resume from each: the rest of the run is the uninterrupted one, bitwise
        again = tmp_path / f"from_{step}"
        shutil.copytree(out, again, ignore=shutil.ignore_patterns("hf"))
        for c in complete_checkpoints(again / "checkpoints"):
            if int(c.name.split("_")[1]) > step:
                shutil.rmtree(c)
        (again / "checkpoints" / "latest").write_text(f"step_{step:08d}")
        cfg = JobConfig.model_validate(_job(tiny_qwen3, data, again, async_checkpoint=True))
        result = run_job(cfg)
        assert result["start_step"] == step and _losses(again)[-(7 - step):] == _losses(reference)[step:]
        assert _same_weights(again, reference)


SLOW_WRITER = """
import sys, time
import posttrain.compute.checkpoint as C
real = C._write_files
def slow(files):  # the background write of step 4 takes long: the kill lands in the middle of it
    if any("step_00000004" in str(path) for path in files):
        time.sleep(60)
    real(files)
C._write_files = slow
from posttrain.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


def test_kill_during_a_background_write_keeps_the_previous_checkpoint_and_resumes_exactly(tiny_qwen3, data, tmp_path, reference):
    out, job = tmp_path / "killed", tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(tiny_qwen3, data, out, async_checkpoint=True)))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(job)], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # training went on past step 4 while step 4 is written
        rows = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if any(json.loads(r)["step"] >= 5 for r in rows if r.endswith("}")) and (out / "checkpoints" / ".step_00000004.tmp").exists():
            proc.kill()
            break
        time.sleep(0.02)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == -9, err[-2000:]
    assert find_latest(out / "checkpoints").name == "step_00000002"  # the unfinished one is invisible
    rerun = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(job)], cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed" in rerun.stderr and not list((out / "checkpoints").glob(".step_*.tmp"))
    losses = {json.loads(r)["step"]: json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()}
    assert [losses[s] for s in range(1, 8)] == _losses(reference)
    assert _same_weights(out, reference)
