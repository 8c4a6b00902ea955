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


@pytest.mark.parametrize("device,threads,world,setting,path,expect", [
    ("cpu", 2, 1, None, "d.jsonl", False),  # torch's threads on both cores: the batch is made between steps
    ("cpu", 1, 2, None, "d.jsonl", False),  # two workers of one thread each
    ("cpu", 2, 1, None, "file:///d.jsonl", False),
    ("cpu", 2, 1, None, "s3://bucket/d.jsonl", True),  # reads that wait on the network
    ("cpu", 1, 1, None, "d.jsonl", True),  # a core left for the loader thread
    ("cuda", 2, 1, None, "d.jsonl", True),  # the host cores wait on the GPU
    ("cpu", 2, 1, True, "d.jsonl", True),  # data.background wins either way
    ("cuda", 2, 1, False, "d.jsonl", False),
])
def test_the_loader_thread_runs_only_where_a_core_is_free(monkeypatch, device, threads, world, setting, path, expect):
    from types import SimpleNamespace

    from posttrain.workflow import engine as engine_mod

    monkeypatch.setattr(engine_mod.torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(engine_mod.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    data = SimpleNamespace(background=setting, sources=[SimpleNamespace(path="local.jsonl"), SimpleNamespace(path=path)])
    job = SimpleNamespace(cfg=SimpleNamespace(data=data), device=torch.device(device), world=world)
    assert Engine._background(job) is expect


def test_a_batch_made_in_the_training_thread_counts_as_data_wait(tmp_path, tiny_qwen3):
    from posttrain.data.loader import DataLoader
    from posttrain.data.tokenizer import load_tokenizer

    cfg = JobConfig(**job_dict(tiny_qwen3, DEMO_DATA, tmp_path / "run"))
    loader = DataLoader(cfg.data, load_tokenizer(cfg.model), seed=0, background=False)
    next(loader)
    assert loader.wait_s > 0
