"""The shape of a LoRA update apart from its size: scale-free sparsity, and SFT vs DPO at equal ‖δ‖.

PAFT's Figure 2 share, S(1e-5) = share of |δ_ij| < 1e-5 (merge.sparsity), mixes two things: how
the entries are spread (shape) and how large they are (scale). For entries with one spread σ,
S(τ) ≈ 0.8·τ/σ when τ ≪ σ, so an update 40× smaller (zephyr's DPO vs SFT learning rates) reads
as far "sparser" with the same shape. Per LoRA layer, δ = s·B A (s = α/r, merge.deltas.Adapter;
an embedding's δ is (B A)ᵀ, the same entries), n = numel, formed in fp32 a chunk of rows at a time:

    fro       = ‖δ‖_F = s·sqrt(Σ (BᵀB) ⊙ (A Aᵀ))   (an r×r product, fp64: no pass over δ needed)
    rms       = ‖δ‖_F / √n
    below_rel = share of |δ_ij| < 0.1·rms            scale-free: δ → cδ leaves it unchanged
    hoyer     = (√n − ‖δ‖₁/‖δ‖₂) / (√n − 1)          Hoyer (2004): 0 for a flat vector, 1 for one non-zero
    row_conc  = share of Σ_i ‖B_i‖² held by the top 10% of B's rows
                (k = max(1, round(n_rows/10))): equal rows give k/n_rows (0.1), one non-zero row 1.
                row_gini: the Gini coefficient of the same ‖B_i‖² (0 for equal rows, (m−1)/m for
                one row of m).
                row_conc_delta: the same share over δ's rows ‖δ_i‖² = s²·B_i (A Aᵀ) B_iᵀ, which,
                unlike B's, does not change when B → B M, A → M⁻¹ A (the factorisation's gauge).
    s_1e5     = share of |δ_ij| < 1e-5: PAFT's raw measure, computed as
                paft_kernels.l1_lowrank.sparsity_of_product computes it (same chunks, same ops), so it
                equals merge.sparsity's per-layer number exactly.
(At δ = 0, rms = 0: below_rel and hoyer are NaN, undefined rather than "sparse".)

Reference values, for i.i.d. entries of any spread (so a shape, not a size):
    Gaussian  below_rel = P(|Z| < 0.1) = erf(0.1/√2)      = 0.0797   hoyer → 1 − √(2/π) = 0.2021
    Laplace   below_rel = 1 − exp(−0.1·√2)                = 0.1319   hoyer → 1 − 1/√2   = 0.2929
(Laplace with scale b has rms b√2, so |x| < 0.1·b√2 has probability 1 − e^(−0.1√2).) A heavier
tail than Gaussian raises both; a truly sparse update (many exact or near zeros) drives both
toward 1. Figure 2's S(1e-5) can move either way with the learning rate; these cannot.

Comparing at matched update size (`matched`): stage_shapes gives each kept checkpoint step
(stage_dir/checkpoints/step-N/adapter) and the final adapter (stage_dir/adapter, under the step
summary.json names; it replaces a checkpoint of the same step) with its model-level
fro_total = sqrt(Σ_layers fro²). Step 0 (B = 0, δ = 0) is left out: it has no shape. The rule,
for stages a (e.g. SFT, the larger update) and b (e.g. DPO): b is taken at its final step F_b, and
a at the step whose fro_total is closest to fro_total(F_b) in |log ratio|; if a never reaches it
(max_a fro_total < fro_total(F_b)), a is taken at its largest-‖δ‖ step instead and b at the step
closest to that. Ties go to the later step. Steps with fro_total = 0 are not candidates.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re

import torch

from merge.deltas import Adapter
from paft_kernels.l1_lowrank import CHUNK_ELEMENTS

REL = 0.1          # below_rel threshold, in units of the layer's rms
RAW = 1e-5         # PAFT's threshold
TOP_ROWS = 0.1     # row_conc: share of the rows counted as "top"
GAUSS_BELOW_REL = math.erf(REL / math.sqrt(2))            # 0.07966
LAPLACE_BELOW_REL = 1 - math.exp(-REL * math.sqrt(2))     # 0.13188
GAUSS_HOYER = 1 - math.sqrt(2 / math.pi)                  # 0.20212 (n → ∞)
LAPLACE_HOYER = 1 - 1 / math.sqrt(2)                      # 0.29289 (n → ∞)


class _Entries:
    """Counts over the entries of one δ, fed a chunk at a time, its rms known in advance."""

    def __init__(self, numel: int, fro: float):
        self.numel, self.fro = numel, fro
        self.rms = fro / math.sqrt(numel) if numel else 0.0
        self.l1 = 0.0
        self.below_rel = 0
        self.below_raw = 0

    def add(self, chunk: torch.Tensor) -> None:
        mag = chunk.abs()
        self.l1 += float(mag.sum(dtype=torch.float64))
        self.below_rel += int((mag < REL * self.rms).sum())
        self.below_raw += int((mag < RAW).sum())

    def result(self) -> dict:
        n, fro = self.numel, self.fro
        zero = n == 0 or fro == 0
        hoyer = float("nan") if zero else \
            ((math.sqrt(n) - self.l1 / fro) / (math.sqrt(n) - 1) if n > 1 else 1.0)
        return {"numel": n, "fro": fro, "rms": self.rms,
                "below_rel": float("nan") if zero else self.below_rel / n,
                "hoyer": hoyer, "s_1e5": self.below_raw / n if n else 0.0}


def entry_shape(delta: torch.Tensor) -> dict:
    """numel, fro, rms, below_rel, hoyer, s_1e5 of one tensor's entries (fp32 values, fp64 sums)."""
    d = delta.float().reshape(-1)
    acc = _Entries(d.numel(), float(d.double().norm()))
    acc.add(d)
    return acc.result()


