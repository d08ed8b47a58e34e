"""Why are neither SFT's nor DPO's LoRA deltas sparse here, when PAFT's Figure 2 shows DPO's sparse?

    python -m benchmarks.sparsity_study [--out out/sparsity_study] [--model smollm2-135m-instruct] [--quick]

A small controlled experiment on the quickstart's two arms (LoRA r=16, α=32, all-linear layers):
SFT (built-in arithmetic) and DPO (HarmBench pairs), each at three learning rates, with a
checkpoint every few steps. For every run and checkpoint it measures, with merge.figure2:

    S(τ)      share of |δ| < τ, δ = s·B A in fp32, for τ = 1e-7 … 1e-3     (threshold, steps, lr)
    S_bf16(τ) the same for δ' = bf16(W₀ + δ) − bf16(W₀), what diffing two bf16 checkpoints shows
                                                                            (precision)
    S_gauss(τ) what a dense Gaussian δ with each layer's own spread would give:
              mean over layers of erf(τ / (σ_l √2)), σ_l = RMS of δ in layer l
    zero rows/cols: rows of B and columns of A that are exactly zero (the only way a rank-r product
              has exact zeros, short of measure-zero cancellations)

and writes <out>/study.json and <out>/study.md (a table), and prints the table. Nothing here is a
claim by itself: the numbers go into FINDINGS.md's hand-written investigation section.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import torch

from merge.figure2 import THRESHOLDS, curve, steps_curve

RUNS = {  # name -> (recipe, overrides); steps kept short: this is about the shape of δ, not quality
    "sft_lr1e-3": ("recipes/quickstart/sft.yaml", ["train.lr=1.0e-3"]),
    "sft_lr1e-5": ("recipes/quickstart/sft.yaml", ["train.lr=1.0e-5"]),
    "dpo_lr5e-4": ("recipes/quickstart/dpo.yaml", ["train.lr=5.0e-4"]),
    "dpo_lr5e-6": ("recipes/quickstart/dpo.yaml", ["train.lr=5.0e-6"]),
}


def gaussian_curve(adapter_dir: str, thresholds: list[float]) -> tuple[list[float], int, int, float]:
    """(S_gauss(τ), zero rows of B, zero columns of A, median over layers of RMS δ)."""
    from merge.deltas import Adapter
    adapter = Adapter(adapter_dir, "adapter")
    total = [0.0] * len(thresholds)
    zero_rows = zero_cols = 0
    rms = []
    for name in adapter.targets:
        A, B = (t.float() for t in adapter.factors(name))  # (r, in), (out, r)
        sigma = float(((B @ A) * adapter.scale).pow(2).mean().sqrt())
        rms.append(sigma)
        zero_rows += int((B.abs().sum(1) == 0).sum())
        zero_cols += int((A.abs().sum(0) == 0).sum())
        for k, t in enumerate(thresholds):
            total[k] += math.erf(t / (sigma * math.sqrt(2))) if sigma > 0 else 1.0
    n = max(1, len(adapter.targets))
    rms.sort()
    return [v / n for v in total], zero_rows, zero_cols, rms[len(rms) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sparsity_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/sparsity_study")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--sft-steps", type=int, default=8)
    p.add_argument("--dpo-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    a = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": str(a.threads)}
    torch.set_num_threads(a.threads)
    results = {}
    for name in a.runs.split(","):
        recipe, overrides = RUNS[name]
        steps = a.sft_steps if name.startswith("sft") else a.dpo_steps
        run_dir = os.path.join(a.out, name)
        if not os.path.isfile(os.path.join(run_dir, "summary.json")):
            cmd = [sys.executable, "-m", "engine.train", recipe, *overrides, f"model.name={a.model}",
                   f"train.max_steps={steps}", f"train.save_every={max(1, steps // 4)}",
                   f"train.batch_size={a.batch_size}", f"train.threads={a.threads}", "train.keep_checkpoints=8",
                   "train.warmup_steps=2", "train.resume=auto", "logging.progress_bar=false", f"output_dir={run_dir}"]
            print("study:", " ".join(cmd), flush=True)
            if subprocess.run(cmd, env=env).returncode != 0:
                print(f"error: run {name} failed", file=sys.stderr)
                return 2
        adapter = os.path.join(run_dir, "adapter")
        with torch.no_grad():
            fp32 = curve(adapter)
            bf16 = curve(adapter, dtype="bfloat16-merged", base=a.model)
            gauss, zr, zc, rms = gaussian_curve(adapter, THRESHOLDS)
            over_steps = steps_curve(run_dir, [1e-6, 1e-5, 1e-4])
        results[name] = {"fp32": fp32, "bf16_merged": bf16, "gaussian": gauss, "zero_rows_B": zr,
                         "zero_cols_A": zc, "median_rms_delta": rms,
                         "steps": {str(k): v for k, v in over_steps.items()}}
        print(f"study: {name}: S(1e-5) fp32 {fp32[4]:.4f}, bf16-merged {bf16[4]:.4f}, gaussian {gauss[4]:.4f}, "
              f"median RMS δ {rms:.2e}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "study.json"), "w") as f:
        json.dump({"thresholds": THRESHOLDS, "model": a.model, "runs": results}, f, indent=1)
    lines = ["| run | δ | " + " | ".join(f"{t:g}" for t in THRESHOLDS) + " |",
             "|---|---|" + "---:|" * len(THRESHOLDS)]
    for name, r in results.items():
        for key in ("fp32", "bf16_merged", "gaussian"):
            lines.append(f"| {name} | {key} | " + " | ".join(f"{v:.3f}" for v in r[key]) + " |")
    lines += ["", "| run | median RMS δ | zero rows of B | zero cols of A | S(1e-6, 1e-5, 1e-4) over steps |",
              "|---|---:|---:|---:|---|"]
    for name, r in results.items():
        st = "; ".join(f"{k}: " + "/".join(f"{v:.3f}" for v in vs) for k, vs in r["steps"].items())
        lines.append(f"| {name} | {r['median_rms_delta']:.2e} | {r['zero_rows_B']} | {r['zero_cols_A']} | {st} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "study.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
