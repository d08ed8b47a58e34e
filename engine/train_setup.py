"""The set-up of a training run, torchtune-style: small functions from the recipe to the data and
the loss that engine/train.py's loop uses.

    sft_data          rows ─► chat template ─► token ids + loss mask ─► batches
    preference_data   preference rows ─► (prompt, chosen, rejected) ─► pair batches
                      (builtin:harmbench's rejected side: the model's own greedy answers)
    make_objectives   the loss for training and for the held-out set (DPO: its reference)
"""
from __future__ import annotations

import dataclasses
from functools import cache, partial

from engine import generate as generation  # the module, so a test can stand in for generation.generate
from engine.data import (Batches, PairBatches, encode_all, encode_chosen, encode_pairs, load_examples,
                         load_preference_examples)
from engine.models import cache_root, load_model_and_tokenizer
from engine.objectives import dpo_objective, orpo_objective, sft_objective
from engine.recipe import Recipe
from engine.reference import load_or_compute_reference

REJECTED_TOKENS = 64  # length of the base model's own answers used as builtin:harmbench's rejected side


def sft_data(recipe: Recipe, tokenizer):
    """Rows ─► chat template ─► token ids + loss mask ─► (train batches, held-out batches, held-out rows)."""
    d, tc = recipe.data, recipe.train
    if d.format == "auto":
        train_rows, report = load_examples(d, "train")
        eval_rows, _ = load_examples(d, "eval")
        train_enc, enc_report = encode_all(train_rows, tokenizer, d.template, d.max_length)
        eval_enc, _ = encode_all(eval_rows, tokenizer, d.template, d.max_length)
    else:  # a preference dataset used for SFT: train on the prompt and its chosen answer (Thakkar et al.),
        # truncated as DPO truncates the pair (the prompt's first tokens go, the answer stays)
        train_rows, report = load_preference_examples(d, "train")
        eval_rows, _ = load_preference_examples(d, "eval")
        train_enc, enc_report = encode_chosen(train_rows, tokenizer, d.template, d.max_length)
        eval_enc, _ = encode_chosen(eval_rows, tokenizer, d.template, d.max_length)
        eval_rows = [{"messages": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]} for r in eval_rows]
    counts = data_counts(d, report, enc_report)
    print(f"data: {len(train_enc)} training samples ({report['bad']} malformed rows skipped, "
          f"{enc_report.get('dropped', 0)} with no trained token after truncation), {len(eval_enc)} held out")
    args = dict(batch_size=tc.batch_size, seed=tc.seed, pad_id=tokenizer.pad_token_id, packing=d.packing,
                max_length=d.max_length)
    return Batches(train_enc, **args), (Batches(eval_enc, **args) if eval_enc else None), eval_rows, counts


def data_counts(d, report: dict, enc_report: dict) -> dict:
    """The training rows that will not be trained on, by cause; too many of them is an error.

    A row truncated to no trained token, or a pair whose two sides are the same tokens, is as
    useless as a malformed row, so all of them count toward data.max_bad_fraction."""
    counts = {"rows": report["rows"], "malformed": report["bad"], "no_trained_token": enc_report["dropped"],
              "identical_pairs": enc_report.get("identical", 0)}
    unusable = counts["malformed"] + counts["no_trained_token"] + counts["identical_pairs"]
    if counts["rows"] and unusable / counts["rows"] > d.max_bad_fraction:
        raise ValueError(f"data: {unusable} of {counts['rows']} training rows of {report['source']} are unusable "
                         f"({counts['malformed']} malformed or empty, {counts['no_trained_token']} with no trained "
                         f"token within data.max_length={d.max_length}, {counts['identical_pairs']} pairs whose chosen "
                         f"and rejected are the same tokens), more than data.max_bad_fraction={d.max_bad_fraction}")
    return counts


