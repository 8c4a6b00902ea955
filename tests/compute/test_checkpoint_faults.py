"""Checkpoints under faults: a full disk during a save, a damaged newest checkpoint, leftovers of a
killed save, a partial metrics line. Each case resumes to exactly the uninterrupted run."""

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import posttrain.compute.checkpoint as C
from posttrain.cli import main, run_job
from posttrain.compute.checkpoint import DiskFullError, complete_checkpoints
from posttrain.config import JobConfig

from conftest import DEMO_DATA, job_dict, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "d.jsonl", DEMO_DATA.read_text().splitlines()[:40])


def _job(model, data, out, steps=3, **compute):
    return JobConfig.model_validate(job_dict(
        model, data, out, train={"steps": steps, "lr": 2e-3, "schedule": "constant"}, data={"max_tokens_per_batch": 256, "buffer_size": 8},
        compute={"checkpoint_every": 1, **compute}, export={"enabled": True},
    ))


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(tiny_qwen3, data, tmp_path_factory):
    """The uninterrupted 3-step run: its losses and exported weights."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_job(_job(tiny_qwen3, data, out))
    return _losses(out), load_file(out / "hf" / "model.safetensors")


def _matches(run_dir, reference):
    losses, weights = reference
    assert _losses(run_dir) == losses
    got = load_file(run_dir / "hf" / "model.safetensors")
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)


def _text(err: str) -> str:
    return " ".join(err.split())


# ------------------------------------------------------------------------------ disk full
def _full_disk_at(step, monkeypatch, how):
    """Make the save of `step` fail as a full disk does, after part of its files were written: the
    one-process flat file (`how="flat"`, OSError ENOSPC from the write), or DCP's files (one process
    made to write DCP as several do: "dcp" lands the shards, then ENOSPC; "zip" is torch's opaque
    error from its zip writer)."""
    if how == "flat":
        real_flat = C._write_flat

        def write_flat(path, tensors, layout, nbytes):
            if f"{step:08d}" in str(path):
                Path(path).write_bytes(b"\0" * 4096)  # part of it, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real_flat(path, tensors, layout, nbytes)

        monkeypatch.setattr(C, "_write_flat", write_flat)
        return
    monkeypatch.setattr(C, "flat_capable", lambda tree: False)
    real_dcp = C.dcp.save

    def dcp_save(state, checkpoint_id, **kw):
        if f"{step:08d}" in checkpoint_id and how == "dcp":
            real_dcp(state, checkpoint_id=checkpoint_id, **kw)  # the shards land, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", checkpoint_id)
        if f"{step:08d}" in checkpoint_id and how == "zip":  # torch's zip writer inside DCP, on a full tmpfs
            Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"PK\x03\x04partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_dcp(state, checkpoint_id=checkpoint_id, **kw)

    monkeypatch.setattr(C.dcp, "save", dcp_save)
    if how == "zip":  # torch's opaque error carries no errno: the free space tells
        monkeypatch.setattr(C, "free_bytes", lambda path: 4096)


@pytest.mark.parametrize("how", ["flat", "dcp"])
def test_disk_full_during_a_save_is_one_line_and_resume_is_exact(tiny_qwen3, data, tmp_path, monkeypatch, capsys, reference, how):
    import yaml

    out, job = tmp_path / "run", tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(tiny_qwen3, data, out).model_dump(mode="json")))
    _full_disk_at(2, monkeypatch, how)
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert "Traceback" not in err and line.startswith("error: no space left on device writing checkpoint step_00000002 in ")
    assert str(out / "checkpoints") in line and "it needs about" in line and "MiB" in line
    assert f"{out / 'checkpoints' / 'step_00000001'} is still the resume point" in line
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]  # the partial dir is gone
    monkeypatch.undo()
    assert main(["run", str(job)]) == 0  # space freed: resume from step 1
    assert f"resumed from {root / 'step_00000001'}" in _text(capsys.readouterr().err)
    _matches(out, reference)


def test_torch_opaque_write_error_on_a_full_disk_is_reported_as_disk_full(tiny_qwen3, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _full_disk_at(1, monkeypatch, "zip")
    with pytest.raises(DiskFullError, match=r"^no space left on device writing checkpoint step_00000001 .*\(0.0 MiB free\)"
                       r".*there is no earlier checkpoint to resume from") as exc:
        run_job(_job(tiny_qwen3, data, out, steps=1))
    assert "inline_container" in str(exc.value.__cause__)
    assert list((out / "checkpoints").iterdir()) == []


def test_disk_full_elsewhere_is_one_line(tiny_qwen3, data, tmp_path, monkeypatch, capsys):
    import yaml

    from posttrain.compute import metrics

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(tiny_qwen3, data, tmp_path / "run", steps=1).model_dump(mode="json")))
    full = tmp_path / "run" / "metrics.jsonl"

    def no_room(m):
        raise OSError(errno.ENOSPC, "No space left on device", str(full))

    monkeypatch.setattr(metrics, "_SINKS", [no_room])
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: no space left on device writing {full}; free some space" in _text(err)


def test_another_save_error_is_raised_as_is_and_cleaned_up(tiny_qwen3, data, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise ValueError("not a disk problem")

    monkeypatch.setattr(C, "_write_flat", boom)
    with pytest.raises(ValueError, match="not a disk problem"):
        run_job(_job(tiny_qwen3, data, tmp_path / "run", steps=1))
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


# ------------------------------------------------------------------------------ damaged checkpoints
def test_unreadable_checkpoints_fall_back_to_the_newest_readable_and_leftovers_are_cleaned(tiny_qwen3, data, tmp_path, capsys, reference):
    out = tmp_path / "run"
    run_job(_job(tiny_qwen3, data, out))
    root = out / "checkpoints"
    # three kinds of damage, newest first: garbled meta.json, a missing rank file, a truncated shard
    shutil.copytree(root / "step_00000003", root / "step_00000004")
    (root / "step_00000004" / "meta.json").write_text('{"step": 4, "world_')
    (root / "latest").write_text("step_00000004")
    flat = root / "step_00000003" / C.FLAT
    flat.write_bytes(flat.read_bytes()[:100])
    (root / "step_00000002" / "rank_00000.pt").unlink()
    # leftovers of a killed save and of killed atomic writes; a partial metrics line (kill or full disk)
    (root / ".step_00000005.tmp" / "model_optim").mkdir(parents=True)
    (root / "step_00000006").mkdir()
    (root / ".latest.tmp-4242").write_text("step_0000")
    (out / ".metrics.jsonl.tmp-4242").write_text('{"step"')
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"time": 1.2, "step": 4, "epoch": 0, "lo')
    capsys.readouterr()
    run_job(_job(tiny_qwen3, data, out))
    err = _text(capsys.readouterr().err)
    for step, why in ((4, "JSONDecodeError"), (3, ""), (2, "FileNotFoundError")):
        assert f"checkpoint {root / f'step_{step:08d}'} is unreadable ({why}" in err
    assert f"resumed from {root / 'step_00000001'} at step 1 (the newest readable checkpoint; 3 newer unreadable)" in err
    assert "removed leftovers of an interrupted write: .step_00000005.tmp, step_00000006, .latest.tmp-4242, .metrics.jsonl.tmp-4242" in err
    assert "metrics.jsonl: truncated to its last complete line (1 partial or damaged line(s) dropped)" in err
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002", "step_00000003",
                                                      "unreadable.step_00000002", "unreadable.step_00000003", "unreadable.step_00000004"]
    assert (root / "latest").read_text() == "step_00000003"
    assert not (out / ".metrics.jsonl.tmp-4242").exists()
    _matches(out, reference)


def test_no_readable_checkpoint_is_one_clear_error(tiny_qwen3, data, tmp_path):
    out = tmp_path / "run"
    run_job(_job(tiny_qwen3, data, out, steps=2))
    for ckpt in complete_checkpoints(out / "checkpoints"):
        (ckpt / "rank_00000.pt").unlink()
    with pytest.raises(C.CheckpointError, match=r"no readable checkpoint in .*step_00000002: FileNotFoundError.*step_00000001: "):
        run_job(_job(tiny_qwen3, data, out))
    chosen = out / "checkpoints" / "step_00000001"  # a checkpoint given by path: no fallback
    with pytest.raises(C.CheckpointError, match=rf"^compute.resume: {chosen} is unreadable \(FileNotFoundError"):
        run_job(_job(tiny_qwen3, data, out, resume=str(chosen)))


def _two_rank_save(rank: int, root: str, port: int, fail: str, out: str) -> None:
    """One of two gloo ranks: a good save at step 1, then a save at step 2 that fails on rank 1 only."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        opt = torch.optim.AdamW(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        kw = dict(model=model, optimizer=opt, scheduler=sched, data_state={"rank": rank}, meta={"tokenizer_fingerprint": "x"})
        C.save_checkpoint(root, 1, **kw)
        if rank == 1:  # its own file of the next save fails
            def failing(files):
                raise OSError(errno.ENOSPC, "No space left on device") if fail == "disk full" else RuntimeError("a bad sector")

            C._write_files = failing
        try:
            C.save_checkpoint(root, 2, **kw)
            outcome = "saved"
        except Exception as e:  # noqa: BLE001 - the outcome is the test's
            outcome = f"{type(e).__name__}: {e}"
        with open(f"{out}.{rank}", "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fail", ["disk full", "another error"])
def test_a_save_failing_on_one_rank_of_two_fails_on_both_without_a_hang(tmp_path, fail):
    """The ranks agree on a save's outcome with a collective: the rank whose write failed and the one
    whose write worked both raise (neither waits forever in a barrier), the partial checkpoint is
    removed, and step 1 stays the resume point."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root, out = tmp_path / "checkpoints", tmp_path / "outcome"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_two_rank_save, args=(r, str(root), port, fail, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        p.kill() if p.is_alive() else None
    assert not hung, "a rank hung in the failed save"
    outcomes = [(tmp_path / f"outcome.{r}").read_text() for r in range(2)]
    if fail == "disk full":
        assert all(o.startswith("DiskFullError: no space left on device writing checkpoint step_00000002") for o in outcomes), outcomes
        assert all("step_00000001 is still the resume point" in o for o in outcomes), outcomes
    else:
        assert outcomes[1] == "RuntimeError: a bad sector", outcomes
        assert outcomes[0].startswith("CheckpointError: another worker failed writing checkpoint step_00000002"), outcomes
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000001"]
    assert C.find_latest(root).name == "step_00000001" and not (root / ".step_00000002.tmp").exists()
