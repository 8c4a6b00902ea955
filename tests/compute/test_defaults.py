"""Safe defaults: checkpoints are on without any setting (every ~10% of the run, every 30 minutes,
on interrupt), and a resume with another train.steps never silently reshapes the LR schedule."""

import json
import shutil

import pytest
import torch

import posttrain.workflow.engine as E
from posttrain.cli import run_job
from posttrain.compute.checkpoint import complete_checkpoints, read_meta
from posttrain.compute.metrics import _SINKS, add_sink
from posttrain.compute.optim import LRSchedule, lr_lambda
from posttrain.config import ComputeConfig, ConfigError, JobConfig, TrainConfig

from conftest import DEMO_DATA, job_dict, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", DEMO_DATA.read_text().splitlines()[:40])


@pytest.fixture
def sinks():
    yield add_sink
    _SINKS.clear()


def _rows(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _crash_at(step):
    def sink(m):
        if m["step"] == step:
            raise RuntimeError(f"crash at step {step}")
    return sink


# ------------------------------------------------------------------------------ default checkpoints
def test_checkpoints_are_on_by_default_and_a_crashed_first_run_resumes(tiny_qwen3, data, tmp_path, sinks, capsys):
    assert ComputeConfig().checkpoint_every == "auto" and ComputeConfig().checkpoint_every_minutes == 30
    assert ComputeConfig().checkpoint_on_interrupt is True
    job = job_dict(tiny_qwen3, data, tmp_path / "run", train={"steps": 20, "lr": 2e-3})
    del job["compute"]["checkpoint_every"]  # the default, as a user's job file has it
    cfg = JobConfig.model_validate(job)
    assert E.checkpoint_interval(cfg) == 2  # ceil(20 / 10)
    sinks(_crash_at(7))  # not an interrupt: nothing writes a checkpoint on the way out
    with pytest.raises(RuntimeError, match="crash at step 7"):
        run_job(cfg)
    assert "checkpoints: every 2 steps and every 30 min" in capsys.readouterr().err
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000002", "step_00000004", "step_00000006"]
    _SINKS.clear()
    res = run_job(JobConfig.model_validate(job))  # the same job again: resumes, no --overwrite
    assert res["start_step"] == 6 and res["steps"] == 20
    assert "resumed" in capsys.readouterr().err
    assert [r["step"] for r in _rows(tmp_path / "run")] == list(range(1, 21))
    assert [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000016", "step_00000018", "step_00000020"]
    assert E.checkpoint_interval(JobConfig.model_validate({**job, "train": {"steps": 25}})) == 3
    assert E.checkpoint_interval(JobConfig.model_validate({**job, "train": {"steps": 4}})) == 1


def test_checkpoint_every_minutes_by_the_wall_clock(tiny_qwen3, data, tmp_path, sinks, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(E, "_clock", lambda: now[0])
    sinks(lambda m: now.__setitem__(0, now[0] + 4 * 60))  # every step takes 4 minutes
    job = job_dict(tiny_qwen3, data, tmp_path / "run", train={"steps": 10},
                   compute={"checkpoint_every": None, "checkpoint_every_minutes": 10, "keep_checkpoints": None})
    run_job(JobConfig.model_validate(job))
    # 12 minutes after the start at step 3, then 12 after each checkpoint
    assert [read_meta(p)["step"] for p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [3, 6, 9]


# ------------------------------------------------------------------------------ LR schedule on resume
def _schedule(cfg, total, done, lr=1.0):
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=lr)
    s = LRSchedule(opt, cfg, total)
    for _ in range(done):
        opt.step()
        s.step()
    return s


def _resumed(cfg, old_total, new_total, done, choice, *, legacy=False):
    """A schedule of `new_total` updates that loads the state of one of `old_total` after `done`."""
    state = _schedule(cfg, old_total, done).state_dict()
    if legacy:  # written before the plan was saved: the checkpoint's train.steps stands in
        state.pop("plan")
    s = _schedule(cfg, new_total, 0)
    s.load_state_dict(state)
    note = s.on_resume(new_total, 1, choice, fallback=old_total if legacy else None, where="checkpoint X")
    return s, note


def _lrs(s, n):
    out = []
    for _ in range(n):
        out.append(s.get_last_lr()[0])
        s.optimizer.step()
        s.step()
    return out


def test_steps_change_is_an_error_by_default_naming_the_choices():
    cfg = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert cfg.on_steps_change == "error"
    for legacy in (False, True):
        with pytest.raises(ConfigError) as e:
            _resumed(cfg, 10, 20, 6, "error", legacy=legacy)
        msg = str(e.value)
        assert msg.startswith("train.steps changed from 10 to 20 since checkpoint X was written (resuming after step 6)")
        assert "cosine over 10 steps" in msg and "train.on_steps_change=continue" in msg
        assert "continue (keep the 10-step schedule" in msg and "rescale (the LR of a 20-step schedule" in msg
        assert "put train.steps back to 10" in msg
    # the same length, a finished run, or a constant LR: nothing to choose
    assert _resumed(cfg, 10, 10, 6, "error")[1] is None
    assert _resumed(cfg, 10, 8, 9, "error")[1] is None
    assert _resumed(cfg.model_copy(update={"schedule": "constant"}), 10, 20, 6, "error")[1] is None


def test_continue_keeps_the_old_schedule_and_holds_its_final_lr():
    cfg = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1)
    s, note = _resumed(cfg, 10, 20, 6, "continue")
    assert note == "train.steps 10 -> 20 (on_steps_change: continue): the 10-step schedule is kept; steps 11-20 run at its final LR 0.1"
    old = lr_lambda(cfg, 10)
    assert _lrs(s, 14) == [old(u) for u in range(6, 20)]  # = the old schedule's, min_lr_ratio from update 9 on
    assert _lrs(_resumed(cfg, 10, 20, 6, "continue")[0], 14)[-11:] == [pytest.approx(0.1)] * 11
    assert "they change nothing" in _resumed(cfg.model_copy(update={"min_lr_ratio": 0.0}), 10, 20, 6, "continue")[1]


def test_rescale_is_the_new_lengths_schedule_from_the_resumed_step():
    cfg = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1)
    s, note = _resumed(cfg, 10, 20, 6, "rescale")
    new = lr_lambda(cfg, 20)
    assert note.startswith("train.steps 10 -> 20 (on_steps_change: rescale): the schedule now spans 20 steps; "
                           f"LR at the next step {new(6):.3g} (the old schedule's: {lr_lambda(cfg, 10)(6):.3g})")
    assert _lrs(s, 14) == [new(u) for u in range(6, 20)]
    shorter, _ = _resumed(cfg, 10, 8, 4, "rescale")  # shortening works the same way
    assert _lrs(shorter, 4) == [lr_lambda(cfg, 8)(u) for u in range(4, 8)]


@pytest.fixture(scope="module")
def six_steps(tiny_qwen3, data, tmp_path_factory):
    """A finished 6-step run (cosine, min_lr_ratio 0.1) with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("six") / "run"
    run_job(JobConfig.model_validate(_lr_job(tiny_qwen3, data, out, 6)))
    return out


def _lr_job(model, data, out, steps, **train):
    return job_dict(model, data, out, train={"steps": steps, "lr": 1e-3, "min_lr_ratio": 0.1, **train},
                    compute={"checkpoint_every": 3})


def test_extending_a_finished_run_asks_then_rescale_survives_a_second_resume(tiny_qwen3, data, six_steps, tmp_path, sinks):
    out = tmp_path / "run"
    shutil.copytree(six_steps, out)
    with pytest.raises(ConfigError, match=r"^train.steps changed from 6 to 12 since checkpoint .*step_00000006 was written"):
        run_job(JobConfig.model_validate(_lr_job(tiny_qwen3, data, out, 12)))
    sinks(_crash_at(10))
    with pytest.raises(RuntimeError, match="crash at step 10"):  # after the step-9 checkpoint
        run_job(JobConfig.model_validate(_lr_job(tiny_qwen3, data, out, 12, on_steps_change="rescale")))
    _SINKS.clear()
    # the choice is in the checkpoint: the same job without it resumes at step 9 on the rescaled schedule
    res = run_job(JobConfig.model_validate(_lr_job(tiny_qwen3, data, out, 12)))
    assert res["start_step"] == 9
    lrs = [r["lr"] for r in _rows(out)]
    assert lrs[:6] == [r["lr"] for r in _rows(six_steps)]
    want = lr_lambda(TrainConfig(steps=12, min_lr_ratio=0.1), 12)
    assert lrs[6:] == pytest.approx([1e-3 * want(u) for u in range(6, 12)], rel=1e-12)
