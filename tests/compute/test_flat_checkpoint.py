"""One process's checkpoint tensors in one flat file (model_optim.flat + model_optim.idx), written from
page-aligned memory with O_DIRECT where the filesystem takes it, through a bounded bounce buffer
(synchronous) or from the staged copy (background). Read back into the state dicts of the model and
optimizer: every tensor bitwise, every other value as saved; a damaged file or a different model is
an error, never a silent partial load."""

import copy
import io
import os
import time
from pathlib import Path

import pytest
import torch

import posttrain.compute.checkpoint as C


def _tree():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(40, 30, generator=g)
    return ({"w": torch.randn(300, 7, generator=g), "bf16": torch.randn(513, generator=g).to(torch.bfloat16),
             "empty": torch.zeros(0, 5), "strided": wide[:, ::3]},  # not contiguous
            {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(300, 7, generator=g)}},
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": ["w"], "fused": None}]})


def _blank(tree):
    return torch.utils._pytree.tree_map(lambda x: torch.full_like(x, 7) if torch.is_tensor(x) else "blank", tree)


def _save(path: Path, tree, *, staged: bool) -> None:
    tensors, layout, objects, nbytes = C._flat_layout(tree)
    path.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": 1, "tensors": layout, "objects": objects, "bytes": nbytes}, buf)
    (path / C.INDEX).write_bytes(buf.getvalue())
    if staged:
        C._write_staged(path / C.FLAT, C._stage(tensors, layout, nbytes)[0], nbytes)
    else:
        C._write_flat(path / C.FLAT, tensors, layout, nbytes)


def _equal(a, b) -> bool:
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        (torch.is_tensor(x) and x.dtype == y.dtype and torch.equal(x, y)) or (not torch.is_tensor(x) and x == y) for x, y in zip(la, lb))


@pytest.mark.parametrize("direct", ["taken", "refused at open", "refused at write"])
@pytest.mark.parametrize("staged", [False, True])
def test_flat_file_round_trip(tmp_path, monkeypatch, direct, staged):
    """Bitwise round trip: fp32, bf16, an empty and a strided tensor, scalars and non-tensor values;
    the synchronous writer with a 4 KiB bounce buffer (tensors span several flushes), the background
    one from its staging buffer. A filesystem that refuses O_DIRECT (EINVAL at open or at the first
    write, as some do) gets plain writes of the same bytes."""
    import errno

    monkeypatch.setattr(C, "_CHUNK", 4096)
    real_open, real_write, calls = os.open, os.write, []

    def fake_open(path, flags, *a):
        if direct == "refused at open" and flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    def fake_write(fd, data):
        direct_now = bool(C.fcntl.fcntl(fd, C.fcntl.F_GETFL) & os.O_DIRECT)
        calls.append(direct_now)
        if direct == "refused at write" and direct_now:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(C.os, "open", fake_open)
    monkeypatch.setattr(C.os, "write", fake_write)
    tree = _tree()
    _save(tmp_path / "ck", tree, staged=staged)
    monkeypatch.undo()
    assert (tmp_path / "ck" / C.FLAT).stat().st_size % 4096 == 0
    assert _equal(C._read_flat(tmp_path / "ck", _blank(tree)), tree)
    assert calls and (all(calls) if direct == "taken" else not any(calls[-1:]))


def test_a_truncated_file_or_another_model_is_an_error(tmp_path):
    tree = _tree()
    _save(tmp_path / "ck", tree, staged=False)
    other = _blank(tree)
    other[0]["w"] = torch.zeros(301, 7)
    with pytest.raises(C.CheckpointError, match=r"\['w'\] is float32 \[300, 7\] in the checkpoint, torch.float32 \[301, 7\] here"):
        C._read_flat(tmp_path / "ck", other)
    extra = _blank(tree)
    extra[0]["new"] = torch.zeros(2)
    with pytest.raises(C.CheckpointError, match=r"no tensor \[0\]\['new'\] in the checkpoint"):
        C._read_flat(tmp_path / "ck", extra)
    flat = tmp_path / "ck" / C.FLAT
    flat.write_bytes(flat.read_bytes()[:1000])
    with pytest.raises(EOFError, match="truncated"):  # damaged: resume falls back to an older checkpoint
        C._read_flat(tmp_path / "ck", _blank(tree))


