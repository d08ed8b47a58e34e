"""Data: rows from a source -> chat messages -> token ids with answer-only labels -> batches.

SFT:
    examples, report = load_examples(recipe.data, "train")           # sources.py
    encoded, enc_report = encode_all(examples, tok, template, max_len)  # tokenize.py
    batches = Batches(encoded, batch_size, seed, pad_id)               # batches.py
    batch = batches.batch(i)                                           # micro-batch i

Preference pairs (DPO, ORPO):
    examples, report = load_preference_examples(recipe.data, "train")  # preference.py
    encoded, enc_report = encode_pairs(examples, tok, template, max_len)  # pairs.py
    batches = PairBatches(encoded, batch_size, seed, pad_id)           # pairs.py
    batch = batches.batch(i)     # 2B rows: B chosen, then the B rejected answers to the same prompts
"""
from .arithmetic import arithmetic_rows, extract_answer
from .batches import Batches, num_trained_tokens
from .pairs import PairBatches, encode_chosen, encode_pair, encode_pairs
from .preference import REFUSALS, harmbench_pairs, load_preference_examples
from .refusal import looks_like_refusal
from .sources import load_examples, load_rows, to_messages
from .templates import render
from .tokenize import encode, encode_all

__all__ = ["load_examples", "load_rows", "to_messages", "encode", "encode_all", "render",
           "Batches", "num_trained_tokens", "arithmetic_rows", "extract_answer",
           "load_preference_examples", "harmbench_pairs", "REFUSALS", "looks_like_refusal",
           "encode_chosen", "encode_pair", "encode_pairs", "PairBatches"]
