"""Training checkpoints: one atomic directory per step, exact resume.

    <output_dir>/checkpoints/
        step_00000300/
            model_optim/      torch.distributed.checkpoint (sharded on N ranks): trainable weights + AdamW;
                              with one process instead model_optim.flat + model_optim.idx (see below)
            rank_00000.pt     per rank: data-loader state (cursors, mixer, packer buffer), RNG states,
                              and the recipe's own registered states
            trainer.pt        LR scheduler (with the length its schedule spans: train.on_steps_change), step
            meta.json         step, world size, tokenizer fingerprint, resolved config; written last
        latest             name of the newest complete checkpoint, replaced atomically
        .step_00000400.tmp/   a save in progress (or killed): never picked up, removed on the next start
        unreadable.step_N/    a checkpoint found damaged on resume, kept for inspection

A checkpoint becomes visible only by the rename of its finished temporary directory, after its
files were fsynced; `latest` is updated after that. Resume picks `latest` if it is complete, else
the newest complete `step_*` directory; one that cannot be read (a corrupt or missing file) is
reported and the next older one is tried. Frozen weights (LoRA's base) are not saved; a checksum of
them is, and resuming against a different base model fails loudly.

A save that fails (on any rank) removes its temporary directory on every path out, so the previous
checkpoint stays the resume point; a full disk is reported as such, with the size needed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import io
import json
import math
import mmap
import os
import pickle
import random
import shutil
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_unflatten

from .. import atomic
from .distributed import all_reduce, all_reduce_many, rank_world

_OPTS = StateDictOptions(ignore_frozen_params=True, strict=False)


class CheckpointError(RuntimeError):
    pass


class DiskFullError(CheckpointError):
    """A checkpoint did not fit on the disk; the previous one is still the resume point."""


# What a checkpoint write or read can raise (a full disk; a truncated or missing file, a bad pickle
# or JSON); DCP raises CheckpointException, a BaseException.
IO_ERRORS = (Exception, CheckpointException)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it 'assumes a single process' even when told so (no_dist); that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def frozen_checksum(model: torch.nn.Module) -> float:
    """A cheap checksum of the weights a checkpoint does not store (frozen under LoRA); with FSDP2
    each rank sums its shards and the sums are reduced."""
    total = 0.0
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p
                total += float(local.detach().double().sum()) + 1e-3 * float(local.detach().double().abs().sum())
    return all_reduce(total)


def _check_frozen(model: torch.nn.Module, meta: dict, path: Path) -> None:
    """The weights a checkpoint does not store must be the ones it was trained on."""
    got = frozen_checksum(model)
    if not np.isclose(got, meta["frozen_checksum"], rtol=1e-9, atol=1e-6):
        raise CheckpointError(
            f"{path}: the frozen base weights differ from the ones this checkpoint was trained on "
            f"(checksum {got:.6g} vs {meta['frozen_checksum']:.6g}); was model.path changed?"
        )


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            with open(Path(root) / f, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    data_state: dict,
    meta: dict,
    states: dict | None = None,
    keep: int | None = None,
    keep_also: str | None = None,
    background: bool = False,
) -> "Path | PendingSave":
    """`states`: this rank's recipe states (name -> state_dict), restored by `load_checkpoint`.
    `keep`: the newest K checkpoints stay, older ones are removed, except `keep_also` (a checkpoint
    name such as `step_00000300`: the best one).
    Every rank learns of a failure on any rank (a collective, never a hang); the temporary directory
    is removed whatever the failure, including an interrupt.

    `background`: the state is copied (staged) now and written by a background thread while training
    goes on; the returned `PendingSave` is finished (made visible, a collective) at a later step
    boundary, once every rank's write is done. Until then the previous checkpoint is the resume point."""
    pending = PendingSave(Path(ckpt_root), step, keep=keep, keep_also=keep_also)
    pending.start(model, optimizer, scheduler, data_state, meta, states or {}, background=background)
    return pending if background else pending.finish()


