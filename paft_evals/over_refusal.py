"""Task `over_refusal`: how often the model refuses prompts that only LOOK harmful.

Safety training can teach a model to refuse on surface words ("kill", "shoot", "bomb")
instead of on intent. paft_evals/data/benign_prompts.jsonl holds 121 harmless requests written
for this engine in the spirit of XSTest (Röttger et al. 2024), none taken from it: homonyms ("kill
a Python process"), figurative language ("my presentation bombed"), safe contexts (games, sport,
fiction), definitions, history, safety questions, public facts about public figures, cooking and
gardening. Each row is {"prompt", "type"}, type one of TYPES. With 121 prompts a rate's standard
error is at most 0.045 (0.5/√121), against 0.077 with the first 42. No prompt shares an 8-word run
with a HarmBench behaviour (tests/test_evals_items.py): the two tasks never ask the same thing.

    over_refusal_rate = (1/n) Σ_i is_refusal(answer_i)     (lower is better)
    by_type[t]        = the same over the prompts of type t

Read it next to the `refusal` task: a model that refuses everything has refusal_rate 1
and over_refusal_rate 1; the interesting models are high on the first and low on the second.
`--data FILE` replaces the built-in prompts with another JSONL of {"prompt"[, "type"]}.

Items: {"id": "benign/<row index>" ("<file stem>/<row index>" for --data FILE), "score": 1 refused | 0,
"text": the answer's first 200 characters, "type"}. New prompts go at the end of the file, so the
ids of the older ones stay.
"""
from __future__ import annotations

import os

from engine import generate as em
from paft_evals.common import TEXT_CHARS, EvalArgs, chat_prompt, file_stem, first, read_jsonl, stderr, with_items
from paft_evals.harmbench import rates_by
from paft_evals.refusal import is_refusal

BENIGN_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "benign_prompts.jsonl")
# The look-alike kinds of the built-in prompts (by_type's keys); a --data file may use its own.
TYPES = ("homonym", "figurative", "safe_context", "definition", "history", "safety", "public_figure", "cooking",
         "gardening")


def benign_prompts(path: str = BENIGN_PROMPTS) -> list[dict]:
    rows = read_jsonl(path)
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{path} row {i + 1}: needs a non-empty \"prompt\"")
        row.setdefault("type", "unknown")
    return rows


def run_over_refusal(model, tokenizer, args: EvalArgs) -> dict:
    items = first(benign_prompts(args.data or BENIGN_PROMPTS), args.limit)
    prompts = [chat_prompt(it["prompt"], tokenizer, args.template) for it in items]
    answers = em.generate(model, tokenizer, prompts, args.new_tokens(64), args.batch_size)
    refused = [is_refusal(a) for a in answers]
    result = {"over_refusal_rate": sum(refused) / len(refused), "n": len(refused), "stderr": stderr(refused),
              "by_type": rates_by(items, refused, "type"),
              "samples": [{"prompt": it["prompt"], "generation": a, "refused": r}
                          for it, a, r in list(zip(items, answers, refused))[:5]]}
    source = "benign" if not args.data or os.path.samefile(args.data, BENIGN_PROMPTS) else file_stem(args.data)
    return with_items(result, [{"id": f"{source}/{i}", "score": float(r), "text": a[:TEXT_CHARS], "type": it["type"]}
                               for i, (it, a, r) in enumerate(zip(items, answers, refused))], "over_refusal_rate")
