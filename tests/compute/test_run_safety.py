"""A run never destroys an earlier one before the new one is known to work, and a run that trained
nothing never looks successful."""


import json
import os
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main, run_job
from posttrain.compute import replace
from posttrain.compute.metrics import _SINKS, add_sink
from posttrain.compute.rundir import RunDir
from posttrain.config import load_config

from conftest import DEMO_DATA, job_dict, write_jsonl


def _job_file(tmp_path, model, data_path, out, **sections):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(model, data_path, out, **sections)))
    return job


# ------------------------------------------------------------------------------ nothing trained
def test_a_run_that_trains_no_step_fails_and_exports_nothing(tiny_qwen3, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops"] * 30 + [{"nothing": 1}] * 10)
    job = _job_file(tmp_path, tiny_qwen3, bad, tmp_path / "run", data={"on_bad_record": "skip", "max_epochs": 1})
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert "no training step ran" in line and str(bad) in line and "nothing was exported" in line
    assert "40 read, 0 kept" in line and "invalid_json=30, missing_field=10" in line
    assert "records: 40 read" in err.replace("\n", " ")  # the summary line counts them too
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "hf").exists()


# ------------------------------------------------------------------------------ --overwrite
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", DEMO_DATA.read_text().splitlines()[:40])


def _text(err: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(err.split())


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def old_run(tiny_qwen3, data, tmp_path):
    """A finished run with checkpoints, metrics and an export; (job file, run dir, its files)."""
    run_dir = tmp_path / "run"
    job = _job_file(tmp_path, tiny_qwen3, data, run_dir, train={"steps": 2}, compute={"checkpoint_every": 1})
    assert main(["run", str(job)]) == 0
    files = _snapshot(run_dir)
    assert "checkpoints/step_00000002/meta.json" in files and "metrics.jsonl" in files and "hf/config.json" in files
    return job, run_dir, files


@pytest.mark.parametrize("override, key", [
    ("data.sources=[{path: /nonexistent/typo.jsonl}]", "data.sources: '/nonexistent/typo.jsonl' matches no file"),
    ("model.path=/nonexistent/model", "model.path: no such directory '/nonexistent/model'"),
    ("model.tokenizer=/nonexistent/tok", "model.tokenizer: no such directory '/nonexistent/tok'"),
])
def test_overwrite_with_a_typo_keeps_the_previous_run(old_run, capsys, override, key):
    job, run_dir, files = old_run
    capsys.readouterr()
    assert main(["run", str(job), override, "--overwrite"]) == 2
    err = _text(capsys.readouterr().err)
    assert key in err and "Traceback" not in err
    # a model path that does not exist is refused when the job file loads, before the run's pre-check
    assert override.startswith("model.") or f"the previous run in {run_dir} is untouched" in err
    assert _snapshot(run_dir) == files


def test_overwrite_where_nothing_can_be_written_keeps_the_previous_run(old_run, monkeypatch, capsys):
    job, run_dir, files = old_run

    def read_only(*a, **k):  # what a read-only or full filesystem answers (root ignores chmod)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(replace.tempfile, "NamedTemporaryFile", read_only)
    capsys.readouterr()
    assert main(["run", str(job), "--overwrite"]) == 2
    err = _text(capsys.readouterr().err)
    assert f"error: compute.output_dir: cannot write in {run_dir.parent} (Permission denied)" in err
    assert f"the previous run in {run_dir} is untouched" in err
    assert _snapshot(run_dir) == files


def test_an_output_dir_that_cannot_be_created_is_one_line(tiny_qwen3, data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    job = _job_file(tmp_path, tiny_qwen3, data, blocker / "run")
    assert main(["run", str(job)]) == 2
    err = _text(capsys.readouterr().err)
    assert f"error: compute.output_dir: cannot create {blocker / 'run'}" in err and "Traceback" not in err


def test_overwrite_restores_the_previous_run_when_the_new_one_fails_before_a_checkpoint(old_run, tmp_path, capsys):
    job, run_dir, files = old_run
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops"] * 5)  # resolves, but fails at the first record
    assert main(["run", str(job), f"data.sources=[{{path: {bad}}}]", "--overwrite"]) == 2
    err = _text(capsys.readouterr().err)
    assert "invalid JSON" in err and f"restored the previous run in {run_dir}" in err
    assert _snapshot(run_dir) == files
    assert not replace.previous(RunDir(run_dir)).exists()


def test_overwrite_drops_the_previous_run_at_the_new_runs_first_checkpoint(old_run):
    job, run_dir, _ = old_run
    aside = replace.previous(RunDir(run_dir))
    seen = {}
    add_sink(lambda m: seen.setdefault(m["step"], aside.exists()))
    try:
        cfg = load_config(job, ["train.steps=3", "compute.checkpoint_every=2"])
        run_job(cfg, overwrite=True)
    finally:
        _SINKS.clear()
    assert seen == {1: True, 2: True, 3: False}  # kept until step 2's checkpoint
    assert [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not (run_dir / "checkpoints" / "step_00000001").exists() and not aside.exists()


def test_a_replacement_killed_before_its_first_checkpoint_is_undone_on_the_next_start(old_run, capsys):
    job, run_dir, files = old_run
    run = RunDir(run_dir)
    os.replace(run_dir, replace.previous(run))  # what --overwrite did before the kill
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    capsys.readouterr()
    assert main(["run", str(job)]) == 0  # resumes the restored run: nothing left to train
    err = _text(capsys.readouterr().err)
    assert "restored the previous run" in err and "resumed" in err and "nothing left to train" in err
    assert _snapshot(run_dir)["checkpoints/step_00000002/meta.json"] == files["checkpoints/step_00000002/meta.json"]
    assert not replace.previous(run).exists()
