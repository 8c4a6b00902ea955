"""`posttrain eval SUITE.yaml --model A [--model B ...] --out OUT`: checkpoints in, compared results out.

A suite is a list of tasks, each reading its data through the data pillar (same sources, formats,
transforms, tokenizer layer and chat template as training):

- likelihood: held-out conversations; per-sample NLL of the assistant (target) tokens, as training
  masks them. Metrics `loss` (token-weighted mean NLL) and `perplexity` (exp of it).
- generation: prompt records (`{"prompt": ..., <fields>}`) rendered with the generation prompt and
  completed by a rollout engine (the same interface RL uses: vLLM or the HF-model engine), `n` samples per
  prompt, greedy or sampled and seeded; every scorer (workflow/scorers.py) is a metric, plus
  pass@k (unbiased estimator) for each k of `pass_at`, the completion length and the truncated share.
- preference: each model's completion against the baseline's (the first --model) or a reference
  answer in the records, judged by a function or a reward model: the win rate (ties count 1/2).

Every model sees the same samples, keyed by file:line; the first model is the baseline, and each
other model's difference from it gets a paired bootstrap CI and a paired permutation p-value
(workflow/eval_stats.py), overall and per slice (source, length bucket, any record field).
Writes OUT/results.json (schema below, `schema_version` 1), OUT/samples/<task>.jsonl (every
completion and score) and the report (workflow/eval_report.py).
"""

from __future__ import annotations

import gc
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field, ValidationError, field_validator, model_validator

from .. import atomic
from ..compute.device import choose_device, choose_dtype
from ..config import (
    ConfigError,
    DataConfig,
    Located,
    ModelConfig,
    Strict,
    absolute_import_path,
    read_yaml_file,
    resolve_import_path,
)
from ..data.loader import SampleStream
from ..data.packing import pack_row
from ..data.prompts import Prompt, make_prompt_encoder, prompt_limit
from ..data.records import encode_sft_record
from ..data.tokenizer import fingerprint, load_tokenizer
from . import eval_stats
from .rewards import RewardError, Rewards
from .rollout import EngineConfig, Sampling, start_engine
from .scorers import ScorerSpec, build

SCHEMA_VERSION = 1


class TaskSpec(Strict):
    name: str = Field(description="the task's name in the results (unique in the suite)")
    kind: Literal["likelihood", "generation", "preference"] = Field(
        description="likelihood: loss/perplexity on the assistant tokens of held-out conversations; generation: completions "
        "of prompt records scored by `scorers`; preference: win rate against the baseline's (or a reference) completion")
    data: DataConfig = Field(description="the task's data, read as in training (sources, format, transform, max_seq_len, "
                             "max_tokens_per_batch; one pass, in file order)")
    max_samples: int | None = Field(None, ge=1, description="evaluate only the first N usable records")
    engine: EngineConfig = Field(EngineConfig(engine="hf"), description="generation/preference: the rollout engine "
                                 "(hf generate by default; vllm for speed)")
    sampling: Sampling = Field(Sampling(temperature=0.0), description="generation/preference: sampling (default greedy)")
    n: int = Field(1, ge=1, description="generation: completions per prompt")
    pass_at: list[int] = Field([], description="generation: report pass@k for these k (each <= n), per scorer")
    pass_threshold: float = Field(1.0, description="generation: a completion passes when its score is >= this")
    batch_size: int = Field(32, ge=1, description="generation/preference: prompts per engine call")
    scorers: list[ScorerSpec] = Field([], description="generation: the scorers, each one metric")
    on_scorer_error: Literal["error", "zero"] = Field(
        "error", description="a scorer that raises or returns a non-number: error (naming the sample) or score 0 and count it")
    judge: str | None = Field(None, description="preference: import path of judge(prompts, completions_a, completions_b, "
                              "**columns) -> list of P(b is better) in [0, 1] (1 win, 0 loss, 0.5 tie)")
    reward_model: str | None = Field(None, description="preference: a sequence-classification model dir scoring prompt + "
                                     "completion; the higher score wins (equal: a tie)")
    reference_field: str | None = Field(None, description="preference: compare every model against this record field's "
                                        "answer instead of against the baseline model")
    slices: list[str] = Field([], description="record fields to break every metric down by (source and length are automatic)")
    length_buckets: int = Field(4, ge=0, description="length slices: quantile buckets of the baseline's prompt (generation) "
                                "or target (likelihood) tokens (0: none)")

    @model_validator(mode="after")
    def _consistent(self):
        gen = self.kind in ("generation", "preference")
        if self.kind == "generation" and not self.scorers:
            raise ValueError("a generation task needs at least one scorer (`scorers`)")
        if self.kind != "generation" and self.scorers:
            raise ValueError(f"`scorers` belong to generation tasks, not {self.kind}")
        if self.kind == "preference" and (self.judge is None) == (self.reward_model is None):
            raise ValueError("a preference task needs exactly one of `judge` (a function) or `reward_model` (a model dir)")
        if self.kind != "preference" and (self.judge or self.reward_model or self.reference_field):
            raise ValueError("`judge`, `reward_model` and `reference_field` belong to preference tasks")
        if self.kind == "preference" and self.n != 1:
            raise ValueError("a preference task compares one completion per prompt (n: 1)")
        if bad := [k for k in self.pass_at if not 1 <= k <= self.n]:
            raise ValueError(f"pass_at: each k must be between 1 and n={self.n}; got {bad}")
        if self.pass_at and self.kind != "generation":
            raise ValueError("`pass_at` belongs to generation tasks")
        if not gen and self.n != 1:
            raise ValueError("`n` belongs to generation tasks")
        return self


