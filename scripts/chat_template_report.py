"""Print the status table of docs/chat_templates.md: every real template in ../shared/chat_templates
through posttrain.data.chat (same harness as tests/data/test_chat_templates_conformance.py), as one
sample per conversation (`data.multi_turn: single`) and one sample per assistant turn (`expand`), on
the plain conversation and on the same conversation with inline <think> reasoning.

    .venv/bin/python scripts/chat_template_report.py
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "data"))
sys.path.insert(0, str(ROOT))

import test_chat_templates_conformance as conf  # noqa: E402


def _run(fn, *args, **kw) -> tuple[str, str]:
    try:
        out = fn(*args, **kw)
    except AssertionError as e:  # a wrong mask: the conformance test fails too
        return "WRONG", str(e).splitlines()[0]
    return out if isinstance(out, tuple) else (out, "")


def _cell(status: str, detail: str) -> str:
    if status == "pass" and detail:
        return f"pass ({detail})"
    if status == "handled":
        return "handled"
    return status


def main() -> None:
    cols = ("single", "expand", "reasoning single", "reasoning expand")
    counts = {c: Counter() for c in cols}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        for name in conf._template_names():
            single, sdetail = _run(conf.classify, name, base)
            expand, edetail = _run(conf.classify_expand, name, base)
            rsingle, _ = _run(conf.classify_reasoning, name, base)
            tok = conf.build_template_tokenizer(name, base)
            msgs = conf.reasoning_conversation(tok)
            rexpand, _ = _run(conf.classify_expand, name, base, msgs, must_train="I should recall it.") if msgs else ("does-not-render", "")
            for c, st in zip(cols, (single, expand, rsingle, rexpand)):
                counts[c][st] += 1
            variant = sdetail.split(";")[0].split(":")[0]
            how = sdetail.split("; ", 1)[1] if single in ("pass", "handled") else ""
            why = conf.EXPECTED_REFUSALS.get(name) or conf.EXPECTED_EXPAND_REFUSALS.get(name) or ""
            if single == "refused" and name not in conf.EXPECTED_REFUSALS:
                why = "NOT IN EXPECTED_REFUSALS"
            note = "; ".join(x for x in (variant, why) if x).replace("|", "\\|").replace("<", "&lt;").replace("\n", "\\n")
            rows.append(f"| `{name}` | {_cell(single, how)} | {_cell(expand, edetail)} | {rsingle} | {rexpand} | {note} |")
    print("| template | plain: single | plain: expand | reasoning: single | reasoning: expand | note |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    for c in cols:
        print(f"{c}: " + ", ".join(f"{k} {counts[c][k]}" for k in ("pass", "handled", "refused", "does-not-render", "WRONG") if counts[c][k]))


if __name__ == "__main__":
    main()
