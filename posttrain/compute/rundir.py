"""The layout of a run's output directory (`compute.output_dir`), spelled in one place.

    <output_dir>/
        config.yaml            the resolved job (defaults filled in)
        metrics.jsonl          one line per step
        tensorboard/           with compute.tensorboard: true
        tracking.json          the W&B / MLflow run ids (compute.wandb, compute.mlflow): a resume continues them
        wandb/                 W&B's own files (compute.wandb, unless compute.wandb.dir says elsewhere)
        checkpoints/           step_N/ dirs and the `latest` pointer (compute/checkpoint.py)
        best.json              with train.eval_every: the best evaluation so far and its checkpoint
        <name>.rank_N.pt       data precomputed once before training (e.g. reference log-probs)
        .stop-request          written by a driver on Ctrl-C/SIGTERM: its workers stop after the step
        hf/                    the final export; hf-step_N/ from `posttrain export`
        hf-best/               with export.best: the export of the best checkpoint
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_checkpoint(cls, ckpt_dir: str | Path) -> "RunDir":
        return cls(Path(ckpt_dir).parent.parent)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def tracking(self) -> Path:
        return self.root / "tracking.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.root / "best.json"

    @property
    def hf(self) -> Path:
        return self.root / "hf"

    @property
    def stop_request(self) -> Path:
        return self.root / ".stop-request"

    @property
    def hf_best(self) -> Path:
        return self.root / "hf-best"

    def export_of(self, ckpt_dir: Path) -> Path:
        return self.root / f"hf-{Path(ckpt_dir).name}"

    def precomputed(self, name: str, rank: int) -> Path:
        return self.root / f"{name}.rank_{rank:05d}.pt"
