"""Evaluation during training: the recipe's own loss on held-out data (`data.eval_sources`) every
`train.eval_every` steps, the best checkpoint by `train.best_metric`, early stopping with patience.

A recipe opts in with one argument, `job.steps(loader, eval_fn=fn)`, where `fn(batch)` returns
{name: (sum, count)} for one held-out micro-batch, or {name: [(sum, count, weight), ...]} for a
value made of parts. The engine runs `fn` on every held-out batch of every worker (no gradients, the
model in eval mode) and logs `eval/<name>` = sum(all sums) / sum(all counts) over the whole set, on
all workers together: a token-mean over the set, never a mean of batch means, so 1 worker and N
workers give the same value. `eval/loss` is the eval loss. Metrics of other evaluations (a suite
run by a hook in `Engine.eval_hooks`) join the same dict.

`Best` follows the chosen metric; its state (best value and step, evaluations without improvement)
is saved in every checkpoint, so a resumed run takes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .. import atomic
from ..config import ConfigError, TrainConfig

# eval_fn(batch) -> {name: (sum, count) | [(sum, count, weight), ...]}
EvalFn = Callable[[dict], dict[str, Any]]


def _terms(value) -> list[tuple]:
    """(sum, count) or a list of (sum, count[, weight]) -> [(sum, count, weight), ...]."""
    if isinstance(value, tuple) and len(value) == 2 and not isinstance(value[0], tuple):
        return [(value[0], value[1], 1.0)]
    return [(t[0], t[1], t[2] if len(t) > 2 else 1.0) for t in value]


def _float(x) -> float:
    return float(x.detach().double().item() if torch.is_tensor(x) else x)


class Sums:
    """Per-batch (sum, count) terms of an eval function, added up over batches; `flat()` is what is
    all-reduced over workers, `values(flat)` the metrics from the reduced sums."""

    def __init__(self):
        self.terms: dict[str, list[list[float]]] = {}  # name -> [[sum, count, weight], ...]

    def add(self, out: dict[str, Any], *, count: bool = True) -> None:
        """Add one batch's terms; `count=False` registers the names only (a padding forward)."""
        for name, value in out.items():
            terms = _terms(value)
            acc = self.terms.setdefault(name, [[0.0, 0.0, w] for _, _, w in terms])
            if len(acc) != len(terms):
                raise ValueError(f"eval_fn: {name!r} has {len(terms)} terms in one batch and {len(acc)} in another")
            if count:
                for a, (s, n, _) in zip(acc, terms):
                    a[0] += _float(s)
                    a[1] += _float(n)

    def flat(self) -> list[float]:
        return [x for name in sorted(self.terms) for s, n, _ in self.terms[name] for x in (s, n)]

    def values(self, flat: list[float]) -> dict[str, float]:
        out, i = {}, 0
        for name in sorted(self.terms):
            value, seen = 0.0, True
            for _, _, w in self.terms[name]:
                s, n = flat[i], flat[i + 1]
                i += 2
                if n == 0:
                    seen = False
                else:
                    value += w * s / n
            if seen:  # a value over nothing (no target in the whole set) is not reported
                out[name] = value
        return out


class Best:
    """The best evaluation so far by `train.best_metric` (`best_mode`), and how many evaluations in a
    row did not improve it by more than `early_stopping_min_delta` (the patience count)."""

    def __init__(self, train: TrainConfig, keep_checkpoint: bool):
        self.metric, self.mode = train.best_metric, train.best_mode
        self.patience, self.min_delta = train.early_stopping_patience, train.early_stopping_min_delta
        self.keep_checkpoint = keep_checkpoint
        self.value: float | None = None
        self.step: int | None = None
        self.checkpoint: str | None = None  # the best step's checkpoint (a name in checkpoints/)
        self.bad = 0  # evaluations since the best one

    def observe(self, step: int, metrics: dict[str, float]) -> bool:
        """Take one evaluation's metrics; True if it is the new best."""
        if self.metric not in metrics:
            have = ", ".join(sorted(k for k in metrics if k != "eval/time_s"))
            raise ConfigError(f"train.best_metric: {self.metric!r} is not among the evaluation's metrics ({have})")
        v = metrics[self.metric]
        if self.value is None:
            better = not math.isnan(v)
        elif self.mode == "min":
            better = v < self.value - self.min_delta
        else:
            better = v > self.value + self.min_delta
        if better:
            self.value, self.step, self.bad = v, step, 0
            self.checkpoint = f"step_{step:08d}" if self.keep_checkpoint else None
        else:
            self.bad += 1
        return better

    @property
    def stop(self) -> bool:
        """Patience is spent: early stopping."""
        return self.patience is not None and self.bad >= self.patience

    def why(self) -> str:
        by = f" by more than {self.min_delta:g}" if self.min_delta else ""
        return (f"early stopping: {self.metric} did not improve{by} in {self.bad} evaluation"
                f"{'s' if self.bad != 1 else ''} (train.early_stopping_patience={self.patience}); best {self.value:.6g} "
                f"at step {self.step}")

    def summary(self) -> str:
        if self.value is None:
            return f"no best {self.metric} yet"
        tail = f"; {self.bad}/{self.patience} without improvement" if self.patience else ""
        return f"best {self.metric} {self.value:.6g} at step {self.step}{tail}"

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "step": self.step,
                "checkpoint": self.checkpoint, "bad": self.bad}

    def load_state_dict(self, state: dict) -> bool:
        """Restore; False (and nothing restored) when the state was for another metric or mode."""
        if (state.get("metric"), state.get("mode")) != (self.metric, self.mode):
            return False
        self.value, self.step, self.checkpoint, self.bad = state["value"], state["step"], state["checkpoint"], state["bad"]
        return True

    def write(self, path) -> None:
        """`<output_dir>/best.json`, atomically: the best value, its step and checkpoint."""
        import json

        atomic.write_text(path, json.dumps({
            "metric": self.metric, "mode": self.mode, "value": self.value, "step": self.step,
            "checkpoint": f"checkpoints/{self.checkpoint}" if self.checkpoint else None,
            "evaluations_without_improvement": self.bad, "early_stopping_patience": self.patience,
        }, indent=2) + "\n")
