"""compute.compile: compiled decoder layers train like eager ones (LoRA, activation checkpointing,
rows of changing length; two FSDP2 workers: tests/workflow/test_spmd.py), and a machine that cannot
compile trains eager."""

import json
import os
import subprocess
import sys

from posttrain.cli import run_job
from posttrain.config import JobConfig

from conftest import DEMO_DATA, ROOT, job_dict, write_jsonl


def _losses(out):
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_compiled_layers_train_like_eager_with_lora_and_checkpointing(tiny_qwen3, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", DEMO_DATA.read_text().splitlines()[:48])
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"c{int(compiled)}"
        job = job_dict(tiny_qwen3, data, out, model={"lora": {"rank": 4}, "gradient_checkpointing": True},
                       train={"steps": 4}, compute={"compile": compiled}, export={"enabled": False})
        run_job(JobConfig.model_validate(job))
        runs[compiled] = _losses(out)
    said = capsys.readouterr().err
    assert "decoder layers compiled" in said
    # packed rows end at multiples of 64 and change length between steps: the compiled layers
    # recompile for the new shape instead of failing or falling back
    rows = {json.loads(ln)["padding"] for ln in (tmp_path / "c1" / "metrics.jsonl").read_text().splitlines()}
    assert len(rows) > 1
    eager, compiled = runs[False], runs[True]
    assert eager[-1] < eager[0]
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-5, (eager, compiled)


def test_no_cpp_compiler_says_so_and_trains_eager(tmp_path):
    """A cold compile cache and a C++ compiler that does not exist: the setup probe fails, the message
    says why and what to do, and the layers are left eager."""
    code = (
        "import torch\n"
        "from posttrain.compute.compile import compile_layers\n"
        "layers = [torch.nn.Linear(4, 4)]\n"
        "ok = compile_layers(layers, torch.device('cpu'), print)\n"
        "assert ok is False and layers[0]._compiled_call_impl is None\n"
        "print('eager', float(layers[0](torch.ones(4)).sum()) == float(layers[0](torch.ones(4)).sum()))\n"
    )
    env = {**os.environ, "CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compute.compile: torch.compile cannot build code on cpu" in out.stdout
    assert "/nonexistent/g++" in out.stdout and "C++ compiler" in out.stdout
    assert "eager True" in out.stdout
