"""Write the SFT training file of the laptop reproduction (recipes/paft/laptop/sft.yaml).

    python -m paft_evals.laptop_data out/laptop/data

    sharegpt_train800.jsonl  the first 800 usable chats of ShareGPT's train split, {messages} per line
                             (engine/data/catalog.py: a PyPI package file in the cache, sha256-checked).
                             Tokenizing all 16.9k train chats would take minutes per stage on 2 cores,
                             and a run reads only steps x batch of them.

The evaluations read their data through the named tasks (bigbench_bbh, truthfulqa_mc, hhh,
gsm8k100, strongreject: paft_evals/benchmarks.py), so they need no files here. ShareGPT's train and
test splits are fixed by record id (catalog.sharegpt_split_of), so this file never holds a test
chat. The file is written to a temporary name and renamed.
"""
from __future__ import annotations

import json
import os
import sys

from engine.writes import write_text

SHAREGPT_ROWS = 800


def write_all(out: str) -> list[str]:
    from engine.data.catalog import load_named

    os.makedirs(out, exist_ok=True)
    chats = [r for r in load_named("sharegpt", "train") if r][:SHAREGPT_ROWS]
    path = os.path.join(out, f"sharegpt_train{SHAREGPT_ROWS}.jsonl")
    write_text(path, "".join(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n" for r in chats))
    return [path]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(__doc__)
        return 2 if argv and argv[0] not in ("-h", "--help") else 0
    try:
        for path in write_all(argv[0]):
            print(f"wrote {path}")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
