"""Merge operators: pure functions from tensors to one merged tensor.

Every function takes the tensors of ONE weight (the same name in every model), upcasts to
fp32 (fp64 stays fp64), and returns the merged tensor in that compute dtype. The caller
rounds once to the output dtype: rounding intermediate results (a bf16 task vector, a bf16
sum) would throw away most of a small fine-tuning delta.

Notation: θ₀ is the base weight, θᵢ the weight of model i, τᵢ = θᵢ − θ₀ its task vector,
wᵢ its weight, λ a global scale. Conventions follow mergekit
(mergekit/merge_methods/generalized_task_arithmetic.py, linear.py, slerp.py and
mergekit/sparsify.py, read from mergekit 0.1.5 on PyPI), which users of merge configs know.

Where mergekit and we differ on purpose
  * DARE rescale: the DARE paper (and we) divide kept entries by `density`, which makes the
    result unbiased entry by entry. mergekit 0.1.5 instead rescales the dropped tensor so its
    L1 norm matches the original (RescaleNorm.l1); close to 1/density in expectation only.
  * DARE randomness: mergekit draws from torch's global RNG (order dependent, reproducible
    only as a whole run). We seed one generator per tensor from hash(seed, tensor name), so a
    tensor's mask does not depend on which tensors came before it.
  * TIES trim: mergekit argsorts |τ| (O(n log n), an int64 index per entry) and keeps exactly
    k = max(1, int(density·n)) entries. We take the k-th largest |τ| with torch.kthvalue
    (selection, O(n)) and keep |τ| >= it: the same set unless magnitudes tie at the
    threshold, where we keep all tied entries.

Where peft's `LoraModel.add_weighted_adapter` differs (peft/tuners/lora/model.py,
peft/utils/merge_utils.py, peft 0.21)
  * Its "linear", "ties", "dare_linear", "dare_ties" and "magnitude_prune" combine the
    factors A and B separately (each adapter's wᵢ·sᵢ split as √ on both sides), never the
    product: Σ√c A and Σ√c B multiply out into cross terms Bᵢ Aⱼ, so it is not the merge of
    the task vectors sᵢ Bᵢ Aᵢ. Its "*_svd" variants do apply the operator to the products,
    then truncate the result back to a rank by SVD (lossy). Its "cat" is exact (it folds
    wᵢ·sᵢ into the A blocks; `python -m merge --as-adapter` folds them into the B blocks).
  * Its TIES elects the sign from the UNweighted trimmed task vectors and divides the
    agreeing weighted sum by the COUNT of agreeing models; mergekit (and we) elect from the
    weighted task vectors and divide by the SUM of the agreeing weights.
  * Its magnitude trim uses torch.topk with k = int(density·n) (k may be 0); its DARE
    uses torch.bernoulli on the global RNG, rescaled by 1/density like ours.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

Weights = Sequence[float]
Densities = float | Sequence[float]

# mergekit's slerp: above this |cos θ| the two tensors are taken as colinear and lerped
# (sin θ in the denominator would be ~0 and amplify rounding noise).
SLERP_DOT_THRESHOLD = 0.9995


def _f32(x: torch.Tensor) -> torch.Tensor:
    """The compute dtype: fp32, or fp64 for fp64 inputs (never a lower precision)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _per_model(value: Densities, n: int) -> list[float]:
    return [float(value)] * n if isinstance(value, (int, float)) else [float(v) for v in value]


# ---------------------------------------------------------------------------- linear, task arithmetic

def linear(tensors: Sequence[torch.Tensor], weights: Weights, normalize: bool = True) -> torch.Tensor:
    """Weighted average of whole weights (Wortsman et al. 2022, "model soups"; mergekit linear).

        θ = Σᵢ wᵢ θᵢ / Σᵢ wᵢ      (normalize)        θ = Σᵢ wᵢ θᵢ      (not normalized)

    No base model: the inputs are the weights themselves, not task vectors.
    """
    out = torch.zeros_like(_f32(tensors[0]))
    for t, w in zip(tensors, weights, strict=True):
        out.add_(_f32(t), alpha=w)
    if normalize:
        total = sum(weights)
        out.div_(total if abs(total) >= 1e-8 else 1.0)  # mergekit's guard against Σw ≈ 0
    return out


