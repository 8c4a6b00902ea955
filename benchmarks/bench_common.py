"""What the side-by-side benchmarks against TRL share: mode selection, the child processes'
environment, the interleaved run order."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def selected_modes(arg: str, table: dict, trl_python: Path) -> list[str]:
    """The comma-separated `--modes` value, checked against `table` (name -> {"side": ...})."""
    modes = [m.strip() for m in arg.split(",") if m.strip()]
    unknown = [m for m in modes if m not in table]
    if unknown:
        sys.exit(f"unknown mode(s) {unknown}; choose from {list(table)}")
    if any(table[m]["side"] == "trl" for m in modes) and not trl_python.exists():
        sys.exit(f"{trl_python} not found: run `bash benchmarks/setup_trl_venv.sh` first")
    return modes


def child_env(threads: int) -> dict[str, str]:
    """Every run's process: the same thread count, offline (nothing downloads mid-benchmark)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


def rotation(modes: list[str], rep: int) -> list[str]:
    """Repeat `rep`'s order: A B C, then B C A, ... (no mode always runs first or last)."""
    k = rep % len(modes)
    return modes[k:] + modes[:k]
