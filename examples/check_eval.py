"""Check the evaluation demo's results (`make eval-demo`) from its results.json alone.

    python examples/check_eval.py runs/eval_demo runs/eval_demo_self

runs/eval_demo compares the base model (the baseline) with the SFT demo's export (and the DPO and
GRPO demos' exports when they exist): every export must beat the base significantly on the held-out
loss and on the exact answers. runs/eval_demo_self compares the SFT export with itself: no metric
may differ significantly.
"""

import json
import sys
from pathlib import Path


def main(compared: str, itself: str) -> int:
    res = json.loads((Path(compared) / "results.json").read_text())
    failures = []
    for task, metric, better in (("heldout_chat", "loss", "lower"), ("answers", "exact_match", "higher")):
        block = res["tasks"][task]["metrics"][metric]
        base = block["models"][res["baseline"]]["value"]
        for c in block["comparisons"]:
            value = block["models"][c["model"]]["value"]
            improved = c["significant"] and (c["difference"] < 0 if better == "lower" else c["difference"] > 0)
            print(f"{task}/{metric}: {c['model']} {value:.4g} vs base {base:.4g}: difference {c['difference']:+.4g} "
                  f"[{c['ci_low']:+.4g}, {c['ci_high']:+.4g}], p={c['p_value']:.2g} -> {'improved' if improved else 'NOT improved'}")
            if not improved:
                failures.append(f"{c['model']} on {task}/{metric}")
    res = json.loads((Path(itself) / "results.json").read_text())
    for task, t in res["tasks"].items():
        for metric, block in t["metrics"].items():
            for c in block["comparisons"]:
                if c["significant"]:
                    failures.append(f"self-comparison {task}/{metric} (p={c['p_value']})")
    print("self-comparison: " + ("no significant difference" if not any("self" in f for f in failures) else "DIFFERS"))
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
