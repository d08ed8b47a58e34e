"""What every task shares: its options (EvalArgs), JSONL reading, chat prompts, the model's mode.

Every task is a function `run_<task>(model, tokenizer, args: EvalArgs) -> dict` returning
scalar metrics, `n` (how many items were scored), a few `samples` to read, and `items`: one
{"id", "score", ...} per scored item (see `with_items`), what item-level paired statistics need.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

from engine.safeio import parse_json, read_text
from engine.generate import prompt_text
from paft_evals.refusal import WINDOW


@dataclass
class EvalArgs:
    """Options of one task run (the CLI fills these in; the pipeline can build one directly).

    template        chat template of the prompts: tokenizer | vicuna | mistral (engine.data.templates)
    limit           score only the first `limit` items (None: all)
    task_limit      {task: limit} for the tasks that take their own (paft_evals.tasks.evaluate applies it)
    batch_size      prompts (generation) or sequences (log-likelihood) per forward
    max_new_tokens  greedy generation length; None: the task's own default
    task_max_new_tokens  {task: length} for the tasks that need their own (a GSM8K chain of thought
                    needs far more than a refusal check); paft_evals.tasks.evaluate applies it per task
    data            the task's data file (gsm8k, bbh, generation, mc, preference)
    max_length      preference pairs are truncated to this many tokens (engine.data.pairs)
    beta            DPO β for the implicit rewards of the preference task
    harmbench       which HarmBench test behaviours the refusal task asks: all | standard | contextual
                    (contextual ones carry a long context: ~10x the prompt tokens to read)
    subtasks        bigbench_bbh: the BBH task names to run (None: all of engine.data.catalog.BBH_TASKS)
    shots           bigbench_bbh: few-shot examples taken from each task's own examples (never scored)
    hhh_split       hhh: which split of the HHH pairs is scored: test (held out, default) | train | all
    """
    template: str = "tokenizer"
    limit: int | None = None
    task_limit: dict[str, int] = field(default_factory=dict)
    batch_size: int = 8
    max_new_tokens: int | None = None
    task_max_new_tokens: dict[str, int] = field(default_factory=dict)
    data: str | None = None
    max_length: int = 1024
    beta: float = 0.1
    harmbench: str = "all"
    subtasks: list[str] | None = None
    shots: int = 3
    hhh_split: str = "test"

    def new_tokens(self, default: int) -> int:
        return self.max_new_tokens if self.max_new_tokens is not None else default


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL file; a line that is not a JSON object is an error naming the line."""
    rows = []
    for n, line in enumerate(read_text(path).split("\n"), 1):  # read_text: not UTF-8 is an error naming the file
        if not line.strip():
            continue
        row = parse_json(line, f"{path} line {n}")  # not JSON, a lone surrogate, nested too deep: an error naming it
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def need_data(args: EvalArgs, task: str, example: str) -> str:
    """args.data, or an error that says what the task wants."""
    if not args.data:
        raise ValueError(f"{task}: needs a data file (--data {task}=FILE), e.g. {example}")
    return args.data


def stderr(values: list) -> float:
    """Sample standard error of a mean: sd (ddof=1) / sqrt(n), lm-eval's mean_stderr; 0 for n < 2.
    For 0/1 hits at rate p that is sqrt(p (1 - p) / (n - 1))."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


TEXT_CHARS = WINDOW  # characters of a generation kept per item: all the refusal detector reads


def with_items(result: dict, items: list[dict], headline: str, macro: bool = False) -> dict:
    """`result` with "items" added: one {"id": str, "score": float, ...} per scored item.

    An id names the same item for every model, run and batch size (a row's index in its file, a
    dataset's own id), so two variants can be compared item by item. `score` is the item's share
    of the headline metric: the mean of the scores IS result[headline]; with `macro` (a mean of
    per-part means, as BBH's macro_score), each item's "part" names its group, and the mean over
    parts of each part's mean score is the headline. Both are checked here, so a task that broke
    either would fail loudly, not write items a reader cannot trust."""
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise AssertionError(f"{headline}: item id {dup!r} is not unique")
    if items:
        if macro:
            parts: dict = {}
            for it in items:
                parts.setdefault(it["part"], []).append(it["score"])
            mean = sum(sum(v) / len(v) for v in parts.values()) / len(parts)
        else:
            mean = sum(it["score"] for it in items) / len(items)
        if abs(mean - result[headline]) > 1e-9:
            raise AssertionError(f"{headline}: the items' scores average {mean}, the metric is {result[headline]}")
    result["items"] = items
    return result


def file_stem(path: str) -> str:
    """"data/gsm8k.jsonl" -> "gsm8k"; a BIG-bench "<name>/task.json" -> "<name>": a data file's short
    name (the results key of a task given several files, and the prefix of its item ids)."""
    base = os.path.basename(os.path.normpath(path))
    if base == "task.json":  # BIG-bench keeps every task in <name>/task.json
        base = os.path.basename(os.path.dirname(os.path.normpath(path)))
    return base.split(".")[0] or base


def first(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def first_of_each(items: list[dict], key: str, limit: int | None) -> list[dict]:
    """`limit` items taken from the groups of `key` in turn (the first of each group, then the second
    of each, ...), returned in their original order. For a file sorted by group (StrongREJECT's CSV
    is sorted by category, HHH comes subset by subset), a plain first-N would score one group only."""
    if limit is None:
        return items
    groups: dict = {}
    for i, it in enumerate(items):
        groups.setdefault(it[key], []).append(i)
    turns = [g[k] for k in range(max(map(len, groups.values()), default=0)) for g in groups.values() if k < len(g)]
    return [items[i] for i in sorted(turns[:limit])]


def chat_prompt(user: str, tokenizer, template: str) -> str:
    """One user message rendered with the chat template, ending where the assistant's answer begins.

    The same text training saw before an answer (prompt_text cuts the rendered conversation at the
    final assistant turn; the placeholder answer is cut off).
    """
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": "."}]
    return prompt_text(messages, tokenizer, template)


@contextmanager
def eval_mode(model):
    """Dropout off while scoring; each module's own train/eval flag is put back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in modes:
            m.training = was_training
