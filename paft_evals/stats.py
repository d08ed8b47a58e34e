"""Item-level paired statistics for FINDINGS: is variant X better than Y on the same items?

The unit of evidence is the ITEM, not the seed. Seeds re-run the same few items, so three seeds
that all show +0.02 may be one item that flipped three times: seeds are not independent evidence
about items the benchmark did not ask. So each item is first averaged over the seeds,

    x_i = mean_s X[s][i],   y_i = mean_s Y[s][i],   d_i = x_i − y_i      (the same items in X and Y)

and the paired differences d_i are the sample. A claim may combine tasks t (e.g. combined =
(helpful + harmless)/2 puts weight 1/4 on each of two helpful tasks): with n_t items, mean d̄_t
and sample variance s_t² = Σ (d_i − d̄_t)² / (n_t − 1) per task,

    effect E = Σ_t w_t d̄_t,        se² = Σ_t v_t,   v_t = w_t² s_t² / n_t,
    df = (Σ_t v_t)² / Σ_t v_t² / (n_t − 1)          (Welch–Satterthwaite; n − 1 for one task)

Under E = 0, T = E / se is ~ Student t with df degrees of freedom:
    p     = 2 P(t_df > |T|)                         (two-sided)
    CI    = E ± t_{1−α/2, df} · se
    MDE   = (t_{1−α/2, df} + t_{power, df}) · se    (a true effect this large is found with prob. `power`)
    p_tost = max(P(t_df > (E + m)/se), P(t_df < (E − m)/se))   (TOST: equivalent within ±m if < α)
A percentile bootstrap that resamples items within each task is reported beside the t interval as
a check on the t approximation (binary scores, few discordant items).

Several claims are decided at once, so their p-values are Holm–Bonferroni adjusted: sorted
p_(1) ≤ … ≤ p_(k), adjusted p_(j) = max_{i ≤ j} min(1, (k − i + 1) p_(i)).

The Student t CDF is F(t) = 1 − ½ I_{ν/(ν+t²)}(ν/2, ½) for t ≥ 0, with I the regularized incomplete
beta function (continued fraction, modified Lentz); quantiles are found by bisection on F. Accurate
to ~1e-12 for df up to 1e3 and ~1e-9 relative by df = 1e6 (lgamma's rounding); past df = 1e7 the
normal is used, which is closer than that (the quantiles differ by ~2e-7).
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

# ---------------------------------------------------------------------------- Student t, by hand
# (scipy is in the lock but not in setup.py's install_requires, so it cannot be imported here.)


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (Numerical Recipes §6.4), evaluated by modified Lentz."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),            # even step
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """I_x(a, b), given x and y = 1 − x separately (so neither loses digits near 0 or 1)."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    # The fraction converges fast for x < (a+1)/(a+b+2); otherwise use I_x(a,b) = 1 − I_y(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, y) / b


