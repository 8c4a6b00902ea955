"""Records -> tokenized samples, with the bad-record policy.

A record is one JSON object per line: `{"messages": [...]}`, `{"prompt": ..., "completion": ...}`
or `{"text": ...}`. Every failure (bad JSON, missing or mistyped fields, a sample with nothing to
train on, an overlong sample under `overlong: drop`) is a `BadRecord` naming `file:line` and the
reason; `on_bad_record: error` stops the job with it, `skip` counts it per reason.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import fsspec

from ..config import ConfigError, DataConfig, resolve_import_path
from .chat import ChatTemplateError, EmptyMaskError, encode_messages, encode_prompt_completion, encode_text


class BadRecord(ValueError):
    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.where, self.reason, self.detail = where, reason, detail


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss
    where: str  # file:line, for error messages


@dataclass
class RecordStats:
    seen: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"records: {self.seen} read, {self.kept} kept, {self.truncated} truncated; skipped: {skipped}"


def read_jsonl(path: str) -> Iterator[tuple[str, dict | BadRecord]]:
    """Yield (file:line, record or BadRecord) for every non-empty line of a (local or remote) JSONL file."""
    try:
        files = fsspec.open_files(path, "rt", encoding="utf-8", compression="infer", expand=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.sources: cannot open {path!r}: {e}") from e
    if not files:
        raise ConfigError(f"data.sources: {path!r} matches no file")
    for f in files:
        try:
            fh = f.open()
        except FileNotFoundError as e:
            raise ConfigError(f"data.sources: no such file {f.path!r}") from e
        with fh:
            for lineno, line in enumerate(fh, 1):
                where = f"{f.path}:{lineno}"
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, BadRecord(where, "invalid_json", f"invalid JSON ({e.msg} at column {e.colno})")
                    continue
                if not isinstance(rec, dict):
                    yield where, BadRecord(where, "not_an_object", f"expected a JSON object, got {type(rec).__name__}")
                    continue
                yield where, rec


def _check_messages(msgs) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list of {role, content} objects"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"messages[{i}] must be an object with a string 'role'"
        if "content" not in m:
            return f"messages[{i}] has no 'content'"
        c = m["content"]
        if not (c is None or isinstance(c, (str, list))):
            return f"messages[{i}].content must be a string or a list of parts, got {type(c).__name__}"
    return None


def encode_record(tokenizer, rec: dict, where: str, fmt: str) -> Sample:
    """One record -> Sample, or raise BadRecord naming the reason."""
    if fmt == "auto":
        fmt = "messages" if "messages" in rec else "prompt_completion" if "prompt" in rec else "text" if "text" in rec else None
        if fmt is None:
            keys = ", ".join(sorted(rec)) or "none"
            raise BadRecord(where, "missing_field", f"record has none of 'messages', 'prompt'+'completion', 'text' (keys: {keys})")
    try:
        if fmt == "messages":
            if (err := _check_messages(rec.get("messages"))) is not None:
                raise BadRecord(where, "wrong_type" if "messages" in rec else "missing_field", err)
            enc = encode_messages(tokenizer, rec["messages"], tools=rec.get("tools"))
        elif fmt == "prompt_completion":
            p, c = rec.get("prompt"), rec.get("completion")
            if p is None or c is None:
                raise BadRecord(where, "missing_field", "prompt/completion record needs both 'prompt' and 'completion'")
            if isinstance(p, str) != isinstance(c, str) or not isinstance(p, (str, list)):
                raise BadRecord(where, "wrong_type", "'prompt' and 'completion' must both be strings or both lists of messages")
            enc = encode_prompt_completion(tokenizer, p, c)
        else:
            if not isinstance(rec.get("text"), str):
                raise BadRecord(where, "wrong_type" if "text" in rec else "missing_field", "'text' must be a string")
            enc = encode_text(tokenizer, rec["text"])
    except EmptyMaskError as e:
        raise BadRecord(where, "empty_mask", f"nothing to train on: {e}") from e
    except ChatTemplateError as e:
        raise BadRecord(where, "template", str(e)) from e
    labels = [t if m else -100 for t, m in zip(enc.input_ids, enc.loss_mask)]
    return Sample(list(enc.input_ids), labels, where)


def load_samples(cfg: DataConfig, tokenizer, stats: RecordStats | None = None) -> tuple[list[Sample], RecordStats]:
    """Read and tokenize every source under the bad-record and overlong policies."""
    stats = stats or RecordStats()
    transform: Callable | None = resolve_import_path(cfg.transform, key="data.transform") if cfg.transform else None
    samples = []
    for src in cfg.sources:
        for where, rec in read_jsonl(src.path):
            stats.seen += 1
            try:
                if isinstance(rec, BadRecord):
                    raise rec
                if transform is not None:
                    rec = transform(rec)
                    if rec is None:
                        stats.skipped["filtered"] += 1
                        continue
                sample = encode_record(tokenizer, rec, where, cfg.format)
                sample = fit_length(sample, cfg.max_seq_len, cfg.overlong, stats)
            except BadRecord as bad:
                if cfg.on_bad_record == "error":
                    raise BadRecord(bad.where, bad.reason, bad.detail + " (data.on_bad_record: error; set it to 'skip' to count and skip such records)") from None
                stats.skipped[bad.reason] += 1
                continue
            stats.kept += 1
            samples.append(sample)
    if not samples:
        raise ConfigError(f"data.sources: no usable sample ({stats.summary()})")
    return samples, stats


def fit_length(s: Sample, max_len: int, policy: str, stats: RecordStats) -> Sample:
    if len(s.input_ids) <= max_len:
        return s
    if policy == "drop":
        raise BadRecord(s.where, "overlong", f"{len(s.input_ids)} tokens > data.max_seq_len={max_len} (data.overlong: drop)")
    labels = s.labels[:max_len]
    if all(lab == -100 for lab in labels[1:]):
        raise BadRecord(s.where, "empty_mask", f"nothing to train on after truncation to data.max_seq_len={max_len}")
    stats.truncated += 1
    return Sample(s.input_ids[:max_len], labels, s.where)
