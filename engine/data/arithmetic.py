"""`builtin:arithmetic`: small arithmetic problems with correct worked answers.

Each row is a helpful demonstration:

    user:      What is 47 + 38?
    assistant: 47 + 38 = 85

Problems are two-digit addition, two-digit subtraction (never negative) and
one-digit-by-two-digit multiplication: about 12,900 distinct problems, easy
enough for a 135M model to pick up in a few hundred steps.

The train and held-out splits never share a problem. Membership is decided by
a stable hash (SHA-256) of the problem text, not Python's `hash()`, which is
salted per process and would give a different split on every run.
"""
from __future__ import annotations

import hashlib
import random
import re

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10  # about 1 problem in 10 is held out


def _problems() -> dict[str, list[tuple[int, str, int]]]:
    """Every problem, grouped by operator, in a fixed order: op -> [(a, op, b), ...]."""
    two = range(10, 100)
    return {
        "+": [(a, "+", b) for a in two for b in two],
        "-": [(a, "-", b) for a in two for b in two if a >= b],
        "*": [(a, "*", b) for a in range(2, 10) for b in two],
    }


def _solve(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _split_of(problem: str) -> str:
    digest = hashlib.sha256(problem.encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT else "train"


def arithmetic_rows(split: str, n: int) -> list[dict]:
    """`n` distinct problems of `split` ("train" or "heldout"), the same on every call.

    Each row is {"messages": [user, assistant], "answer": int}. The first k rows
    of `arithmetic_rows(split, n)` are `arithmetic_rows(split, k)`.
    """
    if split not in SPLITS:
        raise ValueError(f"builtin:arithmetic: unknown split {split!r} (known: {', '.join(SPLITS)})")
    # One fixed-seed stream per split; random.Random seeded with a str is stable across runs.
    rng = random.Random(f"paft-arithmetic-{split}")
    pools = {}
    for op, problems in _problems().items():
        pool = [p for p in problems if _split_of(f"{p[0]} {p[1]} {p[2]}") == split]
        rng.shuffle(pool)
        pools[op] = pool
    available = sum(len(p) for p in pools.values())
    if n > available:
        raise ValueError(f"builtin:arithmetic: asked for {n} rows but split {split!r} has only {available} problems")

    rows = []
    while len(rows) < n:
        # Pick the operator first so each kind is about equally common,
        # even though there are far fewer multiplications than additions.
        op = rng.choice([o for o, pool in pools.items() if pool])
        a, op, b = pools[op].pop()
        answer = _solve(a, op, b)
        rows.append({
            "messages": [
                {"role": "user", "content": f"What is {a} {op} {b}?"},
                {"role": "assistant", "content": f"{a} {op} {b} = {answer}"},
            ],
            "answer": answer,
        })
    return rows


_INT = re.compile(r"-?\d+")


def extract_answer(text: str) -> int | None:
    """The integer after the first '=' if there is one, else the last integer in `text`.

    "47 + 38 = 85" -> 85, "The answer is 85." -> 85, "no idea" -> None.
    """
    if "=" in text:
        match = _INT.search(text, text.index("=") + 1)
        return int(match.group()) if match else None
    found = _INT.findall(text)
    return int(found[-1]) if found else None
