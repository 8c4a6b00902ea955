"""Reward functions, by import path, several with weights (TRL's calling convention, so TRL reward
functions work unchanged):

    def my_reward(prompts, completions, completion_ids, **columns) -> list[float | None]

`prompts` are the records' prompts, `completions` the decoded completions, `completion_ids` their
token ids and `columns` every other field of the prompt records, each a list aligned with the
completions. `async def` functions are awaited (all of a step's functions concurrently). A function
that raises, returns the wrong count or a non-number / NaN is an error naming it, or with
`on_error: zero` scores 0 for the affected completions and is counted (`reward/<name>/errors`).
`None` means "not applicable" and scores 0 without counting as an error.

A reward can also be a reward model (`model: DIR`, model/reward_model.py): a sequence-classification
model scoring prompt + completion, on the process that scores (the RL controller, worker 0), or with
`placement: separate` in its own Ray actor with its own CPUs / GPU (a role of its own, verl's
reward-model worker): it is started on the first call and scores while the other functions run.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator

from ..config import ConfigError, Strict, check_model_source, resolve_import_path
from ..model.reward_model import RewardModel


class RewardSpec(Strict):
    fn: str | None = Field(None, description="import path of the function: module:fn or path/to/file.py:fn")
    model: str | None = Field(None, description="instead of fn: a reward model, a sequence-classification model dir "
                              "(num_labels=1) scoring prompt + completion with its own chat template, run by the controller")
    batch_size: int = Field(16, ge=1, description="model: completions scored per forward")
    placement: Literal["colocated", "separate"] = Field(
        "colocated", description="model: colocated (in the controller's process) or separate (its own Ray actor with cpus / gpus)")
    cpus: float = Field(1, gt=0, description="model, separate placement: CPUs reserved for its actor")
    gpus: float = Field(0, ge=0, description="model, separate placement: GPUs reserved for its actor")
    weight: float = Field(1.0, description="its weight in the total reward")
    name: str | None = Field(None, description="metric name (default: the function's name; reward_model for a model)")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.fn is None) == (self.model is None):
            raise ValueError("a reward needs exactly one of `fn` (a function) or `model` (a reward model dir)")
        if self.placement == "separate" and self.model is None:
            raise ValueError("placement: separate places a reward model (`model`) in its own actor; a function runs in the controller")
        return self

    def ray_resources(self) -> dict[str, float]:
        """What its actor reserves (separate placement), for the job's Ray cluster."""
        return {"CPU": self.cpus, "GPU": self.gpus} if self.placement == "separate" else {}


class RewardError(RuntimeError):
    pass


@dataclass
class Scored:
    total: torch.Tensor  # [n] weighted sum
    per_fn: dict[str, torch.Tensor]  # name -> [n] raw values
    errors: dict[str, int]
    seconds: float


