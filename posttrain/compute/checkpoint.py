"""Training checkpoints: one atomic directory per step, exact resume.

    <output_dir>/checkpoints/
        step_00000300/
            model_optim/      torch.distributed.checkpoint (sharded on N ranks): trainable weights + AdamW
            rank_00000.pt     per rank: data-loader state (cursors, mixer, packer buffer), RNG states,
                              and the recipe's own registered states
            trainer.pt        LR scheduler, step
            meta.json         step, world size, tokenizer fingerprint, resolved config; written last
        latest             name of the newest complete checkpoint, replaced atomically
        .step_00000400.tmp/   a save in progress (or killed): never picked up

A checkpoint becomes visible only by the rename of its finished temporary directory, after its
files were fsynced; `latest` is updated after that. Resume picks `latest` if it is complete, else
the newest complete `step_*` directory. Frozen weights (LoRA's base) are not saved; a checksum of
them is, and resuming against a different base model fails loudly.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .. import atomic
from .distributed import all_reduce, rank_world

_OPTS = StateDictOptions(ignore_frozen_params=True, strict=False)


class CheckpointError(RuntimeError):
    pass


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
) -> Path:
    """`states`: this rank's recipe states (name -> state_dict), restored by `load_checkpoint`."""
    rank, world = rank_world()
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    msd, osd = get_state_dict(model, optimizer, options=_OPTS)
    with _single_process_quiet():
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "model_optim"), no_dist=world == 1)
    torch.save({"data": data_state, "rng": rng_state(), "states": states or {}}, tmp / f"rank_{rank:05d}.pt")
    checksum = frozen_checksum(model)  # collective: every rank
    _barrier()
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict(), "step": step}, tmp / "trainer.pt")
        (tmp / "meta.json").write_text(json.dumps({
            "step": step, "world_size": world, "frozen_checksum": checksum, **meta,
        }, indent=2, default=str))
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic.write_text(ckpt_root / "latest", final.name)
        if keep:
            for old in complete_checkpoints(ckpt_root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


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
    state = {"model": msd, "optim": osd}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path / "model_optim"), no_dist=world == 1)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_OPTS)
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    mine = torch.load(path / f"rank_{rank:05d}.pt", weights_only=False)
    set_rng_state(mine["rng"])
    return {"step": trainer["step"], "data": mine["data"], "states": mine.get("states", {}), "meta": meta}


def resolve_resume(spec: str, ckpt_root: Path) -> Path | None:
    """compute.resume: `auto` (newest complete checkpoint, if any), `never`, or a checkpoint path."""
    if spec == "never":
        return None
    if spec == "auto":
        return find_latest(ckpt_root)
    path = Path(spec)
    if not is_complete(path):
        raise CheckpointError(f"compute.resume: {spec!r} is not a complete posttrain checkpoint directory")
    return path


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
    state = {"model": get_model_state_dict(model, options=_OPTS)}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(Path(path) / "model_optim"), no_dist=True)
    set_model_state_dict(model, state["model"], options=_OPTS)
    return meta
