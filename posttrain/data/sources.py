"""Streaming record sources over fsspec (local paths, globs, folders, s3://, gs://, ...), with an exact cursor.

A source is a file, a glob, or a folder (every supported file in it, recursively, sorted; or a
folder written by `datasets`' `save_to_disk`). Each file is read by the reader of its layout
(`layouts.py`: JSON Lines, JSON array, text, Parquet, Arrow, HF dataset folder) in *windows*
(`shuffle_window` records, or one Parquet row group); a window is permuted with an RNG seeded by
(seed, epoch, file, window) and the records whose position falls to this data-parallel rank are
kept. Memory is one window, whatever the file size (a JSON array file is parsed whole). The cursor
is (epoch, file, window start offset, position in window): restoring it re-reads only that window,
so a resumed source yields exactly the records the uninterrupted one would have.

Transient read errors are retried with exponential backoff; a missing file or bucket is an error
naming the URL; a file of no supported layout is an error listing the supported ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import fsspec

from ..config import ConfigError
from .layouts import COMPRESSED, LINE_KINDS, SUPPORTED, CorruptData, Decompressed, RawText, is_dataset_dir, kind_of, make_reader

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
    window_offset: int = 0  # where the window starts: byte offset (lines), row group (Parquet), row or element index
    window_line: int = 1  # 1-based line number of the window's first line (line layouts; 0 for the others)
    pos: int = 0  # next position inside the permuted window
    index: int = 0  # records passed in this epoch, all ranks: record k belongs to rank k % world


class Source:
    """One path, glob or folder; yields (where, record-or-raw) tuples for this rank."""

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
        sample_by: str = "line",
        index: int = 0,
    ):
        # `index` (its place in data.sources) and each file's place in the sorted listing seed its
        # shuffles, never the files' location: the same job trains in the same order wherever its
        # data is checked out or copied to
        self.path, self.seed, self.rank, self.world, self.index = path, seed, rank, world_size, index
        self.shuffle, self.window_size, self.sample_by = shuffle, window, sample_by
        self.fs, self.files, self.kinds = self._expand(path, storage_options or {})
        self.cursor = Cursor(window_line=self._first_line(0))
        self._window: list[tuple[str, Any]] | None = None  # permuted (where, raw) of the current window
        self._reader: tuple[str, Any] | None = None  # (url, reader) of the file being read
        self._next_offset = 0
        self._next_line = 1

    # ---------------------------------------------------------------------------------- files
    @staticmethod
    def _expand(path: str, storage_options: dict):
        """(fs, sorted URLs, {URL: layout}); a folder contributes its supported files or itself
        (a `save_to_disk` folder)."""
        try:
            fs, _, paths = fsspec.get_fs_token_paths(path, storage_options=storage_options)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"data.sources: cannot open {path!r}: {e}") from e
        kinds: dict[str, str] = {}
        try:
            expanded = with_retries(lambda: fs.expand_path(paths, recursive=False), path)
            for p in expanded:
                if with_retries(lambda: fs.isfile(p), path):
                    if (kind := kind_of(p)) is None:
                        raise ConfigError(f"data.sources: {p!r} is of no supported layout; supported: {SUPPORTED}")
                    kinds[p] = kind
                elif with_retries(lambda: fs.isdir(p), path):
                    kinds.update(Source._folder(fs, p, path))
        except FileNotFoundError:
            kinds = {}
        except OSError as e:
            raise ConfigError(f"data.sources: cannot list {path!r}: {e}") from e
        if not kinds:
            raise ConfigError(f"data.sources: {path!r} matches no file (missing file, bucket or prefix?)")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        url = {f: f if "://" in f or protocol in ("file", "local") else f"{protocol}://{f}" for f in kinds}
        return fs, sorted(url.values()), {url[f]: k for f, k in kinds.items()}

    @staticmethod
    def _folder(fs, folder: str, path: str) -> dict[str, str]:
        if with_retries(lambda: is_dataset_dir(fs, folder), path):
            return {folder: "dataset"}
        found = with_retries(lambda: fs.find(folder), path)
        visible = [f for f in found if not any(part.startswith((".", "_")) for part in posixpath.relpath(f, folder).split("/"))]
        kinds = {f: k for f in visible if (k := kind_of(f)) is not None}
        if not kinds:
            others = sorted({posixpath.splitext(f)[1] or posixpath.basename(f) for f in visible})
            raise ConfigError(f"data.sources: folder {folder!r} has no file of a supported layout "
                              f"(found: {', '.join(others) or 'nothing'}); supported: {SUPPORTED}")
        return kinds

    def _epoch_files(self, epoch: int) -> list[str]:
        files = list(self.files)
        if self.shuffle:
            random.Random(_seed(self.seed, "files", self.index, epoch)).shuffle(files)
        return files

    def _first_line(self, file: int, epoch: int = 0) -> int:
        if file >= len(self.files):
            return 0
        return 1 if self.kinds[self._epoch_files(epoch)[file]] in LINE_KINDS else 0

    def _open(self, url: str):
        def op():
            if url.lower().endswith(COMPRESSED):  # our decompressor: a broken file is named, not retried
                return io.BufferedReader(Decompressed(url, fsspec.open(url, "rb", **self._fs_kwargs()).open()))
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
    def _reader_of(self, url: str):
        if self._reader is None or self._reader[0] != url:
            reader = with_retries(lambda: make_reader(url, self.kinds[url], lambda: self._open(url), sample_by=self.sample_by,
                                                      storage_options=self._fs_kwargs()), url)
            self._reader = (url, reader)
        return self._reader[1]

    def _read_window(self) -> None:
        """Read the window at the cursor, permute it, keep it in memory."""
        c = self.cursor
        url = self._epoch_files(c.epoch)[c.file]
        reader = self._reader_of(url)
        items, self._next_offset, self._next_line = with_retries(lambda: reader.read(c.window_offset, c.window_line, self.window_size), url)
        if self.shuffle:
            random.Random(_seed(self.seed, "window", self.index, c.epoch, self.files.index(url), c.window_offset)).shuffle(items)
        self._window = items

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
                c.file, c.window_offset, c.window_line, c.pos = c.file + 1, 0, self._first_line(c.file + 1, c.epoch), 0
            else:
                c.window_offset, c.window_line, c.pos = self._next_offset, self._next_line, 0

    def start_epoch(self, epoch: int) -> None:
        self.cursor = Cursor(epoch=epoch, window_line=self._first_line(0, epoch))
        self._window = None

    def state_dict(self) -> dict:
        return {"path": self.path, "cursor": asdict(self.cursor)}

    def load_state_dict(self, state: dict) -> None:
        if state["path"] != self.path:
            raise ValueError(f"data state is for source {state['path']!r}, not {self.path!r}")
        self.cursor = Cursor(**state["cursor"])
        self._window = None


class CorruptRecord(ValueError):
    """Where a compressed file broke (the loader's bad-record reason `corrupt_file`)."""


def parse_record(raw) -> Any:
    """bytes/str line -> decoded JSON; a text line or file -> {"text": ...}; a row or JSON array
    element as it is. Raises ValueError (bad JSON) or UnicodeDecodeError (text that is not UTF-8)."""
    if isinstance(raw, RawText):
        return {"text": raw.data.decode("utf-8")}
    if isinstance(raw, CorruptData):
        raise CorruptRecord(raw.detail)
    if isinstance(raw, (bytes, str)):
        return json.loads(raw)
    return raw
