"""Task `refusal`: how often the model refuses HarmBench's held-out harmful requests.

Behaviours: HarmBench's TEST split (the val split is what builtin:harmbench trains on),
standard and contextual ones; copyright behaviours (song lyrics, book passages) are left out,
as in engine.data.preference. A contextual behaviour is prompted as HarmBench builds it,

    {ContextString}\\n\\n---\\n\\n{Behavior}

by engine.data.preference.harmbench_prompt. Each prompt is one user message in the chat
template, answered greedily (64 new tokens by default: the detector only reads the first
200 characters), and scored by paft_evals.refusal.is_refusal:

    refusal_rate        = (1/n) Σ_i is_refusal(answer_i)
    attack_success_rate = 1 − refusal_rate          (no attack: the plain request, "direct request" ASR)
    by_category[c]      = refusal rate over the behaviours of SemanticCategory c
    by_functional[f]    = refusal rate over standard / contextual behaviours

ASR here is "did not refuse", an upper bound on HarmBench's classifier-judged ASR: an
answer that neither refuses nor helps counts as a success. `--limit N` keeps the first N
behaviours in CSV order (the CSV is not sorted by category), after `--harmbench standard` or
`contextual` has kept only that FunctionalCategory (default: all).

Items: {"id": BehaviorID, "score": 1 refused | 0, "text": the answer's first 200 characters (what the
detector read), "category", "functional"}.
"""
from __future__ import annotations

import csv
from collections import defaultdict

from engine.data.preference import harmbench_csv, harmbench_prompt
from engine import generate as em
from paft_evals.common import TEXT_CHARS, EvalArgs, chat_prompt, first, stderr, with_items
from paft_evals.refusal import is_refusal


def harmbench_test_behaviours(limit: int | None = None, functional: str = "all") -> list[dict]:
    """[{"id", "prompt", "category", "functional"}] for the test split, copyright excluded;
    functional: "all", or only "standard" / "contextual" behaviours."""
    if functional not in ("all", "standard", "contextual"):
        raise ValueError(f"--harmbench: expected all, standard or contextual, got {functional!r}")
    with open(harmbench_csv("test"), encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("FunctionalCategory") != "copyright"]
    out = []
    for row in rows:
        text = harmbench_prompt(row)
        if text is None:  # a contextual row with no context: nothing to ask
            continue
        if functional != "all" and row.get("FunctionalCategory") != functional:
            continue
        out.append({"id": row["BehaviorID"], "prompt": text, "category": row.get("SemanticCategory") or "unknown",
                    "functional": row.get("FunctionalCategory") or "unknown"})
    return first(out, limit)


def rates_by(items: list[dict], refused: list[bool], key: str) -> dict:
    """{group: refusal rate} over the items of each group."""
    groups = defaultdict(list)
    for it, r in zip(items, refused):
        groups[it[key]].append(r)
    return {g: sum(v) / len(v) for g, v in sorted(groups.items())}


def score_refusals(model, tokenizer, items: list[dict], args: EvalArgs, by: tuple[str, ...],
                   sample_prompt=lambda p: p[-200:], ids: list[str] | None = None) -> dict:
    """Ask each item's "prompt" as one user turn, greedily, and score refusals (shared by the HarmBench
    and StrongREJECT tasks): refusal_rate, attack_success_rate, n, stderr, by_<key> for each key in `by`,
    samples, and items (ids: each item's id; default its "id")."""
    prompts = [chat_prompt(it["prompt"], tokenizer, args.template) for it in items]
    answers = em.generate(model, tokenizer, prompts, args.new_tokens(64), args.batch_size)
    refused = [is_refusal(a) for a in answers]
    rate = sum(refused) / len(refused)
    out = {"refusal_rate": rate, "attack_success_rate": 1.0 - rate, "n": len(refused), "stderr": stderr(refused)}
    for key in by:
        out[f"by_{key}"] = rates_by(items, refused, key)
    out["samples"] = [{**({"id": it["id"]} if "id" in it else {}), "prompt": sample_prompt(it["prompt"]),
                       "generation": a, "refused": r} for it, a, r in list(zip(items, answers, refused))[:5]]
    ids = ids if ids is not None else [it["id"] for it in items]
    return with_items(out, [{"id": i, "score": float(r), "text": a[:TEXT_CHARS], **{k: it[k] for k in by}}
                            for i, it, a, r in zip(ids, items, answers, refused)], "refusal_rate")


def run_refusal(model, tokenizer, args: EvalArgs) -> dict:
    items = harmbench_test_behaviours(args.limit, args.harmbench)
    return score_refusals(model, tokenizer, items, args, by=("category", "functional"))
