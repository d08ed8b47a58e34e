"""Messages -> token ids and labels, with only the assistant answers trained.

Label convention (the trainer relies on it): `labels[t]` is `input_ids[t]` on
a trained token and -100 elsewhere. Labels are *not* shifted here; the loss
predicts `labels[:, 1:]` from the logits at `[:, :-1]` (the HF convention).

How the mask is made: render the conversation to one string with the answer
character spans (templates.py), tokenize that string once with offsets, and
train every token whose characters overlap an answer span. Tokenizing prompt
and answer separately and concatenating would be wrong: BPE merges across the
boundary (e.g. "ASSISTANT:" + " 85" is tokenized as ":", " 85", not ": " + "85"),
so the pieces would not be the tokens the model sees at inference.
"""
from __future__ import annotations

from .templates import render

IGNORE = -100


def _tokenize(messages: list[dict], tokenizer, template: str) -> tuple[list[int], list[int]]:
    """Untruncated (input_ids, labels) of one conversation."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("data: a fast tokenizer (tokenizers library) is needed for offset mapping")
    text, spans = render(messages, tokenizer, template)
    # add_special_tokens=False: the template text already holds every special token it wants.
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, labels = enc["input_ids"], []
    for tok, (a, b) in zip(ids, enc["offset_mapping"]):
        if a == b:
            # An empty range is a whitespace token whose offsets the tokenizer trimmed
            # (byte-level BPE's trim_offsets turns " " at [a-1, a) into (a, a)).
            a = max(a - 1, 0)
        trained = any(a < end and b > start for start, end in spans)
        labels.append(tok if trained else IGNORE)
    return ids, labels


def _has_target(labels: list[int]) -> bool:
    # labels[0] is never a target: nothing comes before it to predict it from.
    return any(l != IGNORE for l in labels[1:])


def encode(messages: list[dict], tokenizer, template: str, max_length: int) -> dict | None:
    """{"input_ids": [...], "labels": [...]} cut to `max_length` tokens (the end is cut),
    or None when no trained token is left after the cut."""
    ids, labels = _tokenize(messages, tokenizer, template)
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels} if _has_target(labels) else None


def encode_all(examples: list[dict], tokenizer, template: str, max_length: int) -> tuple[list[dict], dict]:
    """Encode examples ({"messages": [...], ...}, as load_examples returns them).

    Returns the encoded samples and a report: {"samples", "kept", "dropped",
    "first_dropped", "truncated", "tokens", "trained_tokens"}. A sample is
    dropped when truncation leaves it no trained token.
    """
    encoded, report = [], new_report(len(examples))
    for i, example in enumerate(examples):
        ids, labels = _tokenize(example["messages"], tokenizer, template)
        if len(ids) > max_length:
            report["truncated"] += 1
            ids, labels = ids[:max_length], labels[:max_length]
        keep_sample(encoded, report, i, ids, labels)
    report["kept"] = len(encoded)
    return encoded, report


def new_report(samples: int) -> dict:
    return {"samples": samples, "kept": 0, "dropped": 0, "first_dropped": None,
            "truncated": 0, "tokens": 0, "trained_tokens": 0}


def keep_sample(encoded: list, report: dict, i: int, ids: list[int], labels: list[int]) -> None:
    """Append sample i, or count it dropped when truncation left it no trained token."""
    if not _has_target(labels):
        report["dropped"] += 1
        if report["first_dropped"] is None:
            report["first_dropped"] = i
        return
    encoded.append({"input_ids": ids, "labels": labels})
    report["tokens"] += len(ids)
    report["trained_tokens"] += sum(l != IGNORE for l in labels[1:])