def _t_upper(t: float, df: float) -> float:
    """P(T > t) for t ≥ 0: ½ I_{ν/(ν+t²)}(ν/2, ½), computed directly so tiny tails keep their digits."""
    if df > 1e7:                        # includes inf
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    return 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t), t * t / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student t with df > 0 degrees of freedom (df = inf: the normal)."""
    return 1.0 - _t_upper(t, df) if t >= 0 else _t_upper(-t, df)


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student t with df degrees of freedom, by bisection on the upper tail."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if df > 1e7:
        return NormalDist().inv_cdf(q)
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    tail = 1.0 - q
    lo, hi = 0.0, 1.0
    while _t_upper(hi, df) > tail:     # bracket: the upper tail falls as t grows
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _t_upper(mid, df) > tail else (lo, mid)
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------- items and differences

def item_means(per_seed: dict) -> dict[str, float]:
    """{seed: {item_id: score}} → {item_id: mean over seeds}, over the items every seed scored."""
    seeds = list(per_seed.values())
    if not seeds:
        return {}
    # An item some seed lacks would be averaged over fewer runs than the rest: drop it.
    common = [i for i in seeds[0] if all(i in s for s in seeds[1:])]
    return {i: sum(float(s[i]) for s in seeds) / len(seeds) for i in common}


def paired_diffs(x: dict[str, float], y: dict[str, float]) -> dict[str, float]:
    """d_i = x_i − y_i over the items both variants scored (pairing removes item difficulty)."""
    return {i: float(x[i]) - float(y[i]) for i in x if i in y}


# ---------------------------------------------------------------------------- the comparison

def compare(parts, *, margin=None, alpha=0.05, power=0.8, n_boot=2000, seed=0) -> dict:
    """parts: [(weight, {item_id: d_i}), ...], one per task. Effect Σ w_t mean(d_t) and its t test."""
    ws = [float(w) for w, _ in parts]
    ds = [np.asarray(list(d.values()), dtype=float) for _, d in parts]
    ns = [len(d) for d in ds]
    out = {"n": sum(ns), "n_by_part": ns, "alpha": alpha}
    if margin is not None:
        out["margin"] = float(margin)
    if not parts or min(ns) < 2:
        # One item has no spread to measure its difference against (and one item moving is not
        # "all items moved the same way"): nothing can be decided.
        effect = float(sum(w * d.mean() for w, d in zip(ws, ds))) if parts and min(ns) > 0 else None
        out.update(effect=effect, se=None, df=None, ci=None, ci_boot=None, p=None, mde=None,
                   decision="inconclusive", reason="a part has fewer than 2 items" if parts else "no parts")
        if margin is not None:
            out["p_tost"] = None
        return out

    effect = float(sum(w * d.mean() for w, d in zip(ws, ds)))     # plain floats: results go to JSON
    v = [w * w * float(d.var(ddof=1)) / n for w, d, n in zip(ws, ds, ns)]
    se = math.sqrt(sum(v))
    if se > 0:
        df = sum(v) ** 2 / sum(vt * vt / (n - 1) for vt, n in zip(v, ns))
    else:
        df = float(sum(n - 1 for n in ns))     # Welch–Satterthwaite is 0/0: fall back to pooled df
    t_crit = t_ppf(1 - alpha / 2, df)

    if se > 0:
        p = min(1.0, 2.0 * _t_upper(abs(effect) / se, df))
    else:
        # Every part's items (≥ 2 each, checked above) moved by the same amount, so the t
        # approximation has nothing to work with. No difference at all if the effect is 0;
        # otherwise every item agrees on the direction: the exact sign test, 2 · 2^−n.
        p = 1.0 if effect == 0 else min(1.0, 2.0 * 0.5 ** sum(ns))
    out.update(effect=effect, se=se, df=df, ci=[effect - t_crit * se, effect + t_crit * se], p=p,
               mde=(t_crit + t_ppf(power, df)) * se)

    if margin is not None:
        m = float(margin)
        if se > 0:
            # H0: E ≤ −m rejected by a large (E + m)/se; H0: E ≥ +m by a small (E − m)/se.
            # P(T > a) is written t_cdf(−a) so that a small tail keeps its digits.
            out["p_tost"] = max(t_cdf(-(effect + m) / se, df), t_cdf((effect - m) / se, df))
        else:
            # No item differs (or all by the same amount): "no discordant item in n" still allows a
            # true discordance rate up to ~3/n (the rule of three, 95%), so equivalence is claimed
            # only if the effect plus that much of each part stays inside the margin.
            slack = sum(abs(w) * 3.0 / n for w, n in zip(ws, ns))
            out["p_tost"] = 0.0 if abs(effect) + slack < m else 1.0

    out["ci_boot"] = _bootstrap(ws, ds, alpha, n_boot, seed) if n_boot else None
    return out


def _bootstrap(ws, ds, alpha, n_boot, seed) -> list[float]:
    """Percentile interval of Σ w_t mean(d_t*) with items resampled with replacement within each task."""
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for w, d in zip(ws, ds):
        n = len(d)
        step = max(1, 2_000_000 // n)           # bound memory: at most ~2M indices at once
        for start in range(0, n_boot, step):
            rows = min(step, n_boot - start)
            total[start:start + rows] += w * d[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    lo, hi = np.quantile(total, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]


# ---------------------------------------------------------------------------- several claims

def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values in the input order; None entries stay None (not counted)."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    k, out, running = len(idx), list(pvalues), 0.0
    for rank, i in enumerate(idx):
        # (k − rank) for the rank-th smallest; the running max keeps the adjusted p's in the raw order.
        running = max(running, min(1.0, (k - rank) * pvalues[i]))
        out[i] = running
    return out


def decide(result: dict, p_adj: float | None, p_tost_adj: float | None = None, alpha=0.05) -> str:
    """One of "holds", "does not hold", "equivalent within ±m", "inconclusive".

    A claim "X ≥ Y" holds only when X is detectably better; no detectable difference is
    inconclusive (consistent with ≥, but not evidence for it). A detected direction wins over
    equivalence: the claim asks about the direction."""
    if result.get("reason") or result.get("effect") is None:
        return "inconclusive"
    if p_adj is not None and p_adj < alpha:
        if result["effect"] > 0:
            return "holds"
        if result["effect"] < 0:
            return "does not hold"
    if p_tost_adj is not None and p_tost_adj < alpha and result.get("margin") is not None:
        return f"equivalent within ±{result['margin']:g}"
    return "inconclusive"


def decide_all(results: list[dict], alpha=0.05) -> list[str]:
    """Holm over the claims' p, and separately over their p_tost; store p_holm, p_tost_holm, decision."""
    p_holm = holm([r.get("p") for r in results])
    p_tost_holm = holm([r.get("p_tost") for r in results])
    out = []
    for r, ph, pt in zip(results, p_holm, p_tost_holm):
        r["p_holm"], r["p_tost_holm"] = ph, pt
        r["decision"] = decide(r, ph, pt, alpha)
        out.append(r["decision"])
    return out


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def summary(result: dict) -> str:
    """One line: effect +0.031 [95% CI −0.010, +0.072], n = 300, MDE 0.058, p_holm 0.41."""
    if result.get("se") is None:
        return f"inconclusive ({result.get('reason', 'no estimate')}), n = {result.get('n', 0)}"
    level = f"{100 * (1 - result.get('alpha', 0.05)):g}%"
    lo, hi = result["ci"]
    key = "p_holm" if result.get("p_holm") is not None else "p"
    return (f"effect {_signed(result['effect'])} [{level} CI {_signed(lo)}, {_signed(hi)}], n = {result['n']}, "
            f"MDE {result['mde']:.3f}, {key} {result[key]:.2g}")