def _trained():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("flat", [True, False])
def test_one_process_saves_and_resumes(tmp_path, monkeypatch, flat):
    """save_checkpoint / load_checkpoint in one process: the flat file in place of DCP's directory;
    model and AdamW state restored bitwise. Without it (state the flat file does not take: here
    forced), a background save in one process stages a copy and DCP writes it in our thread (no
    process group needed)."""
    if not flat:
        monkeypatch.setattr(C, "flat_capable", lambda tree: False)
    torch.manual_seed(0)
    model, opt = _trained()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    saved = C.save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched, data_state={"cursor": 7}, meta={},
                              background=not flat)
    path = saved if flat else saved.finish()
    files = ["meta.json", C.FLAT, C.INDEX, "rank_00000.pt", "trainer.pt"] if flat else ["meta.json", "model_optim", "rank_00000.pt", "trainer.pt"]
    assert sorted(p.name for p in path.iterdir()) == files
    torch.manual_seed(1)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    got = C.load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0))
    assert got["step"] == 3 and got["data"] == {"cursor": 7}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k][n], sb[k][n]) for k in sa for n in sa[k])


def _fresh_layout(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt, options=C._OPTS)
    return C._flat_layout((msd, osd))


def _step(model, opt):
    model(torch.randn(5, 8)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


def test_the_state_of_one_process_is_reused_while_it_holds_the_same_tensors():
    """_state keeps get_state_dict's result and its layout (4 + 1.7 ms a save): what it gives equals
    get_state_dict's, after the learning rate changed, after more steps, and after the optimizer's
    state or a parameter's memory was replaced (then it is computed again)."""
    torch.manual_seed(0)
    model, opt = _trained()

    def same_as_fresh():
        _, _, (tensors, layout, objects, nbytes) = C._state(model, opt)
        f_tensors, f_layout, f_objects, f_nbytes = _fresh_layout(model, opt)
        assert layout == f_layout and nbytes == f_nbytes and objects == f_objects
        assert all(a.data_ptr() == b.data_ptr() and torch.equal(a, b) for a, b in zip(tensors, f_tensors))
        return tensors

    first = same_as_fresh()
    opt.param_groups[0]["lr"] = 0.5  # changes every step (the scheduler)
    _step(model, opt)
    assert same_as_fresh() is first  # reused
    opt.load_state_dict(opt.state_dict() | {"state": {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}})
    assert same_as_fresh() is not first  # the optimizer's tensors are new objects: computed again
    second = same_as_fresh()
    model[0].weight.data = model[0].weight.data.clone()  # the same Parameter over new memory
    assert same_as_fresh() is not second


def test_staging_reuses_its_views_and_copies_the_current_values():
    """The views of a staged state are kept for the next save of the same tensors: a second staging
    after the tensors changed in place holds the new values (a strided tensor's byte view is a copy:
    never kept)."""
    tree = _tree()
    tensors, layout, _, nbytes = C._flat_layout(tree)
    C.release_buffers()
    C._stage(tensors, layout, nbytes)
    for t in tensors:
        t.add_(1) if t.dtype != torch.bfloat16 else t.mul_(2)
    tree[0]["strided"].add_(1)  # the view of a tensor that is not contiguous
    buf, live = C._stage(tensors, layout, nbytes)
    assert not live
    for t, (_, _, _, off, n) in zip(tensors, layout):
        assert torch.equal(buf[off : off + n], C._byte_view(t)), "a stale staged copy"
    C.release_buffers()
    assert not C._BUFFER and not C._VIEWS


def test_files_written_by_torch_save_still_load(tmp_path):
    """Earlier versions wrote the per-rank state and the flat file's index with torch.save; they are pickles now."""
    obj = {"data": {"buffer": [1, 2]}, "rng": torch.arange(3)}
    torch.save(obj, tmp_path / "old.pt")
    (tmp_path / "new.pt").write_bytes(__import__("pickle").dumps(obj))
    for name in ("old.pt", "new.pt"):
        got = C._load_pickled(tmp_path / name)
        assert got["data"] == obj["data"] and torch.equal(got["rng"], obj["rng"])


def test_a_background_save_of_one_process_makes_itself_visible(tmp_path):
    """One process: the writer thread renames the finished checkpoint into place and points `latest`
    at it (nobody to agree with), so finish() at the next step only waits; retention runs there too."""
    torch.manual_seed(0)
    model, opt = _trained()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    paths = []
    for step in (1, 2, 3):
        pending = C.save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, data_state={}, meta={},
                                    keep=2, background=True)
        pending.thread.join()
        assert pending.published and C.find_latest(tmp_path).name == f"step_{step:08d}"  # before finish()
        paths.append(pending.finish())
        _step(model, opt)
    assert [p.name for p in C.complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert not list(tmp_path.glob(".step_*"))


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
def test_a_background_write_runs_at_idle_priority_and_training_does_not(tmp_path, monkeypatch):
    """The writer thread takes a core only where training leaves one idle; the thread that trains keeps
    its normal priority (the policy is the writer thread's own, not the process's)."""
    torch.manual_seed(0)
    model, opt = _trained()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    seen, real = [], C._write_files
    monkeypatch.setattr(C, "_write_files", lambda files: (seen.append(os.sched_getscheduler(0)), real(files)))
    pending = C.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, data_state={}, meta={}, background=True)
    assert pending.finish().name == "step_00000001"
    assert seen and all(p == os.SCHED_IDLE for p in seen)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    C.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, data_state={}, meta={})  # synchronous
    assert seen[-1] == os.SCHED_OTHER


