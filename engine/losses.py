"""Losses: SFT, and the preference losses DPO (four variants) and ORPO.

SFT (next-token cross-entropy on the trained tokens only):

    L_SFT = − (1/N) Σ_{t ∈ trained} log p_θ(x_t | x_<t)

Labels follow the Hugging Face convention: `labels[b, t]` is the token at
position t or −100, and position t is predicted from the hidden state at t−1.

Why not call `model(input_ids, labels=...)`? That computes logits for every
position, (B, T, V) in fp32: for SmolLM2 (V = 49152) and 4×512 tokens that is
400 MB, almost all of it for prompt tokens that carry no loss. Here the
decoder runs once, the hidden states of the trained positions are gathered,
and only those go through the LM head, in chunks when there are many.

Preference losses work on sequence log-probs, log π(y|x) = Σ_t log p(y_t | x, y_<t)
summed over the answer's tokens. The same chunked pass gives them: the per-token
log-probs of the gathered positions are scatter-added back to their row. A pair
batch holds the chosen answers in its first n_pairs rows and the rejected ones in
the next n_pairs, so one decoder forward scores both (`preference_forward`); the
reference model is the same network with the LoRA adapters switched off
(`reference_logps`), so no second copy of the weights is needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.lora import disable_adapters

LOGITS_CHUNK = 2048  # trained tokens per LM-head chunk: bounds the fp32 (chunk, V) logits held at once
IGNORE = -100

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
# Loss types whose log-probs are per-token MEANS over the answer rather than sums (see dpo_loss).
DPO_MEAN_LOGPS = frozenset({"ipo"})


def uses_mean_logps(loss_type: str) -> bool:
    """True if `dpo_loss(..., loss_type)` expects length-normalised (mean) log-probs instead of sums."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    return loss_type in DPO_MEAN_LOGPS


# --------------------------------------------------------------------------- token log-probs

def hidden_states(model, batch: dict) -> torch.Tensor:
    """Final (normed) hidden states of the decoder, (B, T, H)."""
    out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                              position_ids=batch.get("position_ids"), use_cache=False)
    return out.last_hidden_state


def _trained_positions(hidden: torch.Tensor, labels: torch.Tensor):
    """Hidden states, targets and row index of every trained position.

    Returns h (N, H), y (N,), row (N,): position t+1's label is predicted from hidden[:, t].
    Boolean-mask indexing walks the batch row-major, so rows come out in order 0, 0, ..., 1, 1, ...
    """
    targets = labels[:, 1:]                       # (B, T-1): token t+1 is predicted at t
    mask = targets != IGNORE                      # (B, T-1)
    h = hidden[:, :-1][mask]                      # (N, H) only the positions that carry loss
    y = targets[mask]                             # (N,)
    row = mask.nonzero(as_tuple=True)[0]          # (N,) batch index of each trained position
    return h, y, row


def _chunk_token_logps(lm_head_weight: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y_i) for each row of h: a log-softmax in fp32, read only at the label.

    log softmax(z)_y = z_y − logsumexp(z). Written this way (TRL's `selective_log_softmax`, Liger's
    fused CE do the same) no second (n, V) tensor of log-probs is built next to the logits.
    """
    logits = (h @ lm_head_weight.t()).float()                 # (n, V) in fp32 for a stable log-softmax
    picked = logits.gather(1, y.unsqueeze(1)).squeeze(1)      # (n,) the label's logit
    return picked - torch.logsumexp(logits, dim=-1)           # (n,)


def _token_logps(model, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y_i | h_i) for the N gathered positions, (N,) fp32, through the LM head in chunks."""
    weight = model.get_output_embeddings().weight  # (V, H); tied to the embeddings in many small models
    n = y.numel()
    if n <= LOGITS_CHUNK:
        return _chunk_token_logps(weight, h, y)
    # Many trained tokens: recompute each chunk's logits in backward instead of keeping them all;
    # only the (chunk,) log-probs survive the forward.
    parts = [checkpoint(_chunk_token_logps, weight, h[s:s + LOGITS_CHUNK], y[s:s + LOGITS_CHUNK],
                        use_reentrant=False)
             for s in range(0, n, LOGITS_CHUNK)]
    return torch.cat(parts)                       # (N,)


