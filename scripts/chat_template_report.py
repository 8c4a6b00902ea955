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


COLS = ("single", "expand", "reasoning single", "reasoning expand")


def row(name: str, base: Path) -> tuple[tuple[str, ...], str]:
    single, sdetail = _run(conf.classify, name, base)
    expand, edetail = _run(conf.classify_expand, name, base)
    rsingle, _ = _run(conf.classify_reasoning, name, base)
    msgs = conf.reasoning_conversation(conf.build_template_tokenizer(name, base))
    rexpand, _ = _run(conf.classify_expand, name, base, msgs, must_train="I should recall it.") if msgs else ("does-not-render", "")
    variant = sdetail.split(";")[0].split(":")[0]
    how = sdetail.split("; ", 1)[1] if single in ("pass", "handled") else ""
    why = [conf.EXPECTED_REFUSALS.get(name, "NOT IN EXPECTED_REFUSALS")] if single == "refused" else []
    if expand == "refused":
        why.append("per turn: " + conf.EXPECTED_EXPAND_REFUSALS.get(name, "NOT IN EXPECTED_EXPAND_REFUSALS"))
    if rexpand == "refused":
        why.append("reasoning per turn: " + conf.EXPECTED_REASONING_EXPAND_REFUSALS.get(name, "NOT EXPECTED"))
    note = "; ".join([variant, *why]).replace("|", "\\|").replace("<", "&lt;").replace("\n", "\\n")

    def mode(one: str, per_turn: str) -> str:  # the data.multi_turn that trains it
        return "single" if one in ("pass", "handled") else "expand" if per_turn == "pass" else "none"

    use = f"{mode(single, expand)} / {mode(rsingle, rexpand)}"
    return ((single, expand, rsingle, rexpand),
            f"| `{name}` | {use} | {_cell(single, how)} | {_cell(expand, edetail)} | {rsingle} | {rexpand} | {note} |")


def main() -> None:
    counts = {c: Counter() for c in COLS}
    head = ("| template | data.multi_turn (plain / reasoning) | plain: single | plain: expand | reasoning: single | "
            "reasoning: expand | note |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        print(head)
        for name in conf._template_names():
            statuses, line = row(name, Path(d))
            for c, st in zip(COLS, statuses):
                counts[c][st] += 1
            print(line)
        print()
        for c in COLS:
            print(f"{c}: " + ", ".join(f"{k} {counts[c][k]}" for k in ("pass", "handled", "refused", "does-not-render", "WRONG") if counts[c][k]))
        print()
        print("| template with data.chat_template_kwargs | plain: single | plain: expand |\n|---|---|---|")
        for name in conf.KWARG_VARIANTS:
            cells = row(name, Path(d))[1].split("|")
            print("|".join([cells[0], cells[1], cells[3], cells[4], ""]))


if __name__ == "__main__":
    main()
