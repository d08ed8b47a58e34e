"""Data: rows from a source -> chat messages -> token ids with answer-only labels -> batches.

    examples, report = load_examples(recipe.data, "train")           # sources.py
    encoded, enc_report = encode_all(examples, tok, template, max_len)  # tokenize.py
    batches = Batches(encoded, batch_size, seed, pad_id)               # batches.py
    batch = batches.batch(i)                                           # micro-batch i
"""
from .arithmetic import arithmetic_rows, extract_answer
from .batches import Batches, num_trained_tokens
from .sources import load_examples, load_rows, to_messages
from .templates import render
from .tokenize import encode, encode_all

__all__ = ["load_examples", "load_rows", "to_messages", "encode", "encode_all", "render",
           "Batches", "num_trained_tokens", "arithmetic_rows", "extract_answer"]
