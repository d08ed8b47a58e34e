"""Tests for engine/data: sources, templates, answer-only masks, batching and packing.

Everything runs on CPU with a byte-level BPE tokenizer trained here on a few
lines, so nothing is downloaded.
"""
import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from engine.data import (Batches, arithmetic_rows, encode, encode_all, extract_answer, load_examples,
                         render)
from engine.data.batches import num_trained_tokens
from engine.data.sources import to_messages
from engine.recipe import DataConfig

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONVERSATION = [
    {"role": "system", "content": "You are good at sums."},
    {"role": "user", "content": "What is 47 + 38?"},
    {"role": "assistant", "content": "47 + 38 = 85"},
    {"role": "user", "content": "And 85 - 38?"},
    {"role": "assistant", "content": "85 - 38 = 47"},
]
END_MARKER = {"tokenizer": "<|im_end|>\n", "vicuna": "</s>", "mistral": "</s>"}


@pytest.fixture(scope="module")
def tok():
    lines = [r["messages"][0]["content"] + " ASSISTANT: " + r["messages"][1]["content"]
             for r in arithmetic_rows("train", 200)]
    lines += ["A chat between a curious user and an artificial intelligence assistant.",
              "[INST] You are good at sums. [/INST] USER: And what is"] * 5
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=True)
    bpe.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=500, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = CHATML
    return tokenizer


def runs(labels):
    """Maximal runs of consecutive trained positions, as lists of indices."""
    out, cur = [], []
    for t, label in enumerate(labels):
        if label != -100:
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------- 1. masks

