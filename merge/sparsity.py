"""How sparse is a fine-tuning update? PAFT's definition (Figure 2).

    python -m merge.sparsity ADAPTER_OR_MODEL [--base MODEL] [--layers-of ADAPTER] [--out DIR] [--threshold 1e-5]

For each layer the update δ is
    a LoRA adapter:   δ = s·B A              (s = lora_alpha / r, or / √r with use_rslora)
    a full model:     δ = θ − θ₀             (θ₀ from --base, tensor by tensor)
and its sparsity is the share of entries with |δ| < 1e-5. The model's sparsity is the plain
mean over layers (every layer counts the same, whatever its size), as PAFT averages it.
For a full model every floating-point tensor is a layer, embeddings and norms included; to
compare a merged model with the adapters it came from, `--layers-of ADAPTER` measures only
the weights that adapter adapts (untouched tensors would otherwise count as 100% sparse).

Output: a table on stdout, and in DIR (default: the input directory) `sparsity.json`
(per-layer values, the mean, the threshold) and `sparsity_hist.png`, a histogram of
log10 |δ| over all entries (exact zeros counted apart). Both files are written to a
temporary name and renamed, so a reader never sees half a file.

Adapters use paft_kernels.l1_lowrank.sparsity_of_product, which forms B A a chunk of rows
at a time; the histogram takes one more chunked pass. Nothing holds more than one layer.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from paft_kernels.l1_lowrank import sparsity_of_product
from engine.writes import atomic_write, write_text
from merge.deltas import Adapter, Checkpoint, MergeError, open_model, remove_tree

THRESHOLD = 1e-5
BINS = torch.linspace(-12, 2, 141)  # log10 |δ| from 1e-12 to 100 in steps of 0.1 (outside: clamped)
CHUNK = 1 << 22  # entries of δ formed at once for the histogram


def _histogram(delta: torch.Tensor, counts: torch.Tensor) -> int:
    """Add log10|δ| of the nonzero entries into counts (len(BINS) − 1); return the zeros."""
    mag = delta.abs().reshape(-1)
    nonzero = mag[mag > 0]
    logs = nonzero.log10().clamp_(BINS[0], BINS[-1] - 1e-6)
    counts += torch.histc(logs, bins=len(BINS) - 1, min=float(BINS[0]), max=float(BINS[-1]))
    return mag.numel() - nonzero.numel()


def _adapter_rows(adapter: Adapter, threshold: float, counts: torch.Tensor):
    for name in adapter.targets:
        A, B = adapter.factors(name)
        s = sparsity_of_product(A, B, adapter.scale, threshold)
        zeros = 0
        rows = max(1, CHUNK // max(1, A.shape[1]))
        for i in range(0, B.shape[0], rows):  # the histogram needs the values: one more chunked pass
            zeros += _histogram((B[i:i + rows] @ A).mul_(adapter.scale), counts)
        yield name, adapter.delta_shape(name), s, zeros


def _model_rows(model: Checkpoint, base: Checkpoint, threshold: float, counts: torch.Tensor,
                only: set[str] | None = None):
    for name in base.names:
        if only is not None and name not in only:
            continue
        theta0 = base.read(name)
        if not theta0.is_floating_point():
            continue
        if not model.has(name):
            raise MergeError(f"{model.label}: tensor {name}: missing (the base model has it)")
        if model.shape(name) != base.shape(name):
            raise MergeError(f"{model.label}: tensor {name}: shape {model.shape(name)}, base {base.shape(name)}")
        delta = model.read(name).float() - theta0.float()
        s = (delta.abs() < threshold).float().mean().item() if delta.numel() else 0.0
        yield name, tuple(delta.shape), s, _histogram(delta, counts)


def measure(path: str, base: str | None = None, threshold: float = THRESHOLD, scratch: str | None = None,
            layers_of: str | None = None) -> dict:
    """Per-layer and mean sparsity of the update in `path` (an adapter, or a model against `base`;
    with `layers_of`, an adapter directory, only the weights that adapter adapts)."""
    import tempfile
    own_scratch = scratch is None
    scratch = scratch or tempfile.mkdtemp(prefix="paft-sparsity-")
    try:
        model = open_model(path, "input", scratch)
        counts = torch.zeros(len(BINS) - 1, dtype=torch.float64)
        if isinstance(model, Adapter):
            rows = list(_adapter_rows(model, threshold, counts))
            kind = "adapter"
        else:
            if base is None:
                raise MergeError(f"input: {path} is a full model: give --base MODEL to take δ = θ − θ₀ against")
            base_model = open_model(base, "--base", scratch)
            if not isinstance(base_model, Checkpoint):
                raise MergeError(f"--base: {base} is an adapter, not a model")
            only = None
            if layers_of is not None:
                adapter = open_model(layers_of, "--layers-of", scratch)
                if not isinstance(adapter, Adapter):
                    raise MergeError(f"--layers-of: {layers_of} is not a LoRA adapter directory")
                only = set(adapter.targets)
            rows = list(_model_rows(model, base_model, threshold, counts, only))
            kind = "model"
    finally:
        if own_scratch:
            remove_tree(scratch)
    if not rows:
        raise MergeError(f"input: {path}: no layers to measure")
    layers = [{"name": n, "shape": list(shape), "sparsity": s, "exact_zeros": z} for n, shape, s, z in rows]
    return {"input": path, "base": base, "kind": kind, "threshold": threshold, "layers_of": layers_of,
            "mean_sparsity": sum(r["sparsity"] for r in layers) / len(layers), "layers": layers,
            "histogram": {"log10_edges": BINS.tolist(), "counts": counts.tolist(),
                          "exact_zeros": sum(r["exact_zeros"] for r in layers)}}


def write_outputs(result: dict, out_dir: str) -> tuple[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "sparsity.json")
    png_path = os.path.join(out_dir, "sparsity_hist.png")
    text = json.dumps(result, indent=1) + "\n"
    write_text(json_path, text)

    h = result["histogram"]
    edges, counts = h["log10_edges"], h["counts"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    ax.axvline(math.log10(result["threshold"]), color="red", linestyle="--",
               label=f"|δ| = {result['threshold']:g}: {100 * result['mean_sparsity']:.1f}% below (mean over layers)")
    ax.set_xlabel("log10 |δ|")
    ax.set_ylabel("entries")
    zeros = f", {h['exact_zeros']:,} exact zeros not shown" if h["exact_zeros"] else ""
    ax.set_title(f"{os.path.basename(os.path.normpath(result['input']))}: {len(result['layers'])} layers{zeros}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return json_path, png_path


def format_table(result: dict) -> str:
    width = max(len(r["name"]) for r in result["layers"])
    lines = [f"{'layer':<{width}}  {'shape':>14}  sparsity"]
    for r in result["layers"]:
        lines.append(f"{r['name']:<{width}}  {'x'.join(map(str, r['shape'])):>14}  {100 * r['sparsity']:7.2f}%")
    lines.append(f"{'mean over ' + str(len(result['layers'])) + ' layers':<{width}}  {'':>14}  "
                 f"{100 * result['mean_sparsity']:7.2f}%   (|δ| < {result['threshold']:g})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merge.sparsity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="a peft LoRA adapter directory, or a full model directory (with --base)")
    parser.add_argument("--base", help="the base model a full model's δ = θ − θ₀ is taken against")
    parser.add_argument("--layers-of", metavar="ADAPTER",
                        help="measure a full model only on the weights this LoRA adapter adapts")
    parser.add_argument("--out", help="directory for sparsity.json and sparsity_hist.png (default: the input's)")
    parser.add_argument("--threshold", type=float, default=THRESHOLD, help="|δ| below this counts as zero")
    parser.add_argument("--quiet", action="store_true", help="print only the mean, not the per-layer table")
    args = parser.parse_args(argv)
    try:
        with torch.no_grad():  # scoped, so an in-process caller keeps its grad mode
            result = measure(args.input, args.base, args.threshold, layers_of=args.layers_of)
        out = args.out or (args.input if os.path.isdir(args.input) else ".")
        paths = write_outputs(result, out)
    except (MergeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(result).splitlines()[-1] if args.quiet else format_table(result))
    print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
