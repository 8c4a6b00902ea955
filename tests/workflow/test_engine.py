"""The engine's contract with a recipe: registered states are checkpointed and restored on resume,
a recipe that forgets step.update() is stopped, metrics are the sum of the recipe's shares."""

import json

import pytest
import torch

from posttrain.cli import run_job
from posttrain.config import JobConfig
from posttrain.model.loss import lm_loss
from posttrain.workflow.engine import Engine

from conftest import DEMO_DATA, job_dict, write_jsonl


class Counter:
    """A recipe's own state: counts the documents it has seen and draws from its own generator."""

    def __init__(self):
        self.docs, self.gen = 0, torch.Generator().manual_seed(123)

    def state_dict(self):
        return {"docs": self.docs, "gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.docs = state["docs"]
        self.gen.set_state(state["gen"])


def counting_recipe(cfg, run_dir):
    job = Engine.setup(cfg, run_dir)
    counter = Counter()
    for step in job.steps(job.loader(), counter=counter):
        n = step.targets()
        for b in step.micro:
            counter.docs += len(b["doc_lens"])
            out = job.forward(lm_loss, b, job.vocab)
            step.backward(out.ce_sum / n, docs_seen=counter.docs / len(step.micro),
                          draw=float(torch.rand((), generator=counter.gen)) / len(step.micro))
        step.update()
    return job.finish()


def forgetful_recipe(cfg, run_dir):
    job = Engine.setup(cfg, run_dir)
    for step in job.steps(job.loader()):
        step.backward(job.forward(lm_loss, step.micro[0], job.vocab).ce_sum * 0)
    return job.finish()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", DEMO_DATA.read_text().splitlines()[:40])


def _job(model, data, out, steps):
    return job_dict(model, data, out, recipe=f"{__file__}:counting_recipe",
                    train={"steps": steps, "grad_accum": 2, "schedule": "constant"},  # the same lr in both runs
                    compute={"checkpoint_every": 2}, data={"max_tokens_per_batch": 256})


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_recipe_states_are_checkpointed_and_restored(tiny_qwen3, data, tmp_path):
    run_job(JobConfig.model_validate(_job(tiny_qwen3, data, tmp_path / "ref", 6)))
    run_job(JobConfig.model_validate(_job(tiny_qwen3, data, tmp_path / "cut", 3)))  # checkpoint at step 2
    (tmp_path / "cut" / "hf").rename(tmp_path / "cut" / "hf-3")
    res = run_job(JobConfig.model_validate(_job(tiny_qwen3, data, tmp_path / "cut", 6)))  # resumes at step 2
    assert res["start_step"] == 2
    ref, cut = _rows(tmp_path / "ref"), _rows(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "docs_seen", "draw"):  # the counter and its generator continue exactly
        assert [r[key] for r in cut] == [r[key] for r in ref], key
    assert ref[-1]["docs_seen"] > ref[0]["docs_seen"] > 0


def test_a_recipe_that_never_updates_is_stopped(tiny_qwen3, data, tmp_path):
    job = job_dict(tiny_qwen3, data, tmp_path / "r", recipe=f"{__file__}:forgetful_recipe")
    with pytest.raises(RuntimeError, match=r"did not call step.update\(\) in step 1"):
        run_job(JobConfig.model_validate(job))
