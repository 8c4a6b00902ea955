"""Print the status table of docs/chat_templates.md: every real template in ../shared/chat_templates
through posttrain.data.chat (same harness as tests/test_chat_templates_conformance.py).

    .venv/bin/python scripts/chat_template_report.py
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import test_chat_templates_conformance as conf  # noqa: E402


def main() -> None:
    counts = Counter()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in conf._template_names():
            try:
                status, detail = conf.classify(name, Path(d))
            except AssertionError as e:  # a wrong mask: the conformance test fails too
                status, detail = "WRONG", str(e).splitlines()[0]
            counts[status] += 1
            detail = detail.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")
            if status == "refused":  # "variant: template NAME: problem (...); what to do"
                variant, _, msg = detail.partition(": template ")
                problem = msg.split(": ", 1)[-1].split(" (")[0].split(";")[0]
                why = conf.EXPECTED_REFUSALS.get(name, "NOT IN EXPECTED_REFUSALS")
                detail = f"{variant}: {why}. Error: \"{problem}\""
            rows.append(f"| `{name}` | {status} | {detail.replace('<', '&lt;')} |")
    print("| template | status | detail (conversation variant; span source / reason) |")
    print("|---|---|---|")
    print("\n".join(rows))
    print()
    print(", ".join(f"{k}: {counts[k]}" for k in ("pass", "handled", "refused", "does-not-render", "WRONG") if counts[k]))


if __name__ == "__main__":
    main()
