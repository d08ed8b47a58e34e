"""How much of a weight update survives rounding the merged weights to a low-precision dtype.

An exported or merged model stores W' = round(W + δ), with W the base weight as stored and
δ the update (δ = s·B A for a LoRA adapter, θ_merged − θ₀ for a merge), summed in fp32. The
update the saved model actually carries is

    eff = round(W + δ) − W

and we report, over every weight with δ ≠ 0 (norms taken over all of them together):

    lost   = ‖eff − δ‖ / ‖δ‖       the distance of the saved model from the trained one, in
                                   units of the update (0: exact; 1: as far as the base is)
    erased = #{δ ≠ 0 and round(W + δ) = round(W)} / #{δ ≠ 0}
                                   the share of δ's entries that left no trace at all

Why it matters: bf16 keeps 8 significant bits, so round(W + δ) = W whenever |δ| is below half
a bf16 ulp of W, |δ| < 2^-9 |W| roughly; a LoRA update is often that small entry by entry
(measured on the quickstart's adapters: see docs/RELIABILITY.md). `lost` is large then, and
the "fine-tuned" model handed to an evaluation is mostly the base. fp32 (24 bits) keeps
essentially all of it (lost ~ 1e-6 for the same updates).

`lost` can exceed 1: entries that do survive are moved to the nearest representable value,
a step of up to half an ulp of W, which can be bigger than δ itself.
"""
from __future__ import annotations

import math

import torch

LOSSY_BOUND = 0.01  # refuse (or, when allowed, warn) past 1 % of ‖δ‖ lost


class RoundingLoss:
    """Accumulates `lost` and `erased` (see the module docstring) tensor by tensor."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.err2 = 0.0     # Σ ‖eff − δ‖²
        self.delta2 = 0.0   # Σ ‖δ‖²
        self.changed = 0    # #{δ ≠ 0}
        self.erased = 0     # #{δ ≠ 0, round(W + δ) = round(W)}
        self.worst = (0.0, None)  # (lost of one tensor, its name)

    @torch.no_grad()
    def add(self, name: str, merged: torch.Tensor, base: torch.Tensor) -> None:
        """merged = W + δ in fp32 (or fp64), base = W as stored; same shape."""
        merged, base = merged.float(), base.float()
        delta = merged - base
        nonzero = delta != 0
        n = int(nonzero.sum())
        if n == 0:
            return  # this tensor is not updated: nothing to lose
        rounded = merged.to(self.dtype).float()
        err2 = float(((rounded - base) - delta).double().pow(2).sum())
        d2 = float(delta.double().pow(2).sum())
        self.err2 += err2
        self.delta2 += d2
        self.changed += n
        self.erased += int((nonzero & (rounded == base.to(self.dtype).float())).sum())
        one = math.sqrt(err2 / d2) if d2 > 0 else 0.0
        if one > self.worst[0]:
            self.worst = (one, name)

    @property
    def lost(self) -> float:
        return math.sqrt(self.err2 / self.delta2) if self.delta2 > 0 else 0.0

    @property
    def erased_share(self) -> float:
        return self.erased / self.changed if self.changed else 0.0

    def summary(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        worst = f"; worst tensor {self.worst[1]} ({100 * self.worst[0]:.3g}%)" if self.worst[1] else ""
        return (f"{name} loses {100 * self.lost:.3g}% of the update (||round(W+delta) - W - delta|| / ||delta||; "
                f"{100 * self.erased_share:.3g}% of its {self.changed:,} nonzero entries erased{worst})")

    def as_dict(self) -> dict:
        return {"dtype": str(self.dtype).removeprefix("torch."), "lost": self.lost,
                "erased": self.erased_share, "changed_entries": self.changed, "worst_tensor": self.worst[1]}