class SuiteConfig(Strict):
    """An evaluation suite (`posttrain eval SUITE.yaml --model DIR ...`)."""

    name: str | None = Field(None, description="the suite's name in the report (default: the file name)")
    tasks: list[TaskSpec] = Field(min_length=1, description="the tasks, run in order on every model")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto: cuda when available, else cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="model dtype (auto: bf16 on a GPU that supports it)")
    seed: int = Field(0, description="seed of sampling and of the statistics' resampling")
    tokenizer_fingerprint: str | None = Field(
        None, description="expected tokenizer fingerprint (a prefix is enough; see results.json): a model whose tokenizer "
        "differs is refused")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of the bootstrap intervals")
    bootstrap_resamples: int = Field(2000, ge=100, description="bootstrap resamples per interval")
    permutation_resamples: int = Field(9999, ge=99, description="random sign flips of the paired permutation test")
    alpha: float = Field(0.05, gt=0, lt=1, description="a difference is `significant` when p_value < alpha")

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in tasks]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"task names must be unique; repeated: {dup}")
        return tasks


# ---------------------------------------------------------------------------------------- loading
def load_suite(path: str | Path, overrides: list[str] | None = None) -> SuiteConfig:
    """The suite file, validated with file:line on every error; import paths (scorer `fn`, `judge`,
    data transforms) are looked up next to the suite file, then in the current directory."""
    path = Path(path)
    raw, origin, lines = read_yaml_file(path, overrides or [], what="the suite file",
                                        shape="a suite file is a mapping with `tasks:` (a list of tasks)")
    for task in raw.get("tasks") or []:
        if isinstance(task, dict):
            if isinstance(task.get("judge"), str):
                task["judge"] = absolute_import_path(task["judge"], path.parent)
            for s in task.get("scorers") or []:
                if isinstance(s, dict) and isinstance(s.get("fn"), str):
                    s["fn"] = absolute_import_path(s["fn"], path.parent)
            data = task.get("data")
            for spec in [data] + list((data or {}).get("sources") or []) if isinstance(data, dict) else []:
                if isinstance(spec, dict) and isinstance(spec.get("transform"), str):
                    spec["transform"] = absolute_import_path(spec["transform"], path.parent)
    try:
        suite = SuiteConfig.model_validate(raw)
    except ValidationError as e:
        located = Located(path, lines, origin)
        located.collect(e, root=SuiteConfig)
        raise ConfigError("\n".join(located.msgs)) from None
    for i, t in enumerate(suite.tasks):  # plugged-in functions resolve now, not after the first model
        for j, s in enumerate(t.scorers):
            if s.fn:
                resolve_import_path(s.fn, key=f"{path}: tasks[{i}].scorers[{j}].fn")
        if t.judge:
            resolve_import_path(t.judge, key=f"{path}: tasks[{i}].judge")
    if suite.name is None:
        suite.name = path.stem
    return suite


# ------------------------------------------------------------------------------- per-sample results
@dataclass
class Row:
    """One sample's results for one model: metric -> (value, weight); slice labels; what to dump."""

    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)
    length: int = 0  # prompt tokens (generation) or target tokens (likelihood), for length slices
    record: dict = field(default_factory=dict)  # the fields named in `slices`
    dump: dict = field(default_factory=dict)


