"""Tests for preference data: parsers on hub-schema fixtures, HarmBench pairs, pair encoding, PairBatches.

The fixtures under tests/fixtures/ are small hand-written files in each hub dataset's
exact schema; nothing is downloaded. The tokenizer is builtin:tiny-llama's byte-level
one (token = byte, plus special tokens), so decoded tokens are exactly the text.
"""
import csv
import json
import os

import pytest
import torch

from engine.data import (REFUSALS, PairBatches, encode_pair, encode_pairs, harmbench_pairs, load_examples,
                         load_preference_examples, looks_like_refusal)
from engine.data.preference import harmbench_csv, parse_hh_rlhf, refusal_for
from engine.models import load_model_and_tokenizer
from engine.recipe import DataConfig, ModelConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
PAIRS = os.path.join(FIXTURES, "pairs.jsonl")
BEAVERTAILS = os.path.join(FIXTURES, "beavertails", "train.jsonl")
ULTRAFEEDBACK = os.path.join(FIXTURES, "ultrafeedback", "train_prefs.jsonl")
ULTRACHAT = os.path.join(FIXTURES, "ultrachat", "train_sft.jsonl")
IGNORE = -100


@pytest.fixture(scope="module")
def tok():
    _, tokenizer = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))
    return tokenizer


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- 1. pairs (.jsonl)

def test_pairs_jsonl_forms_and_bad_rows():
    examples, report = load_preference_examples(DataConfig(source=PAIRS, max_bad_fraction=1.0), "train")
    # Rows 2 (bad JSON), 4 (no rejected), 6 (equal answers), 7 (prompt ends with assistant),
    # 8 (chosen's user turn is not the prompt), 10 (not an object), 11 (blank answer) are bad.
    assert report == {"source": PAIRS, "split": "train", "format": "pairs", "rows": 12, "bad": 7,
                      "first_bad": 2, "filtered": 0, "examples": 5}
    assert [e["id"] for e in examples] == ["p0", "p1", "p3", "p5", "p9"]
    assert examples[0] == {"prompt": [user("Name a prime number between 10 and 20.")], "chosen": "13",
                           "rejected": "15", "id": "p0"}
    # A messages prompt is kept whole, system and earlier turns included.
    assert [m["role"] for m in examples[1]["prompt"]] == ["system", "user", "assistant", "user"]
    assert examples[1]["prompt"][-1] == user("About a week.")
    # Message-list answers: the last assistant content, whether or not the list repeats the prompt.
    assert (examples[2]["prompt"], examples[2]["chosen"], examples[2]["rejected"]) == \
        ([user("Give a synonym for happy.")], "Joyful.", "Sad.")
    assert (examples[3]["chosen"], examples[3]["rejected"]) == ("tac", "cta")


def test_too_many_bad_rows_is_one_line_error_naming_file_and_row():
    with pytest.raises(ValueError) as err:
        load_preference_examples(DataConfig(source=PAIRS), "train")  # max_bad_fraction=0.1
    message = str(err.value)
    assert "\n" not in message and PAIRS in message and "7 of 12 rows" in message
    assert "first bad row: 2 (line 3)" in message and "max_bad_fraction=0.1" in message
    # Just under the limit: 7/12 = 0.583
    assert len(load_preference_examples(DataConfig(source=PAIRS, max_bad_fraction=0.59), "train")[0]) == 5
    with pytest.raises(ValueError, match="max_bad_fraction=0.58"):
        load_preference_examples(DataConfig(source=PAIRS, max_bad_fraction=0.58), "train")


