"""Compare variants: a markdown table and a bar chart from several results files.

    python -m paft_evals.report base.json sft.json dpo.json --out report/ [--columns refusal/refusal_rate,mc/accuracy]
        -> report/results.md, report/results.png

Each results file (from `python -m paft_evals`) becomes one row, named by its "name"; its metrics
are flattened to "task/metric" columns (nested groups as "task/group/key", e.g.
"refusal/by_category/illegal"). Without --columns the table shows each task's headline
metric (paft_evals.tasks.HEADLINE) and, where present, the DPO reward accuracy.

`write_report(rows, columns, out_dir, title)` is the generic part: any list of
{"name": ..., column: value} dicts, so other code (the PAFT pipeline) can tabulate its own rows.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from engine.commands import run_command
from engine.outputs import claim_output
from engine.safeio import read_json
from engine.writes import atomic_file, write_text
from paft_evals.tasks import HEADLINE, task_of

MISSING = "–"


def flatten(results: dict) -> dict:
    """{"name": ..., "task/metric": number, "task/group/key": number, ...} of one results file."""
    row = {"name": results.get("name") or results.get("model") or "?"}
    for task, metrics in results.get("tasks", {}).items():
        for key, value in metrics.items():
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                row[f"{task}/{key}"] = value
            elif isinstance(value, dict):  # by_category, by_type, ...: one level deep
                for sub, v in value.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        row[f"{task}/{key}/{sub}"] = v
    return row


def default_columns(rows: list[dict]) -> list[str]:
    """Each task's headline metric, then reward accuracies, in first-seen order."""
    columns = []
    for row in rows:
        for key in row:
            if "/" not in key:
                continue
            task, metric = key.split("/", 1)
            if metric in (HEADLINE.get(task_of(task)), "reward_accuracy") and key not in columns:
                columns.append(key)
    return columns


def wilson(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion p over n items (Wilson 1927). Unlike p ± 1.96·se
    it is not [0, 0] at p = 0, where a 135M model's refusal rate often is."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _n_of(row: dict, column: str):
    n = row.get(column.split("/")[0] + "/n") if "/" in column else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _cell(value, n: int | None = None) -> str:
    if value is None:
        return MISSING
    if isinstance(value, dict) and "mean" in value:  # over seeds (engine/pipeline/seeds.py): "mean ± se"
        se = value.get("se")
        return f"{value['mean']:.3f} ± {se:.3f}" if se is not None else f"{value['mean']:.3f}"
    if isinstance(value, float) and n and 0.0 <= value <= 1.0:  # a rate over n items: with its interval
        lo, hi = wilson(value, n)
        return f"{value:.3f} [{lo:.2f}, {hi:.2f}]"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str], title: str) -> str:
    """One row per variant; a rate over n items shows its Wilson 95% interval, and a row of n per column."""
    lines = [f"# {title}", "", "| variant | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for row in rows:
        lines.append(f"| {row.get('name', '?')} | " + " | ".join(_cell(row.get(c), _n_of(row, c)) for c in columns)
                     + " |")
    ns = [sorted({_n_of(r, c) for r in rows} - {None}) for c in columns]
    if any(ns):
        lines.append("| n (items) | " + " | ".join("/".join(map(str, n)) or MISSING for n in ns) + " |")
        over_seeds = any(isinstance(r.get(c), dict) for r in rows for c in columns)
        lines += ["", "Each cell is the mean ± se over seeds of a rate over n items; whether two variants differ "
                  "is decided item by item in FINDINGS.md (with each claim's MDE)." if over_seeds else
                  "A rate over n items is shown with its Wilson 95% interval [lo, hi] (one variant alone; "
                  "comparisons between variants are paired item by item, see FINDINGS.md where there is one)."]
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], columns: list[str], path: str, title: str) -> None:
    """Grouped bars: one group per column, one bar per variant (a missing value leaves a gap)."""
    import matplotlib
    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    n_rows = max(1, len(rows))
    width = 0.8 / n_rows
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(columns) * max(1, n_rows) ** 0.5 + 2), 4))
    for i, row in enumerate(rows):
        xs, ys, errs = [], [], []
        for j, c in enumerate(columns):
            v = row.get(c)
            if isinstance(v, dict) and "mean" in v:  # over seeds: the mean, se as an error bar
                v, err = v["mean"], v.get("se") or 0.0
            else:
                err = 0.0
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(float(v))
                errs.append(float(err))
        colors = plt.get_cmap("tab10" if n_rows <= 10 else "tab20")  # one distinct colour per variant up to 20
        ax.bar(xs, ys, width=width, label=str(row.get("name", "?")), color=colors(i % colors.N),
               yerr=errs if any(errs) else None, capsize=1.5)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=30, ha="right", fontsize=8)
    ax.set_title(title)
    ax.axhline(0, color="black", linewidth=0.5)
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:  # whole or not at all, as every file the engine writes
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_report(rows: list[dict], columns: list[str], out_dir: str, title: str = "Results") -> dict:
    """Write out_dir/results.md (a table: one row per dict, one column per key in `columns`,
    "–" where a row lacks it) and out_dir/results.png (grouped bar chart). Each row's "name"
    labels it. Returns {"markdown": path, "png": path}."""
    if not columns:
        raise ValueError("write_report: no columns to show")
    os.makedirs(out_dir, exist_ok=True)
    md, png = os.path.join(out_dir, "results.md"), os.path.join(out_dir, "results.png")
    text = markdown_table(rows, columns, title)
    write_text(md, text)
    bar_chart(rows, columns, png, title)
    return {"markdown": md, "png": png}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paft_evals.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results JSON files from python -m paft_evals")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--columns", default=None, help="comma-separated task/metric columns (default: headlines)")
    p.add_argument("--title", default="Evaluation results")
    a = p.parse_args(argv)

    def report() -> dict:
        rows = []
        for path in a.results:
            rows.append(flatten(read_json(path)))  # engine.safeio: damaged or too deep is one error naming it
        columns = [c.strip() for c in a.columns.split(",") if c.strip()] if a.columns else default_columns(rows)
        with claim_output(a.out, "python -m paft_evals.report"):  # one report at a time into --out
            return write_report(rows, columns, a.out, a.title)
    status, paths = run_command(report, f"the report stopped; {a.out} holds no half-written file")
    if status:
        return status
    print(f"report: wrote {paths['markdown']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