@dataclass
class TaskRun:
    rows: dict[str, Row]  # sample id -> row
    stats: str  # the data pillar's record summary
    texts: dict[str, dict] = field(default_factory=dict)  # preference: completions awaiting the judge


def _sample_id(seen: Counter, where: str) -> str:
    """file:line, with #k for the k-th sample of one record (a multi-turn record expanded into several)."""
    seen[where] += 1
    return where if seen[where] == 1 else f"{where}#{seen[where]}"


def _stream(task: TaskSpec, tok, seed: int, encode) -> SampleStream:
    data = task.data.model_copy(update={"shuffle": False, "max_epochs": 1, "on_exhausted": "drop"})
    return SampleStream(data, tok, seed=seed, encode=encode)


def _empty(task: TaskSpec, stream: SampleStream) -> ConfigError:
    paths = ", ".join(s.path for s in task.data.sources)
    return ConfigError(f"task {task.name!r}: no usable samples in {paths} ({stream.stats.summary()})")


def _likelihood(task: TaskSpec, model, tok, device: torch.device, seed: int) -> TaskRun:
    from ..model.preference import document_logps

    fields: dict[str, dict] = {}

    def encode(tokenizer, rec, where, cfg, stats):
        fields[where] = {k: rec.get(k) for k in task.slices}
        return encode_sft_record(tokenizer, rec, where, cfg, stats)

    stream = _stream(task, tok, seed, encode)
    rows: dict[str, Row] = {}
    seen: Counter = Counter()
    budget, pending, used = task.data.max_tokens_per_batch, [], 0

    def flush():
        batch = pack_row(pending, budget, tok.pad_token_id, task.data.pack_to_multiple_of)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            sums, counts = document_logps(model, batch, len(tok))
        for s, nll, n in zip(pending, (-sums).tolist(), counts.tolist()):
            if n > 0:  # a sample whose every target was cut away scores nothing
                rows[_sample_id(seen, s.where)] = Row({"loss": (nll, n), "perplexity": (nll, n)}, int(n), fields[s.where],
                                                      {"nll": nll, "tokens": int(n)})
        pending.clear()

    while (s := stream.next()) is not None and (task.max_samples is None or len(rows) + len(pending) < task.max_samples):
        if pending and used + len(s.input_ids) > budget:
            flush()
            used = 0
        pending.append(s)
        used += len(s.input_ids)
    if pending:
        flush()
    if not rows:
        raise _empty(task, stream)
    return TaskRun(rows, stream.stats.summary())


def _prompts(task: TaskSpec, tok, seed: int) -> tuple[list[Prompt], str]:
    stream = _stream(task, tok, seed, make_prompt_encoder(prompt_limit(task.data, task.sampling.max_new_tokens)))
    prompts: list[Prompt] = []
    while (task.max_samples is None or len(prompts) < task.max_samples) and (p := stream.next()) is not None:
        prompts.append(p)
    if not prompts:
        raise _empty(task, stream)
    return prompts, stream.stats.summary()


def _columns(records: list[dict]) -> dict[str, list]:
    keys = sorted({k for r in records for k in r if k != "prompt"})
    return {k: [r.get(k) for r in records] for k in keys}