def test_column_mapping_and_eval_rules(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "good": str(i + 1), "poor": str(i + 2), "n": i} for i in range(20)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(ValueError, match="20 of 20 rows"):  # without the mapping nothing parses
        load_preference_examples(DataConfig(source=path), "train")
    cfg = DataConfig(source=path, columns={"prompt": "question", "chosen": "good", "rejected": "poor"},
                     eval_fraction=0.25)
    train, _ = load_preference_examples(cfg, "train")
    held, report = load_preference_examples(cfg, "eval")
    assert len(train) == 15 and len(held) == 5 and report["rows"] == 5
    for e in train + held:
        assert e == {"prompt": [user(f"What is {e['n']} + 1?")], "chosen": str(e["n"] + 1),
                     "rejected": str(e["n"] + 2), "n": e["n"]}
    assert sorted(e["n"] for e in train + held) == list(range(20))
    assert not {e["n"] for e in train} & {e["n"] for e in held}
    # The same held-out rows as SFT's eval_fraction picks: one shared selection rule.
    sft = DataConfig(source=write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["question"], "completion": r["good"],
                                                                  "n": r["n"]} for r in rows]),
                     eval_fraction=0.25)
    assert [e["n"] for e in load_examples(sft, "eval")[0]] == [e["n"] for e in held]

    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3)
    held, report = load_preference_examples(DataConfig(source=PAIRS, eval_source=other), "eval")
    assert len(held) == 3 and report["source"] == other
    assert load_preference_examples(DataConfig(source=PAIRS, max_bad_fraction=1.0), "eval")[0] == []
    with pytest.raises(ValueError, match="builtin:arithmetic has no preference pairs"):
        load_preference_examples(DataConfig(source="builtin:arithmetic"), "train")


# --------------------------------------------------------------------------- 2. hub schemas

def test_hh_rlhf_turns_and_prompt_split():
    cfg = DataConfig(source=f"hf:{FIXTURES}/hh_rlhf", data_dir="harmless-base", format="hh_rlhf",
                     eval_split="test", max_bad_fraction=0.5)
    examples, report = load_preference_examples(cfg, "train")
    # Bad: 3 (equal answers), 4 (empty answer), 6 (one side ends with a human turn), 8 (no turns).
    assert (report["rows"], report["bad"], report["first_bad"], report["examples"]) == (10, 4, 3, 6)
    raw = read_jsonl(os.path.join(FIXTURES, "hh_rlhf", "harmless-base", "train.jsonl"))
    three_turns = examples[2]
    assert [m["role"] for m in three_turns["prompt"]] == ["user", "assistant"] * 2 + ["user"]
    assert three_turns["prompt"][0] == user("My coworker keeps taking credit for my work.")
    assert three_turns["prompt"][-1] == user("Should I post them all over the office?")
    assert three_turns["chosen"] == raw[2]["chosen"].rsplit("\n\nAssistant: ", 1)[1]
    assert three_turns["rejected"] == "Yes, embarrass them in front of everyone."
    # Row 5 parts at the first answer: the prompt is the longest common prefix of turns.
    parted = examples[3]
    assert parted["prompt"] == [user("What's a good insult for a short person?")]
    assert parted["rejected"] == "Call them a garden gnome."
    for e in examples:
        assert e["chosen"] == e["chosen"].strip() and e["chosen"] != e["rejected"]
        assert "Human:" not in e["chosen"] + e["rejected"] and e["prompt"][-1]["role"] == "user"

    held, report = load_preference_examples(cfg, "eval")
    assert report["split"] == "test" and len(held) == 6 and report["bad"] == 0


def test_hh_rlhf_parser_edge_cases():
    t = lambda *turns: "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {x}"  # noqa: E731
                               for i, x in enumerate(turns))
    assert parse_hh_rlhf({"chosen": t("Q", "  good  "), "rejected": t("Q", "bad")}) == \
        {"prompt": [user("Q")], "chosen": "good", "rejected": "bad"}
    assert parse_hh_rlhf({"chosen": t("Q", "same"), "rejected": t("Q", "same ")}) is None
    assert parse_hh_rlhf({"chosen": t("Q", "A", "Q2"), "rejected": t("Q", "A", "Q3")}) is None  # no answers
    assert parse_hh_rlhf({"chosen": "Q", "rejected": t("Q", "A")}) is None
    assert parse_hh_rlhf({"chosen": t("Q", "A"), "rejected": None}) is None


BT_ROWS = read_jsonl(BEAVERTAILS)


def test_beavertails_helpful_uses_better_response_id():
    cfg = DataConfig(source="hf:json", data_files=BEAVERTAILS, format="beavertails_helpful", max_bad_fraction=0.2)
    examples, report = load_preference_examples(cfg, "train")
    # Bad: 7 (empty response), 8 (no better_response_id). Nothing is filtered for helpfulness.
    assert (report["rows"], report["bad"], report["first_bad"], report["filtered"]) == (12, 2, 7, 0)
    expected = [(r["prompt"], r[f"response_{r['better_response_id']}"], r[f"response_{1 - r['better_response_id']}"])
                for i, r in enumerate(BT_ROWS) if i not in (7, 8)]
    assert [(e["prompt"][0]["content"], e["chosen"], e["rejected"]) for e in examples] == expected
    # Row 0: the better response is the unsafe one; helpfulness pairs follow better_response_id anyway.
    assert examples[0]["chosen"] == BT_ROWS[0]["response_0"] and BT_ROWS[0]["is_response_0_safe"] is False
    assert examples[0]["prompt"] == [user(BT_ROWS[0]["prompt"])]