@pytest.mark.parametrize("template", ["tokenizer", "vicuna", "mistral"])
@pytest.mark.parametrize("with_system", [True, False])
def test_masks_cover_exactly_the_answers(tok, template, with_system):
    messages = CONVERSATION if with_system else CONVERSATION[1:]
    out = encode(messages, tok, template, max_length=512)
    ids, labels = out["input_ids"], out["labels"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    trained = runs(labels)
    assert len(trained) == len(answers)  # every other token is -100
    for run, answer in zip(trained, answers):
        assert [labels[t] for t in run] == [ids[t] for t in run]
        text = tok.decode([ids[t] for t in run], clean_up_tokenization_spaces=False)
        # A leading space belongs to the token that starts the answer (BPE: " 85").
        assert text.lstrip(" ") == answer + END_MARKER[template]
    # The full text round-trips: nothing was lost or added by tokenizing once.
    text, _ = render(messages, tok, template)
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == text


def test_template_formats(tok):
    msgs = CONVERSATION[1:3]
    text, spans = render(msgs, tok, "vicuna")
    assert text.startswith("A chat between a curious user") and " USER: What is 47 + 38? ASSISTANT: 47" in text
    assert [text[a:b] for a, b in spans] == ["47 + 38 = 85</s>"]
    text, spans = render(CONVERSATION[:3], tok, "vicuna")
    assert text == "You are good at sums. USER: What is 47 + 38? ASSISTANT: 47 + 38 = 85</s>"
    text, spans = render(CONVERSATION, tok, "mistral")
    assert text == ("<s>[INST] You are good at sums.\n\nWhat is 47 + 38? [/INST] 47 + 38 = 85</s>"
                    "[INST] And 85 - 38? [/INST] 85 - 38 = 47</s>")
    assert [text[a:b] for a, b in spans] == ["47 + 38 = 85</s>", "85 - 38 = 47</s>"]
    text, spans = render(msgs, tok, "tokenizer")
    assert [text[a:b] for a, b in spans] == ["47 + 38 = 85<|im_end|>\n"]


def test_bpe_merges_across_the_prompt_answer_boundary(tok):
    # "ASSISTANT: 47": the space before the answer is glued to it, " 47", so the
    # first trained token starts inside the prompt. Tokenizing the pieces
    # separately would give different tokens from what the model sees.
    text, ((start, _),) = render(CONVERSATION[1:3], tok, "vicuna")
    out = encode(CONVERSATION[1:3], tok, "vicuna", 512)
    first = runs(out["labels"])[0][0]
    assert tok.convert_ids_to_tokens(out["input_ids"][first]).startswith("Ġ")
    pieces = tok(text[:start], add_special_tokens=False)["input_ids"] + \
        tok(text[start:], add_special_tokens=False)["input_ids"]
    assert pieces != out["input_ids"]


def test_whitespace_tokens_inside_answer_are_trained(tok):
    # Byte-level BPE trims the offsets of a lone space token to an empty range.
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a  b   c"}]
    out = encode(msgs, tok, "vicuna", 512)
    (run,) = runs(out["labels"])
    assert tok.decode([out["input_ids"][t] for t in run]).lstrip(" ") == "a  b   c</s>"


def test_own_template_must_be_prefix_stable(tok):
    unstable = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    unstable.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                              "{% if loop.last %} END{% endif %}\n{% endfor %}"
                              "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="template: vicuna"):
        render(CONVERSATION[1:], unstable, "tokenizer")
    no_template = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    with pytest.raises(ValueError, match="no chat template"):
        render(CONVERSATION[1:], no_template, "tokenizer")


# --------------------------------------------------------------------------- 2. arithmetic

def test_arithmetic_splits():
    train, heldout = arithmetic_rows("train", 2000), arithmetic_rows("heldout", 200)
    assert train == arithmetic_rows("train", 2000) and heldout == arithmetic_rows("heldout", 200)
    assert arithmetic_rows("train", 50) == train[:50]
    questions = lambda rows: {r["messages"][0]["content"] for r in rows}  # noqa: E731
    assert len(questions(train)) == 2000 and len(questions(heldout)) == 200  # no repeats
    assert not questions(train) & questions(heldout)
    for row in train + heldout:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        expr = user["content"].removeprefix("What is ").removesuffix("?")
        assert eval(expr) == row["answer"] >= 0
        assert assistant["content"] == f"{expr} = {row['answer']}"
        assert extract_answer(assistant["content"]) == row["answer"]
    assert {r["messages"][0]["content"].split()[3] for r in train} == {"+", "-", "*"}
    with pytest.raises(ValueError, match="'test'"):
        arithmetic_rows("test", 10)
    with pytest.raises(ValueError, match="only"):
        arithmetic_rows("heldout", 100_000)


@pytest.mark.parametrize("text,answer", [
    ("47 + 38 = 85", 85), ("85", 85), ("The answer is 85.", 85), ("7 * 12 = 84<|im_end|>", 84),
    ("3 - 5 = -2", -2), ("12 + 3 = 15 = 16", 15), ("no idea", None), ("x = ?", None), ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


# --------------------------------------------------------------------------- 3. jsonl

def test_jsonl_rows_and_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "What is 1 + 1?", "completion": "2", "id": 7},                      # 0 ok
        {"messages": CONVERSATION},                                                   # 1 ok
        '{"prompt": "broken json"',                                                   # 2 bad JSON
        {"prompt": "no completion"},                                                  # 3 missing field
        {"prompt": "  ", "completion": "empty prompt"},                               # 4 empty content
        {"messages": [{"role": "assistant", "content": "hi"},
                      {"role": "user", "content": "wrong order"}]},                    # 5 role order
        {"messages": [{"role": "user", "content": "ends with user"}]},               # 6 no answer
        [1, 2],                                                                       # 7 not an object
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 8
        {"prompt": "What is 2 + 2?", "completion": 4},                                # 9 not a string
        {"messages": CONVERSATION[1:3]},                                              # 10 ok
    ] + ["", ""])  # blank lines at the end are not rows
    examples, report = load_examples(DataConfig(source=path, max_bad_fraction=1.0), "train")
    assert report["rows"] == 11 and report["bad"] == 8 and report["first_bad"] == 2
    assert examples[0] == {"messages": [{"role": "user", "content": "What is 1 + 1?"},
                                        {"role": "assistant", "content": "2"}], "id": 7}
    assert examples[1]["messages"] == CONVERSATION and examples[2]["messages"] == CONVERSATION[1:3]

    with pytest.raises(ValueError) as err:
        load_examples(DataConfig(source=path, max_bad_fraction=0.1), "train")
    message = str(err.value)
    assert "\n" not in message and path in message and "8 of 11 rows" in message
    assert "first bad row: 2 (line 3)" in message and "max_bad_fraction=0.1" in message


def test_jsonl_with_no_usable_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "only"}])
    with pytest.raises(ValueError, match="d.jsonl"):
        load_examples(DataConfig(source=path, max_bad_fraction=1.0), "train")


def test_to_messages_column_mapping():
    row = {"question": "What is 2 + 2?", "answer": "4"}
    assert to_messages(row, {"prompt": "question", "completion": "answer"}) == [
        {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    assert to_messages(row, {}) is None
    assert to_messages({"conv": CONVERSATION}, {"messages": "conv"}) == CONVERSATION
    assert to_messages(None, {}) is None


# --------------------------------------------------------------------------- 4. hf sources

def test_hf_json_with_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "qa.json", [{"question": f"What is {i} + 1?", "answer": str(i + 1), "level": i}
                                              for i in range(5)])
    cfg = DataConfig(source="hf:json", data_files=path, columns={"prompt": "question", "completion": "answer"})
    examples, report = load_examples(cfg, "train")
    assert report["rows"] == 5 and report["bad"] == 0
    assert examples[3] == {"messages": [{"role": "user", "content": "What is 3 + 1?"},
                                        {"role": "assistant", "content": "4"}], "level": 3}


def test_hf_local_dir_with_eval_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}] * 3)
    write_jsonl(tmp_path / "test.jsonl", [{"messages": CONVERSATION[1:3]}] * 2)
    cfg = DataConfig(source=f"hf:{tmp_path}", eval_split="test")
    train, _ = load_examples(cfg, "train")
    held, report = load_examples(cfg, "eval")
    assert len(train) == 3 and len(held) == 2 and report["split"] == "test"
    assert held[0]["messages"] == CONVERSATION[1:3]