def _generate(task: TaskSpec, engine, tok, seed: int, index: int) -> TaskRun:
    prompts, summary = _prompts(task, tok, seed)
    seen: Counter = Counter()
    ids = [_sample_id(seen, p.where) for p in prompts]
    groups = []
    for b in range(0, len(prompts), task.batch_size):
        chunk = prompts[b: b + task.batch_size]
        groups += engine.generate([list(p.ids) for p in chunk], task.sampling, n=task.n, seed=seed + b)
    texts = [[tok.decode(c.ids, skip_special_tokens=True) for c in g] for g in groups]
    rows = {}
    if task.kind == "preference":
        run = TaskRun(rows, summary)
        for sid, p, g, t in zip(ids, prompts, groups, texts):
            run.texts[sid] = {"prompt": p.record["prompt"], "record": p.record, "completion": t[0]}
            rows[sid] = Row({}, len(p.ids), {k: p.record.get(k) for k in task.slices},
                            {"completion": t[0], "tokens": len(g[0].ids), "finish": g[0].finish})
        return run
    flat = [(i, c) for i, g in enumerate(groups) for c in g]
    records = [prompts[i].record for i, _ in flat]
    built = [build(s, key=f"tasks[{index}].scorers[{j}]") for j, s in enumerate(task.scorers)]
    scorers = Rewards(functions=[(name, 1.0, fn) for name, fn in built],
                      on_error=task.on_scorer_error, key=f"tasks[{index}].scorers", what="scorer",
                      on_error_key=f"tasks[{index}].on_scorer_error")
    scored = scorers([r["prompt"] for r in records], [t for g in texts for t in g], [c.ids for _, c in flat],
                     _columns(records), ids=[ids[i] for i, _ in flat])
    for i, (sid, p, g) in enumerate(zip(ids, prompts, groups)):
        sl = slice(i * task.n, (i + 1) * task.n)
        metrics: dict[str, tuple[float, float]] = {}
        for name, values in scored.per_fn.items():
            v = values[sl].tolist()
            metrics[name] = (sum(v) / task.n, 1.0)
            for k in task.pass_at:
                metrics[f"{name}/pass@{k}"] = (eval_stats.pass_at_k(task.n, sum(x >= task.pass_threshold for x in v), k), 1.0)
        metrics["completion_tokens"] = (sum(len(c.ids) for c in g) / task.n, 1.0)
        metrics["truncated"] = (sum(c.finish == "length" for c in g) / task.n, 1.0)
        rows[sid] = Row(metrics, len(p.ids), {k: p.record.get(k) for k in task.slices},
                        {"completions": texts[i], "scores": {n: v[sl].tolist() for n, v in scored.per_fn.items()},
                         "finish": [c.finish for c in g]})
    run = TaskRun(rows, summary + (f"; scorer errors zeroed: {dict(scored.errors)}" if any(scored.errors.values()) else ""))
    return run


# ------------------------------------------------------------------------------------- preference
def _judge_fn(task: TaskSpec, device: torch.device, dtype: torch.dtype) -> Callable:
    if task.judge:
        return resolve_import_path(task.judge, key=f"task {task.name!r}: judge")
    from ..model.reward_model import RewardModel

    rm = RewardModel(task.reward_model, device=device, dtype=dtype, batch_size=task.batch_size, key=f"task {task.name!r}: reward_model")

    def reward_model_judge(prompts, completions_a, completions_b, **_):
        ra, rb = rm.score(prompts, completions_a), rm.score(prompts, completions_b)
        return [1.0 if b > a else 0.0 if b < a else 0.5 for a, b in zip(ra, rb)]

    return reward_model_judge


def _judge(task: TaskSpec, fn: Callable, ids: list[str], prompts: list, a: list[str], b: list[str], records: list[dict]) -> list[float]:
    try:
        out = list(fn(prompts=prompts, completions_a=a, completions_b=b, **_columns(records)))
    except Exception as e:  # noqa: BLE001 - named with the task and its samples
        raise RewardError(f"task {task.name!r}: the judge raised {type(e).__name__}: {e} (samples {ids[0]} .. {ids[-1]})") from e
    if len(out) != len(ids):
        raise RewardError(f"task {task.name!r}: the judge returned {len(out)} values for {len(ids)} comparisons")
    for sid, v in zip(ids, out):
        if not (isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0):
            raise RewardError(f"task {task.name!r}: the judge returned {v!r} for sample {sid}; expected P(b is better) in [0, 1]")
    return [float(v) for v in out]


def _preferences(task: TaskSpec, runs: dict[str, TaskRun], labels: list[str], device, dtype) -> None:
    """Fill each model's `win_rate` rows: against the reference field, or the baseline's completion
    (the baseline against itself ties: 0.5 on every sample)."""
    fn = _judge_fn(task, device, dtype)
    base = runs[labels[0]]
    for label in labels:
        run = runs[label]
        if task.reference_field is None and label == labels[0]:
            for row in run.rows.values():
                row.metrics["win_rate"] = (0.5, 1.0)
            continue
        ids = [i for i in run.rows if task.reference_field is not None or i in base.rows]
        recs = [run.texts[i]["record"] for i in ids]
        if task.reference_field is not None:
            if missing := [i for i, r in zip(ids, recs) if not isinstance(r.get(task.reference_field), str)]:
                raise ConfigError(f"task {task.name!r}: reference_field {task.reference_field!r} is not a string in sample {missing[0]}")
            opp = [r[task.reference_field] for r in recs]
        else:
            opp = [base.texts[i]["completion"] for i in ids]
        wins = []
        for b in range(0, len(ids), task.batch_size):
            sl = slice(b, b + task.batch_size)
            wins += _judge(task, fn, ids[sl], [run.texts[i]["prompt"] for i in ids[sl]], opp[sl],
                           [run.texts[i]["completion"] for i in ids[sl]], recs[sl])
        for i, w, o in zip(ids, wins, opp):
            run.rows[i].metrics["win_rate"] = (w, 1.0)
            run.rows[i].dump.update({"opponent": o, "win": w})


