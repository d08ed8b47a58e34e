"""The merge methods, one entry each: name, parameters, function, paper.

Adding a method is one entry in METHODS and one function in merge/methods.py (the math is in
its docstring). Everything else reads this table:
  * the config reader (merge/config.py): which parameters a method takes, their defaults and
    checks, which ones a model entry may set for itself;
  * the per-tensor merge (merge/plan.py, merge_tensor): which tensors `fn` takes and which
    keyword each parameter is passed as;
  * the pipeline validator (engine/pipeline/config.py): the method names;
  * `python -m merge --help`: its list of methods and parameters is `methods_help()`.

The table is kept apart from merge/methods.py so that file stays pure math (tensors in, one
tensor out), as mergekit keeps its registry apart from its methods.

A parameter's setting in a config is a number, a gradient [v0, v1, ...] or a filtered list
(merge/config.py resolves it per tensor); its check applies to every number in it:

    number    any finite number within float32's range (true/false are not numbers; a NaN or
              inf weight would write a NaN model with exit 0)
    bool      true or false
    density   a number in (0, 1]
    unit      a number in [0, 1]
A number written as a string ("1e-3": YAML 1.1 reads that as a string) is the number it spells,
as in recipes (engine/schema.py); a string for a true/false parameter is refused.

How `fn` is called, by the method's `inputs`, for one weight of the merge:

    weights   fn([θ₁, …, θₙ], **params)          the models' weights themselves (no base)
    pair      fn(θ_start, θ_end, **params)       slerp's two ends
    deltas    fn(θ₀, [τ₁, …, τₙ], **params)      the task vectors τᵢ = θᵢ − θ₀
and a `random` method also gets generator= (methods.tensor_generator: one per tensor). A
per-model parameter is passed as a list, one value per model; a parameter whose `arg` is None
is accepted (mergekit configs carry it) and not passed.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Callable

from engine.schema import FLOAT32_MAX
from merge import methods as M


@dataclass(frozen=True)
class Param:
    default: object = None      # None: required
    check: str = "number"       # number | bool | density | unit (see above)
    arg: str | None = None      # fn's keyword for it; None: accepted, not used
    per_model: bool = False     # a model entry may set it for itself

    @property
    def required(self) -> bool:
        return self.default is None

    def problem(self, key: str, v) -> str | None:
        """What is wrong with one number `v` of a setting of parameter `key` (None: nothing)."""
        if self.check == "bool":
            return None if isinstance(v, bool) else f"{key} must be true or false, got {v!r}"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"{key} must be a number, got {v!r}"
        if not (abs(v) <= FLOAT32_MAX if isinstance(v, int) else math.isfinite(v) and abs(v) <= FLOAT32_MAX):
            return f"{key} must be a finite number within the float32 range (|x| <= {FLOAT32_MAX:.4g}), got {v!r}"
        if self.check == "density" and not 0 < v <= 1:
            return f"{key} must be in (0, 1], got {v}"
        if self.check == "unit" and not 0 <= v <= 1:
            return f"{key} must be in [0, 1], got {v}"
        return None


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable                # in merge/methods.py
    inputs: str                 # weights | pair | deltas (see above)
    params: dict[str, Param]    # in mergekit's order; the defaults are mergekit's
    paper: str                  # who introduced it
    url: str
    random: bool = False        # fn takes generator=
    note: str = ""              # one more sentence for --help
    sums_weights: bool = False  # normalize divides by Σᵢ wᵢ: a sum of 0 is refused (merge/plan.py)


WEIGHT = Param(None, "number", "weights", per_model=True)
LAMBDA = Param(1.0, "number", "lam")
DENSITY = Param(1.0, "density", "density", per_model=True)
UNUSED_DENSITY = Param(1.0, "density", None, per_model=True)  # mergekit declares it for every task-vector method
INT8_MASK = Param(False, "bool", None)  # mergekit's; our masks are booleans already
RESCALE = Param(True, "bool", "rescale")


def _normalize(default: bool) -> Param:
    return Param(default, "bool", "normalize")


def _dare(name: str, fn: Callable, sums_weights: bool) -> Method:
    return Method(name, fn, "deltas",
                  {"weight": WEIGHT, "lambda": LAMBDA, "density": DENSITY, "int8_mask": INT8_MASK,
                   "normalize": _normalize(False), "rescale": RESCALE},
                  "Yu et al. 2024, DARE", "https://arxiv.org/abs/2311.03099",
                  random=True, sums_weights=sums_weights)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("linear", M.linear, "weights", {"weight": WEIGHT, "normalize": _normalize(True)},
           "Wortsman et al. 2022, model soups", "https://arxiv.org/abs/2203.05482", sums_weights=True),
    Method("task_arithmetic", M.task_arithmetic, "deltas",
           {"weight": WEIGHT, "lambda": LAMBDA, "density": UNUSED_DENSITY, "int8_mask": INT8_MASK,
            "normalize": _normalize(False)},
           "Ilharco et al. 2023, task arithmetic", "https://arxiv.org/abs/2212.04089", sums_weights=True),
    Method("ties", M.ties, "deltas",
           {"weight": WEIGHT, "lambda": LAMBDA, "density": DENSITY, "int8_mask": INT8_MASK,
            "normalize": _normalize(True)},
           "Yadav et al. 2023, TIES-merging", "https://arxiv.org/abs/2306.01708"),
    _dare("dare_linear", M.dare_linear, sums_weights=True),
    _dare("dare_ties", M.dare_ties, sums_weights=False),  # its normalize divides per entry (disjoint_mean)
    Method("slerp", M.slerp, "pair", {"t": Param(None, "unit", "t")},
           "Shoemake 1985 (quaternion slerp), as mergekit applies it to weights",
           "https://doi.org/10.1145/325165.325242",
           note="base_model at t = 0, the other model at t = 1; or, with two models besides base_model "
                "(e.g. an SFT and a DPO adapter of that base, as Thakkar et al. 2024 merge them), "
                "the first at t = 0 and the second at t = 1."),
]}


def _value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else f"{v:g}"


def methods_help(indent: int = 4, width: int = 100) -> str:
    """The methods, their parameters (default, or `required`) and papers, as `--help` lists them."""
    col = max(len(name) for name in METHODS) + 2
    lines = []
    for m in METHODS.values():
        used = [f"{k} ({'required' if p.required else _value(p.default)})" for k, p in m.params.items() if p.arg]
        unused = [k for k, p in m.params.items() if not p.arg]
        text = ", ".join(used) + (f"; {', '.join(unused)} accepted, unused" if unused else "")
        text += f": {m.note}" if m.note else ""
        lines.append(textwrap.fill(text, width, initial_indent=" " * indent + f"{m.name:<{col}}",
                                   subsequent_indent=" " * (indent + col)))
        lines.append(textwrap.fill(f"{m.paper}, {m.url}", width, initial_indent=" " * (indent + col),
                                   subsequent_indent=" " * (indent + col + 2), break_long_words=False,
                                   break_on_hyphens=False))
    per_model = sorted({k for m in METHODS.values() for k, p in m.params.items() if p.per_model})
    ranges = {k: {"density": "(0, 1]", "unit": "[0, 1]"}[p.check]
              for m in METHODS.values() for k, p in m.params.items() if p.check in ("density", "unit")}
    text = (f"A model's entry may set {' and '.join(per_model)} for itself; the others are method-level. "
            + ", ".join(f"{k} is in {r}" for k, r in ranges.items()) + ".")
    lines.append(textwrap.fill(text, width, initial_indent=" " * indent, subsequent_indent=" " * indent))
    return "\n".join(lines)
