"""PAFT Figure 2, reproduced: how much of a fine-tuning update is (nearly) zero, at every threshold.

    python -m merge.figure2 NAME=STAGE_DIR [NAME=STAGE_DIR ...] --out fig2.png [--json fig2.json]

For one LoRA layer the update is δ = s·B A (B (out, r), A (r, in), s = α/r), and its sparsity at a
threshold τ is the share of entries with |δ| < τ; a model's sparsity is the plain mean over its
LoRA layers (PAFT's definition, merge.sparsity). Figure 2 of PAFT reads it at τ = 1e-5; here the
whole curve S(τ) for τ in 1e-7 … 1e-3 (log axis) is drawn, because one threshold hides what the
curve shows: for a dense update S(τ) rises like a CDF of |δ|, so "sparser at 1e-5" mostly means
"smaller entries", not "more exact zeros".

A note on what sparsity of a rank-r product can mean. δ_ij = s Σ_k B_ik A_kj (k < r). For factors
in general position no entry is exactly zero: an exact zero needs a zero row of B (the whole
output row i untouched) or a zero column of A (input j ignored), or a cancellation of measure
zero. So an elementwise-sparse δ arises only from (i) factors with zero rows/columns (what a
proximal L1 on the factors produces), or (ii) many entries pushed just below τ (what an L1 on the
product does: its subgradient sign(δ) drives entries toward 0 without making them exactly 0).
For a dense δ whose entries look Gaussian with spread σ, S(τ) ≈ erf(τ / (σ√2)) ≈ 0.8 τ/σ for τ ≪ σ:
the curve is fixed by the one scale σ, which grows with learning rate × steps.

`dtype`: "float32" measures δ itself (what the trainer holds). "bfloat16-merged" measures what one
sees diffing two bf16 checkpoints, δ' = bf16(W₀ + δ) − bf16(W₀): every |δ| below about half a bf16
ulp of W₀ (|W₀|·2⁻⁹ to |W₀|·2⁻⁸) becomes an exact zero, so low precision alone makes an update look sparse.

Over training steps: each stage's checkpoints/step-*/adapter (keep them with train.keep_checkpoints)
give S(τ) at that step.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import torch

from engine.writes import atomic_write, write_json

THRESHOLDS = [1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
STEP_THRESHOLDS = [1e-6, 1e-5, 1e-4]  # drawn over training steps
CHUNK = 1 << 22  # entries of δ formed at once


def _shares(mag: torch.Tensor, edges: torch.Tensor, counts: torch.Tensor) -> None:
    """counts[k] += #entries with |δ| < edges[k] (one pass: bucketize, then a cumulative sum)."""
    idx = torch.bucketize(mag.reshape(-1), edges, right=True)  # 0 .. len(edges): how many edges are <= |δ|
    hist = torch.bincount(idx, minlength=len(edges) + 1)[: len(edges)].to(torch.float64)
    counts += hist.cumsum(0)