def task_arithmetic(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Weights,
                    lam: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic").

        θ = θ₀ + λ · Σᵢ wᵢ τᵢ  (/ Σᵢ wᵢ when normalize; mergekit's default is not to)
    """
    mixed = torch.zeros_like(_f32(base))
    for d, w in zip(deltas, weights, strict=True):
        mixed.add_(_f32(d), alpha=w)
    if normalize:
        total = sum(weights)
        mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    return _f32(base) + lam * mixed


# ---------------------------------------------------------------------------- TIES

def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of the 1-D tensor x, exactly; torch.kthvalue does the selecting.

    torch.kthvalue is a selection, O(n), but a slow one on the CPU (~10 ns an entry, against
    ~0.4 ns for an elementwise pass). So, after Floyd & Rivest (1975), it runs on a few per
    cent of x only:
      1. kthvalue on a strided sample of m = n/32 entries gives two values lo ≤ hi a few
         standard deviations of the sample rank (√m/2 at most) either side of the target's
         rank: the answer lies in [lo, hi] with near certainty;
      2. one pass counts the entries above hi and gathers those in [lo, hi] (~6/√m of x);
      3. kthvalue on the gathered entries, at the rank the count leaves.
    The counts show whether the band really holds the answer; if not (a sample that misjudged
    a very structured tensor), kthvalue runs on all of x. Exact either way.
    """
    n = x.numel()
    if n < 1 << 16:
        return torch.kthvalue(x, n - k + 1).values  # small: not worth the detour
    sample = x[:: 32]
    m = sample.numel()
    j = (n - k + 1) / n * m  # the target's expected rank (from below) in the sample
    d = 3 * math.sqrt(m)     # ≥ 6 standard deviations of that rank
    lo = torch.kthvalue(sample, max(1, int(j - d))).values if j - d >= 1 else None
    hi = torch.kthvalue(sample, min(m, int(j + d) + 1)).values if j + d < m else None
    above = int((x > hi).sum()) if hi is not None else 0
    in_band = torch.ones_like(x, dtype=torch.bool) if lo is None else x >= lo
    if hi is not None:
        in_band &= x <= hi
    band = x[in_band]
    rank = k - above  # the answer is the rank-th largest entry of the band
    if 1 <= rank <= band.numel():
        return torch.kthvalue(band, band.numel() - rank + 1).values
    return torch.kthvalue(x, n - k + 1).values  # the band missed: select over everything


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density·n)) entries of largest |τ|, zero the rest (TIES "trim").

    The threshold is the k-th largest magnitude, found by selection with torch.kthvalue
    (kth_largest, O(n)) instead of sorting all n magnitudes as mergekit does. Ties at the
    threshold are all kept.
    """
    delta = _f32(delta)
    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    k = max(1, int(density * n))  # mergekit: a positive density keeps at least one entry
    mag = delta.abs()
    threshold = kth_largest(mag.view(-1), k)
    # Multiply by a float 0/1 mask: PyTorch's CPU kernels that mix bool and float operands
    # (delta * bool_mask, torch.where(mask, delta, 0.)) run ~5x slower than float-only ones.
    return delta * (mag >= threshold).to(delta.dtype)


def disjoint_mean(deltas: Sequence[torch.Tensor], weights: Weights, normalize: bool = True) -> torch.Tensor:
    """TIES "elect" and "disjoint merge" of the (trimmed) task vectors τᵢ.

        elected sign   γ = sign(Σᵢ wᵢ τᵢ)            (mergekit's "sum" method; γ = +1 where it is 0)
        agree          mᵢ = [sign(wᵢ τᵢ) = γ]       (a zeroed entry never agrees)
        merged         Σᵢ mᵢ wᵢ τᵢ / Σᵢ mᵢ wᵢ       (normalize; divisor 1 where no model agrees)

    The signs compared are those of the weighted τᵢ, as in mergekit (the same for wᵢ > 0).
    One model at a time: no (K, *shape) stack is ever built.
    """
    total = torch.zeros_like(_f32(deltas[0]))
    for d, w in zip(deltas, weights, strict=True):
        total.add_(_f32(d), alpha=w)
    elected = (total >= 0).to(total.dtype) * 2 - 1  # γ = ±1 (float masks: see magnitude_trim)
    del total
    mixed = torch.zeros_like(elected)
    divisor = torch.zeros_like(elected)
    for d, w in zip(deltas, weights):
        x = _f32(d) * w
        agree = (x * elected > 0).to(x.dtype)  # 1 where sign(wᵢ τᵢ) = γ; 0 where it differs or τᵢ = 0
        mixed.addcmul_(x, agree)
        divisor.add_(agree, alpha=w)
    if not normalize:
        return mixed
    divisor += (divisor == 0).to(divisor.dtype)  # 0 -> 1: no model agrees, mixed is 0 there anyway
    return mixed / divisor


def ties(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Weights, density: Densities,
         lam: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023, "Resolving interference when merging models").

        τ̂ᵢ = trim(τᵢ, densityᵢ)                       keep the top-k magnitudes of each τᵢ
        θ  = θ₀ + λ · disjoint_mean(τ̂, w)             sign election + mean over agreeing models
    """
    dens = _per_model(density, len(deltas))
    trimmed = [magnitude_trim(d, p) for d, p in zip(deltas, dens, strict=True)]
    return _f32(base) + lam * disjoint_mean(trimmed, weights, normalize)


# ---------------------------------------------------------------------------- DARE

def tensor_generator(name: str, seed: int) -> torch.Generator:
    """A CPU generator seeded from (seed, tensor name): a tensor's random draws depend on
    nothing else, so a merge is reproducible and independent of the order tensors come in."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator,
                rescale: bool = True) -> torch.Tensor:
    """DARE's drop-and-rescale (Yu et al. 2024, "Language models are Super Mario").

        mᵢⱼ ~ Bernoulli(density),   τ̃ = m ⊙ τ / density

    E[τ̃] = τ entry by entry. A generator is always consumed, even at density 1, so the draws
    for the next model do not depend on this model's density.
    """
    delta = _f32(delta)
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density
    if density >= 1:
        return delta
    kept = delta * keep.to(delta.dtype)
    return kept / density if rescale else kept


def _dropped(deltas, density, generator, rescale) -> list[torch.Tensor]:
    dens = _per_model(density, len(deltas))
    return [random_drop(d, p, generator, rescale) for d, p in zip(deltas, dens, strict=True)]


def dare_linear(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Weights, density: Densities,
                generator: torch.Generator, lam: float = 1.0, normalize: bool = False,
                rescale: bool = True) -> torch.Tensor:
    """DARE then task arithmetic:  θ = θ₀ + λ · Σᵢ wᵢ τ̃ᵢ  (/ Σᵢ wᵢ when normalize)."""
    dropped = _dropped(deltas, density, generator, rescale)
    return task_arithmetic(base, dropped, weights, lam, normalize)


def dare_ties(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Weights, density: Densities,
              generator: torch.Generator, lam: float = 1.0, normalize: bool = False,
              rescale: bool = True) -> torch.Tensor:
    """DARE then TIES' sign election and disjoint mean:  θ = θ₀ + λ · disjoint_mean(τ̃, w).

    mergekit's default is normalize: false for dare_ties (true for ties).
    """
    dropped = _dropped(deltas, density, generator, rescale)
    return _f32(base) + lam * disjoint_mean(dropped, weights, normalize)


# ---------------------------------------------------------------------------- SLERP

def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = SLERP_DOT_THRESHOLD,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985), on the flattened tensors as mergekit does.

        cos Ω = ⟨a/‖a‖, b/‖b‖⟩
        θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b
        θ = (1−t)·a + t·b              when |cos Ω| > dot_threshold (nearly colinear or opposite;
                                        mergekit's 0.9995)

    t = 0 gives a, t = 1 gives b. The magnitudes are interpolated along with the direction
    (the coefficients multiply the unnormalised tensors), as in mergekit.
    """
    a, b = _f32(a), _f32(b)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    # A zero tensor has no direction: normalising by 1 keeps cos Ω = 0, not NaN.
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > dot_threshold:
        # mergekit writes (1−t)·a + t·b; a + t·(b − a) is the same number up to rounding and
        # gives a back bit for bit where b = a (a weight neither model changed).
        return a + t * (b - a)
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return (math.sin((1 - t) * omega) / sin_omega) * a + (math.sin(t * omega) / sin_omega) * b