def preference_data(recipe: Recipe, tokenizer, model):
    """Preference rows ─► (prompt, chosen, rejected) ─► pair token ids + masks ─► pair batches."""
    d, tc = recipe.data, recipe.train

    # The model answers each prompt as training will see it: a pair longer than data.max_length keeps
    # the prompt's last tokens (engine/data/pairs.py), so generating from a contextual behaviour's
    # whole 1,000-token context would be an answer to a prompt it is never trained on, at ~10x the cost.
    context = max(16, d.max_length - REJECTED_TOKENS)

    # Whose answers are the rejected side: the model being trained (its adapter is still zero here,
    # so this is its base), or data.rejected_from (a pipeline's `after` stage: the shared base).
    author = d.rejected_from or recipe.model.name

    @cache  # the train and the held-out split each call generate_rejected: load another author once
    def author_model():
        if author == recipe.model.name:
            return model, tokenizer
        return load_model_and_tokenizer(dataclasses.replace(recipe.model, name=author), next(model.parameters()).device)

    def generate_rejected(prompts: list[list[dict]]) -> list[str]:
        gen_model, gen_tokenizer = author_model()
        texts = [generation.prompt_text(p + [{"role": "assistant", "content": "."}], gen_tokenizer, d.template)
                 for p in prompts]
        print(f"data: generating {len(texts)} completions of {author} for builtin:harmbench "
              f"(prompts cut to their last {context} tokens; cached afterwards)")
        return generation.generate(gen_model, gen_tokenizer, texts, max_new_tokens=REJECTED_TOKENS, batch_size=16,
                        max_prompt_tokens=context)

    # The cache of generated answers is keyed by everything that shapes them: model, template, lengths.
    extra = dict(generate_fn=generate_rejected, cache_dir=cache_root(recipe.model),
                 model_key=f"{_safe_name(author)}-{d.template}-greedy{REJECTED_TOKENS}-ctx{context}")
    train_rows, report = load_preference_examples(d, "train", **extra)
    eval_rows, _ = load_preference_examples(d, "eval", **extra)
    train_enc, enc_report = encode_pairs(train_rows, tokenizer, d.template, d.max_length)
    eval_enc, _ = encode_pairs(eval_rows, tokenizer, d.template, d.max_length)
    counts = data_counts(d, report, enc_report)
    print(f"data: {len(train_enc)} training pairs ({report['bad']} malformed rows skipped, "
          f"{enc_report.get('dropped', 0)} dropped after truncation, {enc_report['identical']} dropped as "
          f"chosen = rejected within max_length), {len(eval_enc)} held out")
    if not train_enc:
        raise ValueError(f"data: no training pairs left in {report['source']} after truncation to "
                         f"data.max_length={d.max_length} and dropping identical pairs")
    args = dict(batch_size=tc.batch_size, seed=tc.seed, pad_id=tokenizer.pad_token_id)
    return PairBatches(train_enc, **args), (PairBatches(eval_enc, **args) if eval_enc else None), eval_rows, counts


def make_objectives(recipe: Recipe, model, train_batches, eval_batches, device, autocast):
    """The loss function for training and for the held-out set (they differ only in DPO's reference table)."""
    method = recipe.train.method
    if method == "sft":
        return sft_objective, sft_objective
    if method == "orpo":
        objective = partial(orpo_objective, cfg=recipe.orpo)
        return objective, objective
    train_ref = eval_ref = None
    if recipe.dpo.precompute_ref:
        root = cache_root(recipe.model)
        train_ref, path = load_or_compute_reference(model, train_batches, device, autocast, root, recipe.model.name)
        print(f"dpo: reference log-probs of {len(train_batches.samples)} pairs from {path}")
        if eval_batches is not None:
            eval_ref, _ = load_or_compute_reference(model, eval_batches, device, autocast, root, recipe.model.name)
    return (partial(dpo_objective, cfg=recipe.dpo, ref_table=train_ref),
            partial(dpo_objective, cfg=recipe.dpo, ref_table=eval_ref))


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
