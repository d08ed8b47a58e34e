"""FINDINGS.md: does each of the papers' claims hold here? Decided by a paired comparison over seeds.

Every claim compares two numbers measured on the same seed (the same data order, init and
dropout stream), e.g. X = sparsity of the DPO stage, Y = sparsity of the SFT stage. With seeds
k = 1..n the paired differences are d_k = X_k − Y_k, and

    d̄ = (1/n) Σ d_k,      se = sd(d) / √n,      sd(d)² = Σ (d_k − d̄)² / (n − 1)

The decision rule (stated in the file):
    holds          if d̄ > 2·se and d_k > 0 for every seed
    does not hold  if d̄ < −2·se and d_k < 0 for every seed (the opposite is seen)
    inconclusive   otherwise, and always with fewer than 2 seeds
A claim of the form "X ≥ Y" is counted as holding only when X is detectably better; no detectable
difference is reported as inconclusive (consistent with ≥, but not evidence for it).

Scores (per variant and seed):
    helpful  = mean of the `helpful` columns   (e.g. BBH, TruthfulQA, GSM8K)
    harmless = mean of the `harmless` columns  ("1-col" means 1 − col, e.g. 1 − over-refusal)
    combined = (helpful + harmless) / 2        (PAFT Table 1 asks for both at once)

The claims (a)–(e) are those of PAFT (Pentyala et al. 2024) and Thakkar et al. 2024; which
variant plays which role is set by the `findings` section of a pipeline recipe (defaults below).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.writes import write_text


@dataclass
class FindingsConfig:
    helpful: list[str] = field(default_factory=list, metadata={
        "help": "columns averaged into the helpful score (default: every headline column but refusal ones)"})
    harmless: list[str] = field(default_factory=list, metadata={
        "help": "columns averaged into the harmless score; '1-COL' takes 1 − COL (default: refusal columns)"})
    sft: str = field(default="sft", metadata={"help": "the dense SFT stage"})
    sft_sparse: str = field(default="sft_sparse", metadata={"help": "the L1-sparse SFT stage"})
    dpo: str = field(default="dpo", metadata={"help": "the DPO stage (from the base)"})
    sequential: str = field(default="sequential", metadata={"help": "SFT -> DPO stage"})
    sequential_sparse: str = field(default="sequential_sparse", metadata={"help": "SFT_sparse -> DPO stage"})
    merge: str = field(default="ties", metadata={"help": "the main merge of SFT_sparse and DPO (PAFT: TIES)"})
    merge_dense: str = field(default="ties_dense", metadata={"help": "the same merge with the dense SFT"})
    sparsity_target: float = field(default=0.9, metadata={"help": "claim (b): sparsity above this"})
    appendix: str = field(default="", metadata={
        "help": "a hand-written markdown file appended below the generated claims, marked as such"})


# ---------------------------------------------------------------------------- scores

def _value(row: dict, column: str):
    invert = column.startswith("1-")
    v = row.get(column[2:] if invert else column)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    return 1.0 - v if invert else float(v)


def default_groups(columns: list[str]) -> tuple[list[str], list[str]]:
    """(helpful, harmless) from headline columns: refusal rates are harmless, over-refusal counts
    inverted, everything else (accuracies, exact match) is helpful."""
    helpful, harmless = [], []
    for c in columns:
        if c in ("sparsity", "combined") or c.startswith(("helpful", "harmless")):
            continue
        if "over_refusal" in c:
            harmless.append("1-" + c)
        elif "refusal" in c:
            harmless.append(c)
        else:
            helpful.append(c)
    return helpful, harmless


def add_scores(row: dict, helpful: list[str], harmless: list[str]) -> dict:
    """row + helpful, harmless, combined_hh (None where a part is missing)."""
    def mean(cols):
        vals = [_value(row, c) for c in cols]
        return None if not cols or any(v is None for v in vals) else sum(vals) / len(vals)
    h, s = mean(helpful), mean(harmless)
    return {**row, "helpful": h, "harmless": s,
            "combined_hh": None if h is None or s is None else (h + s) / 2.0}


# ---------------------------------------------------------------------------- the paired test

def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def decide(diffs: list[float]) -> str:
    if len(diffs) < 2:
        return "inconclusive at this scale"
    m, se = mean_se(diffs)
    if m > 2 * se and all(d > 0 for d in diffs):
        return "holds"
    if m < -2 * se and all(d < 0 for d in diffs):
        return "does not hold"
    return "inconclusive at this scale"


def paired(x: dict, y: dict) -> dict:
    """x, y: {seed: value}. The per-seed differences over the seeds both have."""
    seeds = [s for s in x if s in y and x[s] is not None and y[s] is not None]
    diffs = [x[s] - y[s] for s in seeds]
    out = {"seeds": seeds, "x": [x[s] for s in seeds], "y": [y[s] for s in seeds], "diffs": diffs,
           "decision": decide(diffs)}
    if diffs:
        out["mean"], out["se"] = mean_se(diffs)
    return out


# ---------------------------------------------------------------------------- the claims

def _per_seed(per_seed_rows: dict, variant: str, column: str) -> dict:
    """{seed: row[column]} for one variant."""
    out = {}
    for seed, rows in per_seed_rows.items():
        for r in rows:
            if r["name"] == variant:
                v = r.get(column)
                out[seed] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    return out


def claims(per_seed_rows: dict, cfg: FindingsConfig) -> list[dict]:
    """Each claim: id, text, measure, x/y labels, and the paired result."""
    f = cfg
    get = lambda v, c: _per_seed(per_seed_rows, v, c)  # noqa: E731
    out = []

    def claim(cid, text, measure, xl, x, yl, y):
        out.append({"id": cid, "text": text, "measure": measure, "x_label": xl, "y_label": yl, **paired(x, y)})

    claim("a", "DPO's deltas are sparser than SFT's (PAFT Fig. 2)",
          "sparsity at |δ| < 1e-5 (fp32 δ = s·B A, mean over LoRA layers)",
          f.dpo, get(f.dpo, "sparsity"), f.sft, get(f.sft, "sparsity"))
    target = {s: f.sparsity_target for s in get(f.sft_sparse, "sparsity")}
    claim("b", f"L1 pushes SFT sparsity over {f.sparsity_target:.0%} (PAFT eq. 1)",
          "sparsity at |δ| < 1e-5 of the L1-sparse SFT, minus the target",
          f.sft_sparse, get(f.sft_sparse, "sparsity"), "target", target)
    claim("c", f"parallel SFT_sparse ∥ DPO merged with {f.merge} scores ≥ sequential SFT → DPO "
          f"on the combined helpful+harmless score (PAFT Table 1)", "combined_hh",
          f.merge, get(f.merge, "combined_hh"), f.sequential, get(f.sequential, "combined_hh"))
    claim("c'", f"(same, against the sequential SFT_sparse → DPO)", "combined_hh",
          f.merge, get(f.merge, "combined_hh"), f.sequential_sparse, get(f.sequential_sparse, "combined_hh"))
    claim("d", f"L1 sparsity helps the merge: {f.merge} of SFT_sparse + DPO beats {f.merge} of dense SFT + DPO",
          "combined_hh", f.merge, get(f.merge, "combined_hh"), f.merge_dense, get(f.merge_dense, "combined_hh"))
    claim("e1", "DPO aligns harmlessness more faithfully than SFT (Thakkar et al.)", "harmless",
          f.dpo, get(f.dpo, "harmless"), f.sft, get(f.sft, "harmless"))
    best_single = {}
    a, b = get(f.sft_sparse, "combined_hh"), get(f.dpo, "combined_hh")
    for s in a:
        if a.get(s) is not None and b.get(s) is not None:
            best_single[s] = max(a[s], b[s])
    claim("e2", f"a merge across preferences ({f.merge}) beats the better of its single runs "
          f"({f.sft_sparse}, {f.dpo}) (Thakkar et al.)", "combined_hh, against max of the two per seed",
          f.merge, get(f.merge, "combined_hh"), "best single", best_single)
    return out


def _num(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


RULE = ("Decision rule, per claim: the paired differences d_k = X_k − Y_k over seeds k (same seed = same "
        "data order, init and dropout); **holds** if mean(d) > 2·se(d) and every d_k > 0; **does not hold** "
        "if mean(d) < −2·se(d) and every d_k < 0; **inconclusive at this scale** otherwise (a claim "
        "'X ≥ Y' with no detectable difference is inconclusive, not confirmed).")


def render(results: list[dict], cfg: FindingsConfig, title: str, notes: list[str] = (),
           helpful: list[str] = (), harmless: list[str] = ()) -> str:
    lines = [f"# FINDINGS: {title}", "",
             "Generated by the pipeline from the per-seed results (results.json); do not edit by hand.", "",
             RULE, "",
             f"Scores: helpful = mean of {', '.join(helpful) or '–'}; harmless = mean of "
             f"{', '.join(harmless) or '–'} ('1-' = one minus); combined_hh = (helpful + harmless) / 2.", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    lines += ["| claim | statement | decision | mean d ± se | seeds |", "|---|---|---|---:|---:|"]
    for c in results:
        md = f"{_num(c.get('mean'))} ± {_num(c.get('se'))}" if c["diffs"] else "–"
        lines.append(f"| ({c['id']}) | {c['text']} | **{c['decision']}** | {md} | {len(c['diffs'])} |")
    lines.append("")
    for c in results:
        lines += [f"## ({c['id']}) {c['text']}", "", f"Measure: {c['measure']}. X = {c['x_label']}, "
                  f"Y = {c['y_label']}.", "", "| seed | X | Y | d = X − Y |", "|---:|---:|---:|---:|"]
        for s, x, y, d in zip(c["seeds"], c["x"], c["y"], c["diffs"]):
            lines.append(f"| {s} | {_num(x)} | {_num(y)} | {_num(d)} |")
        if not c["diffs"]:
            lines.append("| – | – | – | – |")
        lines += ["", f"mean d = {_num(c.get('mean'))}, se = {_num(c.get('se'))} → **{c['decision']}**", ""]
    if cfg.appendix:
        with open(cfg.appendix, encoding="utf-8") as f:
            extra = f.read()
        lines += ["---", "", f"*Below: hand-written, from {cfg.appendix}; not generated from this run's results.*",
                  "", extra.rstrip()]
    return "\n".join(lines) + "\n"


def write_findings(path: str, text: str) -> None:
    write_text(path, text)
