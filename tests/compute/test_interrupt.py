"""Ctrl-C and SIGTERM: the step finishes, a checkpoint is written, one line is printed, and the
resumed run equals the uninterrupted one; a second signal abandons a checkpoint write safely."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import posttrain.compute.checkpoint as C
from posttrain.cli import run_job
from posttrain.compute.interrupt import Interrupted
from posttrain.compute.metrics import _SINKS, add_sink
from posttrain.config import JobConfig

from conftest import DEMO_DATA, ROOT, job_dict, run_and_kill, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", DEMO_DATA.read_text().splitlines()[:40])


def _job(model, data, out, steps=4, **compute) -> dict:
    """No periodic checkpoint: only an interrupt writes one."""
    return job_dict(model, data, out, train={"steps": steps, "lr": 2e-3},
                    data={"max_tokens_per_batch": 256, "buffer_size": 8}, compute=compute)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _same_run(run_dir, ref_dir):
    assert _losses(run_dir) == _losses(ref_dir)
    got, want = load_file(run_dir / "hf" / "model.safetensors"), load_file(ref_dir / "hf" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture
def signal_at(monkeypatch):
    """signal_at(step, sig): this process receives `sig` right after step `step` is logged."""
    def arm(step, sig):
        add_sink(lambda m: os.kill(os.getpid(), sig) if m["step"] == step else None)
    yield arm
    _SINKS.clear()


@pytest.fixture(scope="module")
def reference(tiny_qwen3, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run_job(JobConfig.model_validate(_job(tiny_qwen3, data, out)))
    return out


def test_sigterm_checkpoints_at_the_step_boundary_and_resumes_exactly(tiny_qwen3, data, tmp_path, signal_at, reference, capsys):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's after a test that started Ray here
    signal_at(2, signal.SIGTERM)
    with pytest.raises(Interrupted) as exc:
        run_job(JobConfig.model_validate(_job(tiny_qwen3, data, out)))
    ckpt = out / "checkpoints" / "step_00000002"
    assert str(exc.value) == f"SIGTERM after step 2: checkpoint {ckpt} written; run the same command again to resume"
    assert exc.value.exit_code == 143
    assert C.find_latest(out / "checkpoints") == ckpt and not (out / "hf").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the engine's handler is gone again, the previous one back
    _SINKS.clear()
    run_job(JobConfig.model_validate(_job(tiny_qwen3, data, out)))  # no --overwrite needed
    assert "resumed" in capsys.readouterr().err
    _same_run(out, reference)


@pytest.mark.parametrize("at", [2, 3])
def test_ctrl_c_with_background_checkpoints_resumes_exactly(tiny_qwen3, data, tmp_path, signal_at, reference, at):
    """compute.async_checkpoint: a Ctrl-C right after a step whose checkpoint is being written in the
    background (2) finishes that write and stops; one after a step without a periodic save (3) writes its
    checkpoint (synchronously) after the pending one. Either way the rerun is the uninterrupted run."""
    out = tmp_path / "run"
    signal_at(at, signal.SIGINT)
    with pytest.raises(Interrupted) as exc:
        run_job(JobConfig.model_validate(_job(tiny_qwen3, data, out, checkpoint_every=2, async_checkpoint=True)))
    ckpt = out / "checkpoints" / f"step_{at:08d}"
    assert f"after step {at}: checkpoint {ckpt} written" in str(exc.value)
    assert C.find_latest(out / "checkpoints") == ckpt and C.is_complete(ckpt)
    assert not list((out / "checkpoints").glob(".step_*.tmp"))
    _SINKS.clear()
    run_job(JobConfig.model_validate(_job(tiny_qwen3, data, out, checkpoint_every=2, async_checkpoint=True)))
    _same_run(out, reference)


def test_without_checkpoint_on_interrupt_the_run_stops_and_says_so(tiny_qwen3, data, tmp_path, signal_at):
    signal_at(1, signal.SIGINT)
    with pytest.raises(Interrupted, match=r"^SIGINT after step 1: not checkpointed \(compute.checkpoint_on_interrupt: false\); "
                       "no checkpoint to resume from$"):
        run_job(JobConfig.model_validate(_job(tiny_qwen3, data, tmp_path / "run", checkpoint_on_interrupt=False)))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_second_signal_abandons_the_checkpoint_write_safely(tiny_qwen3, data, tmp_path, signal_at, monkeypatch):
    out = tmp_path / "run"
    real = C._write_flat

    def save_interrupted_again(path, *a, **kw):
        if "00000003" in str(path):  # the interrupt's checkpoint: Ctrl-C again while it is written
            os.kill(os.getpid(), signal.SIGINT)
        return real(path, *a, **kw)

    monkeypatch.setattr(C, "_write_flat", save_interrupted_again)
    signal_at(3, signal.SIGINT)
    with pytest.raises(Interrupted, match="^SIGINT again: stopped at once$"):
        run_job(JobConfig.model_validate(_job(tiny_qwen3, data, out, checkpoint_every=2)))
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]  # no partial dir; step 2 stays the resume point


@pytest.mark.slow
def test_ctrl_c_and_sigterm_on_the_cli_resume_to_the_uninterrupted_run(tiny_qwen3, data, tmp_path):
    """Real processes: SIGINT after step >= 2, SIGTERM after step >= 5, then a plain rerun."""
    ref = tmp_path / "ref"
    run_job(JobConfig.model_validate(_job(tiny_qwen3, data, ref, steps=10)))
    out, job = tmp_path / "run", tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(tiny_qwen3, data, out, steps=10)))
    stopped = []
    for sig, at in ((signal.SIGINT, 2), (signal.SIGTERM, 5)):
        err = run_and_kill(job, out, at, sig=sig, returncode=128 + sig)
        assert "Traceback" not in err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"interrupted: {signal.Signals(sig).name} after step ") and line.endswith(
            "written; run the same command again to resume"), err[-2000:]
        stopped.append(int(line.split("after step ")[1].split(":")[0]))
    assert 2 <= stopped[0] < stopped[1] < 10
    assert [p.name for p in C.complete_checkpoints(out / "checkpoints")] == [f"step_{s:08d}" for s in stopped]
    done = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(job)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped[1]:08d}'}" in " ".join(done.stderr.split())
    _same_run(out, ref)
