"""The training engine every recipe calls: what must be identical across methods lives here once.

    job = Engine.setup(cfg, run_dir)          # device/dtype/threads, tokenizer, policy (LoRA, padded
                                              # vocab, checkpointing), FSDP2 root, optimizer, schedule
    ref = job.frozen("adapters")              # a reference / teacher: no grad, sharded like the policy
    for step in job.steps(job.loader(), eval_fn=held_out, **states):  # resume; log, evaluate, checkpoint
        n = step.total(fn)                    # a normaliser over the *global* step (all micro-batches, ranks)
        for b in step.micro:                  # this rank's micro-batches
            out = job.forward(loss_fn, b)     # any loss fn(model, batch) inside the FSDP2 root
            step.backward(loss, **metrics)    # loss already divided by the global normaliser
        step.update()                         # clip, optimizer, schedule, zero grads
    return job.finish()                       # gather, export <output_dir>/hf, samples

No class to subclass and no hooks into the loop: a recipe is a loop that calls these. Conventions a
recipe keeps:
- `step.backward(loss, **metrics)`: `loss` and every metric are this micro-batch's *share* of the
  global step value (divided by a global count from `step.total`), so summing them over micro-batches
  and ranks gives the step's value. The engine scales the backward for FSDP2's gradient average.
- Frozen-model forward FLOPs are counted on their own line (`frozen_mfu`), beside the policy's
  training FLOPs (`policy_mfu`); `mfu` is their sum over the step time.
- Any object with `state_dict`/`load_state_dict` passed to `steps(...)` is checkpointed per rank and
  restored on resume, with the model, optimizer, schedule, data loader and RNG.
- `eval_fn(batch) -> {name: (sum, count)}`: the recipe's loss (and metrics) on one held-out batch as
  sums and their counts, for evaluation during training (`train.eval_every`, `data.eval_sources`;
  see workflow/evaluation.py). A recipe that passes none refuses `train.eval_every`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import atomic
from ..compute import interrupt, replace
from ..compute.checkpoint import (
    IO_ERRORS,
    CheckpointError,
    PendingSave,
    clean_leftovers,
    find_latest,
    load_checkpoint,
    release_buffers,
    resume_candidates,
    save_checkpoint,
    set_aside_unreadable,
    unreadable_reason,
)
from ..compute.compile import compile_layers
from ..compute.compile import usable as compile_usable
from ..compute.device import choose_device, choose_dtype, gpu_peak, mfu, peak_flops, remeasure_peak, seed_everything
from ..compute.distributed import all_reduce, all_reduce_many, full_state_dict, local_scalar, rank_world, shard_fsdp2
from ..compute.metrics import MetricsLogger, console, peak_memory_gb
from ..compute.optim import build_optimizer, build_scheduler
from ..compute.rundir import RunDir
from ..compute.tracking import Trackers
from ..config import ConfigError, JobConfig, ModelConfig
from ..data.layouts import local_path
from ..data.loader import DataLoader
from ..data.packing import computed_lens, share_prefix
from ..data.records import encode_sft_record
from ..data.tokenizer import TokenizerMismatchError, fingerprint, load_tokenizer
from ..model.attention import NAME as ATTN_PACKED
from ..model.attention import check_prefix_sharing
from ..model.export import export_hf, inference_state_dict
from ..model.flops import FlopCounter
from ..model.hf import decoder_layers, unwrap
from ..model.load import load_model
from ..model.loss import count_targets
from ..model.sample import sample_chat
from .evaluation import Best, EvalFn, Sums
from .export import export_checkpoint

_BEST = "posttrain.best"  # the engine's own entry among a checkpoint's states: evaluation.Best

_clock = time.monotonic  # the wall clock of compute.checkpoint_every_minutes (a test moves it)


def checkpoint_interval(cfg: JobConfig) -> int | None:
    """compute.checkpoint_every in steps; `auto`: ceil(train.steps / 10), about ten per run."""
    every = cfg.compute.checkpoint_every
    return math.ceil(cfg.train.steps / 10) if every == "auto" else every


class NothingTrained(RuntimeError):
    """The run ended without a single optimizer step (e.g. every record was skipped): nothing is
    exported and the command fails, so a run that did nothing never looks successful."""


def _forward_flops(counter: FlopCounter, batch: dict) -> float:
    """Matmul FLOPs of one forward over a batch (decoder on real tokens, head on target positions)."""
    parts = counter.breakdown(computed_lens(batch), count_targets(batch["labels"]), doc_starts=batch.get("doc_starts"))
    return sum(p["forward"] for p in parts.values())


@dataclass
class Frozen:
    """A model that never trains: a DPO reference or a distillation teacher. `forward(fn, batch)`
    runs `fn(model, batch)` without gradients (in eval mode), through its own FSDP2 root when the
    policy is sharded, and counts the forward's FLOPs for the metrics."""

    engine: "Engine"
    model: torch.nn.Module
    root: Callable | None = None  # FSDP2 root of a separate frozen copy
    adapters_off: bool = False  # the policy itself, with its LoRA adapters disabled
    counter: FlopCounter | None = None
    flops: float = 0.0  # forward FLOPs since the last step's metrics

    def forward(self, fn: Callable, batch: dict, *args, **kwargs):
        self.flops += _forward_flops(self.counter, batch)
        with torch.no_grad(), self._mode():
            if self.adapters_off:
                with self.engine.model.disable_adapter():
                    return self.engine.forward(fn, batch, *args, **kwargs)
            return self.root(fn, batch, *args, **kwargs) if self.root is not None else fn(self.model, batch, *args, **kwargs)

    @contextlib.contextmanager
    def _mode(self):
        m = self.engine.model if self.adapters_off else self.model
        was = m.training
        m.eval()
        try:
            yield
        finally:
            m.train(was)

    @contextlib.contextmanager
    def gathered(self):
        """Keep the root weights (embeddings, final norm, head) unsharded inside the block: for a loss
        that applies this model's head within the *policy's* forward (distillation)."""
        root = self.root if self.root is not None else (self.engine.root if self.adapters_off else None)
        if root is None or not hasattr(root, "unshard"):
            yield
            return
        root.unshard()
        try:
            yield
        finally:
            root.reshard()