# ------------------------------------------------------------------------------------- comparison
LOWER_IS_BETTER = {"loss", "perplexity", "truncated"}
NEUTRAL = {"completion_tokens"}


def _transform(metric: str):
    return np.exp if metric == "perplexity" else (lambda x: x)


def _length_slices(rows: dict[str, Row], buckets: int) -> dict[str, str]:
    if buckets < 2 or len(rows) < 2 * buckets:
        return {}
    lengths = np.array([r.length for r in rows.values()])
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, buckets + 1)[1:-1]).round().astype(int))
    out = {}
    for sid, r in rows.items():
        k = int(np.searchsorted(edges, r.length, side="left"))
        lo = 0 if k == 0 else edges[k - 1] + 1
        hi = edges[k] if k < len(edges) else lengths.max()
        out[sid] = f"{lo}-{hi} tokens"
    return out


def _slices(task: TaskSpec, rows: dict[str, Row]) -> dict[str, dict[str, str]]:
    """slice name -> sample id -> label, from the baseline's rows (so every model is sliced alike)."""
    out: dict[str, dict[str, str]] = {}
    sources = {sid: sid.rsplit(":", 1)[0] for sid in rows}
    if len(set(sources.values())) > 1:
        out["source"] = sources
    if lengths := _length_slices(rows, task.length_buckets):
        out["length"] = lengths
    for f in task.slices:
        out[f] = {sid: json.dumps(r.record.get(f)) if not isinstance(r.record.get(f), str) else r.record[f] for sid, r in rows.items()}
    return out


def _metric_block(metric: str, runs: dict[str, TaskRun], labels: list[str], ids: list[str] | None, suite: SuiteConfig,
                  seed: int) -> dict:
    kw = dict(transform=_transform(metric), confidence=suite.confidence, resamples=suite.bootstrap_resamples, seed=seed)
    models = {}
    for label in labels:
        rows = runs[label].rows
        keys = [i for i in (ids if ids is not None else rows) if i in rows and metric in rows[i].metrics]
        v = [rows[i].metrics[metric] for i in keys]
        models[label] = eval_stats.estimate([x for x, _ in v], [w for _, w in v], **kw)
    comparisons = []
    base = runs[labels[0]].rows
    for label in labels[1:]:
        rows = runs[label].rows
        keys = [i for i in (ids if ids is not None else base) if i in base and i in rows
                and metric in base[i].metrics and metric in rows[i].metrics]
        a = [base[i].metrics[metric] for i in keys]
        b = [rows[i].metrics[metric] for i in keys]
        entry = {"baseline": labels[0], "model": label}
        if any(wa != wb for (_, wa), (_, wb) in zip(a, b)):
            entry.update(difference=None, ci_low=None, ci_high=None, p_value=None, n=len(keys), significant=False,
                         note="the models tokenize these samples differently, so per-token values are not comparable")
        else:
            res = eval_stats.paired([x for x, _ in a], [x for x, _ in b], [w for _, w in a],
                                    permutations=suite.permutation_resamples, **kw)
            entry.update(res, significant=res["p_value"] is not None and res["p_value"] < suite.alpha)
        comparisons.append(entry)
    better = None if metric in NEUTRAL else ("lower" if metric in LOWER_IS_BETTER else "higher")
    return {"better": better, "models": models, "comparisons": comparisons}


