"""Preference pairs -> token ids -> batches of chosen and rejected rows.

    encoded, report = encode_pairs(examples, tok, template, max_length)
    batches = PairBatches(encoded, batch_size, seed, pad_id)
    batch = batches.batch(i)       # rows 0..B-1 chosen, rows B..2B-1 rejected

Each side is the conversation prompt + [{"role": "assistant", "content": answer}],
rendered and tokenized exactly as for SFT (tokenize.py), so the answer tokens are
the ones the model sees at inference. Only the FINAL answer is trained (labels =
input_ids there, -100 elsewhere): earlier assistant turns of a multi-turn prompt
are context, shared by both sides. DPO / ORPO sum log-probs over these labels.

Truncation (a side longer than max_length), as TRL does it: the prompt loses
tokens from its START first, by the same count on both sides so that the two
rows keep the same prompt tokens; at least one prompt token is kept so the first
answer token is still predicted from something. If an answer alone still does
not fit, its end is cut. A pair is dropped when either side has no trained token, and when
the two sides are the same tokens after truncation (identical answers, or answers that differ
only past max_length): such a pair has Δ = 0 whatever the weights, so it adds a constant to
the DPO loss and nothing to its gradient. It is counted ("identical"), not trained on.

A batch of B pairs is one forward pass over 2B rows, right-padded together:

    input_ids, labels, attention_mask, position_ids   (2B, T) long
    n_pairs                                            B (an int)

Row i and row i + B are the chosen and rejected answer to the same prompt, so
the loss splits per-row log-probs as logps[:B] (chosen) and logps[B:] (rejected).
No packing: DPO needs one sequence log-prob per row.
"""
from __future__ import annotations

import torch

from .batches import Batches, check_trained, collate
from .tokenize import IGNORE, _has_target, _tokenize, keep_sample, new_report


def _side(prompt: list[dict], answer: str, tokenizer, template: str) -> tuple[list[int], list[int], int]:
    """Untruncated (ids, labels, prompt_length) of prompt + answer, with only the final answer trained."""
    ids, labels = _tokenize(prompt + [{"role": "assistant", "content": answer}], tokenizer, template)
    # The final answer is the last run of trained tokens (a user turn always separates
    # it from earlier answers); everything before it is prompt.
    end = max((t for t, l in enumerate(labels) if l != IGNORE), default=None)
    if end is None:
        return ids, labels, len(ids)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return ids, [IGNORE] * start + labels[start:], start


IDENTICAL = "identical"  # _encode's verdict on a pair whose two sides are the same tokens


def _encode(example: dict, tokenizer, template: str, max_length: int) -> tuple[dict | str | None, bool]:
    sides = [_side(example["prompt"], example[key], tokenizer, template) for key in ("chosen", "rejected")]
    over = max(len(ids) for ids, _, _ in sides) - max_length
    truncated = over > 0
    out = {}
    for key, (ids, labels, prompt_len) in zip(("chosen", "rejected"), sides):
        # Left-truncate the prompt (keeping its last token), then cut an answer that still overflows.
        drop = max(0, min(over, prompt_len - 1))
        ids, labels = ids[drop:][:max_length], labels[drop:][:max_length]
        if labels:
            labels[0] = IGNORE  # nothing precedes the first token, so it is never a target
        if not _has_target(labels):
            return None, truncated
        out[f"{key}_input_ids"], out[f"{key}_labels"] = ids, labels
    if out["chosen_input_ids"] == out["rejected_input_ids"] and out["chosen_labels"] == out["rejected_labels"]:
        return IDENTICAL, truncated
    return out, truncated


def encode_pair(example: dict, tokenizer, template: str, max_length: int) -> dict | None:
    """{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"} of one
    preference example ({"prompt": [...], "chosen": str, "rejected": str}), truncated to
    max_length as the module docstring says; None if a side is left with no trained token or
    the two sides are the same tokens."""
    pair = _encode(example, tokenizer, template, max_length)[0]
    return None if pair == IDENTICAL else pair


def encode_chosen(examples: list[dict], tokenizer, template: str, max_length: int) -> tuple[list[dict], dict]:
    """SFT samples {"input_ids", "labels"} from preference examples: prompt + chosen, the chosen answer
    trained (Thakkar et al.'s SFT arm on the DPO pairs). Truncated as a pair's side is: the prompt loses
    its first tokens, so a long prompt (a HarmBench context) keeps its request and the answer stays
    (cutting from the right, as plain SFT does, would cut the answer away). Report as encode_all's."""
    encoded, report = [], new_report(len(examples))
    for i, example in enumerate(examples):
        ids, labels, prompt_len = _side(example["prompt"], example["chosen"], tokenizer, template)
        over = len(ids) - max_length
        if over > 0:
            report["truncated"] += 1
            drop = min(over, prompt_len - 1)
            ids, labels = ids[drop:][:max_length], labels[drop:][:max_length]
            labels[0] = IGNORE  # nothing precedes the first token, so it is never a target
        keep_sample(encoded, report, i, ids, labels)
    report["kept"] = len(encoded)
    return encoded, report


def encode_pairs(examples: list[dict], tokenizer, template: str, max_length: int) -> tuple[list[dict], dict]:
    """Encode preference examples; returns the encoded pairs and a report:
    {"pairs", "kept", "dropped", "first_dropped", "identical", "first_identical", "truncated", "tokens",
    "trained_tokens"} (tokens and trained_tokens count both sides; "dropped" is pairs with a side
    left without a trained token, "identical" pairs whose sides are the same tokens)."""
    encoded = []
    report = {"pairs": len(examples), "kept": 0, "dropped": 0, "first_dropped": None, "identical": 0,
              "first_identical": None, "truncated": 0, "tokens": 0, "trained_tokens": 0}
    for i, example in enumerate(examples):
        pair, truncated = _encode(example, tokenizer, template, max_length)
        report["truncated"] += truncated
        if pair == IDENTICAL:
            report["identical"] += 1
            if report["first_identical"] is None:
                report["first_identical"] = i
            continue
        if pair is None:
            report["dropped"] += 1
            if report["first_dropped"] is None:
                report["first_dropped"] = i
            continue
        encoded.append(pair)
        for side in ("chosen", "rejected"):
            report["tokens"] += len(pair[f"{side}_input_ids"])
            report["trained_tokens"] += sum(l != IGNORE for l in pair[f"{side}_labels"][1:])
    report["kept"] = len(encoded)
    return encoded, report


class PairBatches(Batches):
    """Batches of pairs: the order, determinism and resumability of Batches (batch(i) is a
    pure function of i; len() is batches of pairs per epoch), with each pair giving two rows."""

    def __init__(self, encoded: list[dict], batch_size: int, seed: int, pad_id: int):
        super().__init__(encoded, batch_size, seed, pad_id, packing=False)

    def batch(self, i: int) -> dict:
        index = [s for row in self._pick(i) for s in row]
        pairs = [self.samples[s] for s in index]
        rows = [[{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}] for side in
                ("chosen", "rejected") for p in pairs]  # all chosen rows first, then all rejected
        batch = collate(rows, self.pad_id)
        batch["n_pairs"] = len(pairs)
        batch["index"] = torch.tensor(index)  # (B,) positions in `encoded`: keys for precomputed reference log-probs
        return check_trained(batch, i)