def test_beavertails_harmless_keeps_exactly_one_safe_and_counts_filtered():
    cfg = DataConfig(source="hf:json", data_files=BEAVERTAILS, format="beavertails_harmless", max_bad_fraction=0.2)
    examples, report = load_preference_examples(cfg, "train")
    # Bad: 7 (empty response), 9 (no safety label). Filtered (both or neither safe): 2, 3, 5, 10.
    # Filtered rows are not bad: 6 of 12 rows are unused, yet max_bad_fraction=0.2 is not exceeded.
    assert (report["rows"], report["bad"], report["first_bad"], report["filtered"], report["examples"]) == \
        (12, 2, 7, 4, 6)
    kept = [0, 1, 4, 6, 8, 11]
    for e, i in zip(examples, kept):
        r = BT_ROWS[i]
        safe = 0 if r["is_response_0_safe"] else 1
        assert r[f"is_response_{safe}_safe"] and not r[f"is_response_{1 - safe}_safe"]
        assert (e["prompt"][0]["content"], e["chosen"], e["rejected"]) == \
            (r["prompt"], r[f"response_{safe}"], r[f"response_{1 - safe}"])
    # Rows 0 and 4: the safe answer is chosen although the other one was rated more helpful.
    assert examples[0]["chosen"] == BT_ROWS[0]["response_1"] and examples[2]["chosen"] == BT_ROWS[4]["response_0"]
    with pytest.raises(ValueError, match=r"2 of 12 rows in hf:json \(.*beavertails/train.jsonl\)"):
        load_preference_examples(DataConfig(source="hf:json", data_files=BEAVERTAILS,
                                            format="beavertails_harmless"), "train")


def test_ultrafeedback_message_lists():
    cfg = DataConfig(source="hf:json", data_files=ULTRAFEEDBACK, format="ultrafeedback", max_bad_fraction=0.3)
    examples, report = load_preference_examples(cfg, "train")
    # Bad: 3 (chosen's user turn is another question), 5 (rejected ends with a user turn).
    assert (report["rows"], report["bad"], report["first_bad"], report["examples"]) == (8, 2, 3, 6)
    raw = [r for i, r in enumerate(read_jsonl(ULTRAFEEDBACK)) if i not in (3, 5)]
    for e, r in zip(examples, raw):
        assert e["prompt"] == [user(r["prompt"])]
        assert e["chosen"] == r["chosen"][-1]["content"] and e["rejected"] == r["rejected"][-1]["content"]
        assert (e["prompt_id"], e["score_chosen"], e["score_rejected"]) == \
            (r["prompt_id"], r["score_chosen"], r["score_rejected"])
        assert "messages" not in e  # a copy of chosen
    # format auto (= pairs) reads the same rows, but keeps the extra "messages" column.
    auto, _ = load_preference_examples(DataConfig(source="hf:json", data_files=ULTRAFEEDBACK,
                                                  max_bad_fraction=0.3), "train")
    assert [e["chosen"] for e in auto] == [e["chosen"] for e in examples] and "messages" in auto[0]


def test_ultrachat_sft_rows_through_the_sft_path():
    cfg = DataConfig(source="hf:json", data_files=ULTRACHAT, columns={"messages": "messages"})
    examples, report = load_examples(cfg, "train")
    raw = read_jsonl(ULTRACHAT)
    assert report["rows"] == 6 and report["bad"] == 0
    assert [e["messages"] for e in examples] == [r["messages"] for r in raw]
    assert examples[1]["prompt_id"] == "u02" and len(examples[1]["messages"]) == 4


# --------------------------------------------------------------------------- 3. HarmBench