@dataclass
class Step:
    """One optimizer step: this rank's micro-batches, global totals, backward, update."""

    engine: "Engine"
    index: int
    micro: list[dict]
    metrics: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)
    loss: float = 0.0
    grad_norms: list[float] = field(default_factory=list)
    lr: float | None = None  # of this step's first update
    updates: int = 0
    _local_targets: int | None = None

    def total(self, fn: Callable[[dict], float]) -> float:
        """sum of fn(b) over this rank's micro-batches and over every rank (a global normaliser)."""
        return all_reduce(sum(fn(b) for b in self.micro))

    def local_targets(self) -> int:
        """Label targets (label != -100 after the shift) in this rank's micro-batches."""
        if self._local_targets is None:
            self._local_targets = sum(count_targets(b["labels"]) for b in self.micro)
        return self._local_targets

    def targets(self) -> int:
        """Label targets of the whole global step (all micro-batches, all ranks)."""
        return int(all_reduce(self.local_targets()))

    def log(self, **metrics) -> None:
        """Add this micro-batch's share of additive metrics (summed over micro-batches and ranks)."""
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + float(v.detach().item() if torch.is_tensor(v) else v)

    def log_max(self, **metrics) -> None:
        """Metrics reduced by max over micro-batches and ranks (a worst case, a longest length)."""
        for k, v in metrics.items():
            v = float(v.detach().item() if torch.is_tensor(v) else v)
            self.maxima[k] = max(self.maxima.get(k, v), v)

    @property
    def updated(self) -> bool:
        return self.updates > 0

    def backward(self, loss: torch.Tensor, **metrics) -> None:
        """Backward of this micro-batch's share of the step loss; FSDP2 averages gradients over
        ranks, so the backward is scaled by the world size to make the update a global sum."""
        world = self.engine.world
        (loss * world if world != 1 else loss).backward()
        self.loss += loss.item()
        self.log(**metrics)

    def update(self) -> None:
        """Clip, optimizer step, schedule step, zero grads. A recipe may update several times in one
        step (PPO epochs, minibatches); the engine was then set up with `updates_per_step`."""
        e = self.engine
        clip = e.cfg.train.max_grad_norm
        if clip:
            self.grad_norms.append(local_scalar(torch.nn.utils.clip_grad_norm_(e.trainable, clip)))
        if self.lr is None:
            self.lr = e.sched.get_last_lr()[0]
        e.opt.step()
        e.sched.step()
        e.opt.zero_grad(set_to_none=True)
        self.updates += 1


