"""Checkpoint overhead: time of one save, as a share of the training time between saves.

Runs the demo job (tiny Qwen3 built locally, bundled chat data) with checkpoints every K steps,
full fine-tuning and LoRA, and reads the save times off metrics.jsonl: the wall time between the
logs of steps k and k+1 minus step k+1's own time is the save after step k. Prints a table.

Then synchronous against background saves (`compute.async_checkpoint`), where a save's cost is no
longer a gap between two steps but the staging copy at the step plus whatever the writer thread
takes from the steps that run beside it: the same job without checkpoints, with synchronous and
with background ones every 5 steps, interleaved over `--repeats`, each run's wall time from its
first to its last step log; overhead = median wall time / median wall time without checkpoints - 1.

    python benchmarks/resume.py            # ~6 minutes on 2 idle CPU cores
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


def run(tmp: Path, name: str, every: int | None, steps: int, lora: bool = False, background: bool = False) -> list[dict]:
    job = yaml.safe_load((ROOT / "examples" / "sft_demo.yaml").read_text())
    job["train"]["steps"] = steps
    job["compute"].update(output_dir=str(tmp / name), checkpoint_every=every, checkpoint_every_minutes=None, progress=False,
                          keep_checkpoints=2, async_checkpoint=background)
    job["export"] = {"enabled": False}
    if lora:
        job["model"]["lora"] = {"rank": 16}
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(job))
    subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(tmp / f"{name}.yaml"), "--overwrite"], cwd=ROOT, check=True,
                   capture_output=True)
    return [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]


def measure(tmp: Path, name: str, every: int, steps: int, lora: bool) -> dict:
    rows = run(tmp, name, every, steps, lora)
    saves, steps_t = [], []
    for prev, cur in zip(rows, rows[1:]):
        steps_t.append(cur["step_time_s"])
        if prev["step"] % every == 0:
            saves.append((cur["time"] - prev["time"]) - cur["step_time_s"])
    step_s = statistics.median(steps_t)
    save_s = statistics.median(saves)
    size = sum(f.stat().st_size for f in (tmp / name / "checkpoints").rglob("*") if f.is_file()) / 2  # 2 kept
    return {"step_s": step_s, "save_s": save_s, "overhead": save_s / (every * step_s), "mb": size / 2**20}


def background_vs_sync(tmp: Path, repeats: int, steps: int) -> None:
    modes = {"no checkpoints": (None, False), "every 5 steps, synchronous": (5, False), "every 5 steps, background": (5, True)}
    walls: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(repeats):
        order = list(modes)[rep % len(modes):] + list(modes)[:rep % len(modes)]
        for m in order:
            every, background = modes[m]
            rows = run(tmp, f"bg-{rep}-{list(modes).index(m)}", every, steps, background=background)
            walls[m].append(rows[-1]["time"] - rows[0]["time"])
    base = statistics.median(walls["no checkpoints"])
    print(f"\nbackground vs synchronous saves: demo job, full fine-tuning, steps 2..{steps} timed, medians of {repeats}\n")
    print("| checkpoints | wall time | overhead |\n|---|---|---|")
    for m in modes:
        w = statistics.median(walls[m])
        print(f"| {m} | {w:.2f} s | {w / base - 1:+.1%} |")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=41, help="steps of each background-vs-synchronous run")
    a = ap.parse_args()
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

        background_vs_sync(tmp, a.repeats, a.steps)


if __name__ == "__main__":
    main()