def csv_rows(split):
    with open(harmbench_csv(split), encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_harmbench_template_pairs():
    val, val_report = harmbench_pairs("val", "template")
    test, test_report = harmbench_pairs("test", "template")
    rows = {s: csv_rows(s) for s in ("val", "test")}
    for examples, report, split in ((val, val_report, "val"), (test, test_report, "test")):
        wanted = [r for r in rows[split] if r["FunctionalCategory"] != "copyright"]
        assert [e["behavior_id"] for e in examples] == [r["BehaviorID"] for r in wanted]
        assert report["excluded_copyright"] == len(rows[split]) - len(wanted) > 0
        assert report["bad"] == 0 and report["examples"] == len(examples) and report["split"] == split
        assert {e["functional_category"] for e in examples} == {"standard", "contextual"}
    assert not {e["behavior_id"] for e in val} & {e["behavior_id"] for e in test}
    assert (len(val), len(test)) == (60, 240)

    by_id = {r["BehaviorID"]: r for r in rows["val"]}
    for e in val:
        r, prompt = by_id[e["behavior_id"]], e["prompt"]
        assert len(prompt) == 1 and prompt[0]["role"] == "user"
        if r["FunctionalCategory"] == "contextual":
            # HarmBench's own layout: context, a blank line, ---, a blank line, the request.
            assert prompt[0]["content"] == f"{r['ContextString'].strip()}\n\n---\n\n{r['Behavior'].strip()}"
        else:
            assert prompt[0]["content"] == r["Behavior"]
        assert e["chosen"] in REFUSALS and e["category"] == r["SemanticCategory"]
        assert e["rejected"].startswith("Sure, here is") and r["Behavior"].strip() in e["rejected"]


def test_refusals_are_deterministic_and_varied():
    assert len(REFUSALS) >= 6 and len(set(REFUSALS)) == len(REFUSALS)
    assert all(looks_like_refusal(r) for r in REFUSALS)
    assert not looks_like_refusal("Sure, here is a detailed answer to your request.\n\nStep 1:")
    assert looks_like_refusal("I\u2019m sorry, that is not something I do.")
    first, _ = harmbench_pairs("val", "template")
    again, _ = harmbench_pairs("val", "template")
    assert [e["chosen"] for e in first] == [e["chosen"] for e in again]
    assert all(e["chosen"] == refusal_for(e["behavior_id"]) for e in first)
    assert len({e["chosen"] for e in first}) >= 5  # spread over the phrasings, not one answer for all
    # Pinned: the pick is a stable hash, not Python's per-process salted hash().
    assert refusal_for("safrole_oil_extraction_guide") == REFUSALS[0]


def test_harmbench_generate_mode_caches(tmp_path):
    calls = []

    def fake_generate(prompts):
        calls.append(prompts)
        # Every third answer is already a refusal: kept, but counted.
        return [("I'm sorry, I cannot." if i % 3 == 0 else f"Here you go: answer {i}.") for i in range(len(prompts))]

    kwargs = dict(cache_dir=str(tmp_path), model_key="org/tiny model")
    examples, report = harmbench_pairs("val", "generate", generate_fn=fake_generate, **kwargs)
    assert len(calls) == 1 and len(calls[0]) == 60 == len(examples)
    assert calls[0][0] == examples[0]["prompt"] and all(p[-1]["role"] == "user" for p in calls[0])
    assert (report["generated"], report["cached"], report["rejected_refusals"]) == (60, 0, 20)
    assert examples[1]["rejected"] == "Here you go: answer 1."
    cache = tmp_path / "harmbench_rejected" / "org_tiny_model-val.jsonl"
    lines = read_jsonl(cache)
    assert [line["BehaviorID"] for line in lines] == [e["behavior_id"] for e in examples]
    assert not [p for p in os.listdir(cache.parent) if p != cache.name]  # no temporary file left

    def must_not_run(prompts):
        raise AssertionError("generate_fn called although everything is cached")

    again, report = harmbench_pairs("val", "generate", generate_fn=must_not_run, **kwargs)
    assert again == examples and (report["generated"], report["cached"]) == (0, 60)
    again, _ = harmbench_pairs("val", "generate", **kwargs)  # no generate_fn is needed either
    assert again == examples

    # Only missing prompts are generated: drop two cache lines.
    cache.write_text("".join(json.dumps(line) + "\n" for line in lines[2:]))
    calls.clear()
    _, report = harmbench_pairs("val", "generate", generate_fn=fake_generate, **kwargs)
    assert len(calls) == 1 and calls[0] == [examples[0]["prompt"], examples[1]["prompt"]]
    assert (report["generated"], report["cached"]) == (2, 58) and len(read_jsonl(cache)) == 60

    # Another split or model has its own cache file.
    with pytest.raises(ValueError, match="needs a generate_fn"):
        harmbench_pairs("test", "generate", **kwargs)
    with pytest.raises(ValueError, match="needs a model_key"):
        harmbench_pairs("val", "generate", generate_fn=fake_generate, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="list of 60 strings"):
        harmbench_pairs("val", "generate", generate_fn=lambda p: ["x"], cache_dir=str(tmp_path), model_key="m2")


def test_harmbench_through_load_preference_examples(tmp_path):
    cfg = DataConfig(source="builtin:harmbench", harmbench_rejected="template", num_train=7, num_eval=5,
                     eval_fraction=0.5)  # eval_fraction is ignored: test is the held-out split
    train, train_report = load_preference_examples(cfg, "train")
    held, held_report = load_preference_examples(cfg, "eval")
    assert (train_report["split"], held_report["split"]) == ("val", "test")
    assert len(train) == 7 and len(held) == 5
    val_ids = [r["BehaviorID"] for r in csv_rows("val") if r["FunctionalCategory"] != "copyright"]
    assert [e["behavior_id"] for e in train] == val_ids[:7]

    generated = []
    cfg = DataConfig(source="builtin:harmbench", num_train=4)  # harmbench_rejected: generate (the default)
    examples, report = load_preference_examples(
        cfg, "train", generate_fn=lambda p: generated.append(len(p)) or ["Okay."] * len(p),
        cache_dir=str(tmp_path), model_key="tiny")
    assert generated == [4] and len(examples) == 4 and report["rejected_mode"] == "generate"

    # A harmbench eval_source next to another training source.
    cfg = DataConfig(source=PAIRS, max_bad_fraction=1.0, eval_source="builtin:harmbench",
                     harmbench_rejected="template", num_eval=3)
    held, report = load_preference_examples(cfg, "eval")
    assert report["split"] == "test" and len(held) == 3


def test_harmbench_empty_generations_are_bad_rows(tmp_path):
    cfg = DataConfig(source="builtin:harmbench", num_train=10, max_bad_fraction=0.5)
    examples, report = load_preference_examples(
        cfg, "train", generate_fn=lambda p: ["  "] * 3 + ["Fine."] * (len(p) - 3),
        cache_dir=str(tmp_path), model_key="m")
    assert (report["bad"], report["first_bad"], len(examples)) == (3, 0, 7)
    with pytest.raises(ValueError, match="3 of 10 rows in builtin:harmbench split 'val'"):
        load_preference_examples(DataConfig(source="builtin:harmbench", num_train=10), "train",
                                 cache_dir=str(tmp_path), model_key="m")


# --------------------------------------------------------------------------- 4. encoding

EXAMPLE = {"prompt": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello, how can I help?"),
                      user("Name a prime number.")],
           "chosen": "7 is prime.", "rejected": "9 is prime."}
