"""Streaming record sources over fsspec (local paths, globs, s3://, gs://, ...), with an exact cursor.

A source reads its files in *windows* (`shuffle_window` lines of JSONL, or one Parquet row group),
permutes each window with an RNG seeded by (seed, epoch, file, window), and keeps the records whose
position falls to this data-parallel rank. Memory is one window, whatever the file size. The cursor
is (epoch, file, window start offset, position in window): restoring it re-reads only that window,
so a resumed source yields exactly the records the uninterrupted one would have.

Transient read errors are retried with exponential backoff; a missing file or bucket is an error
naming the URL.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

from ..config import ConfigError

RETRIES = 5
BACKOFF_S = 0.2
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def with_retries(fn, what: str):
    """Call fn(); retry transient OSErrors with exponential backoff; never retry a permanent one."""
    for attempt in range(RETRIES):
        try:
            return fn()
        except _PERMANENT:
            raise
        except (OSError, TimeoutError, ConnectionError) as e:
            if attempt == RETRIES - 1:
                raise OSError(f"{what}: still failing after {RETRIES} attempts: {e}") from e
            time.sleep(BACKOFF_S * 2**attempt)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


@dataclass
class Cursor:
    epoch: int = 0
    file: int = 0  # index into this epoch's file order
    window_offset: int = 0  # byte offset (JSONL) or row group (Parquet) where the window starts
    window_line: int = 1  # 1-based line number of the window's first line (JSONL)
    pos: int = 0  # next position inside the permuted window
    index: int = 0  # records passed in this epoch, all ranks: record k belongs to rank k % world


class Source:
    """One path or glob; yields (where, record-or-error-string) tuples for this rank."""

    def __init__(
        self,
        path: str,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        window: int = 1024,
        storage_options: dict | None = None,
    ):
        self.path, self.seed, self.rank, self.world = path, seed, rank, world_size
        self.shuffle, self.window_size = shuffle, window
        self.fs, self.files = self._expand(path, storage_options or {})
        self.fmt = "parquet" if all(f.endswith(".parquet") for f in self.files) else "jsonl"
        self.cursor = Cursor()
        self._window: list[tuple[str, Any]] | None = None  # permuted (where, raw) of the current window
        self._next_offset = 0
        self._next_line = 1

    # ---------------------------------------------------------------------------------- files
    @staticmethod
    def _expand(path: str, storage_options: dict):
        try:
            fs, _, paths = fsspec.get_fs_token_paths(path, storage_options=storage_options)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"data.sources: cannot open {path!r}: {e}") from e
        try:
            expanded = with_retries(lambda: fs.expand_path(paths, recursive=False), path)
            files = sorted(p for p in expanded if with_retries(lambda: fs.isfile(p), path))
        except FileNotFoundError:
            files = []
        except OSError as e:
            raise ConfigError(f"data.sources: cannot list {path!r}: {e}") from e
        if not files:
            raise ConfigError(f"data.sources: {path!r} matches no file (missing file, bucket or prefix?)")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        urls = [f if "://" in f or protocol in ("file", "local") else f"{protocol}://{f}" for f in files]
        return fs, urls

    def _epoch_files(self, epoch: int) -> list[str]:
        files = list(self.files)
        if self.shuffle:
            random.Random(_seed(self.seed, "files", epoch)).shuffle(files)
        return files

    def _open(self, url: str):
        def op():
            f = fsspec.open(url, "rb", compression="infer", **self._fs_kwargs()).open()
            # zstd's decompression reader has read/readinto but no readline: buffer it
            return f if isinstance(f, io.BufferedIOBase) or hasattr(f, "peek") else io.BufferedReader(f)

        try:
            return with_retries(op, url)
        except FileNotFoundError as e:
            raise ConfigError(f"data.sources: no such file {url!r}") from e

    def _fs_kwargs(self) -> dict:
        return dict(getattr(self.fs, "storage_options", {}) or {})

    # -------------------------------------------------------------------------------- windows
    def _read_window(self) -> None:
        """Read the window at the cursor, permute it, keep it in memory."""
        c = self.cursor
        url = self._epoch_files(c.epoch)[c.file]
        if self.fmt == "parquet":
            rows, more = self._read_parquet_group(url, c.window_offset)
            items = [(f"{url}:row_group={c.window_offset}:row={i}", r) for i, r in enumerate(rows)]
            self._next_offset, self._next_line = (c.window_offset + 1 if more else -1), 0
        else:
            items, self._next_offset, self._next_line = self._read_jsonl_lines(url, c.window_offset, c.window_line)
        if self.shuffle:
            random.Random(_seed(self.seed, "window", c.epoch, url, c.window_offset)).shuffle(items)
        self._window = items

    def _read_jsonl_lines(self, url: str, offset: int, line: int):
        def read():
            items, off, ln = [], offset, line
            with self._open(url) as f:
                if offset:
                    if f.seekable():
                        f.seek(offset)
                    else:  # some decompressors cannot seek: read forward
                        remaining = offset
                        while remaining:
                            remaining -= len(f.read(min(remaining, 1 << 20)))
                while len(items) < self.window_size:
                    raw = f.readline()
                    if not raw:
                        return items, -1, ln  # end of file
                    off += len(raw)
                    if raw.strip():
                        items.append((f"{url}:{ln}", raw))
                    ln += 1
                more = bool(f.read(1))
            return items, (off if more else -1), ln

        return with_retries(read, url)

    def _read_parquet_group(self, url: str, group: int):
        import pyarrow.parquet as pq

        def read():
            with self._open(url) as f:
                pf = pq.ParquetFile(f)
                if pf.num_row_groups == 0:
                    return [], False
                return pf.read_row_group(group).to_pylist(), group + 1 < pf.num_row_groups

        return with_retries(read, url)

    # ------------------------------------------------------------------------------ iteration
    def next(self) -> tuple[str, Any] | None:
        """Next (where, raw) of this rank in this epoch, or None when the epoch is exhausted."""
        while True:
            c = self.cursor
            if c.file >= len(self.files):
                return None
            if self._window is None:
                self._read_window()
            while c.pos < len(self._window):
                item = self._window[c.pos]
                c.pos += 1
                c.index += 1
                if (c.index - 1) % self.world == self.rank:
                    return item
            # window done: move to the next window or file
            self._window = None
            if self._next_offset == -1:
                c.file, c.window_offset, c.window_line, c.pos = c.file + 1, 0, 1 if self.fmt == "jsonl" else 0, 0
            else:
                c.window_offset, c.window_line, c.pos = self._next_offset, self._next_line, 0

    def start_epoch(self, epoch: int) -> None:
        self.cursor = Cursor(epoch=epoch, window_line=1 if self.fmt == "jsonl" else 0)
        self._window = None

    def state_dict(self) -> dict:
        return {"path": self.path, "cursor": asdict(self.cursor)}

    def load_state_dict(self, state: dict) -> None:
        if state["path"] != self.path:
            raise ValueError(f"data state is for source {state['path']!r}, not {self.path!r}")
        self.cursor = Cursor(**state["cursor"])
        self._window = None


def parse_record(raw) -> Any:
    """bytes/str line -> decoded JSON (or the raw object for Parquet rows); raises ValueError."""
    if isinstance(raw, (bytes, str)):
        return json.loads(raw)
    return raw
