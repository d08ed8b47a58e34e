"""Precomputed reference log-probs for DPO (`dpo.precompute_ref: true`).

DPO compares the policy with a frozen reference π_ref. Here the reference is
the base model with the adapters switched off, so no second copy of the model
is held; by default its log-probs are computed on the fly, one extra no-grad
forward per step. With `precompute_ref` they are computed once, before
training, for every pair, and cached on disk:

    <cache root>/ref_logps/<key>.safetensors
        chosen_logps, rejected_logps     (N,) float32  Σ_t log π_ref(y_t | x, y_<t)
        chosen_tokens, rejected_tokens   (N,) int64    answer lengths (IPO uses means)

The key hashes the model name and dtype and every token id and label of the
encoded pairs, so a change of model, data, template or max_length gets a new
file and a stale cache is never read.
"""
from __future__ import annotations

import hashlib
import os

import torch
from safetensors.torch import load_file, save_file

from engine.writes import atomic_file

from engine.losses import preference_forward
from engine.lora import disable_adapters


def cache_key(model_name: str, dtype: torch.dtype, encoded: list[dict]) -> str:
    h = hashlib.sha256(f"{model_name}|{dtype}".encode())
    for pair in encoded:
        for field in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            h.update(torch.tensor(pair[field], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def compute_reference(model, batches, device, autocast) -> dict[str, torch.Tensor]:
    """Reference log-probs of every pair, indexed by its position in the encoded list."""
    n = len(batches.samples)
    table = {"chosen_logps": torch.zeros(n), "rejected_logps": torch.zeros(n),
             "chosen_tokens": torch.zeros(n, dtype=torch.int64), "rejected_tokens": torch.zeros(n, dtype=torch.int64)}
    was_training = model.training
    model.eval()
    with disable_adapters(model):
        for i in range(len(batches)):  # epoch 0 visits every pair exactly once
            mb = batches.batch(i)
            k, idx = mb["n_pairs"], mb["index"]
            with autocast():
                out = preference_forward(model, {key: (v.to(device) if torch.is_tensor(v) else v)
                                                 for key, v in mb.items()}, k)
            logps, lengths = out["logps"].float().cpu(), out["n_tokens"].cpu()
            table["chosen_logps"][idx], table["rejected_logps"][idx] = logps[:k], logps[k:]
            table["chosen_tokens"][idx], table["rejected_tokens"][idx] = lengths[:k], lengths[k:]
    model.train(was_training)
    return table


def load_or_compute_reference(model, batches, device, autocast, cache_dir: str, model_name: str) -> tuple[dict, str]:
    """The cached table if one exists for exactly this model and data, else compute and cache it."""
    dtype = next(model.parameters()).dtype
    path = os.path.join(cache_dir, "ref_logps", cache_key(model_name, dtype, batches.samples) + ".safetensors")
    if os.path.isfile(path):
        return load_file(path), path
    table = compute_reference(model, batches, device, autocast)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(table, tmp)
    return table, path
