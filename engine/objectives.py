"""Training objectives as the loop sees them: `loss, stats = objective(model, micro_batch, totals)`.

One optimizer step may span several micro-batches (gradient accumulation). So
that the accumulated gradient equals the gradient of one big batch, every
micro-batch's loss is divided by the step's totals, not by its own size:

    SFT   loss_mb = Σ_{tokens in mb} NLL / (trained tokens in the step)
    DPO   loss_mb = Σ_{pairs in mb} ℓ_DPO / (pairs in the step)
                    [+ w · Σ_{chosen tokens in mb} NLL / (chosen tokens in the step)]   (RPO term)
    ORPO  loss_mb = Σ NLL(chosen) / (chosen tokens in the step)
                    − λ · Σ_{pairs in mb} log σ(log_odds) / (pairs in the step)

and the logged loss of the step is the plain sum of the micro-batch losses.
Every entry of `stats` is normalised the same way, so summing a step's (or a
whole held-out set's) stats gives its means.

Preference micro-batches hold B chosen rows followed by B rejected rows
(`engine.data.PairBatches`); one forward covers both halves.
"""
from __future__ import annotations

import torch

from paft_kernels.l1_lowrank import l1_lowrank, sparsity_of_product
from engine.lora import LoRALinear
from engine.losses import (dpo_loss, orpo_loss, preference_forward, reference_logps, sft_loss_sum,
                           uses_mean_logps)


def step_totals(micro_batches: list[dict]) -> dict:
    """Denominators for one optimizer step (or one held-out pass): counts only, no forward."""
    totals = {"tokens": 0, "pairs": 0, "chosen_tokens": 0}
    for mb in micro_batches:
        trained = mb["labels"][:, 1:] != -100  # (rows, T-1): positions that carry loss
        totals["tokens"] += int(trained.sum())
        if "n_pairs" in mb:
            totals["pairs"] += mb["n_pairs"]
            totals["chosen_tokens"] += int(trained[: mb["n_pairs"]].sum())
    return totals


def sft_objective(model, mb: dict, totals: dict) -> tuple[torch.Tensor, dict]:
    nll_sum, _ = sft_loss_sum(model, mb)
    loss = nll_sum / totals["tokens"]
    return loss, {"loss": loss.item()}


def _policy_and_reference(model, mb: dict, ref_table: dict | None, mean: bool):
    """Sequence log-probs (2B,) of the policy (with grad) and of the reference (without)."""
    n = mb["n_pairs"]
    if ref_table is None:
        # The base model with adapters off, on the same batch. Run it before the policy forward, so
        # its no-grad activations are freed before the policy's (kept for backward) pile up.
        ref = reference_logps(model, mb, n)
    else:  # precomputed once before training, looked up by example index
        idx = mb["index"].cpu()
        ref = torch.cat([ref_table["chosen_logps"][idx], ref_table["rejected_logps"][idx]])
    out = preference_forward(model, mb, n)
    ref = ref.to(out["logps"].device)
    if mean:  # IPO: per-token means of both policy and reference log-probs
        return out, out["logps"] / out["n_tokens"], ref / out["n_tokens"]
    return out, out["logps"], ref


def dpo_objective(model, mb: dict, totals: dict, cfg, ref_table: dict | None = None) -> tuple[torch.Tensor, dict]:
    n = mb["n_pairs"]
    out, logps, ref = _policy_and_reference(model, mb, ref_table, uses_mean_logps(cfg.loss_type))
    losses, r_chosen, r_rejected = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], cfg.beta, cfg.loss_type,
                                            cfg.label_smoothing)
    pref_loss = losses.sum() / totals["pairs"]
    loss = pref_loss
    if cfg.sft_weight > 0:
        loss = loss + cfg.sft_weight * out["chosen_nll_sum"] / totals["chosen_tokens"]
    p = totals["pairs"]
    stats = {
        "loss": loss.item(), "dpo_loss": pref_loss.item(),
        "rewards/chosen": r_chosen.sum().item() / p, "rewards/rejected": r_rejected.sum().item() / p,
        "rewards/accuracies": (r_chosen > r_rejected).sum().item() / p,
        "rewards/margins": (r_chosen - r_rejected).sum().item() / p,
        "logps/chosen": out["logps"][:n].detach().sum().item() / p,
        "logps/rejected": out["logps"][n:].detach().sum().item() / p,
    }
    return loss, stats


def orpo_objective(model, mb: dict, totals: dict, cfg) -> tuple[torch.Tensor, dict]:
    n = mb["n_pairs"]
    out = preference_forward(model, mb, n)
    mean = out["logps"] / out["n_tokens"]  # ORPO's odds use per-token mean log-probs
    nll = out["chosen_nll_sum"] / totals["chosen_tokens"]
    # orpo_loss with a zero NLL returns −λ·mean_B(log σ(log_odds)), with its gradient (its ratio output is
    # detached, for logging only); rescale the mean over this micro-batch's pairs to one over the step's pairs.
    or_loss, log_odds, ratio = orpo_loss(mean[:n], mean[n:], torch.zeros((), device=mean.device), cfg.lam)
    odds_term = ratio.sum() / totals["pairs"]
    loss = nll + or_loss * (n / totals["pairs"])
    p = totals["pairs"]
    stats = {"loss": loss.item(), "nll_chosen": nll.item(), "log_odds": log_odds.detach().sum().item() / p,
             "log_odds_ratio": odds_term.item(),
             "rewards/accuracies": (log_odds > 0).sum().item() / p,
             "logps/chosen": out["logps"][:n].detach().sum().item() / p,
             "logps/rejected": out["logps"][n:].detach().sum().item() / p}
    return loss, stats


def l1_penalty(model, lam: float, backend: str = "auto") -> torch.Tensor:
    """PAFT's sparsity term λ Σ_layers ‖s·B A‖₁ (eq. 1), added once per optimizer step.

    Its gradients, s·λ·Bᵀ sign(B A) for A and s·λ·sign(B A) Aᵀ for B, are computed tile by
    tile without storing B A (paft_kernels/l1_lowrank.py).
    """
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    return sum(l1_lowrank(m.lora_A.weight, m.lora_B.weight, m.scaling, lam, backend) for m in layers)


@torch.no_grad()
def delta_sparsity(model, threshold: float = 1e-5) -> float:
    """PAFT Figure 2: share of entries of δ = s·B A with |δ| < 1e-5, per layer, averaged over layers."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    return sum(sparsity_of_product(m.lora_A.weight, m.lora_B.weight, m.scaling, threshold)
               for m in layers) / len(layers)
