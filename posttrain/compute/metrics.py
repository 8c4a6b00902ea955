"""Per-step metrics: a rich progress bar on the console and one JSON line per step in the run dir.

`posttrain.compute.metrics.add_sink(fn)` registers a user hook called with every step's metrics dict;
W&B and MLflow are built in (compute.wandb, compute.mlflow: compute/tracking.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .. import atomic
from .rundir import RunDir

_SINKS: list[Callable[[dict], None]] = []
console = Console(stderr=True)


def add_sink(fn: Callable[[dict], None]) -> None:
    _SINKS.append(fn)


def peak_memory_gb(device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak RSS on CPU."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def complete_lines(path: Path) -> list[str]:
    """The lines of a JSONL file up to its last complete one: a partial last line (a kill or a full
    disk mid-write) and anything after a damaged line are dropped, with a note on the console."""
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    good = []
    for ln in lines[:-1]:  # the text after the last newline is never a complete line
        try:
            json.loads(ln)
        except ValueError:
            break
        good.append(ln)
    dropped = len(lines) - 1 - len(good) + (lines[-1] != "")
    if dropped:
        console.print(f"{path}: truncated to its last complete line ({dropped} partial or damaged line(s) dropped)", soft_wrap=True)
    return good


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, *, progress: bool = True, log_every: int = 1, start_step: int = 0,
                 enabled: bool = True, tensorboard: bool = False, trackers=None):
        """`enabled=False` (ranks other than 0) makes every call a no-op. `trackers`: the job's W&B /
        MLflow sinks (compute/tracking.py), closed by `close`."""
        self.enabled = enabled
        self.trackers = trackers
        self.path = RunDir(run_dir).metrics
        self._fh = None  # opened at the first step: a run that fails before it leaves no metrics
        self._tb = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("compute.tensorboard: true needs the tensorboard package (pip install tensorboard)") from e
            self._tb = SummaryWriter(str(RunDir(run_dir).tensorboard))
        if self.path.exists():  # (re)started from step k: drop the lines of steps that will be redone
            kept = [ln for ln in complete_lines(self.path) if json.loads(ln).get("step", 0) <= start_step]
            atomic.write_text(self.path, "".join(ln + "\n" for ln in kept))
        self.log_every = log_every
        self._progress = None
        if progress:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="")
            self._progress.start()
        self._t0 = time.perf_counter()

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        metrics = {"time": round(time.perf_counter() - self._t0, 3), **metrics}
        if self._fh is None:
            self._fh = open(self.path, "a", buffering=1)
        self._fh.write(json.dumps(metrics) + "\n")
        for sink in _SINKS:
            sink(metrics)
        if self.trackers is not None:
            self.trackers.log(metrics)
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(k, v, metrics.get("step", 0))
        step = metrics.get("step", 0)
        info = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  {metrics.get('tokens_per_s', 0):,.0f} tok/s"
        if "reward/mean" in metrics:  # on-policy RL: the number a user watches
            info = f"reward {metrics['reward/mean']:.3f}  " + info
        if metrics.get("mfu") is not None:
            info += f"  MFU {metrics['mfu']:.1%}"
        elif metrics.get("mfu_unreliable"):
            info += "  MFU n/a"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=info)
        if step % self.log_every == 0 or step == 1:
            (self._progress.console if self._progress else console).print(f"step {step:>5}  {info}")

    def close(self, status: str = "finished") -> None:
        """`status`: finished, killed (an interrupt) or failed, for the tracking runs."""
        if self.trackers is not None:
            self.trackers.close(status)
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()
