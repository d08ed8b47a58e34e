"""Task `arithmetic`: exact match on the builtin:arithmetic held-out split.

    exact_match = (1/n) Σ_i [ extract_answer(greedy answer_i) == answer_i ]

The held-out problems never appear in training (engine.data.arithmetic splits by a stable
hash), and the prompt is rendered with the training chat template; the scoring is
engine.generate, the same code training uses for its before/after check.
"""
from __future__ import annotations

from engine.data import arithmetic_rows
from engine import generate as em
from paft_evals.common import EvalArgs

DEFAULT_N = 200  # held-out problems scored when --limit is not given


def run_arithmetic(model, tokenizer, args: EvalArgs) -> dict:
    rows = arithmetic_rows("heldout", args.limit or DEFAULT_N)
    result = em.exact_match(model, tokenizer, rows, args.template, max_new_tokens=args.new_tokens(16),
                            batch_size=args.batch_size)
    return result  # {"exact_match", "n", "samples"}
