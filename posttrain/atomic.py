"""Atomic file writes: a reader sees the old content or the new, never a half-written file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable


def write(path: str | Path, writer: Callable[[IO[bytes]], object]) -> None:
    """`writer(binary file)` writes a temporary sibling, which is fsynced, then renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        writer(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    write(path, lambda fh: fh.write(text.encode()))
