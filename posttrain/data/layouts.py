"""The file layouts a source reads, each in windows that start at a resumable offset.

A layout is picked from the file name (or, for a folder, from the files `datasets`' `save_to_disk`
writes); anything else is refused with the list below, so a binary file is never parsed as JSON.

| layout | files | window | offset in the cursor |
|---|---|---|---|
| JSON Lines | `.jsonl`, `.ndjson`, `.json` not starting with `[` (`.gz`/`.zst`/`.bz2`/`.xz`) | `shuffle_window` lines | byte offset |
| JSON array | `.json` starting with `[` (the Alpaca release format) | `shuffle_window` elements | element index |
| text | `.txt`: one record `{"text": ...}` per line, or per file (`sample_by: document`) | lines / the file | byte offset |
| Parquet | `.parquet` | one row group | row group |
| Arrow | `.arrow` (IPC stream or file, as `datasets` caches and saves them) | `shuffle_window` rows | row |
| HF dataset | a folder written by `datasets.Dataset.save_to_disk` (or a `DatasetDict`'s, split `train`) | `shuffle_window` rows | row |

A JSON array file is parsed whole when its turn comes (the format cannot be streamed by the json
library); Arrow files and dataset folders are memory-mapped, so only the rows of a window are read.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any, Callable

from ..config import ConfigError

COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
SUPPORTED = (
    "JSON Lines (.jsonl, .ndjson, .json; optionally .gz/.zst/.bz2/.xz), a JSON array (.json), text (.txt), "
    "Parquet (.parquet), Arrow (.arrow), or a folder of such files or written by datasets' save_to_disk"
)
LINE_KINDS = ("jsonl", "json", "txt")  # whose cursor counts lines from 1


class CorruptFile(ConfigError):
    """A compressed file that is truncated or corrupt (raised while reading it; never retried)."""

    def __init__(self, url: str, detail: str):
        super().__init__(f"{url}: {detail}")
        self.url, self.detail = url, detail


@dataclass(frozen=True)
class CorruptData:
    """Read in place of a record where a compressed file broke; the loader makes it a bad record
    (reason `corrupt_file`) and the source goes on with its next file."""

    detail: str


class _Zstd(io.RawIOBase):
    """zstd frames decompressed from `raw`; a file that ends inside a frame raises EOFError (the
    `zstandard` stream reader returns nothing then, which would read a truncated file as empty)."""

    def __init__(self, raw):
        import zstandard

        self.raw, self.zstd = raw, zstandard
        self.d, self.mid, self.buf, self.at, self.done = zstandard.ZstdDecompressor().decompressobj(), False, b"", 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self.at >= len(self.buf) and not self.done:
            chunk = self.raw.read(1 << 16)
            if not chunk:
                if self.mid:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                self.done = True
                break
            out = []
            while chunk:
                out.append(self.d.decompress(chunk))
                self.mid = not self.d.eof
                chunk = b""
                if self.d.eof:
                    chunk, self.d = self.d.unused_data, self.zstd.ZstdDecompressor().decompressobj()
            self.buf, self.at = b"".join(out), 0
        n = min(len(b), len(self.buf) - self.at)  # an offset into buf, not a copy of its rest per read
        b[:n] = self.buf[self.at: self.at + n]
        self.at += n
        return n


COMPRESSED = (".gz", ".zst", ".bz2", ".xz")


class Decompressed(io.RawIOBase):
    """A `.gz`, `.zst`, `.bz2` or `.xz` file, decompressed (the stdlib's gzip/bz2/lzma readers, or
    zstandard's); truncation or corruption raises `CorruptFile` naming the file and the compressed
    byte where it broke."""

    def __init__(self, url: str, raw):
        import bz2
        import gzip
        import lzma
        import zlib

        self.url, self.raw = url, raw
        ext = url.lower().rsplit(".", 1)[-1]
        self.kind = {"gz": "gzip", "zst": "zstd", "bz2": "bzip2", "xz": "xz"}[ext]
        self.inner = {"gz": lambda: gzip.GzipFile(fileobj=raw, mode="rb"), "zst": lambda: _Zstd(raw),
                      "bz2": lambda: bz2.BZ2File(raw, mode="rb"), "xz": lambda: lzma.LZMAFile(raw, mode="rb")}[ext]()
        corrupt: list[type] = [EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError]
        try:
            import zstandard

            corrupt.append(zstandard.ZstdError)
        except ImportError:  # pragma: no cover - only .gz then
            pass
        self.corrupt = tuple(corrupt)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            return self.inner.readinto(b)
        except self.corrupt as e:
            raise self._corrupt(e) from None
        except OSError as e:
            # bz2's decompressor reports a damaged stream as a bare OSError("Invalid data stream"),
            # without the errno that a failing read of the file itself carries
            if self.kind == "bzip2" and e.errno is None:
                raise self._corrupt(e) from None
            raise

    def _corrupt(self, e: BaseException) -> "CorruptFile":
        try:
            at = f" near compressed byte {self.raw.tell()}"
        except (OSError, ValueError, AttributeError):
            at = ""
        return CorruptFile(self.url, f"the {self.kind} file is truncated or corrupt{at} ({type(e).__name__}: {e})")

    def close(self) -> None:
        if not self.closed:
            try:
                self.inner.close()
            finally:
                self.raw.close()
        super().close()


@dataclass(frozen=True)
class RawText:
    """A text record still as bytes: decoded (and refused if not UTF-8) by `parse_record`."""

    data: bytes


def kind_of(url: str) -> str | None:
    """The layout of a file from its name, or None if it is not a supported one."""
    name = posixpath.basename(url.lower())
    stem = next((name[: -len(c)] for c in COMPRESSIONS if name.endswith(c)), name)
    compressed = stem != name
    for ext, kind in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".txt", "txt")):
        if stem.endswith(ext):
            return kind
    if not compressed:
        if name.endswith(".parquet"):
            return "parquet"
        if name.endswith(".arrow"):
            return "arrow"
    return None


def is_dataset_dir(fs, path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return fs.isfile(posixpath.join(path, "dataset_dict.json")) or (
        fs.isfile(posixpath.join(path, "state.json")) and fs.isfile(posixpath.join(path, "dataset_info.json")))


Window = tuple[list[tuple[str, Any]], int, int]  # (where, raw) items, next offset (-1: end of file), next line


class LinesReader:
    """JSON Lines, or `.txt` one record per line. Reads from a byte offset; empty lines are skipped."""

    def __init__(self, url: str, open_: Callable, *, text: bool = False):
        self.url, self.open, self.text = url, open_, text

    def read(self, offset: int, line: int, size: int) -> Window:
        items, at = [], [line]  # at[0]: the line being read
        try:
            return self._read(items, at, offset, line, size)
        except CorruptFile as e:  # the file ends here: what was read, then the break as a bad record
            items.append((f"{self.url}:{at[0]}", CorruptData(f"{e.detail}, at line {at[0]}")))
            return items, -1, at[0]

    def _read(self, items: list, at: list, offset: int, line: int, size: int) -> Window:
        off, ln = offset, line
        with self.open() as f:
            if offset:
                if f.seekable():
                    f.seek(offset)
                else:  # some decompressors cannot seek: read forward
                    remaining = offset
                    while remaining:
                        remaining -= len(f.read(min(remaining, 1 << 20)))
            while len(items) < size:
                raw = f.readline()
                if not raw:
                    return items, -1, ln  # end of file
                off += len(raw)
                if raw.strip():
                    items.append((f"{self.url}:{ln}", RawText(raw.rstrip(b"\r\n")) if self.text else raw))
                ln += 1
                at[0] = ln
            more = bool(f.read(1))
        return items, (off if more else -1), ln


class TextFileReader:
    """`.txt` with `sample_by: document`: the whole file is one `{"text": ...}` record."""

    def __init__(self, url: str, open_: Callable):
        self.url, self.open = url, open_

    def read(self, offset: int, line: int, size: int) -> Window:
        try:
            with self.open() as f:
                return [(self.url, RawText(f.read()))], -1, 0
        except CorruptFile as e:
            return [(self.url, CorruptData(e.detail))], -1, 0


class JsonArrayReader:
    """A `.json` file holding one array of records, parsed once when its first window is read."""

    def __init__(self, url: str, open_: Callable):
        self.url, self.open, self.records = url, open_, None

    def read(self, offset: int, line: int, size: int) -> Window:
        if self.records is None:
            with self.open() as f:
                try:
                    self.records = json.load(io.TextIOWrapper(f, encoding="utf-8"))
                except CorruptFile:
                    raise
                except (ValueError, UnicodeDecodeError) as e:
                    pos = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
                    raise ConfigError(f"data.sources: {self.url}: not a valid JSON array file ({getattr(e, 'msg', e)}{pos})") from None
        end = min(offset + size, len(self.records))
        items = [(f"{self.url}:record={i}", self.records[i]) for i in range(offset, end)]
        return items, (end if end < len(self.records) else -1), 0


class ParquetReader:
    """One row group per window."""

    def __init__(self, url: str, open_: Callable):
        self.url, self.open = url, open_

    def read(self, offset: int, line: int, size: int) -> Window:
        import pyarrow.parquet as pq

        with self.open() as f:
            pf = pq.ParquetFile(f)
            if pf.num_row_groups == 0:
                return [], -1, 0
            rows = pf.read_row_group(offset).to_pylist()
            more = offset + 1 < pf.num_row_groups
        items = [(f"{self.url}:row_group={offset}:row={i}", r) for i, r in enumerate(rows)]
        return items, (offset + 1 if more else -1), 0


class TableReader:
    """Rows of an Arrow table (an `.arrow` file) or of a `datasets.Dataset` (a `save_to_disk` folder)
    in windows of `size` rows; both slice to a pyarrow Table."""

    def __init__(self, url: str, load: Callable):
        self.url, self.load, self.table = url, load, None

    def read(self, offset: int, line: int, size: int) -> Window:
        if self.table is None:
            self.table = self.load()
        rows = self.table[offset: offset + size].to_pylist()
        end = offset + len(rows)
        items = [(f"{self.url}:row={offset + i}", r) for i, r in enumerate(rows)]
        return items, (end if end < self.table.num_rows else -1), 0


def local_path(url: str) -> str | None:
    """The path of a local source (a plain path or a file:// URL), or None for a remote one (s3://, ...)."""
    return url[len("file://"):] if url.startswith("file://") else url if "://" not in url else None


def _arrow_table(url: str, open_: Callable):
    """An Arrow IPC file or stream (`datasets` writes streams) as a table; memory-mapped when local."""
    import pyarrow as pa

    local = local_path(url)
    if local is not None:
        src = pa.memory_map(local)
    else:
        with open_() as f:
            src = pa.BufferReader(f.read())
    for opener in (pa.ipc.open_file, pa.ipc.open_stream):
        try:
            src.seek(0)
            return opener(src).read_all()
        except pa.ArrowInvalid:
            continue
    raise ConfigError(f"data.sources: {url}: not an Arrow IPC file or stream")


def _dataset_table(url: str, storage_options: dict):
    """The rows of a `save_to_disk` folder, through `datasets` (memory-mapped, indices applied)."""
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"data.sources: {url} is a Hugging Face datasets folder; reading it needs `pip install datasets`") from e
    ds = datasets.load_from_disk(url, storage_options=storage_options or None)
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        if "train" not in ds and len(splits) != 1:
            raise ConfigError(f"data.sources: {url} holds splits {splits} and none is 'train'; give the split's folder, e.g. {url}/{splits[0]}")
        ds = ds["train"] if "train" in ds else ds[splits[0]]
    return ds.with_format("arrow")  # a slice of it is a pyarrow Table, with any indices mapping applied


def make_reader(url: str, kind: str, open_: Callable, *, sample_by: str = "line", storage_options: dict | None = None):
    """The reader for one file (or dataset folder) of the given layout."""
    if kind == "jsonl":
        return LinesReader(url, open_)
    if kind == "txt":
        return TextFileReader(url, open_) if sample_by == "document" else LinesReader(url, open_, text=True)
    if kind == "json":
        with open_() as f:
            head = f.read(4096).lstrip()
            while not head:
                chunk = f.read(4096)
                if not chunk:
                    break
                head = chunk.lstrip()
        return JsonArrayReader(url, open_) if head.startswith(b"[") else LinesReader(url, open_)
    if kind == "parquet":
        return ParquetReader(url, open_)
    if kind == "arrow":
        return TableReader(url, lambda: _arrow_table(url, open_))
    if kind == "dataset":
        return TableReader(url, lambda: _dataset_table(url, storage_options or {}))
    raise ConfigError(f"data.sources: {url}: unsupported layout; supported: {SUPPORTED}")