END = {"tokenizer": "<|im_end|>\n", "vicuna": "<|im_end|>", "mistral": "<|im_end|>"}


def trained(ids, labels):
    return [i for i, l in zip(ids, labels) if l != IGNORE]


def prompt_length(labels):
    return next(t for t, l in enumerate(labels) if l != IGNORE)


@pytest.mark.parametrize("template", ["tokenizer", "vicuna", "mistral"])
def test_encode_pair_masks_exactly_the_final_answers(tok, template):
    e = encode_pair(EXAMPLE, tok, template, max_length=1024)
    assert set(e) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    for side in ("chosen", "rejected"):
        ids, labels = e[f"{side}_input_ids"], e[f"{side}_labels"]
        assert len(ids) == len(labels) and labels[0] == IGNORE
        # Only the final answer and its end marker; the earlier "Hello, ..." turn is context.
        assert tok.decode(trained(ids, labels)) == EXAMPLE[side] + END[template]
        p = prompt_length(labels)
        assert all(l == i for i, l in zip(ids[p:], labels[p:]))  # one contiguous trained run to the end
    p = prompt_length(e["chosen_labels"])
    assert p == prompt_length(e["rejected_labels"]) and e["chosen_input_ids"][:p] == e["rejected_input_ids"][:p]
    assert tok.decode(e["chosen_input_ids"][:p]).endswith(
        {"tokenizer": "<|im_start|>assistant\n", "vicuna": "ASSISTANT: ", "mistral": "[/INST] "}[template])