def token_nll_sum(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of −log p(label) over trained positions, and their count.

    hidden: (B, T, H) decoder output; labels: (B, T) with −100 where untrained.
    """
    h, y, _ = _trained_positions(hidden, labels)
    n = int(y.numel())
    if n == 0:
        raise ValueError("batch has no trained tokens (every label is -100)")
    return -_token_logps(model, h, y).sum(), n


def _per_sequence(tok_logps: torch.Tensor, row: torch.Tensor, batch_size: int):
    """Scatter-add per-token log-probs (N,) back to their rows: sums (B,) fp32 and counts (B,) long."""
    sums = tok_logps.new_zeros(batch_size).index_add(0, row, tok_logps)       # (B,) differentiable
    counts = torch.zeros(batch_size, dtype=torch.long, device=row.device).index_add_(
        0, row, torch.ones_like(row))                                          # (B,)
    return sums, counts


def sequence_logps(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log π(y|x) = Σ_{t ∈ trained} log p(label_t | x_<t), and the trained-token counts.

    hidden: (B, T, H) decoder output; labels: (B, T) with −100 where untrained (shifted as in
    `token_nll_sum`). Returns sums (B,) fp32 and counts (B,) long; a row with no trained
    tokens gets sum 0 and count 0.
    """
    h, y, row = _trained_positions(hidden, labels)
    return _per_sequence(_token_logps(model, h, y), row, labels.shape[0])


def sft_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """(sum of token NLLs, number of trained tokens) for one micro-batch."""
    return token_nll_sum(model, hidden_states(model, batch), batch["labels"])


# --------------------------------------------------------------------------- pair batches

def _check_pairs(batch: dict, n_pairs: int) -> None:
    rows = batch["input_ids"].shape[0]
    if rows != 2 * n_pairs:
        raise ValueError(f"pair batch has {rows} rows, expected 2 * n_pairs = {2 * n_pairs} "
                         "(chosen rows first, then rejected)")


def preference_forward(model, batch: dict, n_pairs: int) -> dict:
    """One forward of a pair batch: chosen rows [0, n_pairs), rejected rows [n_pairs, 2 n_pairs).

    Returns
        logps           (2B,) fp32  sequence log-prob sums, chosen then rejected
        n_tokens        (2B,) long  trained (answer) tokens per row
        chosen_nll_sum  ()    fp32  −Σ log p over the chosen rows' trained tokens
        chosen_tokens   int         how many tokens that sum covers

    The chosen NLL comes out of the same chunked LM-head pass as the log-probs. It is the
    extra term of RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization") and
    the SFT term of ORPO (Hong et al. 2024): chosen_nll_sum / chosen_tokens is the token-mean
    NLL of the chosen answers, as TRL's DPO `loss_type="sft"` term computes it.

    Every answer must have at least one trained token: an empty answer has no log-prob to
    compare (and IPO/ORPO divide by its length), so that is a data bug and raises.
    """
    _check_pairs(batch, n_pairs)
    hidden = hidden_states(model, batch)                          # (2B, T, H) one decoder pass for both halves
    h, y, row = _trained_positions(hidden, batch["labels"])       # (N, H), (N,), (N,)
    tok = _token_logps(model, h, y)                               # (N,)
    logps, n_tokens = _per_sequence(tok, row, 2 * n_pairs)        # (2B,), (2B,)
    if bool((n_tokens == 0).any()):
        empty = (n_tokens == 0).nonzero(as_tuple=True)[0].tolist()
        raise ValueError(f"pair batch rows {empty} have no trained tokens (empty answer after truncation?)")
    chosen = row < n_pairs                                        # (N,) positions in the chosen half
    return {"logps": logps, "n_tokens": n_tokens,
            "chosen_nll_sum": -tok[chosen].sum(), "chosen_tokens": int(chosen.sum())}


@torch.no_grad()
def reference_logps(model, batch: dict, n_pairs: int) -> torch.Tensor:
    """Reference sequence log-probs (2B,) fp32 of a pair batch: the base model, adapters off.

    With LoRA the reference π_ref is the frozen base, i.e. the same network with every adapter
    disabled, so DPO needs no second copy of the weights (TRL does the same for a fresh peft
    adapter: `use_adapter(model, None)`).

    Dropout is off for the reference (eval mode), so π_ref is a fixed function. TRL gets the
    same effect differently: `DPOConfig.disable_dropout=True` (its default) sets p = 0 in every
    nn.Dropout of the model for the whole run, policy included. Here only this call runs in eval
    mode; each module's own train/eval flag is put back afterwards (not a blanket
    `model.train()`, which would also flip modules someone deliberately left in eval mode).
    """
    _check_pairs(batch, n_pairs)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with disable_adapters(model):
            logps, _ = sequence_logps(model, hidden_states(model, batch), batch["labels"])
    finally:
        for m, was_training in modes:
            m.training = was_training
    return logps


# --------------------------------------------------------------------------- DPO family

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, loss_type: str, label_smoothing: float = 0.0,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses (B,), and the implicit rewards (B,) of chosen and rejected.

    Inputs are (B,) sequence log-probs of the policy π and the reference π_ref: SUMS over the
    answer tokens for sigmoid/robust/hinge, per-token MEANS for ipo (`uses_mean_logps`).
    With the log-ratio margin

        Δ = (log π(y⁺|x) − log π_ref(y⁺|x)) − (log π(y⁻|x) − log π_ref(y⁻|x))

    and ε = label_smoothing, σ the logistic function:

      sigmoid  L = −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)
               DPO, Rafailov et al. 2023, eq. 7. ε > 0 is "conservative DPO" (Mitchell 2023,
               "A note on DPO with noisy preferences"): a cross-entropy against the soft
               target 1−ε instead of 1, so the loss stops pushing once σ(βΔ) reaches 1−ε.
      robust   L = (−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε)
               Chowdhury et al. 2024, "Provably Robust DPO": an unbiased estimate of the clean
               DPO loss when each label is flipped with probability ε (ε < 1/2).
      hinge    L = max(0, 1 − βΔ)
               SLiC, Zhao et al. 2023 (calibration loss with margin 1/β, scaled by β).
      ipo      L = (Δ − 1/(2β))²   with Δ built from mean (length-normalised) log-probs
               IPO, Azar et al. 2023, eq. 17 (β is their τ). A squared loss on summed log-probs
               grows with the answer length; TRL divides by the answer lengths and the IPO
               authors confirmed that is what the paper's results used.

    Rewards r = β·(log π − log π_ref) for each answer (Rafailov et al. §5), detached: they are
    for logging (accuracy = mean[r⁺ > r⁻], margin = mean[r⁺ − r⁻]).

    All of this runs in fp32 whatever the input dtype: log σ of a bf16 margin is too coarse.

    As TRL 1.16 computes it (`DPOTrainer._compute_loss`): robust, hinge and ipo are the same
    formulas. One deliberate difference: TRL 1.16's "sigmoid" ignores label_smoothing (it is
    only used by robust, exo_pair and aot there); here sigmoid with ε > 0 is cDPO as above, which
    is what older TRL versions computed. At ε = 0 (the default) the two agree. hinge and ipo have
    no ε and ignore it, as in TRL.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    eps = float(label_smoothing)
    if loss_type in ("sigmoid", "robust") and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen.float() - ref_chosen.float()        # (B,) log π/π_ref on y⁺
    rejected_logratios = policy_rejected.float() - ref_rejected.float()  # (B,) log π/π_ref on y⁻
    delta = chosen_logratios - rejected_logratios                        # (B,) Δ
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo: regress the (mean) margin onto 1/(2β) instead of pushing it to infinity
        losses = (delta - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


# --------------------------------------------------------------------------- ORPO

def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate everywhere (Mächler 2012, "Accurately computing log(1 − exp(−|a|))").

    Near 0, 1 − eˣ cancels: use log(−expm1(x)). Far below 0, eˣ is tiny: use log1p(−eˣ).
    The switch at −ln 2 is where both are equally good; TRL's ORPO `log1mexp` is the same.
    """
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(mean_logp_chosen: torch.Tensor, mean_logp_rejected: torch.Tensor,
              nll_chosen: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model").

    With l = mean per-token log-prob of an answer, P = eˡ its (geometric-mean) likelihood and
    odds(y|x) = P / (1 − P), eqs. 4 and 7 of the paper:

        log_odds = log odds(y⁺|x) − log odds(y⁻|x)
                 = (l⁺ − l⁻) − (log(1 − e^{l⁺}) − log(1 − e^{l⁻}))
        L_OR     = − log σ(log_odds)                          (B,)
        L        = L_SFT + λ · mean_B(L_OR)

    L_SFT = nll_chosen, the token-mean NLL of the chosen answers (scalar). No reference model:
    the odds ratio alone pushes the rejected answer down while L_SFT pulls the chosen one up.

    Inputs (B,) and a scalar; computed in fp32. Returns the loss (scalar), log_odds (B,) and
    ratio_term = log σ(log_odds) (B,), the last two detached for logging.

    As TRL computes it (`trl.experimental.orpo.ORPOTrainer.odds_ratio_loss`, TRL's β is λ here):
    same log_odds with the same log1mexp, loss = nll − mean(λ · log σ(log_odds)). One deliberate
    difference is upstream of this function: TRL's ORPO NLL covers prompt AND answer tokens
    (labels = input_ids on every attended token); here, as in the paper's L_SFT, it covers the
    chosen answer's tokens only, the same tokens SFT trains.
    """
    lc = mean_logp_chosen.float()                                      # (B,) l⁺ < 0
    lr = mean_logp_rejected.float()                                    # (B,) l⁻ < 0
    log_odds = (lc - lr) - (_log1mexp(lc) - _log1mexp(lr))             # (B,)
    ratio = F.logsigmoid(log_odds)                                     # (B,) log σ(log_odds) ≤ 0
    loss = nll_chosen.float() - lam * ratio.mean()
    return loss, log_odds.detach(), ratio.detach()