class Engine:
    """Built by `Engine.setup`; see the module docstring."""

    def __init__(self, cfg: JobConfig, run_dir: Path, *, updates_per_step: int = 1):
        self.cfg, self.run_dir, self.out = cfg, Path(run_dir), RunDir(run_dir)
        seed_everything(cfg.train.seed)
        self.rank, self.world = rank_world()  # N SPMD workers run the recipe on their data shards
        self.say = console.print if self.rank == 0 else (lambda *a, **k: None)
        if cfg.compute.threads:
            torch.set_num_threads(cfg.compute.threads)
        self.device = choose_device(cfg.compute.device)
        self.dtype = choose_dtype(cfg.model.dtype, self.device)
        # Under FSDP2, model.dtype is the compute dtype: weights, gradients and AdamW state stay fp32.
        self.master = torch.float32 if self.world > 1 else self.dtype
        self.tokenizer = load_tokenizer(cfg.model)
        self.vocab = len(self.tokenizer)  # real vocabulary; embedding rows beyond it are padding
        self.model = self._load(cfg.model, lora=True)
        self.model.train()
        self._shares_data = False  # a loader made with shared prompts (see _sharing)
        self.share_prefix = self._prefix_sharing(self.model)  # data.share_prefix where the attention reads it
        self.flops = FlopCounter.from_model(self.model, vocab_size=self.vocab)  # documents, targets, LoRA, recompute
        self.peak = peak_flops(self.device, self.dtype, override=cfg.compute.peak_flops)  # calibrated before step 1
        self.peak_source = "compute.peak_flops" if cfg.compute.peak_flops else (
            "the GPU table" if self.device.type == "cuda" and gpu_peak(torch.cuda.get_device_name(self.device), self.dtype)
            else "measured")
        self.mfu_unreliable = False  # see _plausible_peak
        # probed once per run
        self.compiled = cfg.compute.compile and compile_usable(self.device, lambda m: self.say(f"[yellow]{m}[/yellow]"))
        if self.compiled:
            compile_layers(self.model, self.say)
        self.root = self._shard(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # after sharding: DTensors
        self.opt = build_optimizer(self.model, cfg.train)
        self.updates_per_step = updates_per_step
        self.sched = build_scheduler(self.opt, cfg.train, cfg.train.steps * updates_per_step)
        self.frozen_models: list[Frozen] = []
        self._copy: torch.nn.Module | None = None  # rank 0's unsharded copy for gathers (see unsharded)
        self.losses: list[float] = []
        self.start_step = 0
        # more evaluations (a benchmark suite): hook(engine, step) -> {name: value}, run on every
        # worker after the held-out loss at every evaluation; the same names on every worker,
        # worker 0's values count (all workers then take the same best / early-stopping decisions);
        # logged as `eval/<name>` with the held-out loss
        self.eval_hooks: list[Callable[["Engine", int], dict[str, float]]] = []
        if cfg.train.eval_suite:  # a suite on the current weights at every evaluation (worker 0)
            from .evaluate import suite_hook

            self.eval_hooks.append(suite_hook(cfg.train.eval_suite, self.out.root))
        self._held_out: list[dict] | None = None  # this rank's held-out micro-batches (CPU), read once
        self.best: Best | None = None
        self.stopped_early: str | None = None  # why the run stopped before train.steps (early stopping)
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.trainable)
        attn = unwrap(self.model).config._attn_implementation
        self.say(f"model: {n_params:,} parameters ({n_train:,} trainable), {self.dtype}, {self.device}, attention {attn}, "
                 f"{self.world} worker{'s' if self.world > 1 else ''}; {cfg.train.steps} steps")

    @classmethod
    def setup(cls, cfg: JobConfig, run_dir: Path, *, updates_per_step: int = 1) -> "Engine":
        """`updates_per_step`: optimizer updates each step makes (the schedule spans steps x updates)."""
        return cls(cfg, run_dir, updates_per_step=updates_per_step)

    # ------------------------------------------------------------------------------ models
    def _load(self, mcfg: ModelConfig, *, lora: bool) -> torch.nn.Module:
        return load_model(
            mcfg if lora else mcfg.model_copy(update={"lora": None}), self.tokenizer, device=self.device,
            dtype=self.master, merge_lora=self.cfg.export.merge_lora, packing=self.cfg.data.packing,
        )

    def _prefix_sharing(self, model: torch.nn.Module, name: str = "the policy") -> bool:
        """Whether packed units may share their prompt (data.share_prefix), probed on `model`: a
        branch's logits must equal its unshared document's. Where it cannot, sharing is turned off with
        a line saying why (an error if a loader already shares: a frozen model loaded after it)."""
        d = self.cfg.data
        if not (d.share_prefix and d.packing):
            return False
        attn = unwrap(model).config._attn_implementation
        diff = check_prefix_sharing(model, self.vocab) if attn == ATTN_PACKED else None
        if diff is not None and diff <= (1e-4 if self.master == torch.float32 else 5e-2):
            return True
        why = f"{name}'s attention {attn!r} cannot read shared-prefix rows" + (
            f" (a branch's logits differ by {diff:.3g}: sliding-window or soft-capped attention)" if diff is not None else "")
        if self._shares_data:
            raise ConfigError(f"{why}, but the data already shares prompts; set data.share_prefix: false")
        self.say(f"data.share_prefix: off, {why}")
        return False

    def _shard(self, model: torch.nn.Module):
        if self.world == 1:
            return None
        return shard_fsdp2(model, decoder_layers(model), param_dtype=self.dtype if self.dtype != self.master else None)

    def forward(self, fn: Callable, batch: dict, *args, **kwargs):
        """`fn(policy, batch, ...)`, through the FSDP2 root when sharded (so its weights are gathered)."""
        if self.root is not None:
            return self.root(fn, batch, *args, **kwargs)
        return fn(self.model, batch, *args, **kwargs)

    def frozen(self, source: str) -> Frozen:
        """A frozen model for a reference or teacher:
        - `adapters`: the policy with its LoRA adapters disabled (exact: the base never trains);
        - `copy`: a separate frozen copy of the policy's starting weights (full fine-tuning);
        - a model directory: another model (a teacher) that must share the policy's tokenizer."""
        if source == "adapters":
            if not hasattr(self.model, "disable_adapter"):
                raise ConfigError("reference 'adapters' needs LoRA (model.lora); use 'copy' for full fine-tuning")
            fz = Frozen(self, self.model, adapters_off=True)
            fz.counter = FlopCounter.from_model(unwrap(self.model), vocab_size=self.vocab)
        else:
            if source == "copy":
                mcfg = self.cfg.model
            else:
                mcfg = self.cfg.model.model_copy(update={"path": source, "tokenizer": None, "lora": None})
                self._check_same_tokenizer(mcfg)
            # the same seed as the policy's load: rows added by a vocabulary resize are drawn alike
            with torch.random.fork_rng(devices=[]):
                seed_everything(self.cfg.train.seed)
                model = self._load(mcfg, lora=False)
            model.requires_grad_(False)
            model.eval()
            if self.share_prefix:  # every model that reads the rows must read branches
                self.share_prefix = self._prefix_sharing(model, "the reference copy" if source == "copy" else source)
            if self.compiled:
                compile_layers(model, self.say)
            fz = Frozen(self, model, root=self._shard(model))
            fz.counter = FlopCounter.from_model(model, vocab_size=self.vocab)
        self.frozen_models.append(fz)
        return fz

    def _check_same_tokenizer(self, mcfg: ModelConfig) -> None:
        other = load_tokenizer(mcfg)
        a, b = self.fingerprint, fingerprint(other)
        if a != b:
            raise TokenizerMismatchError(
                f"{mcfg.path}: its tokenizer differs from the policy's ({self.cfg.model.tokenizer or self.cfg.model.path}): "
                f"fingerprints {b[:16]} vs {a[:16]} (vocabulary {len(other)} vs {len(self.tokenizer)} tokens, chat "
                f"template {'equal' if other.chat_template == self.tokenizer.chat_template else 'different'}). "
                "Both models must tokenize text identically; a padded-vocabulary difference is fine."
            )

    # ------------------------------------------------------------------------------ data
    def loader(self, encode: Callable | None = None, *, one_pass: bool = False) -> DataLoader:
        """This rank's stateful loader over data.sources; `encode(tokenizer, rec, where, cfg, stats)`
        turns a record into a packing unit (default: SFT records). `one_pass`: a single epoch, in
        this thread (for a pass before training)."""
        cfg = self.cfg.data.model_copy(update={"max_epochs": 1}) if one_pass else self.cfg.data
        kw = {"encode": self._sharing(encode)}
        return DataLoader(cfg, self.tokenizer, seed=self.cfg.train.seed, rank=self.rank, world_size=self.world,
                          background=not one_pass and self._background(), **kw)

    def _background(self) -> bool:
        """data.background, or (null) whether a background loader thread has a core to itself: not on CPU
        when torch's threads (per worker, times the workers) take every core this process may use. There it
        competes with the compute threads, which then wait for one another at every parallel op: the SFT
        benchmark's uniform rows, compiled, made 4.9% more tokens/s with the batch made in this thread (6
        interleaved runs each, every pair faster), eager and skewed rows the same within 0.5%. A remote
        source (an fsspec URL) keeps the thread: its reads wait on the network, not on a core."""
        if self.cfg.data.background is not None:
            return self.cfg.data.background
        remote = any(local_path(s.path) is None for s in self.cfg.data.sources)
        if self.device.type != "cpu" or remote:
            return True
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return torch.get_num_threads() * self.world < cores

    def _sharing(self, encode: Callable | None) -> Callable:
        """`encode` (default: SFT records), its units' shared prompts made branches when sharing is on."""
        encode = encode or encode_sft_record
        if not self.share_prefix or getattr(encode, "shares_prefix", False):
            return encode
        self._shares_data = True

        def shared(*args):
            out = encode(*args)
            return [share_prefix(s) for s in out] if isinstance(out, list) else share_prefix(out)

        shared.shares_prefix = True
        return shared

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def precompute(self, name: str, fn: Callable[[dict], torch.Tensor], encode: Callable | None = None) -> dict[str, torch.Tensor]:
        """One pass over this rank's data before training: `fn(batch)` -> one row per unit, kept by
        the unit's `file:line`. Stored in the run dir (`<name>.rank_N.pt`, atomically) and read back
        on resume instead of being recomputed. Used for reference log-probs computed once."""
        path = self.out.precomputed(name, self.rank)
        if path.is_file():
            return torch.load(path)
        loader = self.loader(encode, one_pass=True)
        table: dict[str, torch.Tensor] = {}
        last = None
        t0 = time.perf_counter()
        while True:
            batch = next(loader, None)
            # every rank runs the same number of forwards: a sharded model's forward is a collective
            if not all_reduce(batch is not None, "max"):
                break
            if batch is None:
                if last is None:
                    raise ConfigError(f"{name}: worker {self.rank} has no data while others do; use fewer compute.workers")
                fn(last)
                continue
            last = self._to_device(batch)
            table.update(zip(batch["unit_where"], fn(last).detach().cpu()))
        for fz in self.frozen_models:  # the pass's forwards are not a training step's
            fz.flops = 0.0
        atomic.write(path, lambda fh: torch.save(table, fh))
        self.say(f"{name}: {len(table)} units precomputed in {time.perf_counter() - t0:.1f} s -> {path.name}")
        return table

    # ------------------------------------------------------------------------------ evaluation
    def _read_held_out(self, encode: Callable | None) -> list[dict]:
        """This rank's share of data.eval_sources, packed like the training data, in file order."""
        d = self.cfg.data
        cfg = d.model_copy(update={"sources": d.eval_sources, "max_epochs": 1, "shuffle": False, "on_exhausted": "drop"})
        kw = {"encode": self._sharing(encode)}
        loader = DataLoader(cfg, self.tokenizer, seed=self.cfg.train.seed, rank=self.rank, world_size=self.world,
                            background=False, **kw)
        cap = self.cfg.train.eval_max_batches
        batches = [b for _, b in zip(range(cap) if cap else itertools.count(), loader)]
        if not all_reduce(len(batches)):
            paths = ", ".join(s.path for s in d.eval_sources)
            raise ConfigError(f"data.eval_sources ({paths}) gave no batch ({loader.stats.summary()}); check the files "
                              "and data.on_bad_record")
        return batches

    def evaluate(self, eval_fn: EvalFn, step: int, *, encode: Callable | None = None, spare: dict | None = None) -> dict[str, float]:
        """`eval/<name>` metrics of `eval_fn` over the whole held-out set (all ranks; a collective),
        then of every `eval_hooks` entry. Ranks run the same number of forwards (a sharded forward is
        a collective): one with fewer batches repeats its last one (or `spare`) and discards it."""
        t0 = time.perf_counter()
        if eval_fn is None or not self.cfg.data.eval_sources:  # a suite alone (train.eval_suite)
            eval_fn, self._held_out = None, []
        elif self._held_out is None:
            self._held_out = self._read_held_out(encode)
        local = self._held_out
        n = int(all_reduce(len(local), "max"))
        frozen_flops = [fz.flops for fz in self.frozen_models]  # an evaluation's forwards are no step's
        sums = Sums()
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for j in range(n):
                    batch = local[j] if j < len(local) else (local[-1] if local else spare)
                    sums.add(eval_fn(self._to_device(batch)), count=j < len(local))
        finally:
            self.model.train(was)
            for fz, f in zip(self.frozen_models, frozen_flops):
                fz.flops = f
        values = sums.values(all_reduce_many(sums.flat()) if sums.terms else [])
        for hook in self.eval_hooks:  # worker 0's values count (a suite may run there alone)
            extra = hook(self, step)
            names = sorted(extra)
            values.update(zip(names, all_reduce_many([float(extra[k]) if self.rank == 0 else 0.0 for k in names])))
        out = {f"eval/{k}": v for k, v in values.items()}
        out["eval/time_s"] = time.perf_counter() - t0
        return out

    def _eval_due(self, i: int) -> bool:
        every = self.cfg.train.eval_every
        return bool(every) and (i % every == 0 or i == self.cfg.train.steps)

    # ------------------------------------------------------------------------------ the loop
    def _meta(self) -> dict:
        return {"tokenizer_fingerprint": self.fingerprint, "config": self.cfg.model_dump(mode="json")}

    @functools.cached_property
    def fingerprint(self) -> str:
        """The tokenizer's fingerprint, computed once: it serialises the whole tokenizer (a 151k-token
        vocabulary is megabytes), and every checkpoint records it."""
        return fingerprint(self.tokenizer)

    def _check_same_sources(self, path, saved: dict | None) -> None:
        """The data state (cursors per source, mixer) only means something for the sources it was
        written with: a changed data.sources is refused, saying what changed and what to do."""
        try:
            old = saved["data"]["sources"]
        except (TypeError, KeyError):  # a checkpoint without its config: nothing to compare
            return
        new = self.cfg.model_dump(mode="json")["data"]["sources"]
        if old == new:
            return
        changes = []
        for i in range(max(len(old), len(new))):
            if i >= len(old):
                changes.append(f"[{i}] added ({new[i]['path']!r})")
            elif i >= len(new):
                changes.append(f"[{i}] removed ({old[i]['path']!r})")
            else:
                changes += [f"[{i}].{k}: {old[i].get(k)!r} -> {new[i].get(k)!r}"
                            for k in sorted(set(old[i]) | set(new[i])) if old[i].get(k) != new[i].get(k)]
        was = ", ".join(repr(s["path"]) for s in old)
        raise ConfigError(
            f"data.sources changed since checkpoint {path} was written ({'; '.join(changes)}); its data position is "
            f"for the old sources. Start afresh with --overwrite (or another compute.output_dir), or resume with the "
            f"old sources ({was}) as they were")

    def _resume(self, loader: DataLoader, states: dict[str, Any]) -> int:
        """Restore the newest readable checkpoint; an unreadable one (corrupt or missing file) is
        reported and the next older one tried, all ranks together."""
        root = self.out.checkpoints
        if self.rank == 0:  # leftovers of a killed save or write; nothing is being written yet
            junk = clean_leftovers(root) + atomic.remove_temporaries(self.run_dir, ["metrics.jsonl", "config.yaml", "tracking.json"])
            if junk:
                self.say(f"removed leftovers of an interrupted write: {', '.join(p.name for p in junk)}", soft_wrap=True)
        unreadable = []
        for path in resume_candidates(self.cfg.compute.resume, root):
            error = None
            try:
                state = load_checkpoint(path, model=self.model, optimizer=self.opt, scheduler=self.sched)
            except CheckpointError:
                raise  # readable, but not for this run (workers, base weights): no fallback
            except IO_ERRORS as e:
                error = e
            if all_reduce(error is not None, "max"):
                reason = unreadable_reason(error) if error is not None else "unreadable on another worker"
                self.say(f"[yellow]checkpoint {path} is unreadable[/] ({reason}); trying the previous one", soft_wrap=True)
                unreadable.append((path, reason))
                continue
            if state["meta"].get("tokenizer_fingerprint") != self.fingerprint:
                raise TokenizerMismatchError(f"{path}: written with a different tokenizer than this run's")
            self._check_same_sources(path, state["meta"].get("config"))
            old_steps = ((state["meta"].get("config") or {}).get("train") or {}).get("steps")
            changed = self.sched.on_resume(
                self.cfg.train.steps * self.updates_per_step, self.updates_per_step, self.cfg.train.on_steps_change,
                fallback=old_steps * self.updates_per_step if old_steps else None, where=f"checkpoint {path}")
            if changed:
                self.say(f"[yellow]{changed}", soft_wrap=True)
            loader.load_state_dict(state["data"])
            saved = state.get("states") or {}
            self._resume_best(saved.get(_BEST), path, state["meta"].get("config"))
            for name, obj in states.items():
                if name not in saved:
                    raise ConfigError(f"{path}: the checkpoint has no state {name!r} (written by another recipe?)")
                obj.load_state_dict(saved[name])
            newest = f" (the newest readable checkpoint; {len(unreadable)} newer unreadable)" if unreadable else ""
            self.say(f"[bold]resumed[/] from {path} at step {state['step']}{newest}", soft_wrap=True)
            if unreadable and self.rank == 0:  # kept for inspection, out of the way of resume and retention
                moved = set_aside_unreadable(root, [p.name for p, _ in unreadable])
                self.say(f"moved the unreadable checkpoints aside: {', '.join(str(m) for m in moved)}", soft_wrap=True)
            return state["step"]
        if unreadable and self.cfg.compute.resume != "auto":
            raise CheckpointError(f"compute.resume: {unreadable[0][0]} is unreadable ({unreadable[0][1]})")
        if unreadable:
            listed = "; ".join(f"{p.name}: {why}" for p, why in unreadable)
            raise CheckpointError(f"no readable checkpoint in {root} ({listed}); restore the files, "
                                  "or start afresh with --overwrite (or another compute.output_dir)")
        return 0

    def _resume_best(self, saved: dict | None, path, config: dict | None) -> None:
        if self.best is None:
            return
        new = self.cfg.model_dump(mode="json")["data"]["eval_sources"]
        if saved is not None and config is not None and config.get("data", {}).get("eval_sources") != new:
            self.say(f"data.eval_sources changed since {path} was written: the best {self.best.metric} starts afresh",
                     soft_wrap=True)
        elif saved is None:
            self.say(f"{path} holds no evaluation state (written without train.eval_every): the best {self.best.metric} "
                     "starts afresh", soft_wrap=True)
        elif not self.best.load_state_dict(saved):
            self.say(f"{path} tracked the best {saved.get('metric')} ({saved.get('mode')}); train.best_metric is now "
                     f"{self.best.metric} ({self.best.mode}): the best starts afresh", soft_wrap=True)
        if self.rank == 0:  # best.json may be ahead of the checkpoint resumed from
            self.best.write(self.out.best)

    def steps(self, loader: DataLoader, *, eval_fn: EvalFn | None = None, **states: Any) -> Iterator[Step]:
        """One `Step` per optimizer step, resuming from the newest checkpoint first; after the recipe's
        `step.update()`: evaluation every train.eval_every steps (`eval_fn`, see the module docstring),
        metrics, then a checkpoint every compute.checkpoint_every steps and every
        compute.checkpoint_every_minutes, at a new best evaluation (train.keep_best) and when early
        stopping ends the run."""
        cfg = self.cfg
        if cfg.train.eval_every and eval_fn is None and cfg.data.eval_sources:
            raise ConfigError(f"train.eval_every: recipe {cfg.recipe!r} does not evaluate during training (it passes no "
                              "eval_fn to Engine.steps); remove train.eval_every and data.eval_sources")
        if cfg.train.eval_every:
            self.best = Best(cfg.train, keep_checkpoint=cfg.train.keep_best)
        encode = getattr(getattr(loader, "stream", None), "encode", None)  # held-out data: the training encoding
        self.start_step = start = self._resume(loader, states)
        every = checkpoint_interval(cfg)
        minutes = cfg.compute.checkpoint_every_minutes
        if every or minutes:
            self.say("checkpoints: " + " and ".join(
                ([f"every {every} steps" if every > 1 else "every step"] if every else []) + ([f"every {minutes:g} min"] if minutes else []))
                + (", written in the background" if cfg.compute.async_checkpoint else ""), soft_wrap=True)
        try:
            trackers = Trackers.start(cfg, self.run_dir, enabled=self.rank == 0, say=self.say)
        except BaseException:
            loader.close()
            raise
        log = MetricsLogger(self.run_dir, cfg.train.steps, progress=cfg.compute.progress, log_every=cfg.train.log_every,
                            start_step=start, enabled=self.rank == 0, tensorboard=cfg.compute.tensorboard, trackers=trackers)
        trained, status = 0, "failed"
        self._last_save = _clock()

        pending: list[PendingSave] = []  # a checkpoint being written in the background (compute.async_checkpoint)

        def finish_pending() -> Path | None:
            if not pending:
                return None
            path = pending.pop().finish()  # a collective: every rank at the same step
            if self.rank == 0:  # the run is resumable now: a run it replaces (--overwrite) can go
                replace.drop_previous(self.out)
            return path

        def save(i: int, background: bool = False) -> Path | None:
            finish_pending()
            self._last_save = _clock()
            mine = {k: v.state_dict() for k, v in states.items()}
            if self.best is not None:
                mine[_BEST] = self.best.state_dict()
            out = save_checkpoint(
                self.out.checkpoints, i, model=self.model, optimizer=self.opt, scheduler=self.sched,
                data_state=loader.state_dict(), states=mine, meta=self._meta(), keep=cfg.compute.keep_checkpoints,
                keep_also=self.best.checkpoint if self.best is not None else None, background=background,
            )
            if background:
                pending.append(out)
                return None
            if self.rank == 0:  # the run is resumable now: a run it replaces (--overwrite) can go
                replace.drop_previous(self.out)
            return out

        signals = contextlib.ExitStack()  # Ctrl-C / SIGTERM: finish the step, checkpoint, stop (all ranks)
        signals.enter_context(interrupt.deferred())
        if self.best is not None and self.best.stop and start < cfg.train.steps:  # resumed after early stopping
            self.stopped_early = self.best.why()
            self.say(f"[bold]{self.stopped_early}[/]; resumed at step {start}: nothing more to train", soft_wrap=True)
        try:
            for i in range(start + 1, cfg.train.steps + 1):
                if self.stopped_early:
                    break
                t0, wait0 = time.perf_counter(), loader.wait_s
                if hasattr(loader, "next_step"):  # a step's data made on demand (RL rollouts)
                    micro = loader.next_step(i) or []
                else:
                    micro = [b for _, b in zip(range(cfg.train.grad_accum), loader)]
                micro = micro[: int(all_reduce(len(micro), "min"))]  # ranks stop together when data runs out
                if not micro:
                    self.say(f"[yellow]data exhausted after {i - 1} steps (data.max_epochs={cfg.data.max_epochs})")
                    break
                micro = [self._to_device(b) for b in micro]
                step = Step(self, i, micro)
                yield step
                if not step.updated:
                    raise RuntimeError(f"recipe {cfg.recipe!r} did not call step.update() in step {i}")
                dt = time.perf_counter() - t0
                metrics = self._step_metrics(step, dt, (loader.wait_s - wait0) / dt)
                improved = evaluated = False
                if self._eval_due(i):
                    metrics.update(evaluated := self.evaluate(eval_fn, i, encode=encode, spare=micro[0]))
                    improved = self.best.observe(i, evaluated)
                    if self.best.stop:
                        self.stopped_early = self.best.why()
                log.log(metrics)
                if evaluated:
                    shown = "  ".join(f"{k[5:]} {v:.4f}" for k, v in evaluated.items() if k != "eval/time_s")
                    self.say(f"eval {i:>5}  {shown}  ({self.best.summary()})", soft_wrap=True)
                signum, due, busy = self._after_step(busy=bool(pending) and not pending[0].ready())
                saved = None
                if pending and not busy:  # every rank's background write is done: make it visible
                    finish_pending()
                if self.stopped_early or (improved and cfg.train.keep_best):
                    saved = save(i)
                elif (every and i % every == 0) or due:
                    saved = save(i, background=cfg.compute.async_checkpoint)
                if self._eval_due(i) and self.rank == 0:
                    self.best.write(self.out.best)
                trained += 1
                if self.stopped_early:
                    self.say(f"[bold]{self.stopped_early}[/]; stopped after step {i} of {cfg.train.steps}, checkpoint "
                             f"{saved} written", soft_wrap=True)
                    break
                if signum:
                    if pending and pending[0].step == i:  # this step's checkpoint is being written: finish it
                        saved = finish_pending()
                    status = "killed"
                    raise self._interrupted(signum, i, saved or (save(i) if cfg.compute.checkpoint_on_interrupt else finish_pending()))
            finish_pending()  # the last background checkpoint, before the export
            status = "finished"
        finally:
            signals.close()
            log.close(status)
            loader.close()
            release_buffers()  # (a write still in flight holds on to its own)
        self.say(f"data: {loader.stats.summary()}; mixture {loader.proportions()}")
        if start + trained == 0:
            sources = ", ".join(s.path for s in cfg.data.sources)
            raise NothingTrained(
                f"no training step ran: data.sources ({sources}) gave no batch ({loader.stats.summary()}); "
                "nothing was exported. Check the data files, data.on_bad_record and data.max_epochs"
            )
        if trained == 0 and not self.stopped_early:
            self.say(f"nothing left to train: resumed at step {start} of train.steps={cfg.train.steps}")

    def _after_step(self, busy: bool = False) -> tuple[int, bool, bool]:
        """What every rank does after this step, agreed in one all-reduce: the signal that stops the
        run (0: go on), this process's (Ctrl-C, SIGTERM) or the driver's stop request, on any rank;
        whether compute.checkpoint_every_minutes have passed since the last checkpoint, by rank
        0's clock (so that every rank saves after the same step); and whether any rank is still
        writing a background checkpoint (`busy`: this rank is)."""
        local = interrupt.requested() or 0
        if not local:
            try:
                local = int(self.out.stop_request.read_text().strip() or 0)
            except (OSError, ValueError):
                pass
        minutes = self.cfg.compute.checkpoint_every_minutes
        due = self.rank == 0 and minutes is not None and _clock() - self._last_save >= minutes * 60
        signum, due, busy = all_reduce_many([local, due, busy], "max")
        return int(signum), bool(due), bool(busy)

    def _interrupted(self, signum: int, step: int, saved: Path | None) -> interrupt.Interrupted:
        if saved is not None:
            where = f"checkpoint {saved} written; run the same command again to resume"
        else:
            newest = find_latest(self.out.checkpoints)
            where = "not checkpointed (compute.checkpoint_on_interrupt: false); " + (
                f"the newest checkpoint is {newest}" if newest else "no checkpoint to resume from")
        return interrupt.Interrupted(signum, f"{interrupt.name(signum)} after step {step}: {where}")

    def _step_metrics(self, step: Step, dt: float, data_wait: float) -> dict:
        micro = step.micro
        f = self.flops.step_flops([n for b in micro for n in computed_lens(b)], step.local_targets(), n_micro_batches=len(micro),
                                  doc_starts=[s for b in micro for s in b.get("doc_starts") or [0] * len(b["doc_lens"])])
        frozen = sum(fz.flops for fz in self.frozen_models)
        for fz in self.frozen_models:
            fz.flops = 0.0
        names, max_names = sorted(step.metrics), sorted(step.maxima)
        local = [step.loss / step.updates, f["model"], f["hardware"], frozen, sum(b["num_tokens"] for b in micro),
                 sum(sum(computed_lens(b)) for b in micro), sum(b["input_ids"].numel() for b in micro), *(step.metrics[k] for k in names)]
        loss, model_flops, hw_flops, frozen, real, computed, slots, *values = all_reduce_many(local)
        values += all_reduce_many([step.maxima[k] for k in max_names], "max")
        names += max_names
        self.losses.append(loss)
        grad_norm = sum(step.grad_norms) / len(step.grad_norms) if step.grad_norms else None
        out = {
            "step": step.index, "epoch": micro[-1]["epoch"], "loss": loss, "lr": step.lr,
            "grad_norm": grad_norm, "target_tokens": step.targets(), "tokens_per_s": real / dt,
            "step_time_s": dt, "data_wait": data_wait, "padding": 1 - computed / slots,
        }
        if self._plausible_peak((hw_flops + frozen) / dt / self.world):
            out["mfu"] = mfu((model_flops + frozen) / dt, self.peak, n_devices=self.world)
            out["hfu"] = mfu((hw_flops + frozen) / dt, self.peak, n_devices=self.world)
            if self.frozen_models:
                out["policy_mfu"] = mfu(model_flops / dt, self.peak, n_devices=self.world)
                out["frozen_mfu"] = mfu(frozen / dt, self.peak, n_devices=self.world)
        else:  # no number rather than a nonsense one (an MFU of 5,000%)
            out.update({k: None for k in ("mfu", "hfu", *(("policy_mfu", "frozen_mfu") if self.frozen_models else ()))})
            out["mfu_unreliable"] = True
        out["peak_mem_gb"] = peak_memory_gb(self.device)
        return {**out, **dict(zip(names, values))}

    def _plausible_peak(self, achieved: float) -> bool:
        """Whether MFU can be reported: a device cannot run above its peak, so hardware FLOP/s per
        device above `self.peak` means the peak is wrong; a CPU peak measured while the machine was
        busy is the usual cause. A measured peak is measured again, once (rank 0: its metrics are the
        ones logged); if the achieved rate is still above it, or the peak came from compute.peak_flops
        or the GPU table, MFU is reported as unreliable (null, `mfu_unreliable: true`) for the rest
        of the run, with one line saying why."""
        if self.mfu_unreliable:
            return False
        if achieved <= self.peak or self.rank != 0:
            return True
        gf = 1e9
        if self.peak_source == "measured":
            old, self.peak = self.peak, max(self.peak, remeasure_peak(self.device, self.dtype))
            self.peak_source = "re-measured"
            if achieved <= self.peak:
                self.say(f"MFU: the measured peak {old / gf:,.1f} GFLOP/s was below the achieved {achieved / gf:,.1f} GFLOP/s "
                         f"(measured on a busy machine?); measured again: {self.peak / gf:,.1f} GFLOP/s", soft_wrap=True)
                return True
        self.mfu_unreliable = True
        self.say(f"[yellow]MFU n/a[/]: the peak of {self.peak / gf:,.1f} GFLOP/s ({self.peak_source}) is implausible, below the "
                 f"achieved {achieved / gf:,.1f} GFLOP/s per device; MFU is logged as null (mfu_unreliable: true) for the rest "
                 "of the run. Set compute.peak_flops to the device's real peak FLOP/s", soft_wrap=True)
        return False

    # ------------------------------------------------------------------------------ weights out
    def unsharded(self) -> torch.nn.Module | None:
        """The policy with its full current weights on rank 0 (None on other ranks); a collective.
        Sharded: gathered into an unsharded CPU copy kept on rank 0 for the next call."""
        if self.world == 1:
            return self.model
        weights = full_state_dict(self.model)
        if self.rank != 0:
            return None
        if self._copy is None:
            self._copy = load_model(self.cfg.model, self.tokenizer, device=torch.device("cpu"), dtype=self.dtype,
                                    merge_lora=self.cfg.export.merge_lora)
        self._copy.load_state_dict(weights)
        return self._copy

    def inference_weights(self) -> dict[str, torch.Tensor] | None:
        """HF-named weights for an inference engine (LoRA merged, tied tensors cloned) on rank 0."""
        model = self.unsharded()
        return inference_state_dict(model) if model is not None else None

    # ------------------------------------------------------------------------------ the end
    def finish(self, **extra) -> dict:
        """Gather the full weights (a collective), export `<output_dir>/hf` on rank 0, print samples."""
        cfg, steps = self.cfg, self.start_step + len(self.losses)
        model = self.unsharded()
        if model is None:
            return {"steps": steps, "rank": self.rank}
        result = {"steps": steps, "losses": self.losses, "start_step": self.start_step, "run_dir": str(self.run_dir), **extra}
        if self.best is not None:
            result["best"] = self.best.state_dict()
        if self.stopped_early:
            result["stopped_early"] = self.stopped_early
        if cfg.export.enabled:
            out = export_hf(model, self.tokenizer, self.out.hf, merge_lora=cfg.export.merge_lora,
                            meta={"base_model": cfg.model.path, "steps": steps, "recipe": cfg.recipe})
            result["export_dir"] = str(out)
            console.print(f"[bold green]HF checkpoint:[/] {out}  (tokenizer fingerprint {self.fingerprint[:12]})")
            if cfg.export.best and self.best is not None and self.best.checkpoint:
                best = export_checkpoint(self.out.checkpoints / self.best.checkpoint, self.out.hf_best)
                result["best_export_dir"] = str(best)
                console.print(f"[bold green]best HF checkpoint:[/] {best}  ({self.best.summary()})", soft_wrap=True)
            if cfg.export.sample_prompts:
                texts = sample_chat(out, cfg.export.sample_prompts, max_new_tokens=cfg.export.max_new_tokens)
                for prompt, text in zip(cfg.export.sample_prompts, texts):
                    console.print(f"[bold]sample[/] {prompt!r} -> {text!r}")
        return result