# --------------------------------------------------------------------------- 5. truncation

def test_truncation_and_dropping(tok):
    msgs = CONVERSATION[1:3]
    full = encode(msgs, tok, "vicuna", 10_000)
    n = len(full["input_ids"])
    answer_start = runs(full["labels"])[0][0]
    cut = encode(msgs, tok, "vicuna", n - 2)
    assert cut == {"input_ids": full["input_ids"][:n - 2], "labels": full["labels"][:n - 2]}
    assert encode(msgs, tok, "vicuna", answer_start) is None  # answer fully cut off

    long_prompt = [{"role": "user", "content": "What is 47 + 38? " * 30}, msgs[1]]
    encoded, report = encode_all([{"messages": msgs}, {"messages": long_prompt}, {"messages": msgs}],
                                 tok, "vicuna", max_length=n)
    assert len(encoded) == 2 and report["dropped"] == 1 and report["first_dropped"] == 1
    assert report["truncated"] == 1 and report["kept"] == 2 and report["tokens"] == 2 * n
    assert all(len(e["input_ids"]) <= n for e in encoded)


# --------------------------------------------------------------------------- 6. batches

@pytest.fixture(scope="module")
def encoded(tok):
    examples = [{"messages": r["messages"]} for r in arithmetic_rows("train", 23)]
    examples.append({"messages": CONVERSATION})  # one longer sample, so rows need padding
    out, report = encode_all(examples, tok, "tokenizer", max_length=128)
    assert report["kept"] == 24
    return out


def rows_of(batch):
    """The real (unpadded) token rows of a batch, as tuples."""
    mask = batch["attention_mask"]
    return [tuple(ids[m.bool()].tolist()) for ids, m in zip(batch["input_ids"], mask)]


def test_batches_are_deterministic_and_resumable(tok, encoded):
    b = Batches(encoded, batch_size=5, seed=3, pad_id=tok.pad_token_id)
    assert len(b) == 5  # 24 samples: 4 full batches and one of 4; nothing dropped
    first = [b.batch(i) for i in range(12)]
    again = Batches(encoded, batch_size=5, seed=3, pad_id=tok.pad_token_id)  # e.g. after a restart
    for i in reversed(range(12)):
        for key in ("input_ids", "labels", "attention_mask", "position_ids"):
            assert torch.equal(again.batch(i)[key], first[i][key])
    assert first[4]["input_ids"].shape[0] == 4

    epoch0 = [r for i in range(0, 5) for r in rows_of(first[i])]
    epoch1 = [r for i in range(5, 10) for r in rows_of(first[i])]
    samples = sorted(tuple(e["input_ids"]) for e in encoded)
    assert sorted(epoch0) == samples and sorted(epoch1) == samples  # each sample once per epoch
    assert epoch0 != epoch1  # in a different order
    other_seed = Batches(encoded, batch_size=5, seed=4, pad_id=tok.pad_token_id)
    assert [r for i in range(5) for r in rows_of(other_seed.batch(i))] != epoch0


def test_batch_tensors(tok, encoded):
    b = Batches(encoded, batch_size=8, seed=0, pad_id=tok.pad_token_id)
    by_ids = {tuple(e["input_ids"]): e for e in encoded}
    for i in range(len(b)):
        batch = b.batch(i)
        ids, labels, mask, pos = (batch[k] for k in ("input_ids", "labels", "attention_mask", "position_ids"))
        assert ids.dtype == labels.dtype == pos.dtype == torch.long and ids.shape == labels.shape == mask.shape
        assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == tok.pad_token_id).all()
        assert mask.sum(1).max() == ids.shape[1]  # padded to the longest row only
        for row, n in zip(range(ids.shape[0]), mask.sum(1).tolist()):
            sample = by_ids[tuple(ids[row, :n].tolist())]
            assert labels[row, 0] == -100 and labels[row, 1:n].tolist() == sample["labels"][1:]
            assert pos[row, :n].tolist() == list(range(n))
        assert num_trained_tokens(batch) == int((labels[:, 1:] != -100).sum()) > 0


