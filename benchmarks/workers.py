"""Tokens/s and MFU of the demo job at compute.workers = 1 and 2 (same global batch), side by side.

workers=1 runs in one process with 2 threads and grad_accum=2; workers=2 runs two Ray workers with
one thread each (FSDP2 over gloo) and grad_accum=1, so both see the same documents per step.

    python benchmarks/workers.py           # ~3 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / ".cache" / "tiny-qwen3"


def measure(tmp: Path, workers: int, steps: int) -> dict:
    job = yaml.safe_load((ROOT / "examples" / "sft_demo.yaml").read_text())
    job["train"].update(steps=steps, grad_accum=2 // workers)
    job["compute"].update(output_dir=str(tmp / f"w{workers}"), workers=workers, progress=False,
                          cpus_per_worker=2 // workers, threads=2 // workers)
    job["export"] = {"enabled": False}
    (tmp / f"w{workers}.yaml").write_text(yaml.safe_dump(job))
    subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(tmp / f"w{workers}.yaml")], cwd=ROOT, check=True,
                   capture_output=True)
    rows = [json.loads(l) for l in (tmp / f"w{workers}" / "metrics.jsonl").read_text().splitlines()][3:]  # warm-up
    return {k: statistics.median(r[k] for r in rows) for k in ("tokens_per_s", "mfu", "hfu", "step_time_s", "data_wait")}


def main() -> None:
    if not (MODEL / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "build_tiny_model.py"), str(MODEL)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        res = {w: measure(Path(tmp), w, 25) for w in (1, 2)}
    print("\ndemo job (tiny Qwen3, 3.5M params, fp32), global batch 2 x 2048 packed tokens, 2 CPU cores in all\n")
    print("| workers | tokens/s | step time | MFU | HFU | data wait |")
    print("|---|---|---|---|---|---|")
    for w, r in res.items():
        print(f"| {w} | {r['tokens_per_s']:,.0f} | {r['step_time_s'] * 1e3:.0f} ms | {r['mfu']:.1%} | {r['hfu']:.1%} | {r['data_wait']:.1%} |")


if __name__ == "__main__":
    main()
