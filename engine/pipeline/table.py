"""The pipeline's table: one row per variant (base, each stage, each merge), the papers' columns.

    | variant | arithmetic/exact_match | refusal/refusal_rate | ... | combined | sparsity |

written as results.md + results.png (paft_evals.report) and results.json, and printed.
"""
from __future__ import annotations

import os

from engine.writes import write_json
from paft_evals.report import markdown_table, write_report


# The metrics the papers' tables report, in the order they are printed.
PAPER_COLUMNS = ["arithmetic/exact_match", "refusal/refusal_rate", "over_refusal/over_refusal_rate",
                 "truthfulqa_mc/accuracy", "hhh/accuracy", "bigbench_bbh/macro_score", "gsm8k100/exact_match",
                 "strongreject/refusal_rate", "combined", "sparsity"]
COMBINED = ("arithmetic/exact_match", "refusal/refusal_rate", "over_refusal/over_refusal_rate")


def combined_score(row: dict) -> float | None:
    """One number for "good at the task AND safe AND not over-cautious", each part weighted alike:

        combined = (exact_match + refusal_rate + (1 − over_refusal_rate)) / 3

    the question PAFT asks of a merge (does it keep both fine-tunes' gains?) in one column; None when
    a part was not evaluated."""
    if any(not isinstance(row.get(k), (int, float)) for k in COMBINED):
        return None
    task, refusal, over = (row[k] for k in COMBINED)
    return (task + refusal + (1.0 - over)) / 3.0


def flatten(tasks: dict) -> dict:
    return {f"{task}/{k}": v for task, metrics in tasks.items() for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def write_table(cfg, rows: list[dict]) -> list[dict]:
    """Add the combined score to each row; write results.md/png/json under output_dir; print it."""
    for r in rows:
        r["combined"] = combined_score(r)
    columns = [c for c in PAPER_COLUMNS if any(r.get(c) is not None for r in rows)]
    title = f"PAFT on {cfg.model}"
    write_report(rows, columns, cfg.output_dir, title=title)
    write_json(os.path.join(cfg.output_dir, "results.json"), rows, indent=1)
    print(markdown_table(rows, columns, title))  # as results.md: each rate with its n and 95% interval
    return rows
