"""The stateful data loader the recipe iterates: sources -> mixer -> records -> samples -> packer.

A background thread prepares micro-batches into a bounded queue, so reading, chat rendering,
tokenization and packing overlap the model's compute. Each batch travels with a snapshot of the
producer's state taken right after it was made (source cursors, mixer RNG, packer buffer, record
counts); `state_dict()` returns the snapshot of the last batch the trainer *consumed*, so restoring
it in a fresh process continues with exactly the next batch. An exception in the thread is raised
in the training loop, with its original traceback.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import Counter
from typing import Any, Callable

from ..config import ConfigError, DataConfig, resolve_import_path
from .mixer import Mixer
from .packing import make_batch
from .records import CHAT_FORMATS, BadRecord, RecordStats, Sample, encode_sft_record, has_chat_template, no_chat_template
from .sources import CorruptRecord, Source, parse_record

# encode(tokenizer, record, "file:line", data config, record stats) -> Sample, or raise BadRecord.
# It runs after parsing and the source's transform and applies the length policy itself (the stats count
# truncations). It may return a list of Samples instead: one record made into several packing units
# (data.multi_turn: expand), which the stream hands out one by one before reading the next record.
# Default: SFT (`records.encode_sft_record`); preference pairs: `pairs.encode_pair_record`.
Encode = Callable[[Any, dict, str, DataConfig, RecordStats], "Sample | list[Sample]"]


class SampleStream:
    """Synchronous: mixer -> parse -> transform -> encode (+ length policy), with the bad-record policy.

    Each source may set its own `format` and `transform` (else `data.format` / `data.transform`). An
    exception inside a transform is a bad record (reason `transform`) naming the transform, the
    source and the record, so `data.on_bad_record` decides: stop with it, or count and skip it."""

    def __init__(self, cfg: DataConfig, tokenizer, *, seed: int, rank: int = 0, world_size: int = 1,
                 encode: Encode | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.encode: Encode = encode if encode is not None else encode_sft_record
        if not has_chat_template(tokenizer):
            for i, s in enumerate(cfg.sources):
                if (s.format or cfg.format) in CHAT_FORMATS:
                    key = f"data.sources[{i}].format" if s.format else "data.format"
                    raise no_chat_template(tokenizer, f"data.sources[{i}] ({s.path!r}, {key}: {s.format or cfg.format})")
        sources = [
            Source(s.path, seed=seed, rank=rank, world_size=world_size, shuffle=cfg.shuffle,
                   window=cfg.shuffle_window, storage_options=cfg.storage_options, sample_by=s.sample_by, index=i)
            for i, s in enumerate(cfg.sources)
        ]
        self.mixer = Mixer(sources, [s.weight for s in cfg.sources], seed=seed, on_exhausted=cfg.on_exhausted, max_epochs=cfg.max_epochs)
        # per source: the config its records are encoded with (its format) and its transform
        self.cfgs = [cfg.model_copy(update={"format": s.format}) if s.format else cfg for s in cfg.sources]
        self.transforms: list[tuple[str, Callable] | None] = []
        for i, s in enumerate(cfg.sources):
            key, spec = (f"data.sources[{i}].transform", s.transform) if s.transform else ("data.transform", cfg.transform)
            self.transforms.append((spec, resolve_import_path(spec, key=key)) if spec else None)
        self.stats = RecordStats()
        # per source, its current pass: [epoch, records kept, Counter of skip reasons]; None while
        # the pass was not seen from its start (a resume from an older checkpoint)
        self.passes: list[list | None] = [[0, 0, Counter()] for _ in cfg.sources]
        # the rest of a record that gave several samples (one per assistant turn), handed out before the
        # next record is read; part of the state, so a resume continues inside such a record exactly
        self.pending: list[Sample] = []

    def next(self) -> Sample | None:
        if self.pending:
            return self.pending.pop(0)
        while True:
            item = self.mixer.next()
            if item is None:
                return None
            idx, where, raw = item
            self._check_pass(idx)
            self.stats.seen += 1
            try:
                sample = self._encode(idx, where, raw)
            except BadRecord as bad:
                if self.cfg.on_bad_record == "error":
                    hint = " (data.on_bad_record: error; set it to 'skip' to count and skip such records)"
                    raise BadRecord(bad.where, bad.reason, bad.detail + hint) from bad.__cause__
                self.stats.skipped[bad.reason] += 1
                self.passes[idx][2][bad.reason] += 1
                continue
            if sample is None or (isinstance(sample, list) and not sample):
                self.stats.skipped["filtered"] += 1
                self.passes[idx][2]["filtered"] += 1
                continue
            self.stats.kept += 1
            self.passes[idx][1] += 1
            epoch = self.mixer.sources[idx].cursor.epoch
            samples = sample if isinstance(sample, list) else [sample]
            samples = [s if s.epoch == epoch else dataclasses.replace(s, epoch=epoch) for s in samples]
            self.pending = samples[1:]
            return samples[0]

    def _check_pass(self, idx: int) -> None:
        """A source whose whole pass yielded no usable record would restart forever (data.max_epochs:
        null), reading and skipping, and never give a sample: stop with the skip counts of that pass
        instead. With max_epochs set the passes end, and a run that trained nothing says so."""
        epoch = self.mixer.sources[idx].cursor.epoch
        p = self.passes[idx]
        if p is None:  # resumed mid-pass from a state without pass counts: judge from the next pass on
            self.passes[idx] = [epoch, 1, Counter()]
            return
        if p[0] == epoch:
            return
        if p[1] == 0 and epoch == p[0] + 1 and self.cfg.max_epochs is None:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(p[2].items())) or "no record read"
            raise ConfigError(
                f"data.sources[{idx}] {self.cfg.sources[idx].path!r}: a whole pass over it (epoch {p[0]}) yielded no usable "
                f"record, so it would restart forever without giving a sample; skipped: {counts}. Fix the data (or the "
                f"transform, format, chat template), or remove the source")
        self.passes[idx] = [epoch, 0, Counter()]

    def _encode(self, idx: int, where: str, raw: Any) -> Sample | list[Sample] | None:
        try:
            rec = parse_record(raw)
        except CorruptRecord as e:
            raise BadRecord(where, "corrupt_file", f"{e}; the rest of the file is not read") from None
        except UnicodeDecodeError as e:
            raise BadRecord(where, "not_utf8", f"not UTF-8 text (byte {e.object[e.start]:#04x} at position {e.start})") from None
        except ValueError as e:
            raise BadRecord(where, "invalid_json", f"invalid JSON ({getattr(e, 'msg', e)}{f' at column {e.colno}' if hasattr(e, 'colno') else ''})") from None
        if not isinstance(rec, dict):
            raise BadRecord(where, "not_an_object", f"expected a JSON object, got {type(rec).__name__}")
        if self.transforms[idx] is not None:
            rec = self._transform(idx, where, rec)
            if rec is None:
                return None
        return self.encode(self.tokenizer, rec, where, self.cfgs[idx], self.stats)

    def _transform(self, idx: int, where: str, rec: dict) -> dict | None:
        spec, fn = self.transforms[idx]
        what = f"transform {spec!r} of source {self.cfg.sources[idx].path!r}"
        try:
            out = fn(rec)
        except Exception as e:
            msg = " ".join(str(e).split())
            raise BadRecord(where, "transform", f"{what} raised {type(e).__name__}: {msg}") from e
        if out is not None and not isinstance(out, dict):
            raise BadRecord(where, "transform", f"{what} returned {type(out).__name__}; it must return a record (dict) or None")
        return out

    def state_dict(self) -> dict:
        passes = [None if p is None else [p[0], p[1], Counter(p[2])] for p in self.passes]
        return {"mixer": self.mixer.state_dict(), "stats": self.stats.copy(), "passes": passes,
                "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.mixer.load_state_dict(state["mixer"])
        self.stats = state["stats"].copy()
        self.pending = list(state.get("pending", ()))
        passes = state.get("passes") or [None] * len(self.passes)
        self.passes = [None if p is None else [p[0], p[1], Counter(p[2])] for p in passes]


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _End:
    """The data ran out; `state` is the producer's final state (the records read and skipped after
    the last batch count too)."""

    def __init__(self, state: dict):
        self.state = state


class DataLoader:
    """Endless (or until the data runs out) iterator of micro-batch dicts, with exact state."""

    def __init__(self, cfg: DataConfig, tokenizer, *, seed: int, rank: int = 0, world_size: int = 1, background: bool = True,
                 encode: Encode | None = None):
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token (posttrain.data.tokenizer.load_tokenizer adds one)")
        self.cfg, self.pad_id, self.background = cfg, tokenizer.pad_token_id, background
        self.stream = SampleStream(cfg, tokenizer, seed=seed, rank=rank, world_size=world_size, encode=encode)
        self.buffer: list[Sample] = []
        self.wait_s = 0.0  # time the consumer spent blocked on data (or making it, without the thread)
        self._state = self._snapshot()
        self._thread: threading.Thread | None = None
        self._q: queue.Queue | None = None
        self._stop = threading.Event()
        self._ended = False

    # ---------------------------------------------------------------------------- producer
    def _produce(self) -> dict | None:
        while len(self.buffer) < self.cfg.buffer_size:
            s = self.stream.next()
            if s is None:
                break
            self.buffer.append(s)
        if not self.buffer:
            return None
        batch, self.buffer = make_batch(self.buffer, budget=self.cfg.max_tokens_per_batch, pad_id=self.pad_id,
                                        packing=self.cfg.packing, multiple_of=self.cfg.pack_to_multiple_of)
        return batch

    def _snapshot(self) -> dict:
        return {"stream": self.stream.state_dict(), "buffer": list(self.buffer)}

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._produce()
                item = (batch, self._snapshot()) if batch is not None else _End(self._snapshot())
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if isinstance(item, _End):
                    return
        except BaseException as e:  # surfaces in the training loop, never dies silently
            self._q.put(_Failure(e))

    def _start(self) -> None:
        self._stop.clear()
        self._q = queue.Queue(maxsize=self.cfg.prefetch)
        self._thread = threading.Thread(target=self._run, name="posttrain-data", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._q.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread = None

    # ---------------------------------------------------------------------------- consumer
    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._ended:
            raise StopIteration
        if not self.background:
            t0 = time.perf_counter()
            batch = self._produce()
            self._state = self._snapshot()
            self.wait_s += time.perf_counter() - t0  # made in this thread: all of it is waited for
            if batch is None:
                self._ended = True
                raise StopIteration
            return batch
        if self._thread is None:
            self._start()
        t0 = time.perf_counter()
        item = self._q.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        if isinstance(item, _End):
            self._ended, self._state = True, item.state
            self.close()
            raise StopIteration
        batch, self._state = item
        return batch

    def state_dict(self) -> dict:
        """State after the last consumed batch (plain python objects; pickle/torch.save it)."""
        return {"stream": self._state["stream"], "buffer": list(self._state["buffer"])}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.stream.load_state_dict(state["stream"])
        self.buffer = list(state["buffer"])
        self._state = self._snapshot()
        self._ended = False

    @property
    def stats(self) -> RecordStats:
        return self._state["stream"]["stats"]

    def proportions(self) -> dict[str, float]:
        counts = self._state["stream"]["mixer"]["counts"]
        total = sum(counts) or 1
        return {s.path: round(c / total, 4) for s, c in zip(self.cfg.sources, counts)}


def load_samples(cfg: DataConfig, tokenizer, *, seed: int = 0, encode: Encode | None = None) -> tuple[list[Sample], RecordStats]:
    """Every sample of one pass over the sources, in streaming order (for tests and small tools)."""
    stream = SampleStream(cfg.model_copy(update={"max_epochs": 1}), tokenizer, seed=seed, encode=encode)
    samples = []
    while (s := stream.next()) is not None:
        samples.append(s)
    return samples, stream.stats
