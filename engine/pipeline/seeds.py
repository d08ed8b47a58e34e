"""A pipeline over several seeds: every stage, merge and evaluation once per seed, then mean ± se.

    pipeline:
      seeds: [0, 1, 2]       # runs the whole pipeline into <output_dir>/seed-<k>/ with train.seed=k

What varies with the seed: each training stage's LoRA init, data order and dropout (`train.seed`),
hence every merge built from them. What does not: the base model and the (greedy) evaluations, so
the base variant is evaluated once and its results reused for every seed (copied into each
seed's evals/). DARE's keep masks are seeded from tensor names (merge.methods), the same for
every seed.

Outputs in <output_dir>:
    results.json    {"seeds": [...], "columns": [...], "variants": {name: {column: {"mean", "se", "n",
                    "values": {seed: value}}}}, "per_seed": {seed: rows}}
    results.md/png  the table, each cell "mean ± se" over seeds (bars with se error bars)
    figure2.png/json  PAFT Figure 2: share of |δ| < τ vs τ (fp32 deltas) and over training steps
    FINDINGS.md     each claim decided item by item, seeds averaged per item (paft_evals.findings)
    results.json    also "items": {variant: {task: {seed: {item id: score}}}} (score: 1/0 correct or
                    refused), "margins" (the same for log-likelihood margins), "parts" ({task: {id: part}}
                    for macro-averaged tasks) and "deltas" (per-layer measures of the stages' δ = s·B A)

    se = sd / √n with the n − 1 sample standard deviation; with one seed se is undefined (shown "–").
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil

from engine.pipeline.table import PAPER_COLUMNS
from engine.writes import atomic_write, write_json
from paft_evals.findings import FindingsConfig, add_scores, claims, default_groups, mean_se, render, write_findings
from paft_evals.report import default_columns, write_report

SCORE_COLUMNS = ["helpful", "harmless", "combined_hh"]


def seed_config(cfg, seed: int):
    """The pipeline of one seed: its own output folder, train.seed=seed on every stage."""
    stages = {n: dataclasses.replace(s, overrides=[*s.overrides, f"train.seed={seed}"])
              for n, s in cfg.stages.items()}
    return dataclasses.replace(cfg, seeds=[], output_dir=os.path.join(cfg.output_dir, f"seed-{seed}"),
                               stages=stages)


def reuse_base_eval(first_dir: str, seed_dir: str) -> None:
    """Copy the base's results and the record of the spec they were made from (the same spec for every
    seed): without the record the seed's own check would call the copy stale and evaluate again."""
    src = os.path.join(first_dir, "evals", "base.json")
    dst = os.path.join(seed_dir, "evals", "base.json")
    if os.path.isfile(src) and not os.path.exists(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        for suffix in (".spec.json", ""):  # the record first: a result is never newer than a record of it
            if os.path.isfile(src + suffix):
                with open(src + suffix, "rb") as f, atomic_write(dst + suffix, "wb") as g:
                    shutil.copyfileobj(f, g)
        print(f"pipeline: evaluate base: same for every seed, reused {src}", flush=True)


def aggregate(per_seed: dict[int, list[dict]], columns: list[str]) -> dict[str, dict]:
    """{variant: {column: {"mean", "se", "n", "values": {seed: v}}}} over the seeds that have it."""
    names = []
    for rows in per_seed.values():
        names += [r["name"] for r in rows if r["name"] not in names]
    out = {}
    for name in names:
        cells = {}
        for c in columns:
            values = {}
            for seed, rows in per_seed.items():
                for r in rows:
                    v = r.get(c)
                    if r["name"] == name and isinstance(v, (int, float)) and not isinstance(v, bool):
                        values[seed] = float(v)
            if values:
                m, se = mean_se(list(values.values()))
                cells[c] = {"mean": m, "se": None if se != se else se, "n": len(values), "values": values}
        out[name] = cells
    return out


def summarize_seeds(cfg, per_seed: dict[int, list[dict]]) -> dict:
    """The seeds' rows ─► scores ─► mean ± se table, Figure 2, FINDINGS.md and results.json."""
    fc = cfg.findings or FindingsConfig()

    # ---- the scores of each row, then the mean ± se table
    all_rows = [r for rows in per_seed.values() for r in rows]
    headline = default_columns(all_rows)
    helpful, harmless = (fc.helpful, fc.harmless) if (fc.helpful or fc.harmless) else default_groups(headline)
    per_seed = {s: [add_scores(r, helpful, harmless) for r in rows] for s, rows in per_seed.items()}
    wanted = list(dict.fromkeys([c.removeprefix("1-") for c in helpful + harmless] + headline
                                + [c for c in PAPER_COLUMNS if c != "combined"]))
    all_rows = [r for rows in per_seed.values() for r in rows]
    columns = [c for c in wanted if any(isinstance(r.get(c), (int, float)) for r in all_rows)]
    columns += [c for c in SCORE_COLUMNS if any(r.get(c) is not None for r in all_rows)]
    variants = aggregate(per_seed, columns)
    ns = {}  # {variant: {"task/n": items}}: the table's row of n per column
    for r in all_rows:
        ns.setdefault(r["name"], {}).update({k: v for k, v in r.items() if k.endswith("/n") and isinstance(v, int)})
    table_rows = [{"name": name, **cells, **ns.get(name, {})} for name, cells in variants.items()]
    n_seeds = len(cfg.seeds)
    write_report(table_rows, columns, cfg.output_dir,
                 title=f"PAFT on {cfg.model}: mean ± se over {n_seeds} seed(s) {list(cfg.seeds)}")

    # ---- PAFT Figure 2 from the stages' fp32 deltas (and their kept checkpoints)
    fig = figure2(cfg, fc)

    # ---- FINDINGS.md, from the items of every evaluation and the layers of every stage's δ
    evidence = {**eval_items(cfg, per_seed), **delta_evidence(cfg, fc)}
    result = {"seeds": list(cfg.seeds), "columns": columns, "helpful": helpful, "harmless": harmless,
              "variants": variants, "per_seed": per_seed, "claims": [], "figure2": fig, **evidence}
    result["claims"], text = decide(result, fc, cfg.model, cfg.output_dir, cfg.output_dir)
    write_json(os.path.join(cfg.output_dir, "results.json"), result, indent=1, default=str)
    print(open(os.path.join(cfg.output_dir, "results.md")).read())
    print("\n".join(text.splitlines()[: 12 + len(result["claims"])]))
    return result


def decide(result: dict, fc: FindingsConfig, model: str, run_dir: str, out_dir: str) -> tuple[list[dict], str]:
    """The claims decided from a results dict (this run's, or a saved results.json: it holds every
    item and layer measure), written to out_dir/FINDINGS.md; returns (claims, its text).
    run_dir: where the run's per-seed folders are (named in the notes)."""
    found = claims(result, fc, result["helpful"], result["harmless"])
    all_rows = [r for rows in result["per_seed"].values() for r in rows]
    seeds = result["seeds"]
    notes = [f"Seeds: {seeds}; base model {model}; per-seed outputs under {run_dir}/seed-<k>/.",
             "Items per task (n): " + (", ".join(_task_ns(all_rows)) or "–") + "."]
    for seed, m in result.get("matched", {}).items():
        notes.append(f"Claim (a-matched), seed {seed}: SFT step {m['sft_step']} against DPO step {m['dpo_step']}, "
                     f"‖δ‖ ratio SFT/DPO {m['ratio']:.2f}.")
    fig = result.get("figure2")
    if fig:
        notes.append("Figure 2 (figure2.png): share of |δ| < τ at τ = " + ", ".join(f"{t:g}" for t in fig["thresholds"])
                     + "; mean over seeds: " + "; ".join(
                         f"{n}: " + " ".join(f"{sum(c[k] for c in cs) / len(cs):.3f}" for k in range(len(fig["thresholds"])))
                         for n, cs in fig["curves"].items()) + ".")
    text = render(found, fc, f"PAFT on {model}, {len(seeds)} seeds", notes, result["helpful"], result["harmless"])
    write_findings(os.path.join(out_dir, "FINDINGS.md"), text)
    return found, text


def eval_items(cfg, per_seed: dict[int, list[dict]]) -> dict:
    """{"items": {variant: {task: {seed: {id: score}}}}, "margins": the same for log-likelihood margins,
    "parts": {task: {id: part}}} from evals/<variant>.json of every variant each seed evaluated
    (per_seed's rows: a file the recipe no longer names is left out)."""
    items, margins, parts = {}, {}, {}
    for seed in cfg.seeds:
        evals = os.path.join(cfg.output_dir, f"seed-{seed}", "evals")
        for variant in sorted({r["name"] for r in per_seed.get(seed, [])}):
            with open(os.path.join(evals, f"{variant}.json")) as f:
                tasks = json.load(f).get("tasks", {})
            for task, result in tasks.items():
                for it in result.get("items", []):
                    items.setdefault(variant, {}).setdefault(task, {}).setdefault(seed, {})[it["id"]] = it["score"]
                    if it.get("margin") is not None:
                        margins.setdefault(variant, {}).setdefault(task, {}).setdefault(seed, {})[it["id"]] = it["margin"]
                    if it.get("part") is not None:
                        parts.setdefault(task, {})[it["id"]] = it["part"]
    return {"items": items, "margins": margins, "parts": parts}


def delta_evidence(cfg, fc: FindingsConfig) -> dict:
    """Per-layer measures of the final δ of the SFT, SFT_sparse, DPO and small-lr DPO stages, the SFT
    and DPO checkpoints of matched ‖δ‖ (claim (a) at equal update size), and each stage's held-out
    loss (claim (b): is the sparse SFT as good a fit as the dense one?), per seed."""
    from merge.delta_shape import layer_shapes, matched, stage_adapters, update_size

    measure = functools.lru_cache(maxsize=None)(layer_shapes)  # an adapter's entries are read once
    deltas, pairs, held_out = {}, {}, {}
    for seed in cfg.seeds:
        steps = {}  # {stage: {step: adapter dir}}: the kept checkpoints and the final adapter
        for name in (fc.sft, fc.sft_sparse, fc.dpo, fc.dpo_small_lr):
            stage = os.path.join(cfg.output_dir, f"seed-{seed}", name)
            summary = os.path.join(stage, "summary.json")
            if name in cfg.stages and os.path.isfile(summary):
                with open(summary) as f:
                    loss = json.load(f).get("eval_loss")
                if loss is not None:
                    held_out.setdefault(name, {})[seed] = loss
            if name in cfg.stages and os.path.isdir(os.path.join(stage, "adapter")):
                steps[name] = stage_adapters(stage)
                deltas.setdefault(name, {})[seed] = _slim(measure(steps[name][max(steps[name])]))
        if fc.sft in steps and fc.dpo in steps:
            # The sizes alone pick the matched checkpoints (r×r products); only those two are measured.
            sft_step, dpo_step, ratio = matched(*({s: update_size(p) for s, p in steps[n].items()}
                                                  for n in (fc.sft, fc.dpo)))
            pairs[seed] = {"sft_step": sft_step, "dpo_step": dpo_step, "ratio": ratio,
                           "sft": _slim(measure(steps[fc.sft][sft_step])),
                           "dpo": _slim(measure(steps[fc.dpo][dpo_step]))}
    return {"deltas": deltas, "matched": pairs, "held_out": held_out}


def _slim(layers: dict) -> dict:
    keep = ("fro", "s_1e5", "below_rel", "hoyer", "row_conc")
    return {name: {k: v[k] for k in keep if k in v} for name, v in layers.items()}


def _task_ns(rows: list[dict]) -> list[str]:
    ns = {}
    for r in rows:
        for k, v in r.items():
            if k.endswith("/n") and isinstance(v, (int, float)):
                ns.setdefault(k[:-2], set()).add(int(v))
    return [f"{t} {'/'.join(map(str, sorted(v)))}" for t, v in ns.items()]


def figure2(cfg, fc: FindingsConfig) -> dict | None:
    """Curves for the SFT, SFT_sparse and DPO stages of every seed; figure2.png and figure2.json."""
    from merge.figure2 import STEP_THRESHOLDS, THRESHOLDS, curve, plot, steps_curve
    import torch

    names = [n for n in (fc.sft, fc.sft_sparse, fc.dpo) if n in cfg.stages]
    if not names:
        return None
    curves, steps = {}, {}
    with torch.no_grad():
        for seed in cfg.seeds:
            seed_dir = os.path.join(cfg.output_dir, f"seed-{seed}")
            for n in names:
                stage_dir = os.path.join(seed_dir, n)
                if not os.path.isdir(os.path.join(stage_dir, "adapter")):
                    continue
                curves.setdefault(n, []).append(curve(os.path.join(stage_dir, "adapter")))
                steps.setdefault(n, []).append(steps_curve(stage_dir))
    if not curves:
        return None
    plot(curves, steps, os.path.join(cfg.output_dir, "figure2.png"))
    data = {"thresholds": THRESHOLDS, "step_thresholds": STEP_THRESHOLDS, "curves": curves,
            "steps": {n: [{str(k): v for k, v in s.items()} for s in ss] for n, ss in steps.items()}}
    write_json(os.path.join(cfg.output_dir, "figure2.json"), data, indent=1)
    return data