_CKPT_GROUP = None


def _write_files(files: dict[Path, bytes]) -> None:
    """Write every file, then fsync them: the first fsync commits the filesystem journal's record of
    all of them, so the others only wait for their data (one journal commit, not one per file)."""
    fds = []
    try:
        for path, data in files.items():
            fds.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            view = memoryview(data)
            while view:
                view = view[os.write(fds[-1], view):]
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def _checkpoint_group():
    """A gloo group of its own for background writes: their DCP collectives run beside training's."""
    global _CKPT_GROUP
    if _CKPT_GROUP is None:
        _CKPT_GROUP = dist.new_group(backend="gloo")
    return _CKPT_GROUP


class PendingSave:
    """One checkpoint: `start` (every rank, at a step boundary) stages the state and writes this
    rank's files, inline or in a thread; `finish` (every rank, a collective) agrees on the outcome,
    and rank 0 writes trainer.pt and meta.json, fsyncs and renames the directory into place."""

    def __init__(self, root: Path, step: int, *, keep: int | None, keep_also: str | None):
        self.root, self.step, self.keep, self.keep_also = root, step, keep, keep_also
        self.final, self.tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
        self.rank, self.world = rank_world()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.index: dict | None = None  # the flat file's index (one process), else None: DCP
        self.published = False  # renamed into place (a one-process background save: by its writer thread)
        self.written = threading.Event()  # the model and optimizer tensors are on disk
        self.hold = None  # the optimizer's step pre-hook that waits for `written` (state written in place)

    def start(self, model, optimizer, scheduler, data_state: dict, meta: dict, states: dict, *, background: bool) -> None:
        if self.rank == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
        _barrier()
        try:
            msd, osd, flat = (_state(model, optimizer, home=background) if self.world == 1
                              else (*get_state_dict(model, optimizer, options=_OPTS), None))
            self.bytes = flat[3] if flat else _state_bytes(msd, osd)
            self.checksum = frozen_checksum(model)  # collective: every rank
            # what is not a tensor of the model or optimizer is serialised now: it may change under us. With
            # pickle, not torch.save: its pickler calls a Python persistent_id for every object, 5 ms for the
            # demo's packer buffer (213 samples, 12k token ids) where pickle takes 0.7
            self.own = pickle.dumps({"data": data_state, "rng": rng_state(), "states": states}, protocol=pickle.HIGHEST_PROTOCOL)
            self.trainer = io.BytesIO()
            torch.save({"scheduler": scheduler.state_dict(), "step": self.step}, self.trainer)
            self.meta = {"step": self.step, "world_size": self.world, "frozen_checksum": self.checksum, **meta}
            if flat is not None:  # one process: one flat file, written with O_DIRECT
                tensors, layout, objects, nbytes = flat
                self.index = {"format": 1, "tensors": layout, "objects": objects, "bytes": nbytes}  # written with the file
                if not background:
                    self._write(lambda: _write_flat(self.tmp / FLAT, tensors, layout, nbytes))
                    return
                buf, live = _stage(tensors, layout, nbytes, getattr(optimizer, _HOME, None))
                write = functools.partial(_write_staged, self.tmp / FLAT, buf, nbytes)
                if live:  # the optimizer's state is written from where it lives: its next step waits for the write
                    self.hold = optimizer.register_step_pre_hook(self._wait_written)
            elif not background:
                self._write(lambda: self._dcp_save(msd, osd))
                return
            elif self.world == 1:  # DTensors in one process: stage (copy) them now; DCP writes them in our thread
                staged = torch.utils._pytree.tree_map(lambda x: x.detach().clone() if torch.is_tensor(x) else x, (msd, osd))
                write = functools.partial(self._dcp_save, *staged)
            else:
                with _single_process_quiet():  # DCP stages the tensors now, writes them in its thread (own gloo group)
                    write = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(self.tmp / "model_optim"),
                                           process_group=_checkpoint_group()).result
            self.thread = threading.Thread(target=self._write_beside, args=(write,), name=f"checkpoint-{self.step}", daemon=True)
            self.thread.start()
        except BaseException:
            self._release()
            if self.rank == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _wait_written(self, *_) -> None:
        self.written.wait()

    def _release(self) -> None:
        """The optimizer no longer waits for this save's write."""
        if self.hold is not None:
            self.written.set()
            self.hold.remove()
            self.hold = None

    def _dcp_save(self, msd, osd) -> None:
        with _single_process_quiet():
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(self.tmp / "model_optim"), no_dist=self.world == 1)

    def _write_beside(self, model_optim) -> None:
        """The writer thread: at the scheduler's idle priority, so that its CPU work (the O_DIRECT
        submission, the small files and fsyncs, removing the oldest checkpoint) runs where a core is
        idle (between kernels, while the training thread makes a batch) instead of taking a core from
        training's compute threads. Measured on 2 CPU cores (benchmarks/resume.py's method, 3 interleaved
        runs each): the step beside the write +7.55 -> +0.83 ms, a save every 5 steps 1.39% -> 0.78% of
        the steps' time, and the next save (2 steps later) never had to wait for the write. The next
        save, or the run's end, waits for the write (`finish`), and a waiting trainer leaves its core
        idle, so the write completes."""
        with contextlib.suppress(AttributeError, OSError):  # Linux only; elsewhere a normal thread
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
        self._write(model_optim)

    def _write(self, model_optim) -> None:
        try:
            try:
                model_optim()
            finally:
                self.written.set()
            files = {self.tmp / f"rank_{self.rank:05d}.pt": self.own}
            if self.index is not None:
                files[self.tmp / INDEX] = pickle.dumps(self.index, protocol=pickle.HIGHEST_PROTOCOL)
            _write_files(files)
            if self.world == 1 and self.thread is not None:  # a background write with nobody to agree with
                self._publish()
                self.published = True
                self._prune()
        except IO_ERRORS as e:
            self.error = e

    def ready(self) -> bool:
        """This rank's write is done (finish() would not wait for it)."""
        return self.thread is None or not self.thread.is_alive()

    def finish(self) -> Path:
        """Wait for this rank's write, agree with the others, make the checkpoint visible (collective).
        One process's background save was made visible by its writer thread: the training loop does
        not wait for its last files, fsyncs and rename."""
        try:
            if self.thread is not None:
                self.thread.join()
            self._release()
            _agree(self.error, self.tmp, self.final, self.bytes)
            if not self.published:
                failure = None
                if self.rank == 0:
                    try:
                        self._publish()
                    except IO_ERRORS as e:
                        failure = e
                _agree(failure, self.tmp, self.final, self.bytes)
                self._prune()
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        _barrier()
        return self.final

    def _publish(self) -> None:
        """Rank 0: the last files, fsync, rename into place, point `latest` at it."""
        _write_files({self.tmp / "trainer.pt": self.trainer.getvalue(),
                      self.tmp / "meta.json": json.dumps(self.meta, indent=2, default=str).encode()})
        if self.index is None:  # DCP's files (ours were fsynced as they were written)
            _fsync_tree(self.tmp)
        if self.final.exists():  # a re-save of the same step (after a resume): replace it
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        atomic.write_text(self.root / "latest", self.final.name)

    def _prune(self) -> None:
        """Rank 0: only the newest `keep` checkpoints (and `keep_also`, the best one) stay."""
        if self.rank == 0 and self.keep:
            for old in complete_checkpoints(self.root)[:-self.keep]:
                if old.name != self.keep_also:
                    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------- one process: a flat file
