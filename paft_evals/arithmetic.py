"""Task `arithmetic`: exact match on the builtin:arithmetic held-out split.

    exact_match = (1/n) Σ_i [ extract_answer(greedy answer_i) == answer_i ]

The held-out problems never appear in training (engine.data.arithmetic splits by a stable
hash), and the prompt is rendered with the training chat template; answers are read by
engine.generate's extract_answer, the same code training uses for its before/after check.
Item ids are "arith/<index>": the first k held-out rows are the same for every k, so an index
names the same problem whatever --limit is. --limit may go up to the split's size (~1,300
problems); more is an error naming that size.
"""
from __future__ import annotations

from engine.data import arithmetic_rows
from engine import generate as em
from paft_evals.common import TEXT_CHARS, EvalArgs, with_items

DEFAULT_N = 200  # held-out problems scored when --limit is not given


def run_arithmetic(model, tokenizer, args: EvalArgs) -> dict:
    rows = arithmetic_rows("heldout", args.limit or DEFAULT_N)
    # engine.generate.exact_match's scoring, with the generations and hits kept for the items
    result, generations, hits = em.score_answers(model, tokenizer, rows, args.template, args.new_tokens(16),
                                                 args.batch_size)
    items = [{"id": f"arith/{i}", "score": float(h), "text": g[:TEXT_CHARS]}
             for i, (g, h) in enumerate(zip(generations, hits))]
    return with_items(result, items, "exact_match")
