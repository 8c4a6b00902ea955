"""`posttrain run --overwrite`: replace an earlier run without ever losing it to a typo.

    check   everything checkable first (data sources resolve, the model dir has a config and a
            tokenizer, the output dir's parent is writable); on a failure the old run is untouched
    aside   the old run dir is renamed to a hidden sibling, `<parent>/.<name>.previous/`
    drop    the new run's first checkpoint (engine, rank 0) or its success removes the old run
    restore the new run failed before any checkpoint: it is removed, the old run renamed back

A process killed in between leaves the aside dir; the next `posttrain run` on that output dir
settles it first: the new run has a checkpoint or its export (keep it, drop the old) or not
(restore the old).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..config import ConfigError, JobConfig
from .checkpoint import find_latest
from .metrics import console
from .rundir import RunDir


def check_job(cfg: JobConfig) -> None:
    """Raise ConfigError (naming the key and the path) for what a run would only find out later."""
    from ..data.sources import Source
    from ..data.tokenizer import load_tokenizer

    for s in cfg.data.sources + (cfg.data.eval_sources or []):
        Source._expand(s.path, cfg.data.storage_options)
    m = cfg.model
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(m.path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot load a model config from {m.path!r}: {str(e).splitlines()[0]}") from e
    load_tokenizer(m)
    _check_writable(Path(cfg.compute.output_dir).resolve().parent)


def _check_writable(path: Path) -> None:
    """The nearest existing ancestor of `path` accepts a new file (what creating the run dir needs)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".posttrain-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"compute.output_dir: cannot write in {path} ({e.strerror or e})") from e


def previous(run: RunDir) -> Path:
    """Where an overwritten run waits until its replacement is known to work."""
    return run.root.parent / f".{run.root.name}.previous"


def set_aside(run: RunDir, cfg: JobConfig) -> None:
    """Check the job, then move the existing run dir aside (nothing is deleted yet)."""
    try:
        check_job(cfg)
    except ConfigError as e:
        raise ConfigError(f"{e} (--overwrite: the previous run in {run.root} is untouched)") from None
    try:
        os.replace(run.root, previous(run))
    except OSError as e:
        raise ConfigError(f"compute.output_dir: cannot move the previous run {run.root} aside to replace it "
                          f"({e.strerror or e}); remove it yourself or choose another output_dir") from e
    console.print(f"--overwrite: the previous run is kept in {previous(run)} until this one writes a checkpoint or finishes", soft_wrap=True)


def drop_previous(run: RunDir) -> None:
    """The replacement works (it checkpointed or finished): remove the old run."""
    old = previous(run)
    if old.exists():
        shutil.rmtree(old)
        console.print(f"--overwrite: removed the previous run ({old})", soft_wrap=True)


def restore_previous(run: RunDir) -> None:
    """The replacement failed before writing anything resumable: put the old run back."""
    old = previous(run)
    if not old.exists():
        return
    if run.root.exists():
        shutil.rmtree(run.root)
    os.replace(old, run.root)
    console.print(f"--overwrite: the new run failed before its first checkpoint; restored the previous run in {run.root}", soft_wrap=True)


def settle(run: RunDir) -> None:
    """After the replacement ended (or at the start of the next run, after a kill): keep whichever
    run can be resumed or is finished."""
    if not previous(run).exists():
        return
    if find_latest(run.checkpoints) is not None or run.hf.exists():
        drop_previous(run)
    else:
        restore_previous(run)