def test_a_background_save_writes_the_optimizer_state_from_where_it_lives_and_the_next_step_waits(tmp_path, monkeypatch):
    """A background save moves AdamW's state into its staging buffer once (each tensor the same object,
    its values unchanged) and writes it from there: an optimizer step taken while the write is under
    way waits for it, so the checkpoint holds the state of its own step, not the next one's."""
    torch.manual_seed(0)
    model, opt = _trained()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    objects = {id(t): t.clone() for st in opt.state.values() for t in st.values()}
    real = C._write_staged

    def slow(*a):  # the write starts late: a step that did not wait would change what it writes
        time.sleep(0.5)
        real(*a)

    monkeypatch.setattr(C, "_write_staged", slow)
    want = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    pending = C.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, data_state={}, meta={}, background=True)
    home = getattr(opt, C._HOME)[0]
    lo, hi = home.data_ptr(), home.data_ptr() + home.numel()
    for st in opt.state.values():  # moved into the buffer, the same objects with the same values
        for t in st.values():
            assert lo <= t.data_ptr() < hi and torch.equal(t, objects[id(t)])
    assert pending.thread.is_alive()
    _step(model, opt)  # waits for the write
    assert not pending.thread.is_alive() or pending.written.is_set()
    path = pending.finish()
    fresh_model, fresh_opt = _trained()
    C.load_checkpoint(path, model=fresh_model, optimizer=fresh_opt, scheduler=torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0))
    assert _equal(fresh_model.state_dict(), want[0]) and _equal(fresh_opt.state_dict(), want[1])
    assert not opt._optimizer_step_pre_hooks  # released
    ptrs = [t.data_ptr() for st in opt.state.values() for t in st.values()]
    C.save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, data_state={}, meta={}, background=True).finish()
    assert [t.data_ptr() for st in opt.state.values() for t in st.values()] == ptrs  # moved once
