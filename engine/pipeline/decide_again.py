"""Decide a seeds pipeline's claims again from its saved results.json: nothing is trained or evaluated.

    python -m engine.pipeline.decide_again recipes/paft/laptop.yaml docs/laptop/results.json

results.json holds every item's score per variant and seed and every layer's δ measures, which is all
the decision rule (paft_evals/findings.py) reads. So when that rule or its claims change, the committed
copy of a run is re-decided here instead of retrained: FINDINGS.md and the "claims" of results.json are
rewritten beside the results read; every other key is left as it was.

Only the recipe's `pipeline.findings`, `model`, `seeds` and `output_dir` are read (the stages' data
need not be on this machine); `findings` is checked as the main command checks it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from engine.pipeline.seeds import decide
from engine.safeio import read_yaml
from engine.schema import RecipeError, build
from engine.writes import write_json
from paft_evals.findings import FindingsConfig


def decide_again(recipe: str, results_path: str) -> list[dict]:
    raw = read_yaml(recipe)
    pipe = raw.get("pipeline") if isinstance(raw, dict) else None
    if not isinstance(pipe, dict):
        raise RecipeError(f"{recipe}: not a pipeline recipe (no 'pipeline' mapping)")
    for key in ("model", "output_dir"):
        if not isinstance(pipe.get(key), str):
            raise RecipeError(f"{recipe}: pipeline.{key}: missing or not a string")
    fc = build(FindingsConfig, pipe.get("findings") or {}, "pipeline.findings.")
    try:
        with open(results_path, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{results_path}: cannot read a results.json: {e}") from None
    missing = [k for k in ("seeds", "helpful", "harmless", "per_seed", "items") if k not in result]
    if missing:
        raise RecipeError(f"{results_path}: not a seeds pipeline's results.json (no key {missing[0]!r})")
    out_dir = os.path.dirname(os.path.abspath(results_path))
    result["claims"], _ = decide(result, fc, pipe["model"], pipe["output_dir"], out_dir)
    write_json(results_path, result, indent=1, default=str)
    return result["claims"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.pipeline.decide_again",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("recipe", help="the seeds pipeline recipe the results came from")
    ap.add_argument("results", help="its results.json (e.g. docs/laptop/results.json)")
    a = ap.parse_args(argv)
    try:
        found = decide_again(a.recipe, a.results)
    except ValueError as e:  # RecipeError and a damaged YAML: one line naming the file or key
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for c in found:
        print(f"({c['id']}) {c['decision']}: effect {c.get('effect')}, n {c['n']}")
    print(f"wrote {os.path.join(os.path.dirname(os.path.abspath(a.results)), 'FINDINGS.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
