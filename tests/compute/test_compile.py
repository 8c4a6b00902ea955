"""compute.compile: compiled decoder layers train like eager ones (LoRA, activation checkpointing,
rows of changing length; two FSDP2 workers: tests/workflow/test_spmd.py), and a machine that cannot
compile trains eager."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from posttrain.cli import run_job
from posttrain.config import JobConfig

from conftest import DEMO_DATA, ROOT, job_dict, write_jsonl


def _losses(out):
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", [
    {"lora": {"rank": 4}, "gradient_checkpointing": True},  # every layer compiled whole
    {},  # full fine-tuning: the last layer at the target positions only, its norms and MLP compiled
], ids=["lora-checkpointing", "full-tail"])
def test_compiled_layers_train_like_eager(tiny_qwen3, tmp_path, capsys, model):
    data = write_jsonl(tmp_path / "d.jsonl", DEMO_DATA.read_text().splitlines()[:48])
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"c{int(compiled)}"
        job = job_dict(tiny_qwen3, data, out, model=model, train={"steps": 4}, compute={"compile": compiled},
                       export={"enabled": False})
        run_job(JobConfig.model_validate(job))
        runs[compiled] = _losses(out)
    said = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "decoder layers compiled" in said
    assert ("the last one's norms and MLP compiled on their own (4 modules with the final norm)" in said) == (not model)
    # packed rows end at multiples of 64 and change length between steps: the compiled layers
    # recompile for the new shape instead of failing or falling back
    rows = {json.loads(ln)["padding"] for ln in (tmp_path / "c1" / "metrics.jsonl").read_text().splitlines()}
    assert len(rows) > 1
    eager, compiled = runs[False], runs[True]
    assert eager[-1] < eager[0]
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-5, (eager, compiled)


def test_no_cpp_compiler_says_so_and_trains_eager(tiny_qwen3, tmp_path):
    """A cold compile cache and a C++ compiler that does not exist: the setup probe fails, the run says
    why and what to do, compiles nothing and trains eager to the end."""
    data = write_jsonl(tmp_path / "d.jsonl", DEMO_DATA.read_text().splitlines()[:16])
    job = job_dict(tiny_qwen3, data, tmp_path / "run", train={"steps": 2}, compute={"compile": True},
                   export={"enabled": False})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = {**os.environ, "CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(tmp_path / "job.yaml")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    said = " ".join(out.stderr.split())  # rich wraps long lines
    assert "compute.compile: torch.compile cannot build code on cpu" in said
    assert "/nonexistent/g++" in said and "C++ compiler" in said
    assert "decoder layers compiled" not in said
    assert len(_losses(tmp_path / "run")) == 2
