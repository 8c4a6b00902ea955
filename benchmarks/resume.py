"""Checkpoint overhead: time of one save, as a share of the training time between saves.

Runs the demo job (tiny Qwen3 built locally, bundled chat data) with checkpoints every K steps,
full fine-tuning and LoRA, and reads the save times off metrics.jsonl: the wall time between the
logs of steps k and k+1 minus step k+1's own time is the save after step k. Prints a table.

    python benchmarks/resume.py            # ~2 minutes on 2 CPU cores
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


def measure(tmp: Path, name: str, every: int, steps: int, lora: bool) -> dict:
    job = yaml.safe_load((ROOT / "examples" / "sft_demo.yaml").read_text())
    job["train"]["steps"] = steps
    job["compute"].update(output_dir=str(tmp / name), checkpoint_every=every, progress=False, keep_checkpoints=2)
    job["export"] = {"enabled": False}
    if lora:
        job["model"]["lora"] = {"rank": 16}
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(job))
    subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(tmp / f"{name}.yaml")], cwd=ROOT, check=True,
                   capture_output=True)
    rows = [json.loads(l) for l in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    saves, steps_t = [], []
    for prev, cur in zip(rows, rows[1:]):
        steps_t.append(cur["step_time_s"])
        if prev["step"] % every == 0:
            saves.append((cur["time"] - prev["time"]) - cur["step_time_s"])
    step_s = statistics.median(steps_t)
    save_s = statistics.median(saves)
    size = sum(f.stat().st_size for f in (tmp / name / "checkpoints").rglob("*") if f.is_file()) / 2  # 2 kept
    return {"step_s": step_s, "save_s": save_s, "overhead": save_s / (every * step_s), "mb": size / 2**20}


def main() -> None:
    if not (MODEL / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "build_tiny_model.py"), str(MODEL)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [(label, every, measure(tmp, f"{label}-{every}", every, 4 * every + 1, lora))
                for label, lora in (("full", False), ("lora r16", True)) for every in (5, 25)]
    print("\ntiny Qwen3 (3.5M params) demo job, 2048-token packed micro-batches, 2 CPU threads\n")
    print("| fine-tuning | checkpoint_every | step time | save time | checkpoint size | overhead (save / steps between saves) |")
    print("|---|---|---|---|---|---|")
    for label, every, r in rows:
        print(f"| {label} | {every} | {r['step_s'] * 1e3:.0f} ms | {r['save_s'] * 1e3:.0f} ms | {r['mb']:.1f} MiB | {r['overhead']:.1%} |")


if __name__ == "__main__":
    main()
