"""The report of `posttrain eval`: OUT/report.html (self-contained: the plots are embedded PNGs, so
it can be attached to a review) and OUT/report.md (the same tables, for a terminal or a PR).

Per task: a table of every metric per model (value, CI, samples) and of each model's difference
from the baseline (CI, p-value, significance), the slice breakdowns, and plots made with
matplotlib's Agg backend: the metric per checkpoint with its interval, the differences with their
intervals, and histograms of per-sample scores and completion lengths."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from .. import atomic


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"
    return str(x)


def _ci(d: dict, lo: str = "ci_low", hi: str = "ci_high") -> str:
    return f"[{_fmt(d.get(lo))}, {_fmt(d.get(hi))}]"


def _tables(task: dict, labels: list[str], ci: str) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    head = ["metric", "better", *[f"{m}" for m in labels]]
    rows = []
    for name, block in task["metrics"].items():
        rows.append([name, block["better"] or "", *[f"{_fmt(block['models'][m]['value'])} {_ci(block['models'][m])} "
                                                     f"n={block['models'][m]['n']}" for m in labels]])
    chead = ["metric", "model", "difference", f"{ci} CI", "p-value", "significant", "n"]
    crows = []
    for name, block in task["metrics"].items():
        for c in block["comparisons"]:
            crows.append([name, c["model"], _fmt(c["difference"]), _ci(c), _fmt(c["p_value"], 3),
                          "yes" if c["significant"] else ("n/a: " + c["note"] if c.get("note") else "no"), str(c["n"])])
    return head, rows, chead, crows


def _slice_rows(task: dict, labels: list[str]) -> list[list[str]]:
    out = []
    for name, block in task["metrics"].items():
        for sname, groups in block["slices"].items():
            for lab, sub in groups.items():
                comp = "; ".join(f"{_fmt(c['difference'])} {_ci(c)} p={_fmt(c['p_value'], 3)}" for c in sub["comparisons"])
                out.append([name, f"{sname}={lab}", *[f"{_fmt(sub['models'][m]['value'])} (n={sub['models'][m]['n']})" for m in labels], comp])
    return out


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [head, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(name: str, task: dict, labels: list[str], runs: dict, ci: str) -> list[tuple[str, str]]:
    """(caption, base64 PNG) of the task's plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    metrics = list(task["metrics"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        ms = task["metrics"][metric]["models"]
        vals = [ms[m]["value"] or 0.0 for m in labels]
        err = [[max(0.0, v - (ms[m]["ci_low"] if ms[m]["ci_low"] is not None else v)) for m, v in zip(labels, vals)],
               [max(0.0, (ms[m]["ci_high"] if ms[m]["ci_high"] is not None else v) - v) for m, v in zip(labels, vals)]]
        ax.bar(range(len(labels)), vals, yerr=err, capsize=4, color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), [f"M{i}" for i in range(len(labels))])
        ax.set_title(metric, fontsize=9)
    fig.suptitle(f"{name}: metric per model (M0 = baseline), {ci} CI", fontsize=10)
    fig.tight_layout()
    out.append((f"{name}: metrics per model", _png(fig)))
    compared = [m for m in metrics if any(c["difference"] is not None for c in task["metrics"][m]["comparisons"])]
    if compared:  # one panel per metric: each on its own scale
        fig, axes = plt.subplots(len(compared), 1, figsize=(6, 0.35 * len(compared) * (len(labels) - 1) + 0.9 * len(compared)),
                                 squeeze=False)
        for ax, m in zip(axes[:, 0], compared):
            comps = [c for c in task["metrics"][m]["comparisons"] if c["difference"] is not None]
            for y, c in enumerate(comps):
                lo = c["ci_low"] if c["ci_low"] is not None else c["difference"]
                hi = c["ci_high"] if c["ci_high"] is not None else c["difference"]
                ax.plot([lo, hi], [y, y], color="C0")
                ax.plot([c["difference"]], [y], "o", color="C3" if c["significant"] else "C0")
            ax.axvline(0, color="grey", lw=0.8)
            ax.set_yticks(range(len(comps)), [f"M{labels.index(c['model'])} - M0" for c in comps], fontsize=8)
            ax.set_ylim(-0.6, len(comps) - 0.4)
            ax.set_title(m, fontsize=9)
        fig.suptitle(f"{name}: difference from the baseline, {ci} CI (red: significant)", fontsize=10)
        fig.tight_layout()
        out.append((f"{name}: differences", _png(fig)))
    rows = {lab: runs[lab].rows for lab in labels}
    first = next((m for m in metrics if m not in ("loss", "perplexity", "completion_tokens", "truncated")), None)
    for metric in [m for m in (first, "completion_tokens") if m is not None]:
        values = {lab: [r.metrics[metric][0] / (r.metrics[metric][1] or 1) for r in rows[lab].values() if metric in r.metrics]
                  for lab in labels}
        if not any(values.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 2.8))
        ax.hist([values[lab] for lab in labels], bins=20, label=[f"M{i}" for i in range(len(labels))])
        ax.legend(fontsize=8)
        ax.set_title(f"{name}: per-sample {metric}", fontsize=10)
        out.append((f"{name}: histogram of {metric}", _png(fig)))
    return out


def write_report(results: dict, task_runs: dict, out: Path) -> None:
    labels = [m["label"] for m in results["models"]]
    ci = f"{100 * results['confidence']:g}%"
    legend = [f"M{i}: {lab}" + (" (baseline)" if i == 0 else "") for i, lab in enumerate(labels)]
    md = [f"# Evaluation: {results['suite']}", "", *[f"- {x}" for x in legend], ""]
    body = [f"<h1>Evaluation: {html.escape(str(results['suite']))}</h1>",
            "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in legend) + "</ul>"]
    for name, task in results["tasks"].items():
        head, rows, chead, crows = _tables(task, labels, ci)
        srows = _slice_rows(task, labels)
        shead = ["metric", "slice", *labels, "difference vs baseline"]
        md += [f"## {name} ({task['kind']})", "", _md_table(head, rows), ""]
        body += [f"<h2>{html.escape(name)} ({task['kind']})</h2>", _html_table(head, rows)]
        if crows:
            md += ["Paired differences from the baseline:", "", _md_table(chead, crows), ""]
            body += ["<h3>Paired differences from the baseline</h3>", _html_table(chead, crows)]
        if srows:
            md += ["Slices:", "", _md_table(shead, srows), ""]
            body += ["<h3>Slices</h3>", _html_table(shead, srows)]
        md += [f"Data: {'; '.join(f'{m}: {s}' for m, s in task['data'].items())}", ""]
        for caption, png in _plots(name, task, labels, task_runs[name], ci):
            body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png}"/>'
                        f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    md.append("Plots: report.html (self-contained).")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}figure{display:inline-block}")
    atomic.write_text(out / "report.md", "\n".join(md) + "\n")
    atomic.write_text(out / "report.html", f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(str(results['suite']))}"
                      f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