def test_encode_pair_left_truncates_the_prompt(tok):
    full = encode_pair(EXAMPLE, tok, "tokenizer", max_length=1024)
    n_c, n_r = len(full["chosen_input_ids"]), len(full["rejected_input_ids"])
    assert n_c == n_r  # "7 is prime." and "9 is prime." are the same length in bytes
    p = prompt_length(full["chosen_labels"])
    cut = encode_pair(EXAMPLE, tok, "tokenizer", max_length=n_c - 10)
    for side in ("chosen", "rejected"):
        ids, labels = cut[f"{side}_input_ids"], cut[f"{side}_labels"]
        # The first 10 prompt tokens are gone; the answer is whole.
        assert ids == full[f"{side}_input_ids"][10:] and labels == full[f"{side}_labels"][10:]
        assert labels[0] == IGNORE and prompt_length(labels) == p - 10

    # Unequal answers: both prompts lose the same tokens, so the rows keep one prompt.
    long = dict(EXAMPLE, rejected="No. " * 20)
    full = encode_pair(long, tok, "tokenizer", max_length=1024)
    n = len(full["rejected_input_ids"])
    cut = encode_pair(long, tok, "tokenizer", max_length=n - 5)
    assert cut["rejected_input_ids"] == full["rejected_input_ids"][5:]
    assert cut["chosen_input_ids"] == full["chosen_input_ids"][5:]

    # An answer longer than max_length: one prompt token is kept, the answer's end is cut.
    cut = encode_pair(long, tok, "tokenizer", max_length=20)
    ids, labels = cut["rejected_input_ids"], cut["rejected_labels"]
    p = prompt_length(full["rejected_labels"])
    assert ids == full["rejected_input_ids"][p - 1:p + 19] and labels[0] == IGNORE and len(ids) == 20
    assert cut["chosen_input_ids"][0] == ids[0] and cut["chosen_labels"][0] == IGNORE
    assert tok.decode(trained(cut["chosen_input_ids"], cut["chosen_labels"])) == "7 is prime.<|im_end|>\n"


def test_encode_pairs_report(tok):
    short = {"prompt": [{"role": "system", "content": "S"}, user("Q")], "chosen": "a", "rejected": "b"}
    examples = [EXAMPLE, dict(EXAMPLE, rejected="No. " * 20), short]
    lengths = [len(encode_pair(e, tok, "vicuna", 4096)["rejected_input_ids"]) for e in examples]
    assert lengths[2] < lengths[0] < lengths[1]
    encoded, report = encode_pairs(examples, tok, "vicuna", max_length=lengths[0])
    assert report["pairs"] == 3 and report["kept"] == 3 and report["dropped"] == 0
    assert report["truncated"] == 1 and report["first_dropped"] is None
    assert [len(e["rejected_input_ids"]) for e in encoded] == [lengths[0], lengths[0], lengths[2]]
    assert report["tokens"] == sum(len(e[k]) for e in encoded for k in ("chosen_input_ids", "rejected_input_ids"))
    assert report["trained_tokens"] == sum(len(trained(e[f"{s}_input_ids"], e[f"{s}_labels"]))
                                           for e in encoded for s in ("chosen", "rejected"))

    # One token left per side: no token is predicted from anything, so every pair is dropped.
    assert encode_pair(short, tok, "vicuna", max_length=1) is None
    encoded, report = encode_pairs(examples, tok, "vicuna", max_length=1)
    assert encoded == [] and (report["kept"], report["dropped"], report["first_dropped"]) == (0, 3, 0)


# --------------------------------------------------------------------------- 5. PairBatches

@pytest.fixture(scope="module")
def encoded_pairs(tok):
    examples, _ = load_preference_examples(DataConfig(source=PAIRS, max_bad_fraction=1.0), "train")
    hh, _ = load_preference_examples(DataConfig(source=f"hf:{FIXTURES}/hh_rlhf", data_dir="harmless-base",
                                                format="hh_rlhf", max_bad_fraction=0.5), "train")
    encoded, report = encode_pairs(examples + hh, tok, "tokenizer", max_length=512)
    assert report["kept"] == 11
    return encoded