class Rewards:
    """`specs` by import path, or `functions` given as (name, weight, fn) (evaluation's built-in
    scorers); `what` names them in errors ("reward function", "scorer")."""

    def __init__(self, specs: list[RewardSpec] = (), *, on_error: Literal["error", "zero"] = "error", key: str = "rewards",
                 functions: list[tuple[str, float, Callable]] = (), what: str = "reward function", on_error_key: str = "reward_on_error",
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if not specs and not functions:
            raise ConfigError(f"{key}: at least one {what} is needed")
        self.on_error, self.what, self.on_error_key = on_error, what, on_error_key
        self.fns: list[tuple[str, float, Callable]] = list(functions)
        for i, s in enumerate(specs):
            if s.model is not None:  # loaded on its first call: only the scoring process holds it
                fn = (RemoteRewardModel(s, dtype=dtype, key=f"{key}[{i}].model") if s.placement == "separate" else
                      RewardModel(s.model, device=device, dtype=dtype, batch_size=s.batch_size, key=f"{key}[{i}].model"))
                self.fns.append((s.name or "reward_model", s.weight, fn))
                continue
            fn = resolve_import_path(s.fn, key=f"{key}[{i}].fn")
            self.fns.append((s.name or getattr(fn, "__name__", f"reward_{i}"), s.weight, fn))
        names = [n for n, _, _ in self.fns]
        if len(set(names)) != len(names):
            raise ConfigError(f"{key}: two {what}s share the name {names}; give each a distinct `name`")

    def __call__(self, prompts: list, completions: list[str], completion_ids: list[list[int]], columns: dict[str, list],
                 ids: list[str] | None = None) -> Scored:
        """`ids`: a sample id per completion (e.g. file:line), named in errors."""
        t0 = time.perf_counter()
        n = len(completions)
        kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        raw = self._call_all(kwargs)
        total = torch.zeros(n, dtype=torch.float64)
        per_fn, errors = {}, {}
        for (name, weight, _), out in zip(self.fns, raw):
            values, bad = self._check(name, out, n, ids)
            per_fn[name], errors[name] = values, bad
            total += weight * values
        return Scored(total.float(), {k: v.float() for k, v in per_fn.items()}, errors, time.perf_counter() - t0)

    def remote_cpus(self) -> float:
        """CPUs the reward models placed in actors of their own reserve."""
        return sum(fn.spec.ray_resources()["CPU"] for _, _, fn in self.fns if isinstance(fn, RemoteRewardModel))

    def close(self) -> None:
        """Stop the reward models placed in actors of their own."""
        for _, _, fn in self.fns:
            if isinstance(fn, RemoteRewardModel):
                fn.close()

    def _call_all(self, kwargs: dict) -> list:
        outs: list = [None] * len(self.fns)
        coros = {}
        for i, (name, _, fn) in enumerate(self.fns):
            try:
                out = fn(**kwargs)
            except ConfigError:  # a reward model that does not load: the job's mistake, never a zero reward
                raise
            except Exception as e:  # noqa: BLE001 - reported with the function's name below
                outs[i] = e
                continue
            if inspect.isawaitable(out):
                coros[i] = out
            else:
                outs[i] = out
        if coros:
            async def gather():
                return await asyncio.gather(*coros.values(), return_exceptions=True)

            for i, out in zip(coros, asyncio.run(gather())):
                outs[i] = out
        return outs

    def _check(self, name: str, out, n: int, ids: list[str] | None) -> tuple[torch.Tensor, int]:
        what = f"{self.what} {name!r}"
        if isinstance(out, Exception):
            if self.on_error == "error":
                frame = traceback.extract_tb(out.__traceback__)[-1] if out.__traceback__ else None
                at = f" at {frame.filename}:{frame.lineno}" if frame else ""
                batch = f" on the batch of samples {ids[0]} .. {ids[-1]}" if ids else ""
                raise RewardError(f"{what} raised {type(out).__name__}: {out}{at}{batch} "
                                  f"({self.on_error_key}: zero scores such completions 0 and counts them)") from out
            return torch.zeros(n, dtype=torch.float64), n
        try:
            values = list(out)
        except TypeError:
            raise RewardError(f"{what} returned {type(out).__name__}, expected a list of {n} numbers") from None
        if len(values) != n:
            raise RewardError(f"{what} returned {len(values)} values for {n} completions")
        result, bad = torch.zeros(n, dtype=torch.float64), 0
        for i, v in enumerate(values):
            if v is None:
                continue
            ok = isinstance(v, numbers.Real) and math.isfinite(float(v))  # bools count as 0/1
            if not ok:
                if self.on_error == "error":
                    sample = f" (sample {ids[i]})" if ids else ""
                    raise RewardError(f"{what} returned {v!r} for completion {i}{sample}; expected a finite number or None")
                bad += 1
                continue
            result[i] = float(v)
        return result, bad


class _RewardModelActor:
    """A reward model in its own Ray actor, loaded at start (a model that does not load fails then)."""

    def __init__(self, path: str, dtype: str, batch_size: int, key: str):
        from .rollout import node_cores

        # Ray started this actor with OMP_NUM_THREADS = its reserved cpus (1); it scores while the trainer
        # waits for the step's rewards, so it may use every core (as the rollout engine's actor does)
        torch.set_num_threads(node_cores())
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = RewardModel(path, device=device, dtype=getattr(torch, dtype), batch_size=batch_size, key=key)
        self.model.load()

    def score(self, prompts: list, completions: list[str]) -> list[float]:
        return self.model.score(prompts, completions)


class RemoteRewardModel:
    """`placement: separate`: the reward model's actor, started on the first call (only the process that
    scores starts one). A call returns an awaitable, so it scores while the other reward functions run."""

    def __init__(self, spec: RewardSpec, *, dtype: torch.dtype, key: str):
        check_model_source(spec.model, key=key)  # a path that cannot be there fails now, not at the first score
        self.spec, self.dtype, self.key = spec, str(dtype).removeprefix("torch."), key
        self.actor, self.own_ray = None, False

    def _start(self) -> None:
        import ray

        from .rollout import ensure_ray

        self.own_ray = ensure_ray(self.spec.cpus)
        self.actor = ray.remote(_RewardModelActor).options(num_cpus=self.spec.cpus, num_gpus=self.spec.gpus).remote(
            self.spec.model, self.dtype, self.spec.batch_size, self.key)
        try:
            ray.get(self.actor.__ray_ready__.remote())
        except ray.exceptions.RayError as e:
            self.close()
            cause = getattr(e, "cause", None) or getattr(getattr(e, "error", None), "cause", None)
            raise ConfigError(str(cause) if isinstance(cause, ConfigError) else f"{self.key}: its actor did not start: {e}") from None

    def __call__(self, prompts, completions, **_):
        if self.actor is None:
            self._start()
        ref = self.actor.score.remote(list(prompts), list(completions))

        async def scores():
            return await ref

        return scores()

    def close(self) -> None:
        import ray

        if self.actor is not None:
            ray.kill(self.actor)
            self.actor = None
        if self.own_ray:
            ray.shutdown()
            self.own_ray = False