def curve(adapter_dir: str, thresholds: list[float] = THRESHOLDS, dtype: str = "float32",
          base: str | None = None) -> list[float]:
    """S(τ) for each τ: share of |δ| < τ per LoRA layer, averaged over layers (fp32 math).
    dtype "bfloat16-merged" needs `base` (a model directory or engine name) for W₀."""
    from merge.deltas import Adapter, open_model, remove_tree
    import tempfile

    if dtype not in ("float32", "bfloat16-merged"):
        raise ValueError(f"dtype: {dtype!r} (float32 or bfloat16-merged)")
    edges = torch.tensor(thresholds, dtype=torch.float32)
    scratch = tempfile.mkdtemp(prefix="paft-fig2-")
    try:
        adapter = Adapter(adapter_dir, "adapter")
        base_ckpt = open_model(base or adapter.base_name, "--base", scratch) if dtype != "float32" else None
        means = torch.zeros(len(thresholds), dtype=torch.float64)
        for name in adapter.targets:
            A, B = adapter.factors(name)  # (r, in), (out, r)
            A, B = A.float(), B.float()
            w0 = base_ckpt.read(name).float() if base_ckpt is not None else None  # (out, in)
            counts = torch.zeros(len(thresholds), dtype=torch.float64)
            rows = max(1, CHUNK // max(1, A.shape[1]))
            for i in range(0, B.shape[0], rows):
                delta = (B[i:i + rows] @ A).mul_(adapter.scale)  # (rows, in), fp32
                if w0 is not None:  # what diffing two bf16 checkpoints shows
                    w = w0[i:i + rows]
                    delta = (w + delta).bfloat16().float() - w.bfloat16().float()
                _shares(delta.abs(), edges, counts)
            means += counts / (B.shape[0] * A.shape[1])
        return (means / max(1, len(adapter.targets))).tolist()
    finally:
        remove_tree(scratch)


def steps_curve(stage_dir: str, thresholds: list[float] = STEP_THRESHOLDS) -> dict[int, list[float]]:
    """{step: S(τ) at each τ} from the stage's kept checkpoints, plus its final adapter. Step 0 is
    δ = 0 exactly (LoRA starts with B = 0), so every share is 1 there."""
    out = {0: [1.0] * len(thresholds)}
    for path in sorted(glob.glob(os.path.join(stage_dir, "checkpoints", "step-*", "adapter"))):
        step = int(re.search(r"step-(\d+)", path).group(1))
        out[step] = curve(path, thresholds)
    summary = os.path.join(stage_dir, "summary.json")
    if os.path.isfile(summary):
        with open(summary) as f:
            final_step = json.load(f).get("steps")
        if final_step is not None and final_step not in out and os.path.isdir(os.path.join(stage_dir, "adapter")):
            out[int(final_step)] = curve(os.path.join(stage_dir, "adapter"), thresholds)
    return dict(sorted(out.items()))


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, (var / n) ** 0.5


def plot(curves: dict[str, list[list[float]]], steps: dict[str, list[dict[int, list[float]]]], path: str,
         thresholds: list[float] = THRESHOLDS, step_thresholds: list[float] = STEP_THRESHOLDS,
         title: str = "Delta sparsity (PAFT Fig. 2), fp32 deltas") -> None:
    """Left: S(τ) vs τ (log axis), one line per variant, mean ± se band over seeds.
    Right: S(τ) over training steps at a few τ (mean over seeds). `curves[name]` is one curve per
    seed; `steps[name]` one {step: curve} per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if any(steps.values()) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    colors = plt.get_cmap("tab10")
    for i, (name, per_seed) in enumerate(curves.items()):
        stats = [_mean_se([c[k] for c in per_seed]) for k in range(len(thresholds))]
        m = [s[0] for s in stats]
        se = [s[1] for s in stats]
        ax.plot(thresholds, m, marker="o", color=colors(i), label=f"{name} (n={len(per_seed)} seeds)")
        ax.fill_between(thresholds, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)],
                        color=colors(i), alpha=0.2)
    ax.axvline(1e-5, color="grey", linestyle=":", linewidth=1)
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("threshold τ")
    ax.set_ylabel("share of |δ| < τ (mean over layers)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0][1]
        styles = ["-", "--", ":"]
        for i, (name, per_seed) in enumerate(steps.items()):
            common = sorted(set.intersection(*[set(s) for s in per_seed])) if per_seed else []
            for j, tau in enumerate(step_thresholds):
                ys = [sum(s[st][j] for s in per_seed) / len(per_seed) for st in common]
                ax.plot(common, ys, marker=".", color=colors(i), linestyle=styles[j % 3],
                        label=f"{name} τ={tau:g}")
        ax.set_xlabel("training step")
        ax.set_ylabel("share of |δ| < τ")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("over training (mean over seeds)", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m merge.figure2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", nargs="+", help="NAME=STAGE_DIR (a training output_dir with adapter/); "
                                             "repeat a NAME for several seeds")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--json", default=None, help="also write the curves here")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16-merged"))
    a = p.parse_args(argv)
    curves: dict[str, list] = {}
    steps: dict[str, list] = {}
    try:
        for item in a.stages:
            name, _, stage_dir = item.partition("=")
            if not stage_dir or not os.path.isdir(os.path.join(stage_dir, "adapter")):
                raise ValueError(f"{item}: expected NAME=STAGE_DIR with an adapter/ inside")
            with torch.no_grad():
                curves.setdefault(name, []).append(curve(os.path.join(stage_dir, "adapter"), dtype=a.dtype))
                steps.setdefault(name, []).append(steps_curve(stage_dir))
        plot(curves, steps, a.out, title=f"Delta sparsity (PAFT Fig. 2), {a.dtype} deltas")
        if a.json:
            per_step = {n: [{str(k): v for k, v in s.items()} for s in ss] for n, ss in steps.items()}
            write_json(a.json, {"thresholds": THRESHOLDS, "curves": curves, "steps": per_step}, indent=1)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, per_seed in curves.items():
        print(f"{name}: " + "  ".join(f"{t:g}:{_mean_se([c[k] for c in per_seed])[0]:.3f}"
                                      for k, t in enumerate(THRESHOLDS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