# With one process (compute.workers: 1) the model and optimizer tensors go to one file, each at an
# offset of its own, written from page-aligned memory with O_DIRECT where the filesystem allows it
# (DCP stays the format of sharded saves, which it reshards on load). Why not DCP here: its
# FileSystemWriter writes through the page cache, and the kernel's buffered write path costs CPU per
# byte that training loses on busy cores: on this 2-core VM (ext4 on virtio) a buffered write of the
# demo's 40 MiB took 135 ms of CPU, DCP's save 120-180 ms; the same bytes with O_DIRECT took 1-5 ms
# of CPU and 18 ms of wall time. The index (names, dtypes, shapes, offsets, and the state dicts'
# non-tensor values) is a small pickle beside it.
FLAT, INDEX = "model_optim.flat", "model_optim.idx"
_PAGE = 4096
_CHUNK = 64 << 20  # a synchronous save streams through at most this much memory, whatever the state's size
# [buffer, its mmap]: the page-aligned buffer of every save, reused while it is large enough (fresh memory
# costs its page faults and unmapping every save: 84 vs 38 ms for the demo's synchronous write). Saves
# never overlap: a save first finishes the one in flight.
_BUFFER: list = []
_VIEWS: list = []  # [tensors, buffer, its slices, the tensors' byte views] of the last staging (held: no id reuse)


