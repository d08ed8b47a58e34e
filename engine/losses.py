"""Losses.

SFT (next-token cross-entropy on the trained tokens only):

    L_SFT = − (1/N) Σ_{t ∈ trained} log p_θ(x_t | x_<t)

Labels follow the Hugging Face convention: `labels[b, t]` is the token at
position t or −100, and position t is predicted from the hidden state at t−1.

Why not call `model(input_ids, labels=...)`? That computes logits for every
position, (B, T, V) in fp32: for SmolLM2 (V = 49152) and 4×512 tokens that is
400 MB, almost all of it for prompt tokens that carry no loss. Here the
decoder runs once, the hidden states of the trained positions are gathered,
and only those go through the LM head, in chunks when there are many.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOGITS_CHUNK = 2048  # trained tokens per LM-head chunk: bounds the fp32 (chunk, V) logits held at once


def hidden_states(model, batch: dict) -> torch.Tensor:
    """Final (normed) hidden states of the decoder, (B, T, H)."""
    out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                              position_ids=batch.get("position_ids"), use_cache=False)
    return out.last_hidden_state


def _chunk_nll_sum(lm_head_weight: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = (h @ lm_head_weight.t()).float()  # (n, V) in fp32 for a stable log-softmax
    return F.cross_entropy(logits, y, reduction="sum")


def token_nll_sum(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of −log p(label) over trained positions, and their count.

    hidden: (B, T, H) decoder output; labels: (B, T) with −100 where untrained.
    """
    targets = labels[:, 1:]                       # (B, T-1): token t+1 is predicted at t
    mask = targets != -100
    h = hidden[:, :-1][mask]                      # (N, H) only the positions that carry loss
    y = targets[mask]                             # (N,)
    n = int(y.numel())
    if n == 0:
        raise ValueError("batch has no trained tokens (every label is -100)")
    weight = model.get_output_embeddings().weight  # (V, H); tied to the embeddings in many small models
    if n <= LOGITS_CHUNK:
        return _chunk_nll_sum(weight, h, y), n
    # Many trained tokens: recompute each chunk's logits in backward instead of keeping them.
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, LOGITS_CHUNK):
        sl = slice(start, start + LOGITS_CHUNK)
        total = total + checkpoint(_chunk_nll_sum, weight, h[sl], y[sl], use_reentrant=False)
    return total, n


def sft_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of token NLLs, number of trained tokens) for one micro-batch."""
    return token_nll_sum(model, hidden_states(model, batch), batch["labels"])
