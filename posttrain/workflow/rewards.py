"""Reward functions, by import path, several with weights (TRL's calling convention, so TRL reward
functions work unchanged):

    def my_reward(prompts, completions, completion_ids, **columns) -> list[float | None]

`prompts` are the records' prompts, `completions` the decoded completions, `completion_ids` their
token ids and `columns` every other field of the prompt records, each a list aligned with the
completions. `async def` functions are awaited (all of a step's functions concurrently). A function
that raises, returns the wrong count or a non-number / NaN is an error naming it, or with
`on_error: zero` scores 0 for the affected completions and is counted (`reward/<name>/errors`).
`None` means "not applicable" and scores 0 without counting as an error.
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
from pydantic import Field

from ..config import ConfigError, Strict, resolve_import_path


class RewardSpec(Strict):
    fn: str = Field(description="import path of the function: module:fn or path/to/file.py:fn")
    weight: float = Field(1.0, description="its weight in the total reward")
    name: str | None = Field(None, description="metric name (default: the function's name)")


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
                 functions: list[tuple[str, float, Callable]] = (), what: str = "reward function", on_error_key: str = "reward_on_error"):
        if not specs and not functions:
            raise ConfigError(f"{key}: at least one {what} is needed")
        self.on_error, self.what, self.on_error_key = on_error, what, on_error_key
        self.fns: list[tuple[str, float, Callable]] = list(functions)
        for i, s in enumerate(specs):
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

    def _call_all(self, kwargs: dict) -> list:
        outs: list = [None] * len(self.fns)
        coros = {}
        for i, (name, _, fn) in enumerate(self.fns):
            try:
                out = fn(**kwargs)
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
