"""The distillation example's files work end to end, on the tiny fixture models: both job files pass
`posttrain validate`, the distill job runs (2 steps) on the bundled data and exports, and
examples/check_distill.py measures the result (no threshold: `make distill-demo` checks the real
reduction)."""

import importlib.util
import math
import re

import pytest

from posttrain.cli import main as posttrain
from posttrain.tiny import build_tiny_model

from conftest import ROOT

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def teacher(tiny_qwen3, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "m", tiny_qwen3, hidden_size=96, num_layers=3, seed=1)


def check_distill():
    spec = importlib.util.spec_from_file_location("check_distill", EXAMPLES / "check_distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_distill_example_validates_runs_and_checks(tiny_qwen3, teacher, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the job files' data paths are relative to the repository root
    assert posttrain(["validate", str(EXAMPLES / "distill_teacher.yaml"), f"model.path={teacher}"]) == 0
    assert posttrain(["validate", str(EXAMPLES / "distill_demo.yaml"), f"model.path={tiny_qwen3}",
                      f"distill.teacher={teacher}"]) == 0
    out = tmp_path / "run"
    assert posttrain(["run", str(EXAMPLES / "distill_demo.yaml"), f"model.path={tiny_qwen3}", f"distill.teacher={teacher}",
                      f"compute.output_dir={out}", "compute.device=cpu", "compute.progress=false", "train.steps=2",
                      "train.log_every=1", "data.max_tokens_per_batch=512", "export.max_new_tokens=4"]) == 0
    assert (out / "hf" / "model.safetensors").is_file()
    capsys.readouterr()

    script = check_distill()
    assert not re.search(r"^\s*(from|import)\s+posttrain", (EXAMPLES / "check_distill.py").read_text(), re.M)
    assert script.main(["--teacher", str(teacher), "--student", str(out / "hf"), "--baseline", str(tiny_qwen3)]) == 0
    text = capsys.readouterr().out
    kl = {k: float(v) for k, v in re.findall(r"KL\(teacher \|\| (\w+)\)\s*= ([0-9.eE+-]+)", text)}
    assert set(kl) == {"student", "baseline"} and all(math.isfinite(v) and v >= 0 for v in kl.values()), text
    assert re.search(r"reduction: -?[0-9.]+%", text), text


def test_job_file_with_a_required_recipe_key_loads(tmp_path):
    """load_config checks the pillar sections with the recipe's section already typed: a section with a
    required key (distill.teacher) loads, and its absence is reported once, with the file."""
    from posttrain.config import ConfigError, load_config

    # model.path and distill.teacher must exist (load_config checks them): any directory will do here
    body = f"recipe: distill\nmodel: {{path: {tmp_path}}}\ndata: {{sources: [{{path: d.jsonl}}]}}\ntrain: {{steps: 1}}\n"
    ok = tmp_path / "ok.yaml"
    ok.write_text(body + f"distill: {{teacher: {tmp_path}, divergence: jsd}}\n")
    assert load_config(ok).section.teacher == str(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value) == f"{bad}: distill.teacher: field required"
