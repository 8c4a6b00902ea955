"""Transforms are easy to plug in: found next to the job file or in the current directory without
PYTHONPATH, as `module:fn` or `path/to/file.py:fn`, set per source; an exception inside one names the
transform, the source and the record and follows data.on_bad_record."""

import json
import sys
import uuid

import pytest
import yaml

from posttrain.cli import main
from posttrain.config import ConfigError, load_config
from posttrain.data.loader import load_samples
from posttrain.data.tokenizer import load_tokenizer

from conftest import DEMO_DATA, ROOT, job_dict, write_jsonl

UPPER = "def fn(rec):\n    return {'text': rec['text'].upper()}\n"


@pytest.fixture
def isolated_path(monkeypatch):
    """sys.path restored after the test (the current-directory lookup appends to it)."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def write_job(path, job):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job))
    return path


def test_modules_next_to_the_job_file_resolve_without_pythonpath(tiny_qwen3, tmp_path, monkeypatch, isolated_path):
    name = f"jobmod_{uuid.uuid4().hex[:8]}"
    jobdir = tmp_path / "jobs"
    (jobdir / f"{name}_pkg").mkdir(parents=True)
    (jobdir / f"{name}.py").write_text(UPPER)
    (jobdir / f"{name}_pkg" / "__init__.py").write_text("")
    (jobdir / f"{name}_pkg" / "steps.py").write_text("def fn(rec):\n    return {'text': rec['text'] + ' (from the package)'}\n")
    (jobdir / "local.py").write_text("def fn(rec):\n    return None\n")
    (jobdir / f"{name}_recipe.py").write_text("def run(cfg, run_dir):\n    return {'ran': True}\n")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}])
    job = job_dict(tiny_qwen3, data, tmp_path / "run", data={"transform": f"{name}:fn"}, recipe=f"{name}_recipe:run")
    job["data"]["sources"] = [{"path": str(data)}, {"path": str(data), "transform": f"{name}_pkg.steps:fn"},
                              {"path": str(data), "transform": "local.py:fn"}]
    monkeypatch.chdir(tmp_path)  # neither the job's folder nor on sys.path
    cfg = load_config(write_job(jobdir / "job.yaml", job))
    assert cfg.data.transform == f"{jobdir / name}.py:fn"
    assert cfg.recipe == f"{jobdir / name}_recipe.py:run"  # every import-path component: the recipe too
    assert [s.transform for s in cfg.data.sources] == [None, f"{jobdir / name}_pkg/steps.py:fn", f"{jobdir}/local.py:fn"]
    tok = load_tokenizer(cfg.model)
    for i, want in enumerate(["ONE", "one (from the package)"]):
        (s,), _ = load_samples(cfg.data.model_copy(update={"sources": [cfg.data.sources[i]]}), tok)
        assert tok.decode(s.input_ids, skip_special_tokens=True) == want
    samples, stats = load_samples(cfg.data.model_copy(update={"sources": [cfg.data.sources[2]]}), tok)
    assert samples == [] and stats.skipped == {"filtered": 1}


def test_a_module_in_the_current_directory_resolves_without_pythonpath(tiny_qwen3, tmp_path, monkeypatch, isolated_path):
    name = f"cwdmod_{uuid.uuid4().hex[:8]}"
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / f"{name}.py").write_text(UPPER)
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "two"}])
    job = write_job(tmp_path / "jobs" / "job.yaml", job_dict(tiny_qwen3, data, tmp_path / "run", data={"transform": f"{name}:fn"}))
    monkeypatch.chdir(tmp_path / "work")
    cfg = load_config(job)
    assert cfg.data.transform == f"{name}:fn"  # found on the current directory (Ray workers get it on PYTHONPATH)
    (s,), _ = load_samples(cfg.data, load_tokenizer(cfg.model))
    assert s.labels[0] != -100
    missing = r"override 'data.transform=nowhere_xyz:fn': data.transform: cannot import module 'nowhere_xyz' .*next to the job file"
    with pytest.raises(ConfigError, match=missing):
        load_config(job, ["data.transform=nowhere_xyz:fn"])


DOLLY = [
    {"instruction": "Add 1 and 2.", "context": "", "response": "1 + 2 = 3.", "category": "open_qa"},
    {"instruction": "What is the capital?", "context": "France is a country.", "response": "Paris.", "category": "closed_qa"},
    {"instruction": "Say nothing.", "context": "", "response": "", "category": "open_qa"},  # filtered by the example
    {"context": "no instruction here", "response": "x", "category": "broken"},  # KeyError inside the transform
]


def test_example_transform_trains_and_failures_name_transform_source_and_record(tiny_qwen3, tmp_path, monkeypatch, capfd):
    chats = [json.loads(ln) for ln in DEMO_DATA.read_text().splitlines()[:16]]
    dolly = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)
    chat_file = write_jsonl(tmp_path / "chats.jsonl", chats)
    job = job_dict(tiny_qwen3, chat_file, tmp_path / "run", train={"steps": 2}, export={"enabled": False},
                   data={"on_bad_record": "skip", "max_epochs": 1, "shuffle": False})
    job["data"]["sources"] = [{"path": str(chat_file)}, {"path": str(dolly), "transform": "examples/transforms.py:dolly_to_messages"}]
    monkeypatch.chdir(ROOT)  # the example is given relative to the current directory
    assert main(["run", str(write_job(tmp_path / "job.yaml", job))]) == 0
    err = " ".join(capfd.readouterr().err.split())
    assert "records: 20 read, 18 kept, 0 truncated; skipped: filtered=1, transform=1" in err, err
    job["data"]["on_bad_record"] = "error"
    job["compute"]["output_dir"] = str(tmp_path / "run2")
    assert main(["run", str(write_job(tmp_path / "job.yaml", job))]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines[-1] == (f"error: {dolly}:4: transform '{ROOT}/examples/transforms.py:dolly_to_messages' of source '{dolly}' "
                         "raised KeyError: 'instruction' (data.on_bad_record: error; set it to 'skip' to count and skip such records)")
