"""The train_step results as a markdown table and a bar chart, and optionally into docs/BENCHMARKS.md.

    python -m benchmarks.report                                # table on stdout + results/train_step.md + PNG
    python -m benchmarks.report --doc docs/BENCHMARKS.md       # also rewrite that page's block (make bench)

Reads every benchmarks/results/*.json that `python -m benchmarks.train_step`
wrote (other benchmarks' files there are skipped) and writes

    benchmarks/results/train_step.md     one row per configuration and system, then the targets
    benchmarks/results/train_step.png    tokens/s and peak memory per configuration, relative to ours

With --doc FILE, the text between the lines

    <!-- bench:train_step:begin -->
    <!-- bench:train_step:end -->

in FILE is replaced by the table. If either marker is missing the file is left
untouched and the command says so (exit status 2). When no GPU results exist
yet, the table says so and gives the command that produces them.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from benchmarks.train_step_setup import SYSTEMS as SYSTEM_ORDER  # the table's order: the runs'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
BEGIN, END = "<!-- bench:train_step:begin -->", "<!-- bench:train_step:end -->"
GPU_COMMAND = ("bash benchmarks/gpu/fetch_wheels.sh   # here, once\n"
               "bash benchmarks/gpu/run_gpu.sh       # on the GPU machine: device tool carry [\".whl\"], timeout_s 540")


def load_results(results_dir: str) -> list[dict]:
    """The train_step documents in results_dir, CPU files first."""
    docs = []
    # results_dir/*.json, and one folder down (run_gpu.sh writes <OUT>/train_step/<device>.json)
    paths = glob.glob(os.path.join(results_dir, "*.json")) + glob.glob(os.path.join(results_dir, "*", "*.json"))
    for path in sorted(paths):
        with open(path) as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError:
                continue
        if isinstance(doc, dict) and doc.get("benchmark") == "train_step" and doc.get("runs"):
            docs.append(doc)
    return sorted(docs, key=lambda d: (not d["device"].startswith("cpu"), d["device"]))


def _systems(run: dict):
    for name in sorted(run["systems"], key=lambda s: SYSTEM_ORDER.index(s) if s in SYSTEM_ORDER else 99):
        yield name, run["systems"][name]


def _model_cell(run: dict) -> str:
    m = run["model"]
    layers = m["num_hidden_layers"]
    name = m["name"].removeprefix("random:").removeprefix("builtin:")
    shape = f"{name}, {layers} layers" if m["name"].startswith("random:") else name
    s = run["settings"]
    rows = f"{s['batch']} {s['unit']} x {s['seq']}"
    return f"{shape}; {s['adapter']} {s['method']}; {rows}"


def markdown(docs: list[dict]) -> str:
    """The whole block: one table of every run, a table of targets, then the notes as paragraphs."""
    out = ["| device | configuration | system | tokens/s | ours ÷ it (speed) | peak MiB | ours ÷ it (memory) "
           "| loss step 1 → last | MFU |", "|---|---|---|---:|---:|---:|---:|---|---:|"]
    targets = []
    for doc in docs:
        for name, run in doc["runs"].items():
            first = True
            for system, r in _systems(run):
                left = f"| {doc['device']} | {name}<br>{_model_cell(run)} " if first else "| | "
                first = False
                if r.get("status") != "ok":
                    out.append(f"{left}| {system} | {r.get('status', '?')} | | | | | |")
                    continue
                q = run["ratios"].get(system)
                speed = f"{q['speedup']:.2f}×" if q else "—"
                mem = f"{q['memory']:.2f}×" if q else "—"
                same = "" if not q else (" ✓" if q["same_initial_loss"] else " ✗ step-1 loss differs")
                out.append(f"{left}| {system} | {r['tokens_per_s']:,.0f} | {speed} | {r['peak_mem_mib']:,.0f} | {mem} "
                           f"| {r['loss_first']:.4f} → {r['loss_last']:.4f}{same} | {100 * r['mfu']:.1f}% |")
            for t in run["targets"]:
                m = "—" if t["measured"] is None else f"{t['measured']:.3f}×"
                targets.append(f"| {doc['device']} | {name} | {t['target']} | {m} | **{t['result']}** |")
    if targets:
        out += ["", "| device | configuration | target | measured | result |", "|---|---|---|---:|---|", *targets]
    return "\n".join(out) + "\n\n" + "\n\n".join(notes(docs)) + "\n"


def notes(docs: list[dict]) -> list[str]:
    lines = ["tokens/s: median over the timed steps of real input tokens per step (chosen and rejected rows for "
             "DPO); peak memory: CUDA max allocated (GPU) or peak RSS (CPU) over the training steps, each system "
             "in its own process; ✓: every system's step-1 loss equals ours (same model, factors and data); "
             "MFU: model FLOPs (4N per token for a frozen LoRA base, formula in benchmarks/train_step.py) over "
             "a matmul measured in the same run. `python -m benchmarks.train_step --list` shows every configuration."]
    for doc in docs:
        envs = {json.dumps(r["environment"], sort_keys=True): r["environment"] for r in doc["runs"].values()}
        for env in envs.values():
            versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "peft", "trl", "bitsandbytes",
                                                           "liger-kernel") if env.get(k))
            where = env["device"] if env["device"] != "cpu" else f"{env['cpu']}, {env.get('torch_threads')} threads"
            lines.append(f"{doc['device']}: {where}; {versions}.")
        layers = {r["model"]["num_hidden_layers"] for r in doc["runs"].values() if r["model"]["name"].startswith("random:")}
        if layers:
            lines.append(f"{doc['device']}: random-init models with the real 7B shapes but {', '.join(map(str, sorted(layers)))} "
                         f"of 32 decoder layers; the LM head and embeddings are full size, so a larger share of the "
                         f"step is the head than in the full model.")
    if not any(not d["device"].startswith("cpu") for d in docs):
        lines.append("GPU: not measured yet; this table was made where no GPU was available. The GPU run "
                     "is prepared (its configurations dry-run and its scripts syntax-checked in the tests):")
        lines.append("```bash\n" + GPU_COMMAND + "\n```")
    return lines


def chart(docs: list[dict], path: str) -> None:
    """Per configuration, each system's tokens/s (top) and peak memory (bottom) relative to ours.

    Relative, on a linear axis from 0: CPU and GPU runs differ by orders of magnitude, and a bar
    must start at zero to be read by its length. Ours' absolute numbers are in the x labels.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(d["device"], name, run) for d in docs for name, run in d["runs"].items()
            if run["systems"].get("ours", {}).get("status") == "ok"]
    systems = [s for s in SYSTEM_ORDER if any(run["systems"].get(s, {}).get("status") == "ok" for *_, run in runs)]
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.5 * len(runs) + 2), 7.5), sharex=True)
    width = 0.8 / max(1, len(systems))
    for ax, key, label in zip(axes, ("tokens_per_s", "peak_mem_mib"),
                              ("tokens/s relative to ours (higher is faster)",
                               "peak memory relative to ours (lower is leaner)")):
        for k, system in enumerate(systems):
            xs, ys = [], []
            for i, (*_, run) in enumerate(runs):
                r = run["systems"].get(system, {})
                if r.get("status") == "ok":
                    xs.append(i + (k - (len(systems) - 1) / 2) * width)
                    ys.append(r[key] / run["systems"]["ours"][key])
            bars = ax.bar(xs, ys, width, label=system)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    axes[0].legend(ncol=len(systems), fontsize=8, loc="upper right")
    axes[1].set_xticks(range(len(runs)))
    axes[1].set_xticklabels([f"{dev}\n{name}\nours {run['systems']['ours']['tokens_per_s']:,.0f} tok/s, "
                             f"{run['systems']['ours']['peak_mem_mib']:,.0f} MiB" for dev, name, run in runs],
                            rotation=25, ha="right", fontsize=7)
    axes[0].set_title("Training step, each system relative to the engine", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replace_block(text: str, block: str) -> str | None:
    """text with the lines between the markers replaced by block; None when a marker is missing."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0 or end < start:
        return None
    return text[:start + len(BEGIN)] + "\n" + block + text[end:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=RESULTS, help="directory of the JSON results (default: benchmarks/results)")
    ap.add_argument("--table", help="markdown output (default: <results>/train_step.md)")
    ap.add_argument("--png", help="chart output (default: <results>/train_step.png)")
    ap.add_argument("--doc", metavar="FILE",
                    help="also rewrite the block between the bench:train_step markers in this markdown file "
                         "(make bench: docs/BENCHMARKS.md)")
    args = ap.parse_args(argv)
    docs = load_results(args.results)
    if not docs:
        print(f"error: no train_step results in {args.results} (run python -m benchmarks.train_step first)",
              file=sys.stderr)
        return 2
    block = markdown(docs)
    print(block, end="")
    table = args.table or os.path.join(args.results, "train_step.md")
    png = args.png or os.path.join(args.results, "train_step.png")
    with open(table, "w") as f:
        f.write(block)
    chart(docs, png)
    print(f"wrote {table} and {png}", file=sys.stderr)
    if args.doc:
        with open(args.doc) as f:
            text = f.read()
        new = replace_block(text, block)
        if new is None:
            print(f"error: {args.doc} has no {BEGIN} ... {END} block; left it untouched", file=sys.stderr)
            return 2
        if new != text:
            with open(args.doc, "w") as f:
                f.write(new)
        print(f"updated the train_step block of {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
