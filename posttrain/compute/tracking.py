"""Experiment tracking: Weights & Biases (`compute.wandb`) and MLflow (`compute.mlflow`) as built-in
metric sinks, beside metrics.jsonl and TensorBoard.

Only rank 0 opens a tracking run, so a job has one run however many workers it has. The run's id is
written (atomically) to `<output_dir>/tracking.json` before the run is opened; a resume, a restart
after a worker died, or a rerun of the same command reads it and continues that run (W&B:
`id=..., resume="allow"`; MLflow: the same run id). A run dir replaced with `--overwrite` starts a
new tracking run. Every step's metrics are logged with their `step`; a value that is null (an MFU
flagged unreliable) is left out.

A sink that cannot start (a bad tracking URI, W&B not logged in) stops the job before its first
step with one line; one that fails later (a server gone) is reported once and switched off, and
training goes on (metrics.jsonl still has every step).
"""

from __future__ import annotations

import json
import re
import secrets
import string
import time
from pathlib import Path

from .. import atomic
from ..config import ConfigError, JobConfig, MlflowConfig, WandbConfig, check_tracking
from .rundir import RunDir


class TrackingIds:
    """`<output_dir>/tracking.json`: {"wandb": {...}, "mlflow": {...}}, one entry per sink."""

    def __init__(self, run_dir: Path):
        self.path = RunDir(run_dir).tracking
        try:
            self.data = json.loads(self.path.read_text())
        except FileNotFoundError:
            self.data = {}
        except ValueError as e:  # written atomically, so only a hand edit gets here
            raise ConfigError(f"{self.path}: not valid JSON ({e}); fix or delete it (a new tracking run is then started)") from None

    def get(self, sink: str) -> dict | None:
        return self.data.get(sink)

    def set(self, sink: str, entry: dict) -> None:
        self.data[sink] = entry
        atomic.write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def _numbers(metrics: dict) -> dict[str, float]:
    """The numeric metrics of a step, without `step` itself and without nulls."""
    return {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbSink:
    name = "W&B"

    def __init__(self, cfg: WandbConfig, job: JobConfig, run_dir: Path, ids: TrackingIds):
        import wandb

        saved = ids.get("wandb")
        # W&B's own ids look like this: 8 characters of [a-z0-9]
        run_id = saved["id"] if saved else "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        if not saved:
            ids.set("wandb", {"id": run_id, "project": cfg.project, "entity": cfg.entity})
        try:
            self.run = wandb.init(
                project=cfg.project, entity=cfg.entity, name=cfg.name or Path(run_dir).resolve().name, tags=cfg.tags or None,
                mode=cfg.mode, dir=str(Path(cfg.dir or run_dir).resolve()), id=run_id, resume="allow",
                config=job.model_dump(mode="json"), allow_val_change=True, reinit="create_new",
                settings=wandb.Settings(console="off", save_code=False, silent=True),
            )
        except Exception as e:  # not logged in, no network in online mode, a bad entity
            raise ConfigError(f"compute.wandb: W&B could not start run {run_id} ({type(e).__name__}: {e}); log in with "
                              "`wandb login` (or set WANDB_API_KEY), or use compute.wandb.mode: offline") from None
        self.where = self.run.url if cfg.mode == "online" and self.run.url else str(Path(self.run.dir).parent)
        self.run_id = run_id

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_numbers(metrics), step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code={"finished": 0, "killed": 130}.get(status, 1))


# MLflow accepts letters, digits, `_ - . / :` and spaces in a metric or parameter name
_MLFLOW_BAD = re.compile(r"[^\w\-./: ]")


class MlflowSink:
    name = "MLflow"

    def __init__(self, cfg: MlflowConfig, job: JobConfig, run_dir: Path, ids: TrackingIds):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        saved = ids.get("mlflow")
        try:
            self.client = MlflowClient(tracking_uri=(saved or {}).get("tracking_uri") or cfg.tracking_uri)
            if saved:
                self.run_id = saved["run_id"]
                self.client.get_run(self.run_id)  # still there?
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                name = cfg.experiment or "Default"
                exp = self.client.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
                run = self.client.create_run(exp_id, run_name=cfg.run_name or Path(run_dir).resolve().name,
                                             tags={"posttrain.recipe": job.recipe, "posttrain.output_dir": str(Path(run_dir).resolve())})
                self.run_id = run.info.run_id
                ids.set("mlflow", {"run_id": self.run_id, "experiment_id": exp_id, "tracking_uri": self.client.tracking_uri})
                params = [Param(_MLFLOW_BAD.sub("_", k)[:250], str(v)[:6000]) for k, v in _flatten(job.model_dump(mode="json")).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                    self.client.log_batch(self.run_id, params=params[i: i + 100])
        except Exception as e:
            uri = (saved or {}).get("tracking_uri") or cfg.tracking_uri or "MLflow's default"
            raise ConfigError(f"compute.mlflow: MLflow could not start a run at {uri} ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); check compute.mlflow.tracking_uri") from None
        self.where = f"{self.client.tracking_uri} run {self.run_id}"

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(_MLFLOW_BAD.sub("_", k), float(v), ts, step) for k, v in _numbers(metrics).items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED", "killed": "KILLED"}.get(status, "FAILED"))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
    return out


class Trackers:
    """The configured sinks of a job (rank 0 only: on other ranks it holds none)."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    @classmethod
    def start(cls, cfg: JobConfig, run_dir: Path, *, enabled: bool, say=print) -> "Trackers":
        if not enabled or (cfg.compute.wandb is None and cfg.compute.mlflow is None):
            return cls([])
        check_tracking(cfg)
        ids, sinks = TrackingIds(run_dir), []
        try:
            if cfg.compute.wandb is not None and cfg.compute.wandb.mode != "disabled":
                sinks.append(WandbSink(cfg.compute.wandb, cfg, run_dir, ids))
            if cfg.compute.mlflow is not None:
                sinks.append(MlflowSink(cfg.compute.mlflow, cfg, run_dir, ids))
        except BaseException:
            cls(sinks).close("failed")
            raise
        for s in sinks:
            say(f"{s.name}: {s.where}", soft_wrap=True)
        return cls(sinks)

    def log(self, metrics: dict) -> None:
        step = int(metrics.get("step", 0))
        for s in list(self.sinks):
            try:
                s.log(metrics, step)
            except Exception as e:  # a tracking server gone must not stop the training
                from .metrics import console

                console.print(f"[yellow]{s.name}: logging step {step} failed[/] ({type(e).__name__}: {e}); no more metrics "
                              f"go to {s.name} in this run (metrics.jsonl has every step)", soft_wrap=True)
                self.sinks.remove(s)

    def close(self, status: str) -> None:
        for s in self.sinks:
            try:
                s.close(status)
            except Exception:  # closing is best effort: the metrics were already sent
                pass
        self.sinks = []
