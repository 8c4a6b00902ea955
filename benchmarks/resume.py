"""Checkpoint overhead: time of one save, as a share of the training time between saves.

Runs the demo job (tiny Qwen3 built locally, bundled chat data) with checkpoints every K steps,
full fine-tuning and LoRA, and reads the save times off metrics.jsonl: the wall time between the
logs of steps k and k+1 minus step k+1's own time is the save after step k. Prints a table.

Then synchronous against background saves (`compute.async_checkpoint`), where a save's cost is no
longer one gap between two steps but the staging at the step, the finish at the step after, and
whatever the writer thread takes from the step that runs beside it: the job with a save every 2
steps and the same job without checkpoints, `--repeats` times, the modes interleaved; each save's
costs measured against the same steps of the run without checkpoints, scaled by the two runs' ratio
over the steps no save touches (`save_costs`): the machine drifts +-10% between runs, more than the
saves cost.

    python benchmarks/resume.py            # ~9 minutes on 2 idle CPU cores
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


def save_costs(rows: list[dict], ref: list[dict], every: int) -> dict:
    """What each save costs the training loop, against a run without checkpoints on the same data
    (`ref`). The gap after a step (the wall time between its log and the next one, minus the next
    step's own time) holds whatever the loop does between steps: a save's staging and, for a
    background save, its finish at the step after; the step after a save runs beside a background
    write. Each is compared with the same step of the reference run (same data: the length of each
    step's batch cancels), scaled by the two runs' ratio over the steps no save touches (the
    machine's drift between runs, +-10%, is more than a save costs)."""
    def timing(rs):
        gap = {p["step"]: (r["time"] - p["time"]) - r["step_time_s"] for p, r in zip(rs, rs[1:])}  # after step p
        return gap, {r["step"]: r["step_time_s"] for r in rs}
    (gap, step), (gap0, step0) = timing(rows), timing(ref)
    saves = [s for s in step if s % every == 0 and s + 2 in step and s > 4]  # the first saves' neighbours are warm-up
    quiet = [s for s in step if s > 4 and (s - 1) % every != 0 and s + 1 in step]  # steps no write runs beside
    drift = statistics.median(step[s] / step0[s] for s in quiet)
    main = statistics.mean(gap[s] + gap[s + 1] - gap0[s] - gap0[s + 1] for s in saves)  # staging; the finish
    beside = statistics.mean(step[s + 1] - step0[s + 1] * drift for s in saves)  # the step trained beside the write
    base = statistics.mean(step0[s] * drift for s in quiet)
    return {"step_s": base, "main_s": main, "beside_s": beside, "overhead": (main + beside) / (5 * base), "n": len(saves)}


def background_vs_sync(tmp: Path, repeats: int, steps: int) -> None:
    """A save every 2 steps (so that each run measures ~40 saves: one save's cost is a few ms on steps
    that vary by +-5%), each mode against a run without checkpoints on the same data; the overhead is
    given for a save every 5 steps: the cost of one save over 5 steps."""
    modes = {"synchronous": False, "background": True}
    costs: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(repeats):
        ref = run(tmp, f"none-{rep}", None, steps)  # no checkpoints: the same steps on the same data
        order = list(modes)[rep % len(modes):] + list(modes)[:rep % len(modes)]
        for m in order:
            rows = run(tmp, f"bg-{rep}-{list(modes).index(m)}", 2, steps, background=modes[m])
            costs[m].append(save_costs(rows, ref, 2))
    n = costs["background"][0]["n"]
    print(f"\nsynchronous vs background saves: demo job, full fine-tuning, {steps} steps, a save every 2 ({n} measured per "
          f"run), each run against one without checkpoints on the same data; medians of {repeats} runs\n")
    print("| saves | step | save's time in the training loop | step beside the write (vs the same step without saves) | overhead at a save every 5 steps |")
    print("|---|---|---|---|---|")
    for m in modes:
        med = {k: statistics.median(c[k] for c in costs[m]) for k in ("step_s", "main_s", "beside_s", "overhead")}
        print(f"| {m} | {med['step_s'] * 1e3:.0f} ms | {med['main_s'] * 1e3:.1f} ms | {med['beside_s'] * 1e3:+.1f} ms | {med['overhead']:.1%} |")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=81, help="steps of each background-vs-synchronous run")
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
