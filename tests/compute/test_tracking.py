"""Tracking: W&B (offline) and MLflow (file store) as built-in sinks on rank 0, one run per job that
a resume continues; a missing package is one line before training; MFU is never an impossible
number. The two-worker W&B run is in tests/workflow/test_spmd.py."""

import json

import pytest
import yaml

import posttrain.config as C
import posttrain.workflow.engine as E
from posttrain.cli import main, run_job
from posttrain.config import ConfigError, JobConfig, load_config

from conftest import DEMO_DATA, job_dict, wandb_offline_runs, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", DEMO_DATA.read_text().splitlines()[:40])


def _rows(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ W&B
def test_wandb_offline_run_and_a_resume_continues_it(tiny_qwen3, data, tmp_path, capsys):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    wb = {"project": "posttrain-tests", "name": "tiny", "tags": ["ci", "sft"], "mode": "offline"}
    job = job_dict(tiny_qwen3, data, out, train={"steps": 3, "schedule": "constant"}, compute={"checkpoint_every": 3, "wandb": wb})
    run_job(JobConfig.model_validate(job))
    saved = json.loads((out / "tracking.json").read_text())["wandb"]
    assert "W&B: " in capsys.readouterr().err
    job["train"]["steps"] = 5  # resume from step 3 for two more steps: the same W&B run
    run_job(JobConfig.model_validate(job))
    assert json.loads((out / "tracking.json").read_text())["wandb"] == saved
    first, second = wandb_offline_runs(out).values()
    assert first["id"] == second["id"] == saved["id"]
    assert (first["project"], first["name"], first["tags"]) == ("posttrain-tests", "tiny", ["ci", "sft"])
    rows = _rows(out)
    assert sorted(first["history"]) == [1, 2, 3] and sorted(second["history"]) == [4, 5]
    logged = {**first["history"], **second["history"]}
    for r in rows:
        assert logged[r["step"]]["loss"] == r["loss"] and logged[r["step"]]["lr"] == r["lr"]
        assert logged[r["step"]]["tokens_per_s"] == r["tokens_per_s"]


def test_a_missing_tracking_package_is_one_line_before_anything_runs(tiny_qwen3, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(C.TRACKING_PACKAGES, "wandb", ("wandb_not_installed_here", "pip install wandb"))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(tiny_qwen3, data, tmp_path / "run", compute={"wandb": {"project": "p"}})))
    assert main(["run", str(job)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: {job}:" in err and "compute.wandb: the 'wandb_not_installed_here' package is not installed; pip install wandb" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    # the Python API (no job file) stops before the run dir is made, too
    with pytest.raises(ConfigError, match="compute.wandb: the 'wandb_not_installed_here' package is not installed"):
        run_job(JobConfig.model_validate(yaml.safe_load(job.read_text())))
    assert not (tmp_path / "run").exists()
    # mode disabled needs no package
    load_config(job, ["compute.wandb.mode=disabled"])


def test_tracking_config_is_validated(tiny_qwen3, data, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(tiny_qwen3, data, tmp_path / "run", compute={"wandb": {"mode": "offlne", "tag": ["x"]}})))
    with pytest.raises(ConfigError) as e:
        load_config(job)
    msg = str(e.value)
    assert "compute.wandb.mode: input should be 'online', 'offline' or 'disabled'" in msg
    assert "compute.wandb.tag: unknown key; did you mean `tags`?" in msg


# ------------------------------------------------------------------------------ MLflow
def test_mlflow_file_store_run_and_a_resume_continues_it(tiny_qwen3, data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="MLflow is optional: pip install mlflow-skinny (posttrain[tracking])")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    out = tmp_path / "run"
    ml = {"tracking_uri": uri, "experiment": "posttrain-tests", "run_name": "tiny"}
    job = job_dict(tiny_qwen3, data, out, train={"steps": 2, "schedule": "constant"}, compute={"checkpoint_every": 2, "mlflow": ml})
    run_job(JobConfig.model_validate(job))
    job["train"]["steps"] = 4
    run_job(JobConfig.model_validate(job))
    saved = json.loads((out / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("posttrain-tests").experiment_id])  # one run, resumed
    assert run.info.run_id == saved["run_id"] and run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.params["train.schedule"] == "constant" and run.data.tags["posttrain.recipe"] == "sft"
    rows = _rows(out)
    for key in ("loss", "lr", "grad_norm"):
        assert [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)] == [
            (r["step"], r[key]) for r in rows]


def test_mlflow_that_cannot_start_stops_before_training(tiny_qwen3, data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="MLflow is optional: pip install mlflow-skinny (posttrain[tracking])")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # MLflow 3 refuses a file store without it
    job = job_dict(tiny_qwen3, data, tmp_path / "run", compute={"mlflow": {"tracking_uri": (tmp_path / "mlruns").as_uri()}})
    with pytest.raises(ConfigError, match=r"^compute.mlflow: MLflow could not start a run at file://.*check compute.mlflow.tracking_uri"):
        run_job(JobConfig.model_validate(job))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------ MFU sanity
def _mfu_run(tiny_qwen3, data, out, **compute):
    run_job(JobConfig.model_validate(job_dict(tiny_qwen3, data, out, train={"steps": 2}, compute=compute, export={"enabled": False})))
    return _rows(out)


def test_an_impossible_configured_peak_gives_no_mfu_number(tiny_qwen3, data, tmp_path, capsys):
    rows = _mfu_run(tiny_qwen3, data, tmp_path / "run", peak_flops=1.0)  # 1 FLOP/s: MFU would be ~1e9 %
    assert all(r["mfu"] is None and r["hfu"] is None and r["mfu_unreliable"] is True for r in rows)
    err = " ".join(capsys.readouterr().err.split())
    assert "MFU n/a: the peak of 0.0 GFLOP/s (compute.peak_flops) is implausible" in err and "Set compute.peak_flops" in err
    assert "MFU n/a" in err.split("step 1")[1]  # the progress line says n/a, not a percentage


def test_a_measured_peak_below_the_achieved_rate_is_measured_again(tiny_qwen3, data, tmp_path, monkeypatch, capsys):
    """A CPU peak measured while other processes held the cores: measured again once; if it is
    still below what the run achieves, MFU is flagged instead of printed as 5,000%."""
    monkeypatch.setattr(E, "peak_flops", lambda *a, **k: 1e3)  # the first measurement: a busy machine
    remeasured = []
    monkeypatch.setattr(E, "remeasure_peak", lambda *a: remeasured.append(1) or 1e13)
    rows = _mfu_run(tiny_qwen3, data, tmp_path / "again")
    assert len(remeasured) == 1 and all(0 < r["mfu"] <= r["hfu"] < 1 and "mfu_unreliable" not in r for r in rows)
    assert "the measured peak 0.0 GFLOP/s was below the achieved" in " ".join(capsys.readouterr().err.split())
    monkeypatch.setattr(E, "remeasure_peak", lambda *a: remeasured.append(1) or 2e3)  # still busy
    rows = _mfu_run(tiny_qwen3, data, tmp_path / "still")
    assert len(remeasured) == 2 and all(r["mfu"] is None and r["mfu_unreliable"] for r in rows)
    assert "(re-measured) is implausible" in " ".join(capsys.readouterr().err.split())