def _aligned(nbytes: int) -> tuple[torch.Tensor, mmap.mmap]:
    """Page-aligned memory (an anonymous mmap) as a uint8 tensor, `nbytes` rounded up to a page."""
    mm = mmap.mmap(-1, max(_PAGE, -(-nbytes // _PAGE) * _PAGE))
    return torch.frombuffer(mm, dtype=torch.uint8), mm


def _flat_layout(tree) -> tuple[list, list[tuple], dict, int]:
    """Tensor leaves, their (key, dtype, shape, offset, bytes) at 64-byte aligned offsets, the other
    leaves by key, and the total length."""
    tensors, layout, objects, end = [], [], {}, 0
    for path, value in tree_flatten_with_path(tree)[0]:
        key = keystr(path)
        if torch.is_tensor(value):
            n = value.numel() * value.element_size()
            layout.append((key, str(value.dtype).removeprefix("torch."), tuple(value.shape), end, n))
            tensors.append(value.detach())
            end = -(-(end + n) // 64) * 64
        else:
            objects[key] = value
    return tensors, layout, objects, end


_GROUPS = "[1]['param_groups']"  # where the optimizer's param groups sit in the (msd, osd) tree


def _state(model, optimizer, home: bool = False) -> tuple[dict, dict, tuple | None]:
    """One process: get_state_dict(model, optimizer) and, where the flat file takes it, its
    `_flat_layout`. get_state_dict's checks and name maps cost 4 ms a save and the layout 1.7 ms (the
    demo's step is 280 ms), so both are kept (on the optimizer) and reused while the parameters and
    optimizer tensors they hold are the same objects over the same memory; only the param groups'
    values (the learning rate changes every step) are taken fresh. `home`: the optimizer's state moves
    into the staging buffer first (`_move_home`)."""
    key = _identity(model, optimizer)
    cached = getattr(optimizer, "_posttrain_state", None)
    if cached is None or cached[0] != key:
        msd, osd = get_state_dict(model, optimizer, options=_OPTS)
        flat = _flat_layout((msd, osd)) if flat_capable((msd, osd)) else None
        if flat is None or key is None:
            return msd, osd, flat
        if home and _move_home(optimizer, flat[0], flat[1], flat[3]):  # the state's memory changed: its views and identity too
            del msd, osd, flat
            return _state(model, optimizer)
        optimizer._posttrain_state = cached = (key, msd, osd, flat)
    _, msd, osd, (tensors, layout, objects, nbytes) = cached
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": old["params"]}
              for g, old in zip(optimizer.param_groups, osd["param_groups"])]
    objects = {k: v for k, v in objects.items() if not k.startswith(_GROUPS)}
    objects.update((_GROUPS + keystr(path), v) for path, v in tree_flatten_with_path(groups)[0])
    return msd, {**osd, "param_groups": groups}, (tensors, layout, objects, nbytes)


def _identity(model, optimizer) -> tuple | None:
    """What get_state_dict's result depends on: the parameters, buffers and optimizer tensors (each
    object, its memory, whether it trains) and the param groups' members. None: not to be reused (a
    param group holds a tensor value, which the layout would hold as a tensor)."""
    def ident(v):
        return (id(v), v.data_ptr(), v.requires_grad) if torch.is_tensor(v) else id(v)
    if any(torch.is_tensor(v) for g in optimizer.param_groups for k, v in g.items() if k != "params"):
        return None
    return (tuple(ident(v) for v in model.state_dict(keep_vars=True).values()),
            tuple((id(p), tuple(ident(v) for v in st.values())) for p, st in optimizer.state.items()),
            tuple((tuple(g), tuple(id(p) for p in g["params"])) for g in optimizer.param_groups))


def flat_capable(tree) -> bool:
    """Plain tensors only (a DTensor's shards are DCP's to write)."""
    from torch.distributed.tensor import DTensor

    return not any(isinstance(v, DTensor) for v in torch.utils._pytree.tree_leaves(tree))


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)


class _Direct:
    """A file written from page-aligned memory: O_DIRECT where the filesystem takes it (tmpfs and some
    others refuse it: plain writes there), fsynced on close."""

    def __init__(self, path: Path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.fd, self.direct = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644), hasattr(os, "O_DIRECT")
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.fd, self.direct = os.open(path, flags, 0o644), False

    def write(self, buf: torch.Tensor, nbytes: int) -> None:
        """The first `nbytes` of `buf` (rounded up to a page: buf is page-aligned and at least that long)."""
        view = memoryview(buf.numpy())[: -(-nbytes // _PAGE) * _PAGE]
        done = 0
        while done < len(view):
            try:
                done += os.write(self.fd, view[done:])
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False

    def __enter__(self) -> "_Direct":
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)


def _buffer(nbytes: int) -> torch.Tensor:
    """The shared page-aligned buffer, at least `nbytes` long."""
    if not _BUFFER or _BUFFER[0].numel() < nbytes:
        _BUFFER[:] = _aligned(nbytes)
    return _BUFFER[0]


def release_buffers() -> None:
    """Let go of the staging buffer and the views of the last staged state (the end of a run: they are
    the size of the model and optimizer state)."""
    _BUFFER.clear()
    _VIEWS.clear()


# A background save's optimizer state lives in its staging buffer (an attribute of the optimizer: its
# (buffer, mmap)), at its offsets in the flat file: the state (AdamW's two moments, 2/3 of the demo's
# 40 MiB) is written from where it lives, with the next optimizer step waiting for the write (~30 ms
# of wall time, beside a forward and backward), and only the parameters are copied at the save. Not
# the parameters: a parameter that shares one storage with the others is one that torch.save, pickle
# (Ray), deepcopy and safetensors (export) would each see as the whole buffer or as tied weights.
_HOME = "_posttrain_home"


def _move_home(optimizer, tensors: list[torch.Tensor], layout: list[tuple], nbytes: int) -> bool:
    """Move the optimizer state's tensors (plain, contiguous CPU tensors) into a page-aligned buffer
    laid out as the flat file, each object keeping its identity (`.data` set to its slot), where the
    whole state is on the CPU (elsewhere it is copied to the host at each save anyway). True if any
    moved."""
    if any(t.device.type != "cpu" for t in tensors):
        return False
    slots = {(t.data_ptr(), t.dtype, t.shape): (off, n) for t, (_, _, _, off, n) in zip(tensors, layout) if n}
    state = [t for st in optimizer.state.values() for t in st.values()
             if torch.is_tensor(t) and t.is_contiguous() and t._base is None and t.numel()
             and (t.data_ptr(), t.dtype, t.shape) in slots]
    home = getattr(optimizer, _HOME, None)
    if not state or (home is not None and home[0].numel() >= nbytes
                     and all(t.data_ptr() == home[0].data_ptr() + slots[t.data_ptr(), t.dtype, t.shape][0] for t in state)):
        return False  # nothing to move, or all of it at its offsets already
    home = _aligned(nbytes)
    buf = home[0]
    for t in state:
        off, n = slots[t.data_ptr(), t.dtype, t.shape]
        slot = buf[off : off + n].view(t.dtype).view(t.shape)
        slot.copy_(t)
        t.data = slot
    setattr(optimizer, _HOME, home)
    return True


def _stage(tensors: list[torch.Tensor], layout: list[tuple], nbytes: int, home=None) -> tuple[torch.Tensor, bool]:
    """Copy the tensors to their offsets in the shared buffer (a background save's staged state), in
    one call (the demo's 188 tensors: 2.0 ms, against 3.2 in a loop of copies); or into `home` (the
    buffer the optimizer state lives in, `_move_home`) where they are not already at their offsets.
    Returns the buffer, and whether some of it is the live tensors (to be written before they change)."""
    buf = home[0] if home is not None and home[0].numel() >= nbytes else _buffer(nbytes)
    if _VIEWS and _VIEWS[0] is tensors and _VIEWS[1] is buf:  # the same (cached) tensors: the same views
        dst, src, live = _VIEWS[2:]
    else:
        at = buf.data_ptr()
        live = any(n and t.data_ptr() == at + off for t, (_, _, _, off, n) in zip(tensors, layout))
        pairs = [(buf[off : off + n], _byte_view(t)) for t, (_, _, _, off, n) in zip(tensors, layout) if n and t.data_ptr() != at + off]
        dst, src = (list(x) for x in zip(*pairs)) if pairs else ([], [])
        # a strided tensor's byte view is a copy, taken now: never reused
        _VIEWS[:] = [tensors, buf, dst, src, live] if all(t.is_contiguous() for t in tensors) else []
    if dst:
        torch._foreach_copy_(dst, src)
    return buf, live


def _write_staged(path: Path, buf: torch.Tensor, nbytes: int) -> None:
    with _Direct(path) as f:
        f.write(buf, nbytes)


def _write_flat(path: Path, tensors: list[torch.Tensor], layout: list[tuple], nbytes: int) -> None:
    """Stream the tensors to their offsets through a bounce buffer of at most _CHUNK bytes."""
    buf = _buffer(min(nbytes, _CHUNK))
    buf = buf[: max(_PAGE, min(nbytes, _CHUNK) // _PAGE * _PAGE)]  # flushed whole: a multiple of a page
    base = 0  # the file offset of buf[0]
    with _Direct(path) as f:
        for t, (_, _, _, off, n) in zip(tensors, layout):
            src, done = _byte_view(t), 0
            while done < n:
                at = off + done - base
                if at == buf.numel():
                    f.write(buf, buf.numel())
                    base, at = base + buf.numel(), 0
                k = min(n - done, buf.numel() - at)
                buf[at : at + k].copy_(src[done : done + k])
                done += k
        f.write(buf, nbytes - base)


def _read_flat(path: Path, tree):
    """`tree` (the state dicts to load, as get_state_dict gives them) with every value from the flat
    checkpoint in `path`: tensors copied in place, other values replaced."""
    index = _load_pickled(path / INDEX)
    size = (path / FLAT).stat().st_size
    if size < index["bytes"]:
        raise EOFError(f"{path / FLAT}: {size} bytes where its index lists {index['bytes']} (truncated)")  # damaged: resume falls back
    data = np.memmap(path / FLAT, dtype=np.uint8, mode="c") if index["bytes"] else None  # (an empty file cannot be mapped)
    where = {key: (dtype, shape, off) for key, dtype, shape, off, _ in index["tensors"]}
    leaves, spec = tree_flatten_with_path(tree)
    out = []
    for p, value in leaves:
        key = keystr(p)
        if torch.is_tensor(value):
            if key not in where:
                raise CheckpointError(f"{path}: no tensor {key} in the checkpoint (a different model or optimizer?)")
            dtype, shape, off = where[key]
            if (dtype, tuple(shape)) != (str(value.dtype).removeprefix("torch."), tuple(value.shape)):
                raise CheckpointError(f"{path}: {key} is {dtype} {list(shape)} in the checkpoint, {value.dtype} {list(value.shape)} here")
            if value.numel():
                value.copy_(torch.frombuffer(data, dtype=getattr(torch, dtype), count=math.prod(shape), offset=off).view(shape))
            out.append(value)
        else:
            out.append(index["objects"].get(key, value))
    return tree_unflatten(out, spec)


def _read_state(path: Path, msd: dict, osd: dict | None = None, *, no_dist: bool = True) -> tuple:
    """The model's (and optimizer's) state dicts, as get_state_dict gives them, filled from the checkpoint
    in `path`: one process's flat file, or DCP's directory (any number of ranks)."""
    if (path / INDEX).exists():
        return _read_flat(path, (msd,) if osd is None else (msd, osd))
    state = {"model": msd} if osd is None else {"model": msd, "optim": osd}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path / "model_optim"), no_dist=no_dist)
    return tuple(state.values())


def _state_bytes(*state_dicts) -> int:
    """Bytes of the tensors in (nested) state dicts, this rank's shards."""
    def walk(x):
        if torch.is_tensor(x):
            x = x.to_local() if hasattr(x, "to_local") else x
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0
    return sum(walk(sd) for sd in state_dicts)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem of `path` (or its nearest existing ancestor)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _agree(failure: BaseException | None, tmp: Path, final: Path, local_bytes: int) -> None:
    """Every rank raises if any rank failed (a collective in place of a barrier); rank 0 removes the
    temporary directory. A full disk (on any rank) becomes one clear DiskFullError on every rank."""
    rank, world = rank_world()
    free = free_bytes(tmp)
    full = failure is not None and _no_space(failure, free < local_bytes * world)
    failed, any_full, needed = all_reduce_many([failure is not None, full, local_bytes])
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = find_latest(final.parent)
    keep = f"{previous} is still the resume point" if previous else "there is no earlier checkpoint to resume from"
    if any_full:
        raise DiskFullError(
            f"no space left on device writing checkpoint {final.name} in {final.parent}: it needs about {_mib(needed)} "
            f"({_mib(free_bytes(tmp))} free); the partial checkpoint was removed and {keep}. Free some space (or lower "
            "compute.keep_checkpoints) and run the same command again to resume"
        ) from failure
    if failure is None:
        raise CheckpointError(f"another worker failed writing checkpoint {final.name} in {final.parent}; {keep}")
    raise failure


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _no_space(e: BaseException, short_of_space: bool) -> bool:
    """Whether `e` (or an exception it wraps) is a full disk. torch's zip writer reports ENOSPC as an
    opaque `enforce fail at inline_container.cc` / `file write failed`: that counts when the disk
    indeed has less room left than the checkpoint needs."""
    stack, seen = [e], set()
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return True
        text = str(x) if not isinstance(x, CheckpointException) else ""
        if "No space left on device" in text:
            return True
        if short_of_space and any(m in text for m in ("inline_container", "file write failed", "unexpected pos")):
            return True
        stack += [x.__cause__, x.__context__]
        if isinstance(x, CheckpointException):
            stack += [f[0] if isinstance(f, tuple) else f for f in x.failures.values()]
    return False


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint dirs, oldest first (a dir is complete once renamed; meta.json is inside)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    dirs = [d for d in root.glob("step_*") if is_complete(d)]
    return sorted(dirs, key=lambda d: int(d.name.split("_")[1]))


def find_latest(ckpt_root: Path) -> Path | None:
    root = Path(ckpt_root)
    pointer = root / "latest"
    if pointer.is_file():
        d = root / pointer.read_text().strip()
        if is_complete(d):
            return d
    done = complete_checkpoints(root)
    return done[-1] if done else None


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore model/optimizer/scheduler/RNG in place; return {"step", "data", "states", "meta"}."""
    path = Path(path)
    meta = read_meta(path)
    rank, world = rank_world()
    if meta["world_size"] != world:
        raise CheckpointError(
            f"{path}: written by {meta['world_size']} workers, resuming with {world}; the data-loader state is "
            "per rank, so resume with the same compute.workers"
        )
    _check_frozen(model, meta, path)
    msd, osd = get_state_dict(model, optimizer, options=_OPTS)
    msd, osd = _read_state(path, msd, osd, no_dist=world == 1)
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=_OPTS)
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    mine = _load_pickled(path / f"rank_{rank:05d}.pt")
    set_rng_state(mine["rng"])
    return {"step": trainer["step"], "data": mine["data"], "states": mine.get("states", {}), "meta": meta}


def _load_pickled(path: Path):
    """A pickle file, or a torch.save file (zip) as earlier versions wrote it."""
    if zipfile.is_zipfile(path):
        return torch.load(path, weights_only=False)
    with open(path, "rb") as f:
        return pickle.load(f)


def resolve_resume(spec: str, ckpt_root: Path) -> Path | None:
    """compute.resume: `auto` (newest complete checkpoint, if any), `never`, or a checkpoint path."""
    found = resume_candidates(spec, ckpt_root)
    return found[0] if found else None


def resume_candidates(spec: str, ckpt_root: Path) -> list[Path]:
    """The checkpoints to try in order: for `auto`, `latest` then every complete one, newest first
    (an unreadable one falls back to the next); `never`: none; a path: only that one."""
    if spec == "never":
        return []
    if spec == "auto":
        latest = find_latest(ckpt_root)
        return [latest] + [d for d in reversed(complete_checkpoints(ckpt_root)) if d != latest] if latest else []
    path = Path(spec)
    if not is_complete(path):
        raise CheckpointError(f"compute.resume: {spec!r} is not a complete posttrain checkpoint directory")
    return [path]


def clean_leftovers(ckpt_root: Path) -> list[Path]:
    """Remove what an interrupted save leaves behind: `.step_N.tmp/` dirs, `step_N/` dirs without
    meta.json, temporary `latest` pointers. Call before any save starts (rank 0)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    junk = [*root.glob(".step_*.tmp"), *(d for d in root.glob("step_*") if d.is_dir() and not is_complete(d))]
    for d in junk:
        shutil.rmtree(d, ignore_errors=True)
    return junk + atomic.remove_temporaries(root, ["latest"])


def set_aside_unreadable(ckpt_root: Path, names: list[str]) -> list[Path]:
    """Rename unreadable checkpoints `step_N` to `unreadable.step_N` (never resumed from, never
    counted by retention, not replaced by a re-save of step N); returns the new paths."""
    moved = []
    for name in names:
        src, dst = Path(ckpt_root) / name, Path(ckpt_root) / f"unreadable.{name}"
        n = 1
        while dst.exists():  # an earlier damaged copy of the same step is kept too
            n += 1
            dst = dst.with_name(f"unreadable.{name}.{n}")
        if src.exists():
            os.replace(src, dst)
            moved.append(dst)
    return moved


def unreadable_reason(e: BaseException) -> str:
    """One line on why a checkpoint could not be read (DCP's wrapper unwrapped)."""
    if isinstance(e, CheckpointException) and e.failures:
        first = next(iter(e.failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def is_complete(path: Path) -> bool:
    """A checkpoint dir is complete once renamed into place; meta.json, written last, is inside."""
    return (Path(path) / "meta.json").is_file()


def read_meta(path: Path) -> dict:
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete posttrain checkpoint (no meta.json)")
    return json.loads((path / "meta.json").read_text())


def load_weights(path: Path, model: torch.nn.Module) -> dict:
    """Load only the model weights of a checkpoint (of any number of workers: DCP reshards on load)
    into an unsharded `model` in this process; returns the checkpoint's meta."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    meta = read_meta(path)
    _check_frozen(model, meta, Path(path))
    (msd,) = _read_state(Path(path), get_model_state_dict(model, options=_OPTS))
    set_model_state_dict(model, msd, options=_OPTS)
    return meta