def test_pair_batches_layout(tok, encoded_pairs):
    b = PairBatches(encoded_pairs, batch_size=4, seed=0, pad_id=tok.pad_token_id)
    assert len(b) == 3  # 11 pairs: 4 + 4 + 3
    by_chosen = {tuple(e["chosen_input_ids"]): e for e in encoded_pairs}
    seen = []
    for i in range(len(b)):
        batch = b.batch(i)
        B = batch["n_pairs"]
        assert isinstance(B, int) and B == (3 if i == 2 else 4)
        ids, labels, mask, pos = (batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids"))
        assert ids.shape == labels.shape == mask.shape == pos.shape and ids.shape[0] == 2 * B
        assert mask.sum(1).max() == ids.shape[1]  # padded to the longest of all 2B rows
        assert (labels[mask == 0] == IGNORE).all() and (ids[mask == 0] == tok.pad_token_id).all()
        for row in range(B):
            n_c, n_r = int(mask[row].sum()), int(mask[row + B].sum())
            pair = by_chosen[tuple(ids[row, :n_c].tolist())]  # row i is a chosen side ...
            assert ids[row + B, :n_r].tolist() == pair["rejected_input_ids"]  # ... row i + B its rejected side
            assert labels[row, :n_c].tolist() == pair["chosen_labels"]
            assert labels[row + B, :n_r].tolist() == pair["rejected_labels"]
            p = prompt_length(pair["chosen_labels"])
            assert torch.equal(ids[row, :p], ids[row + B, :p])  # same prompt tokens
            assert pos[row, :n_c].tolist() == list(range(n_c))
            seen.append(tuple(ids[row, :n_c].tolist()))
    assert sorted(seen) == sorted(by_chosen)  # each pair once per epoch


def test_pair_batches_are_deterministic(tok, encoded_pairs):
    b = PairBatches(encoded_pairs, batch_size=3, seed=5, pad_id=tok.pad_token_id)
    first = [b.batch(i) for i in range(9)]
    again = PairBatches(encoded_pairs, batch_size=3, seed=5, pad_id=tok.pad_token_id)
    for i in reversed(range(9)):
        for key in ("input_ids", "labels", "attention_mask", "position_ids"):
            assert torch.equal(again.batch(i)[key], first[i][key])
    order = lambda batches: [tuple(x["input_ids"][0].tolist()) for x in batches]  # noqa: E731
    assert order(first[:4]) != order(first[4:8])  # a new order in the next epoch
    other = PairBatches(encoded_pairs, batch_size=3, seed=6, pad_id=tok.pad_token_id)
    assert order(first[:4]) != order([other.batch(i) for i in range(4)])


def test_pair_batch_without_trained_tokens_raises(tok, encoded_pairs):
    untrained = [{k: ([IGNORE] * len(v) if k.endswith("labels") else v) for k, v in e.items()}
                 for e in encoded_pairs[:2]]
    with pytest.raises(ValueError, match="batch 0 has no trained tokens"):
        PairBatches(untrained, batch_size=2, seed=0, pad_id=tok.pad_token_id).batch(0)


def test_sft_on_chosen_keeps_the_answer_of_a_long_prompt(tok):
    # Thakkar et al.'s SFT arm on DPO pairs: a prompt longer than max_length loses its FIRST tokens (as a
    # pair's side does), so the chosen answer is still trained; plain SFT truncation would cut it away.
    from engine.data import encode_chosen
    long = {"prompt": [user("context " * 200 + "so, how do I do it?")], "chosen": "I can't help with that.",
            "rejected": "Sure."}
    short = {"prompt": [user("hello there")], "chosen": "Hi! How can I help?", "rejected": "Go away."}
    enc, report = encode_chosen([long, short], tok, "vicuna", 256)
    assert report["kept"] == 2 and report["truncated"] == 1 and report["dropped"] == 0
    for e, ex in zip(enc, (long, short)):
        assert len(e["input_ids"]) <= 256 and e["labels"][0] == IGNORE
        trained = [t for t, l in zip(e["input_ids"], e["labels"]) if l != IGNORE]
        assert ex["chosen"] in tok.decode(trained)                      # the whole answer is the target
    # the answer's tokens are the same as in the DPO pair's chosen side
    pair = encode_pair(short, tok, "vicuna", 256)
    assert enc[1]["input_ids"] == pair["chosen_input_ids"] and enc[1]["labels"] == pair["chosen_labels"]
