"""A run never destroys an earlier one before the new one is known to work, and a run that trained
nothing never looks successful."""


import yaml

from posttrain.cli import main

from conftest import job_dict, write_jsonl


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