def compare(suite: SuiteConfig, task_runs: dict[str, dict[str, TaskRun]], labels: list[str]) -> dict:
    tasks = {}
    for ti, task in enumerate(suite.tasks):
        runs = task_runs[task.name]
        base_rows = runs[labels[0]].rows
        names = list(dict.fromkeys(m for r in base_rows.values() for m in r.metrics))
        slices = _slices(task, base_rows)
        metrics = {}
        for mi, metric in enumerate(names):
            seed = suite.seed + 1000 * ti + mi
            block = _metric_block(metric, runs, labels, None, suite, seed)
            block["slices"] = {
                sname: {lab: _metric_block(metric, runs, labels, [i for i, v in assign.items() if v == lab], suite, seed)
                        for lab in sorted(set(assign.values()))}
                for sname, assign in slices.items()
            }
            metrics[metric] = block
        tasks[task.name] = {"kind": task.kind, "samples": {lab: len(runs[lab].rows) for lab in labels},
                            "data": {lab: runs[lab].stats for lab in labels}, "metrics": metrics}
    return tasks


# -------------------------------------------------------------------------------------- the run
def _labels(models: list[str]) -> list[str]:
    """Model labels: the paths as given, with #2, #3 for a path given again (a model against itself)."""
    seen: Counter = Counter()
    out = []
    for m in models:
        seen[m] += 1
        out.append(m if seen[m] == 1 else f"{m}#{seen[m]}")
    return out


def _load_tokenizer(model_dir: str, suite: SuiteConfig):
    try:
        tok = load_tokenizer(ModelConfig(path=model_dir))
    except ConfigError as e:
        raise ConfigError(f"--model {model_dir}: {str(e).removeprefix('model.path: ')}") from None
    fp = fingerprint(tok)
    if suite.tokenizer_fingerprint and not fp.startswith(suite.tokenizer_fingerprint):
        raise ConfigError(f"--model {model_dir}: its tokenizer's fingerprint {fp[:16]}… differs from the suite's "
                          f"tokenizer_fingerprint {suite.tokenizer_fingerprint[:16]}…: the suite's token-level expectations "
                          "(lengths, likelihoods) were set for another tokenizer")
    return tok, fp


def _load_lm(model_dir: str, tok, device, dtype):
    from ..model.load import load_model

    try:
        return load_model(ModelConfig(path=model_dir), tok, device=device, dtype=dtype, packing=True).eval()
    except ConfigError as e:
        raise ConfigError(f"--model {model_dir}: {str(e).removeprefix('model.path: ')}") from None


