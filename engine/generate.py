"""Greedy generation from chat prompts, and generation exact match against known integers.

The engine generates in two places: builtin:harmbench's rejected answers (the base model's own,
engine/train_setup.py) and the held-out exact match before and after training (train.py); every
generative task of paft_evals uses the same `generate` and `prompt_text`.

For each held-out example the conversation is rendered with the same chat
template used in training and cut where the final assistant answer begins,
so the model sees exactly the prompt format it was trained on. Generation is
greedy, batched with left padding, and uses the KV cache.

    accuracy = (1/n) Σ_i [ extract_answer(generation_i) == answer_i ]
"""
from __future__ import annotations

import torch

from engine.data import extract_answer, render


def prompt_text(messages: list[dict], tokenizer, template: str) -> str:
    """The rendered conversation up to (not including) the last assistant answer."""
    text, spans = render(messages, tokenizer, template)
    return text[: spans[-1][0]]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             max_prompt_tokens: int | None = None) -> list[str]:
    """Greedy answers to rendered prompts. max_prompt_tokens: keep only each prompt's last N tokens
    (left truncation, as training truncates a preference pair's prompt)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    saved_side, saved_trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so every prompt ends at the same column
    tokenizer.truncation_side = "left"
    cut = {} if max_prompt_tokens is None else {"truncation": True, "max_length": max_prompt_tokens}
    # Batch prompts of similar length together (longest first), so a short prompt is not padded to
    # a long one's length (HarmBench's contextual prompts are 10x its standard ones); answers are
    # put back in the callers' order. Greedy decoding makes each answer independent of its batch
    # up to float rounding.
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False, **cut)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    outputs: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(prompts), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False, **cut).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]  # (B, new tokens)
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                outputs[i] = text
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = saved_side, saved_trunc
        model.train(was_training)
    return outputs


def exact_match(model, tokenizer, examples: list[dict], template: str, max_new_tokens: int = 16,
                batch_size: int = 16) -> dict:
    """Accuracy over examples that carry an integer `answer` (builtin:arithmetic rows)."""
    scored = [ex for ex in examples if "answer" in ex]
    if not scored:
        raise ValueError("exact match needs held-out rows with an 'answer' field (e.g. builtin:arithmetic)")
    return score_answers(model, tokenizer, scored, template, max_new_tokens, batch_size)[0]


def score_answers(model, tokenizer, rows: list[dict], template: str, max_new_tokens: int,
                  batch_size: int) -> tuple[dict, list[str], list[bool]]:
    """Greedy answers to rows {"messages", "answer"}: ({"exact_match", "n", "samples"}, the generations,
    the hits), so that an evaluation can keep each item (paft_evals/arithmetic.py) beside the summary."""
    prompts = [prompt_text(ex["messages"], tokenizer, template) for ex in rows]
    generations = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    hits = [extract_answer(g) == ex["answer"] for g, ex in zip(generations, rows)]
    result = {"exact_match": sum(hits) / len(hits), "n": len(hits),
              "samples": [{"prompt": ex["messages"][-2]["content"], "generation": g, "answer": ex["answer"],
                           "correct": hit} for ex, g, hit in zip(rows[:5], generations, hits)]}
    return result, generations, hits
