"""How much of a LoRA update survives an export in each dtype (the numbers behind engine.export's default).

    python -m benchmarks.export_rounding ADAPTER_DIR [ADAPTER_DIR ...] [--model NAME] [--out results/x.json]

For every adapter, over all its layers (engine/rounding.py defines the measures), with W the base
weight as stored and δ = s·B A:

    lost    ‖round(W + δ) − W − δ‖ / ‖δ‖           the saved model's distance from the trained one
    erased  share of δ ≠ 0 entries with round(W + δ) = round(W)
    issue   ‖(round(W + δ) − round(W)) − δ‖ / ‖δ‖  the update alone, as issue 14 measured it

for bfloat16, float16 and float32. CPU only; nothing is timed.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch

from engine.export import _adapter_base_model
from engine.lora import _lora_modules, load_adapter
from engine.models import load_model_and_tokenizer
from engine.recipe import ModelConfig
from engine.rounding import RoundingLoss

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@torch.no_grad()
def measure(adapter_dir: str, model_name: str | None = None) -> dict:
    name = model_name or _adapter_base_model(adapter_dir)
    model, _ = load_model_and_tokenizer(ModelConfig(name=name, dtype="float32"), torch.device("cpu"))
    load_adapter(model, adapter_dir)
    losses = {d: RoundingLoss(d) for d in DTYPES}
    issue = {d: [0.0, 0.0] for d in DTYPES}  # Σ‖(round(W+δ) − round(W)) − δ‖², Σ‖δ‖²
    for layer, m in _lora_modules(model):
        W = m.base_layer.weight.float()  # (out, in)
        delta = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scaling  # (out, in)
        for d in DTYPES:
            losses[d].add(layer, W + delta, W)
            eff = (W + delta).to(d).float() - W.to(d).float()
            issue[d][0] += float((eff - delta).double().pow(2).sum())
            issue[d][1] += float(delta.double().pow(2).sum())
    return {str(d).removeprefix("torch."): {**losses[d].as_dict(),
                                            "issue_metric": math.sqrt(issue[d][0] / issue[d][1])}
            for d in DTYPES}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.export_rounding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+")
    p.add_argument("--model", default=None, help="base model (default: each adapter's base_model_name_or_path)")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    results = {}
    print("| adapter | dtype | lost ‖δ‖ share | erased entries | issue metric |")
    print("|---|---|---|---|---|")
    for a in args.adapters:
        results[a] = measure(a, args.model)
        for dtype, r in results[a].items():
            print(f"| {os.path.basename(os.path.dirname(os.path.abspath(a)))} | {dtype} | {100 * r['lost']:.3g}% | "
                  f"{100 * r['erased']:.3g}% | {100 * r['issue_metric']:.3g}% |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
