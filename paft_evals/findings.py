"""FINDINGS.md: does each of the papers' claims hold here? Decided item by item, paired, Holm-corrected.

The unit of evidence is the ITEM (a benchmark question, a HarmBench behaviour, a LoRA layer), not
the seed: three seeds re-ask the same items, so they are not three independent pieces of evidence.
For a claim "X beats Y on score S" (paft_evals.stats has the formulas):

    1. each item's score is averaged over the seeds:            x_i = mean_s X_s(i),  y_i likewise
    2. the paired difference per item:                          d_i = x_i − y_i     (same items in X, Y)
    3. S is a weighted sum of task means (helpful = mean of its columns, BBH = mean of its tasks, ...),
       so the effect is Σ_t w_t · mean_t(d) with se² = Σ_t w_t² s_t² / n_t  (a t interval over items;
       a paired bootstrap that resamples items within each task is shown beside it)
    4. Holm–Bonferroni over all the claims, then each claim is
         holds                 the Holm-adjusted p < 0.05 and the effect > 0
         does not hold         the Holm-adjusted p < 0.05 and the effect < 0 (the opposite is seen)
         equivalent within ±m  TOST: both one-sided p < 0.05 (Holm-adjusted), margin m stated
         inconclusive          otherwise; a claim "X ≥ Y" with no detectable difference is not confirmed
    5. the minimum detectable effect at 80% power, MDE = (t_.975 + t_.8) · se, is reported beside the
       papers' own effect size, with the items that would make MDE equal to it: n · (MDE / effect)².

Scores (per variant, item level):
    helpful  = mean of the `helpful` columns   (e.g. arithmetic, BBH, TruthfulQA)
    harmless = mean of the `harmless` columns  ("1-col" means 1 − col, e.g. 1 − over-refusal)
    combined = (helpful + harmless) / 2        (PAFT Table 1 asks for both at once)

Delta claims (a), (b) use LoRA layers as items, each layer's value averaged over seeds
(PAFT's sparsity is a plain mean over layers). The claims are those of PAFT (Pentyala et al. 2024)
and Thakkar et al. 2024; which variant plays which role is set by the `findings` section of a
pipeline recipe (defaults below).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.writes import write_text
from paft_evals import stats


@dataclass
class FindingsConfig:
    helpful: list[str] = field(default_factory=list, metadata={
        "help": "columns averaged into the helpful score (default: every headline column but refusal ones)"})
    harmless: list[str] = field(default_factory=list, metadata={
        "help": "columns averaged into the harmless score; '1-COL' takes 1 − COL (default: refusal columns)"})
    sft: str = field(default="sft", metadata={"help": "the dense SFT stage"})
    sft_sparse: str = field(default="sft_sparse", metadata={"help": "the L1-sparse SFT stage"})
    sft_chosen: str = field(default="sft_chosen", metadata={
        "help": "SFT on the DPO pairs' chosen answers: Thakkar et al.'s control for claim (e1)"})
    dpo: str = field(default="dpo", metadata={"help": "the DPO stage (from the base)"})
    dpo_small_lr: str = field(default="dpo_lr40", metadata={
        "help": "DPO at a smaller learning rate (zephyr's SFT/DPO ratio, 1/40): claim (a) at the papers' scale"})
    sequential: str = field(default="sequential", metadata={"help": "SFT -> DPO stage"})
    merge: str = field(default="ties", metadata={"help": "the main merge of SFT_sparse and DPO (PAFT: TIES)"})
    merge_dense: str = field(default="ties_dense", metadata={"help": "the same merge with the dense SFT"})
    sparsity_target: float = field(default=0.9, metadata={"help": "claim (b): sparsity above this"})
    margin: float = field(default=0.02, metadata={
        "help": "equivalence margin (TOST) of the score claims, in score units (0.02 = 2 points)"})
    delta_margin: float = field(default=0.01, metadata={"help": "equivalence margin of the layer-share claims"})
    appendix: str = field(default="", metadata={
        "help": "a hand-written markdown file appended below the generated claims, marked as such"})


# The papers' own effect sizes, for the MDE comparison (score points / 100). PAFT Table 1 averages:
# TIES-merged parallel vs sequential +1.4 (Mistral-7B) and +7.1 (Llama-3-8B); TIES of sparse vs dense
# SFT +6.3 / +4.9. Claims with no stated size in the papers get None.
PAPER_EFFECTS = {"c": (0.014, "PAFT Table 1: +1.4 (Mistral) / +7.1 (Llama) points"),
                 "d": (0.049, "PAFT Table 1: +6.3 (Mistral) / +4.9 (Llama) points")}


# ---------------------------------------------------------------------------- scores (table rows)

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


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds, for the mean ± se table (not for deciding claims)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


# ---------------------------------------------------------------------------- item-level terms

def score_terms(score: str, helpful: list[str], harmless: list[str], parts: dict) -> list[tuple[float, str, str | None]]:
    """A score as a weighted sum of per-task item means: [(weight, task, part or None)].

    parts: {task: {item id: part}} for macro-averaged tasks (BBH: the mean of its tasks' accuracies).
    "1-COL" contributes −weight (1 − x differs from 1 − y by −(x − y))."""
    groups = {"helpful": [(1.0, helpful)], "harmless": [(1.0, harmless)],
              "combined_hh": [(0.5, helpful), (0.5, harmless)]}
    terms = []
    for scale, columns in groups.get(score, [(1.0, [score])]):
        for col in columns:
            sign = -1.0 if col.startswith("1-") else 1.0
            task = col.removeprefix("1-").split("/")[0]
            names = sorted(set(parts.get(task, {}).values())) or [None]
            for part in names:
                terms.append((scale * sign / len(columns) / len(names), task, part))
    return terms


def _items(evidence: dict, variant: str, task: str, part: str | None) -> dict:
    """{seed: {id: score}} of one variant's task (only the items of `part` if given)."""
    per_seed = evidence["items"].get(variant, {}).get(task, {})
    if part is None:
        return per_seed
    of = evidence["parts"][task]
    return {s: {i: v for i, v in items.items() if of.get(i) == part} for s, items in per_seed.items()}


def compare_variants(evidence: dict, x: str, y: str, terms: list, margin: float) -> dict:
    """X − Y on a score given as terms (score_terms), items averaged over seeds, paired by id."""
    xs = [_items(evidence, x, t, p) for _, t, p in terms]  # per term: {seed: {item id: score}}
    ys = [_items(evidence, y, t, p) for _, t, p in terms]
    parts = [(w, stats.paired_diffs(stats.item_means(xi), stats.item_means(yi)))
             for (w, _, _), xi, yi in zip(terms, xs, ys)]
    result = stats.compare(parts, margin=margin)
    # The same effect seed by seed: the interval above treats the seeds as fixed (items are the unit), so
    # a reader should see whether the seeds agree; training noise is not in it.
    seeds = sorted({s for per_seed in xs + ys for s in per_seed})
    result["by_seed"] = {}
    for seed in seeds:
        one = [(w, stats.paired_diffs(xi.get(seed, {}), yi.get(seed, {}))) for (w, _, _), xi, yi in zip(terms, xs, ys)]
        if all(d for _, d in one):
            result["by_seed"][seed] = sum(w * sum(d.values()) / len(d) for w, d in one)
    result["by_term"] = [{"task": t, "part": p, "weight": w, "n": len(d),
                          "mean_d": sum(d.values()) / len(d) if d else None}
                         for (w, t, p), (_, d) in zip(terms, parts)]
    return result


def layer_means(per_seed: dict, key: str) -> dict[str, float]:
    """{layer: value of `key` averaged over seeds}, per_seed = {seed: {layer: {key: value}}}."""
    return stats.item_means({s: {layer: v[key] for layer, v in layers.items()} for s, layers in per_seed.items()})


def compare_layers(x: dict, y: dict | float, key: str, margin: float) -> dict:
    """Per-layer X − Y (or X − a constant target), layers averaged over seeds, paired by layer name."""
    xm = layer_means(x, key)
    ym = {layer: y for layer in xm} if isinstance(y, (int, float)) else layer_means(y, key)
    return stats.compare([(1.0, stats.paired_diffs(xm, ym))], margin=margin)


# ---------------------------------------------------------------------------- the claims

def claims(evidence: dict, cfg: FindingsConfig, helpful: list[str], harmless: list[str]) -> list[dict]:
    """Each claim: id, text, measure, x/y labels, the paper's effect, and the item-level comparison.

    evidence = {"items":   {variant: {task: {seed: {item id: score}}}},
                "parts":   {task: {item id: part}},                     (macro-averaged tasks)
                "deltas":  {stage: {seed: {layer: {"s_1e5", "below_rel", "hoyer", ...}}}}  (final adapters)
                "matched": {seed: {"sft": {layer: {...}}, "dpo": {layer: {...}}, "sft_step", "dpo_step", "ratio"}}}
    A claim whose variants are missing is left out (and listed as not run)."""
    f, out = cfg, []
    variants, deltas, matched = evidence["items"], evidence.get("deltas", {}), evidence.get("matched", {})
    parts = evidence.get("parts", {})

    def add(cid, text, measure, xl, yl, result):
        effect = PAPER_EFFECTS.get(cid)
        out.append({"id": cid, "text": text, "measure": measure, "x_label": xl, "y_label": yl,
                    "paper_effect": effect[0] if effect else None, "paper_source": effect[1] if effect else None,
                    **result})

    def score_claim(cid, text, x, y, score):
        if x in variants and y in variants:
            add(cid, text, score, x, y, compare_variants(evidence, x, y, score_terms(score, helpful, harmless, parts),
                                                         f.margin))

    if f.dpo in deltas and f.sft in deltas:
        add("a", "DPO's deltas are sparser than SFT's (PAFT Fig. 2, raw share |δ| < 1e-5)",
            "per-layer share of |δ| < 1e-5, final adapters", f.dpo, f.sft,
            compare_layers(deltas[f.dpo], deltas[f.sft], "s_1e5", f.delta_margin))
    if matched:
        # Claim (a) at equal update size, on three scale-free measures (merge/delta_shape.py): the share of
        # small entries, how peaked the entries are, and whether the update sits in few of B's rows.
        at_dpo, at_sft = ({s: m[v] for s, m in matched.items()} for v in ("dpo", "sft"))
        for cid, text, measure, key in (
                ("a-matched", "DPO's deltas are sparser than SFT's at equal update size ‖δ‖ (scale-free)",
                 "per-layer share of |δ| < 0.1 × the layer's RMS (Gaussian 0.080, Laplace 0.132)", "below_rel"),
                ("a-hoyer", "DPO's deltas are sparser than SFT's at equal update size, by Hoyer's measure",
                 "per-layer Hoyer sparsity (√n − ‖δ‖₁/‖δ‖₂)/(√n − 1) (Gaussian 0.202, Laplace 0.293)", "hoyer"),
                ("a-rows", "DPO's updates sit in fewer of B's rows than SFT's at equal update size",
                 "per-layer share of Σ‖B_i‖² held by the top 10% of B's rows (0.10 if flat)", "row_conc")):
            add(cid, text, measure + ", SFT checkpoint with ‖δ‖ closest to DPO's", f.dpo, f.sft,
                compare_layers(at_dpo, at_sft, key, f.delta_margin))
    if f.dpo_small_lr in deltas and f.sft in deltas:
        add("a-lr40", f"DPO at 1/40 of SFT's learning rate ({f.dpo_small_lr}) shows Fig. 2's raw pattern "
            "from magnitude alone", "per-layer share of |δ| < 1e-5, final adapters", f.dpo_small_lr, f.sft,
            compare_layers(deltas[f.dpo_small_lr], deltas[f.sft], "s_1e5", f.delta_margin))
    if f.sft_sparse in deltas:
        add("b", f"L1 pushes SFT sparsity over {f.sparsity_target:.0%} (PAFT eq. 1)",
            "per-layer share of |δ| < 1e-5 of the L1-sparse SFT, minus the target", f.sft_sparse, "target",
            {**compare_layers(deltas[f.sft_sparse], f.sparsity_target, "s_1e5", f.delta_margin),
             "per_seed": {s: sum(v["s_1e5"] for v in layers.values()) / len(layers)
                          for s, layers in deltas[f.sft_sparse].items()},
             "held_out": held_out_cost(evidence.get("held_out", {}), f.sft_sparse, f.sft)})
    score_claim("c", f"parallel SFT_sparse ∥ DPO merged with {f.merge} scores ≥ sequential SFT → DPO "
                f"(PAFT Table 1)", f.merge, f.sequential, "combined_hh")
    score_claim("d", f"L1 sparsity helps the merge: {f.merge} of SFT_sparse + DPO beats {f.merge} of dense "
                f"SFT + DPO (PAFT Table 1)", f.merge, f.merge_dense, "combined_hh")
    score_claim("e1", "DPO aligns harmlessness better than SFT on the same pairs' chosen answers "
                "(Thakkar et al.)", f.dpo, f.sft_chosen, "harmless")
    if f.merge in variants and f.sft_sparse in variants and f.dpo in variants:
        best = max((f.sft_sparse, f.dpo), key=lambda v: _overall(evidence, v, helpful, harmless, parts))
        score_claim("e2", f"a merge across preferences ({f.merge}) beats the better of its single runs "
                    f"(here {best}, chosen on these same items: favours the single run) (Thakkar et al.)",
                    f.merge, best, "combined_hh")
    stats.decide_all(out)
    for c in out:
        c["n_needed"] = needed(c)
        # Detectable is not the same as large: a difference also inside the equivalence margin is negligible.
        if c["decision"] in ("holds", "does not hold") and (c.get("p_tost_holm") or 1.0) < c.get("alpha", 0.05):
            c["decision"] += f" (negligible: also within ±{c['margin']:g})"
        signs = {v > 0 for v in c.get("by_seed", {}).values() if v != 0}
        c["seeds_disagree"] = len(signs) > 1  # the training runs themselves point different ways
    return out


def held_out_cost(held_out: dict, sparse: str, dense: str, margin: float = 0.05) -> dict | None:
    """The sparse SFT's held-out loss against the dense one's, paired by seed (one number per stage and
    seed: the loss is not kept per chat): mean difference, its 95% t upper bound over seeds, and whether
    that bound stays under `margin` × the dense loss (non-inferior within 5%)."""
    a, b = held_out.get(sparse, {}), held_out.get(dense, {})
    seeds = [s for s in a if s in b]
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    m, se = mean_se(d)
    dense_mean = sum(b[s] for s in seeds) / len(seeds)
    upper = m + stats.t_ppf(0.975, len(d) - 1) * se if len(d) > 1 else None
    return {"sparse": sum(a[s] for s in seeds) / len(seeds), "dense": dense_mean, "diff": m, "upper": upper,
            "margin": margin, "seeds": len(seeds),
            "non_inferior": None if upper is None else upper < margin * dense_mean}


def _overall(evidence: dict, variant: str, helpful, harmless, parts) -> float:
    """A variant's combined score from its items (seed-averaged), to pick the better single run."""
    total = 0.0
    for w, t, p in score_terms("combined_hh", helpful, harmless, parts):
        m = stats.item_means(_items(evidence, variant, t, p))
        total += w * (sum(m.values()) / len(m) if m else 0.0)
    return total


def needed(c: dict) -> int | None:
    """Items that would bring the MDE down to the paper's effect: MDE ∝ 1/√n, so n · (MDE / effect)²."""
    if not c.get("paper_effect") or not c.get("mde"):
        return None
    return math.ceil(c["n"] * (c["mde"] / c["paper_effect"]) ** 2)


# ---------------------------------------------------------------------------- FINDINGS.md

def _num(v, fmt="+.3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if fmt.endswith(".3f") and v != 0 and abs(v) < 5e-4:  # a layer share's tiny effect: keep its digits
        return format(v, fmt[:-3] + ".1e")
    return format(v, fmt)


def _ci(c: dict, key: str = "ci") -> str:
    ci = c.get(key)
    return f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else "–"


RULE_NOTE = ("A decision marked *negligible* is detectable but also inside the equivalence margin. *Seeds disagree "
             "in sign*: the effect computed on each seed alone points different ways; the interval treats the three "
             "training runs as fixed (items are the unit), so such a decision rests on these runs, not on training "
             "in general.")

RULE = ("Decision rule (paft_evals/findings.py, paft_evals/stats.py): each item (question, behaviour, "
        "LoRA layer) is averaged over the seeds, then X and Y are paired item by item; the effect is the "
        "mean paired difference (a weighted sum of task means for a combined score) with a t interval over "
        "items. p-values are Holm-adjusted over all the claims below. **holds**: p_holm < 0.05, effect > 0; "
        "**does not hold**: p_holm < 0.05, effect < 0; **equivalent within ±m**: TOST p_holm < 0.05; "
        "**inconclusive** otherwise. MDE = the smallest true effect found with 80% power at this n.")


def render(results: list[dict], cfg: FindingsConfig, title: str, notes: list[str] = (),
           helpful: list[str] = (), harmless: list[str] = ()) -> str:
    lines = [f"# FINDINGS: {title}", "",
             "Generated by the pipeline from the per-item results (results.json); do not edit by hand.", "",
             RULE, "", RULE_NOTE, "",
             f"Scores: helpful = mean of {', '.join(helpful) or '–'}; harmless = mean of "
             f"{', '.join(harmless) or '–'} ('1-' = one minus); combined_hh = (helpful + harmless) / 2. "
             f"Equivalence margins: ±{cfg.margin:g} on scores, ±{cfg.delta_margin:g} on layer shares.", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    lines += ["| claim | statement | decision | effect X − Y | 95% CI | n | MDE | p (Holm) | paper's effect | "
              "items for MDE = paper's |", "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for c in results:
        flag = "; seeds disagree in sign" if c.get("seeds_disagree") else ""
        lines.append(f"| ({c['id']}) | {c['text']} | **{c['decision']}**{flag} | {_num(c.get('effect'))} | {_ci(c)} | "
                     f"{c['n']} | {_num(c.get('mde'), '.3f')} | {_num(c.get('p_holm'), '.3g')} | "
                     f"{_num(c.get('paper_effect'), '.3f')} | {c.get('n_needed') or '–'} |")
    lines.append("")
    for c in results:
        lines += [f"## ({c['id']}) {c['text']}", "", f"Measure: {c['measure']}. X = {c['x_label']}, "
                  f"Y = {c['y_label']}.", "",
                  f"- effect {_num(c.get('effect'))}, 95% t interval {_ci(c)}, paired bootstrap {_ci(c, 'ci_boot')}",
                  f"- n = {c['n']} items, se {_num(c.get('se'), '.4f')}, MDE (80% power) {_num(c.get('mde'), '.3f')}, "
                  f"p {_num(c.get('p'), '.3g')}, Holm-adjusted {_num(c.get('p_holm'), '.3g')}"
                  + (f", TOST ±{c['margin']:g}: p_holm {_num(c.get('p_tost_holm'), '.3g')}" if c.get("margin") else ""),
                  f"- decision: **{c['decision']}**" + (f" ({c['reason']})" if c.get("reason") else "")]
        if c.get("by_seed"):
            lines.append("- the same effect seed by seed (the interval treats seeds as fixed; training noise is not in "
                         "it): " + ", ".join(f"seed {sd}: {_num(v)}" for sd, v in c["by_seed"].items()))
        if c.get("per_seed"):
            lines.append("- mean over layers per seed: " + ", ".join(f"seed {s}: {v:.3f}" for s, v in c["per_seed"].items()))
        h = c.get("held_out")
        if h:
            lines.append(f"- held-out loss (mean over {h['seeds']} seeds): sparse {h['sparse']:.4f}, "
                         f"dense {h['dense']:.4f}, difference {h['diff']:+.4f} ({h['diff'] / h['dense']:+.1%}), 95% "
                         f"upper bound over seeds {_num(h['upper'], '+.4f')}: " + (
                             "–" if h["non_inferior"] is None else
                             f"{'non-inferior' if h['non_inferior'] else 'not shown non-inferior'} within "
                             f"{h['margin']:.0%} of the dense loss"))
        if c.get("paper_source"):
            enough = c.get("mde") is not None and c["mde"] <= c["paper_effect"]
            lines.append(f"- the paper's effect: {c['paper_source']}; at this n the MDE is {_num(c.get('mde'), '.3f')}, "
                         + ("below" if enough else "above") + f" the smaller effect {c['paper_effect']:.3f}; about "
                         f"{c.get('n_needed') or '–'} items give MDE = {c['paper_effect']:.3f}")
        if c.get("by_term"):
            lines += ["", "| task | part | weight | n | mean d |", "|---|---|---:|---:|---:|"]
            lines += [f"| {t['task']} | {t['part'] or '–'} | {t['weight']:+.3f} | {t['n']} | {_num(t['mean_d'])} |"
                      for t in c["by_term"]]
        lines.append("")
    if cfg.appendix:
        with open(cfg.appendix, encoding="utf-8") as f:
            extra = f.read()
        lines += ["---", "", f"*Below: hand-written, from {cfg.appendix}; not generated from this run's results.*",
                  "", extra.rstrip()]
    return "\n".join(lines) + "\n"


def write_findings(path: str, text: str) -> None:
    write_text(path, text)