def evaluate(suite: SuiteConfig, models: list[str], out: str | Path, *, log: Callable[[str], Any] = print) -> dict:
    """Run every task on every model, compare, and write OUT/results.json, OUT/samples/ and the report."""
    if not models:
        raise ConfigError("eval: give at least one --model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = choose_device(suite.device)
    dtype = choose_dtype(suite.dtype, device)
    labels = _labels(models)
    task_runs: dict[str, dict[str, TaskRun]] = {t.name: {} for t in suite.tasks}
    model_info = []
    for label, model_dir in zip(labels, models):
        tok, fp = _load_tokenizer(model_dir, suite)
        model_info.append({"label": label, "path": str(model_dir), "tokenizer_fingerprint": fp})
        lm = None
        for i, task in enumerate(suite.tasks):
            log(f"[{label}] {task.kind} task {task.name!r}")
            torch.manual_seed(suite.seed)
            if task.kind == "likelihood":
                lm = lm or _load_lm(model_dir, tok, device, dtype)
                task_runs[task.name][label] = _likelihood(task, lm, tok, device, suite.seed)
                continue
            engine = start_engine(task.engine, model_dir, tok, dtype=dtype, device=device, max_model_len=task.data.max_seq_len,
                                  seed=suite.seed, scratch=out)
            try:
                task_runs[task.name][label] = _generate(task, engine, tok, suite.seed, i)
            finally:
                engine.close()
        del lm
        gc.collect()
    for task in suite.tasks:
        if task.kind == "preference":
            log(f"judging {task.name!r}")
            _preferences(task, task_runs[task.name], labels, device, dtype)
    results = {
        "schema_version": SCHEMA_VERSION,
        "suite": suite.name,
        "baseline": labels[0],
        "models": model_info,
        "confidence": suite.confidence,
        "alpha": suite.alpha,
        "tasks": compare(suite, task_runs, labels),
    }
    _write_samples(out / "samples", suite, task_runs, labels)
    atomic.write_text(out / "results.json", json.dumps(results, indent=2, allow_nan=False, default=_json_default))
    from .eval_report import write_report

    write_report(results, task_runs, out)
    return results


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        v = x.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _write_samples(folder: Path, suite: SuiteConfig, task_runs: dict[str, dict[str, TaskRun]], labels: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for task in suite.tasks:
        runs = task_runs[task.name]
        ids = list(dict.fromkeys(i for lab in labels for i in runs[lab].rows))
        lines = []
        for sid in ids:
            entry: dict[str, Any] = {"id": sid}
            for lab in labels:
                row = runs[lab].rows.get(sid)
                if row is not None:
                    entry[lab] = {**row.dump, "metrics": {k: v for k, (v, _) in row.metrics.items()}}
            lines.append(json.dumps(entry, ensure_ascii=False, default=str))
        atomic.write_text(folder / f"{task.name}.jsonl", "\n".join(lines) + "\n")

def summary(results: dict) -> str:
    """The console's view of results.json: every metric per model, and each difference from the baseline."""
    labels = [m["label"] for m in results["models"]]
    out = [f"M{i} = {lab}" + (" (baseline)" if i == 0 else "") for i, lab in enumerate(labels)]

    def f(x):
        return "–" if x is None else f"{x:.4g}"

    for name, task in results["tasks"].items():
        out.append(f"{name} ({task['kind']}, {', '.join(str(n) for n in task['samples'].values())} samples)")
        for metric, block in task["metrics"].items():
            vals = "  ".join(f"M{i} {f(block['models'][lab]['value'])}" for i, lab in enumerate(labels))
            diffs = "  ".join(
                f"M{labels.index(c['model'])}-M0 {f(c['difference'])} [{f(c['ci_low'])}, {f(c['ci_high'])}] p={f(c['p_value'])}"
                + (" *" if c["significant"] else "") for c in block["comparisons"])
            out.append(f"  {metric:<24} {vals}" + (f"   {diffs}" if diffs else ""))
    return "\n".join(out)


# --------------------------------------------------------------------------- during training
def training_suite(path: str) -> SuiteConfig:
    """A suite for `train.eval_suite`: as `load_suite`, and with one model, so a preference task
    needs a reference answer to be compared against (`reference_field`)."""
    suite = load_suite(path)
    for t in suite.tasks:
        if t.kind == "preference" and t.reference_field is None:
            raise ConfigError(f"{path}: task {t.name!r} compares against a baseline model, which training "
                              "does not have; give it a reference_field (an answer in the records) or leave it out")
    return suite


def metric_names(suite: SuiteConfig) -> list[str]:
    """`<task>/<metric>` of every metric the suite reports for one model, known before it runs."""
    names = []
    for i, t in enumerate(suite.tasks):
        if t.kind == "likelihood":
            metrics = ["loss", "perplexity"]
        elif t.kind == "preference":
            metrics = ["win_rate"]
        else:
            scorers = [build(s, key=f"tasks[{i}].scorers[{j}]")[0] for j, s in enumerate(t.scorers)]
            metrics = [m for name in scorers for m in [name, *(f"{name}/pass@{k}" for k in t.pass_at)]]
            metrics += ["completion_tokens", "truncated"]
        names += [f"{t.name}/{m}" for m in metrics]
    return names


def suite_hook(path: str, run_dir: Path) -> Callable:
    """An `Engine.eval_hooks` entry: the suite on the current weights (exported to
    <run_dir>/eval_suite/model on worker 0; the gather is a collective), results kept per step in
    <run_dir>/eval_suite/step_N, each metric returned as `<task>/<metric>`. Training's RNG state is
    left as it was, so a run with the suite trains exactly as one without."""
    suite = training_suite(path)
    names = metric_names(suite)
    root = Path(run_dir) / "eval_suite"

    def hook(job, step: int) -> dict[str, float]:
        from ..model.export import export_hf

        model = job.unsharded()
        if model is None:  # not worker 0: its values are not used
            return {n: 0.0 for n in names}
        model_dir = export_hf(model, job.tokenizer, root / "model", merge_lora=True)
        with torch.random.fork_rng(devices=[job.device] if job.device.type == "cuda" else []):
            res = evaluate(suite, [str(model_dir)], root / f"step_{step:08d}", log=lambda m: None)
        label = res["baseline"]
        values = {f"{t}/{m}": block["models"][label]["value"] for t, task in res["tasks"].items()
                  for m, block in task["metrics"].items()}
        return {n: float("nan") if values.get(n) is None else float(values[n]) for n in names}

    return hook