def test_batch_without_trained_tokens_raises(tok, encoded):
    untrained = [{"input_ids": e["input_ids"], "labels": [-100] * len(e["labels"])} for e in encoded[:4]]
    # Only the first token trained: after the shift it is no target either.
    first_only = [{"input_ids": e["input_ids"], "labels": e["input_ids"][:1] + [-100] * (len(e["labels"]) - 1)}
                  for e in encoded[4:8]]
    b = Batches(untrained + first_only, batch_size=8, seed=0, pad_id=tok.pad_token_id)
    with pytest.raises(ValueError, match="batch 3 "):
        b.batch(3)


# --------------------------------------------------------------------------- 7. packing

def segments(pos_row):
    """[start, end) of each packed sample in one row, from where position ids restart."""
    starts = [t for t, p in enumerate(pos_row) if p == 0] + [len(pos_row)]
    return list(zip(starts[:-1], starts[1:]))


def test_packing_rows(tok, encoded):
    b = Batches(encoded, batch_size=2, seed=0, pad_id=tok.pad_token_id, packing=True, max_length=64)
    seen = []
    for i in range(len(b)):
        batch = b.batch(i)
        assert batch["attention_mask"] is None and batch["input_ids"].shape[1] <= 64
        for ids, labels, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
            for a, e in segments(pos.tolist()):
                assert pos[a:e].tolist() == list(range(e - a))
                assert labels[a] == -100  # never predicted from the previous sample
                if (ids[a:e] != tok.pad_token_id).all():
                    seen.append(tuple(ids[a:e].tolist()))
                else:
                    assert (labels[a:e] == -100).all()  # padding
    assert sorted(seen) == sorted(tuple(e["input_ids"]) for e in encoded)
    assert len(b) < 12  # packing made fewer rows than samples
    with pytest.raises(ValueError, match="max_length"):
        Batches(encoded, batch_size=2, seed=0, pad_id=0, packing=True, max_length=8)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(tok, encoded, attn):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = attn
    model = LlamaForCausalLM(config).eval()
    b = Batches(encoded, batch_size=2, seed=0, pad_id=tok.pad_token_id, packing=True, max_length=64)
    checked, padded = 0, 0
    for i in range(len(b)):
        batch = b.batch(i)
        padded += int((batch["input_ids"] == tok.pad_token_id).any())
        with torch.no_grad():
            # use_cache=False: transformers only reads packed position ids when there is no KV cache.
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=None, use_cache=False).logits  # (B, T, V)
            for row in range(batch["input_ids"].shape[0]):
                for a, e in segments(batch["position_ids"][row].tolist()):
                    alone = model(input_ids=batch["input_ids"][row, a:e][None], use_cache=False).logits[0]
                    torch.testing.assert_close(packed[row, a:e], alone, atol=1e-5, rtol=0)
                    checked += 1
    assert padded >= 1  # rows of unequal length in a batch were exercised
    assert checked >= len(encoded)


# --------------------------------------------------------------------------- 8. held-out rows

def test_eval_fraction_split(tmp_path):
    rows = [{"prompt": f"What is {i} + 2?", "completion": str(i + 2)} for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(source=path, eval_fraction=0.2)
    train, train_report = load_examples(cfg, "train")
    held, held_report = load_examples(cfg, "eval")
    prompts = lambda ex: [e["messages"][0]["content"] for e in ex]  # noqa: E731
    assert len(held) == 10 and len(train) == 40 and train_report["rows"] == 40 and held_report["rows"] == 10
    assert not set(prompts(train)) & set(prompts(held))
    assert sorted(prompts(train) + prompts(held)) == sorted(r["prompt"] for r in rows)
    assert prompts(held) != [r["prompt"] for r in rows[-10:]]  # shuffled, not the file's tail
    assert load_examples(cfg, "train")[0] == train and load_examples(cfg, "eval")[0] == held

    no_eval = DataConfig(source=path)
    assert load_examples(no_eval, "eval")[0] == [] and len(load_examples(no_eval, "train")[0]) == 50


def test_eval_sources(tmp_path):
    cfg = DataConfig(source="builtin:arithmetic", num_train=30, num_eval=7)
    train, _ = load_examples(cfg, "train")
    held, report = load_examples(cfg, "eval")
    assert len(train) == 30 and len(held) == 7 and report["split"] == "heldout"
    assert held[0]["answer"] == extract_answer(held[0]["messages"][1]["content"])
    other = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "p", "completion": "c"}] * 3)
    cfg = DataConfig(source="builtin:arithmetic", eval_source=other)
    assert len(load_examples(cfg, "eval")[0]) == 3
