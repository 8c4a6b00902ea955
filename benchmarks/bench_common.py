"""What the side-by-side benchmarks against TRL share: the common arguments, mode selection, the child
processes' environment and their peak memory, the interleaved run order, medians, the model's size and
the markdown copy of the report."""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_run_args(ap: argparse.ArgumentParser, modes: dict, markdown: str, *, steps: int, warmup: int,
                 quick: tuple[int, int, int], repeats: int = 3, threads: int = 2) -> None:
    """The arguments every side-by-side benchmark takes; `quick` = (steps, warmup, repeats) of --quick."""
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: {quick[0]} steps ({quick[1]} warm-up), {quick[2]} repeat(s)")
    ap.add_argument("--steps", type=int, default=steps, help="optimizer steps per run (warm-up included)")
    ap.add_argument("--warmup", type=int, default=warmup, help="first steps of every run left out of the timing")
    ap.add_argument("--repeats", type=int, default=repeats, help="runs of every mode, interleaved")
    ap.add_argument("--threads", type=int, default=threads, help="torch threads of every run")
    ap.add_argument("--modes", default=",".join(modes), help="comma-separated subset of: " + ", ".join(modes))
    ap.add_argument("--markdown", default=str(ROOT / "runs" / "benchmarks" / markdown))
    ap.set_defaults(_quick=quick)


def parse_run_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, apply --quick, check the warm-up leaves timed steps."""
    a = ap.parse_args()
    if a.quick:
        a.steps, a.warmup, a.repeats = a._quick
    if not 1 <= a.warmup < a.steps:
        sys.exit("need 1 <= --warmup < --steps")
    return a


def selected_modes(arg: str, table: dict, trl_python: Path) -> list[str]:
    """The comma-separated `--modes` value, checked against `table` (name -> {"side": ...})."""
    modes = [m.strip() for m in arg.split(",") if m.strip()]
    unknown = [m for m in modes if m not in table]
    if unknown:
        sys.exit(f"unknown mode(s) {unknown}; choose from {list(table)}")
    if any(table[m]["side"] == "trl" for m in modes):
        ensure_trl_venv(trl_python)
    return modes


def ensure_trl_venv(trl_python: Path) -> None:
    """TRL's own venv (its transformers pin clashes with ours): benchmarks/setup_trl_venv.sh creates it,
    or returns at once when it is current."""
    setup = ROOT / "benchmarks" / "setup_trl_venv.sh"
    if subprocess.run(["bash", str(setup)]).returncode != 0 or not trl_python.exists():
        sys.exit(f"{trl_python}: `bash {setup.relative_to(ROOT)}` failed (it installs TRL from the package index)")


def child_env(threads: int) -> dict[str, str]:
    """Every run's process: the same thread count, offline (nothing downloads mid-benchmark)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


def rotation(modes: list[str], rep: int) -> list[str]:
    """Repeat `rep`'s order: A B C, then B C A, ... (no mode always runs first or last)."""
    k = rep % len(modes)
    return modes[k:] + modes[:k]


def run_process(cmd: list[str], log: Path, env: dict) -> tuple[int, float, float]:
    """Run cmd in the repository root, output to `log`; returns (exit code, peak RSS in GiB of that
    process, wall seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss / 2**20, time.perf_counter() - t0


def medians(results: dict[str, list[dict]], fields) -> dict[str, dict[str, float]]:
    """Per mode, the median over its repeats of each field."""
    return {k: {f: statistics.median(x[f] for x in v) for f in fields} for k, v in results.items()}


def model_params(model_dir: Path) -> int:
    """Parameters in the model directory's model.safetensors."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def write_markdown(path: str, script: str, text: str, seconds: float) -> None:
    """The report, headed by the command that made it and its duration."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"`{' '.join([Path(sys.executable).name, script, *sys.argv[1:]])}` ({seconds:.0f} s)\n\n{text}\n")
    print(f"\nmarkdown: {out}")
