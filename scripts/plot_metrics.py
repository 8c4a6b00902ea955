"""Plot metrics of a run (metrics.jsonl) against the step, one panel per key, into a PNG.

    .venv/bin/python scripts/plot_metrics.py runs/grpo_demo/metrics.jsonl reward/mean completion/length_mean --out docs/grpo_demo.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", help="a run's metrics.jsonl")
    p.add_argument("keys", nargs="+", help="metric names, e.g. reward/mean")
    p.add_argument("--out", required=True, help="PNG file")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {}
    for line in Path(a.metrics).read_text().splitlines():
        if line.strip():
            m = json.loads(line)
            rows[m["step"]] = m  # a resumed run rewrites steps after its checkpoint: keep the last
    steps = sorted(rows)
    fig, axes = plt.subplots(1, len(a.keys), figsize=(4.5 * len(a.keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], a.keys):
        missing = [s for s in steps if key not in rows[s]]
        if missing:
            raise SystemExit(f"{a.metrics}: no {key!r} at step {missing[0]}")
        ax.plot(steps, [rows[s][key] for s in steps], marker=".")
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    if a.title:
        fig.suptitle(a.title)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out} ({len(steps)} steps)")


if __name__ == "__main__":
    main()