def row_concentration(energy: torch.Tensor, top: float = TOP_ROWS) -> tuple[float, float]:
    """(share of Σ energy held by the top max(1, round(top·m)) of m rows, Gini of the energies)."""
    e = energy.double().reshape(-1).clamp_min(0)
    m, total = e.numel(), float(e.sum())
    if m == 0 or total == 0:
        return float("nan"), float("nan")
    k = max(1, round(top * m))
    srt = e.sort().values  # ascending
    conc = float(srt[-k:].sum()) / total
    i = torch.arange(1, m + 1, dtype=torch.float64)
    gini = float(((2 * i - m - 1) * srt).sum()) / (m * total)
    return conc, gini


def _fro(Ad: torch.Tensor, Bd: torch.Tensor, gram_a: torch.Tensor, scale: float) -> float:
    """‖s·B A‖_F from fp64 factors and A Aᵀ: s·sqrt(Σ (BᵀB) ⊙ (A Aᵀ)), an r×r product, no pass over δ."""
    return abs(scale) * math.sqrt(max(0.0, float(((Bd.T @ Bd) * gram_a).sum())))


@torch.no_grad()
def _layer(A: torch.Tensor, B: torch.Tensor, scale: float) -> dict:
    """The shape of δ = scale·B A (A (r, in), B (out, r)), forming B A by row chunks in fp32 as
    sparsity_of_product does (chunk rows = CHUNK_ELEMENTS // in, product then ·scale)."""
    A, B = A.float(), B.float()
    N, K = B.shape[0], A.shape[1]
    Ad, Bd = A.double(), B.double()
    gram_a = Ad @ Ad.T  # (r, r)
    acc = _Entries(N * K, _fro(Ad, Bd, gram_a, scale))
    rows = max(1, CHUNK_ELEMENTS // max(1, K))
    for n0 in range(0, N, rows):
        acc.add((B[n0:n0 + rows] @ A).mul_(scale))
    out = acc.result()
    out["row_conc"], out["row_gini"] = row_concentration(B.double().pow(2).sum(1))
    delta_rows = ((Bd @ gram_a) * Bd).sum(1) * scale ** 2  # ‖δ_i‖² = s² B_i (A Aᵀ) B_iᵀ
    out["row_conc_delta"], _ = row_concentration(delta_rows)
    return out


@torch.no_grad()
def layer_shapes(adapter_dir: str) -> dict[str, dict]:
    """{layer: shape dict (module docstring)} for each LoRA layer of a peft adapter directory; layer
    names as merge.sparsity / merge.figure2 name them (merge.deltas.Adapter.targets). One layer at a time."""
    adapter = Adapter(adapter_dir, "adapter")
    out = {}
    for name in adapter.targets:
        A, B = adapter.factors(name)
        out[name] = _layer(A, B, adapter.scale)
    return out


@torch.no_grad()
def update_size(adapter_dir: str) -> float:
    """fro_total = sqrt(Σ_layers ‖δ‖_F²) of an adapter from its factors alone (stage_shapes' number,
    the same ops), for `matched` without measuring every checkpoint's entries."""
    adapter = Adapter(adapter_dir, "adapter")
    total = 0.0
    for name in adapter.targets:
        A, B = adapter.factors(name)
        Ad, Bd = A.float().double(), B.float().double()
        total += _fro(Ad, Bd, Ad @ Ad.T, adapter.scale) ** 2
    return math.sqrt(total)


MEAN_KEYS = ("below_rel", "hoyer", "row_conc", "row_conc_delta", "s_1e5")


def _model_level(layers: dict[str, dict]) -> dict:
    fro_total = math.sqrt(sum(v["fro"] ** 2 for v in layers.values()))
    n = max(1, len(layers))
    return {"fro_total": fro_total,
            "mean": {k: sum(v[k] for v in layers.values()) / n for k in MEAN_KEYS}}


def stage_adapters(stage_dir: str) -> dict[int, str]:
    """{step: adapter dir}: kept checkpoints, and the final adapter under summary.json's step."""
    out = {}
    for path in sorted(glob.glob(os.path.join(stage_dir, "checkpoints", "step-*", "adapter"))):
        out[int(re.search(r"step-(\d+)", path).group(1))] = path
    summary, final = os.path.join(stage_dir, "summary.json"), os.path.join(stage_dir, "adapter")
    if os.path.isfile(summary) and os.path.isdir(final):
        with open(summary) as f:
            step = json.load(f).get("steps")
        if step is not None:
            out[int(step)] = final
    return dict(sorted(out.items()))


def stage_shapes(stage_dir: str) -> dict[int, dict]:
    """{step: {"adapter": dir, "layers": layer_shapes(dir), "fro_total": sqrt(Σ fro²),
    "mean": {key: plain mean over layers, for MEAN_KEYS}}}, ascending steps (step 0 left out)."""
    out = {}
    for step, path in stage_adapters(stage_dir).items():
        layers = layer_shapes(path)
        out[step] = {"adapter": path, "layers": layers, **_model_level(layers)}
    return out


def _size(v) -> float:
    return float(v["fro_total"] if isinstance(v, dict) else v)


def _closest(cands: dict[int, float], target: float) -> int:
    """The step whose value is closest to target in |log ratio|; ties to the later step."""
    return min(cands, key=lambda s: (abs(math.log(cands[s] / target)), -s))


def matched(a: dict[int, dict], b: dict[int, dict]) -> tuple[int, int, float]:
    """(step_a, step_b, fro_total_a / fro_total_b) at matched update size (the rule in the module
    docstring: b at its final step unless a never reaches that ‖δ‖). Values: stage_shapes entries
    or plain fro_total numbers."""
    fa = {s: _size(v) for s, v in a.items() if _size(v) > 0}
    fb = {s: _size(v) for s, v in b.items() if _size(v) > 0}
    if not fa or not fb:
        raise ValueError("matched: each stage needs a step with a non-zero update")
    final_b = max(fb)
    if max(fa.values()) >= fb[final_b]:
        step_b = final_b
        step_a = _closest(fa, fb[step_b])
    else:
        step_a = max(fa, key=lambda s: (fa[s], s))
        step_b = _closest(fb, fa[step_a])
    return step_a, step_b, fa[step_a] / fb[step_b]


def paired_layers(a_layers: dict, b_layers: dict, key: str) -> dict[str, float]:
    """{layer: a[layer][key] − b[layer][key]} over the layers both have (a's order)."""
    return {n: a_layers[n][key] - b_layers[n][key] for n in a_layers if n in b_layers}


def shape_table(stage_dirs: dict[str, str]) -> dict:
    """{name: stage_shapes(dir)} for several stages (e.g. {"sft": ..., "dpo": ...})."""
    return {name: stage_shapes(d) for name, d in stage_dirs.items()}
