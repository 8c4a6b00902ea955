"""Atomic file writes: a reader sees the old content or the new, never a half-written file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable


def write(path: str | Path, writer: Callable[[IO[bytes]], object]) -> None:
    """`writer(binary file)` writes a temporary sibling, which is fsynced, then renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: leave no half-written temporary behind
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    write(path, lambda fh: fh.write(text.encode()))


def remove_temporaries(directory: str | Path, names: list[str]) -> list[Path]:
    """Remove the temporaries that `write` left for these file names in `directory` (a killed
    writer); call only where no other process is writing them."""
    found = [p for name in names for p in Path(directory).glob(f".{name}.tmp-*")]
    for p in found:
        p.unlink(missing_ok=True)
    return found
