"""A researcher's own recipe, outside the package: examples/orpo.py (ORPO) selected by file path,
with its own typed `orpo:` section; its loss equals ORPO's formula computed directly."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from posttrain.cli import run_job
from posttrain.config import ConfigError, load_config

from conftest import ROOT, job_dict, make_pairs, write_jsonl


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", make_pairs(48, seed=1))


def _job_file(tmp_path, model, data, **orpo):
    job = job_dict(model, data, tmp_path / "run", recipe="examples/orpo.py:run", train={"steps": 6, "lr": 2e-3})
    job["orpo"] = orpo
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(job, sort_keys=False))
    return p


def test_orpo_recipe_by_file_path_trains(tiny_qwen3, pairs, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe path is relative to the job file, then the current directory
    cfg = load_config(_job_file(tmp_path, tiny_qwen3, pairs, lam=0.5))
    assert cfg.section.lam == 0.5 and cfg.recipe.endswith("examples/orpo.py:run")
    res = run_job(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert res["losses"][-1] < res["losses"][0]
    assert {"nll_loss", "or_loss", "rewards/accuracy"} <= set(rows[0])
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match=r"orpo.lamda: unknown key"):
        load_config(_job_file(tmp_path, tiny_qwen3, pairs, lamda=0.5))


def test_orpo_loss_matches_formula():
    from posttrain.config import import_module

    orpo = import_module(str(ROOT / "examples" / "orpo.py"), key="recipe")
    m = torch.tensor([-0.1, -2.0, -7.5], dtype=torch.float64)
    direct = torch.log(torch.exp(m) / (1 - torch.exp(m)))
    torch.testing.assert_close(orpo.log_odds(m), direct)
    # -log sigmoid(log odds ratio) == -log(odds_c / (odds_c + odds_r))
    oc, orr = torch.exp(direct[0]), torch.exp(direct[1])
    torch.testing.assert_close(-F.logsigmoid(orpo.log_odds(m[0]) - orpo.log_odds(m[1])), -torch.log(oc / (oc + orr)))
