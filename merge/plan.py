"""What a merge reads, checked before any tensor is merged, and how one tensor is merged.

    prepare(cfg, scratch)      open every model (nothing loaded whole) and check all names and
                               shapes against the reference model: a Plan
    merge_tensor(plan, name)   one weight of the merge, in fp32: the method's function from
                               merge/registry.py, called with the parameters resolved for it

merge/write.py writes what merge_tensor returns.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

import torch

from merge import methods as M
from merge.config import MergeConfig, ModelEntry, resolve, same_path
from merge.deltas import HEAD, Adapter, Checkpoint, MergeError, check_against_base, open_model, task_vector, weight
from merge.registry import METHODS


@dataclass
class Plan:
    cfg: MergeConfig
    reference: Checkpoint        # θ₀ for adapters and task vectors; config and tokenizer come from it
    models: list                 # Checkpoint | Adapter per cfg.models
    names: list[str]             # the output tensors, in writing order
    tied: bool                   # the output keeps lm_head tied to the embedding
    num_layers: int
    rounding: list = field(default_factory=list)  # RoundingLoss per 16-bit output dtype (write_model)

    def layer_t(self, name: str) -> float:
        """mergekit's gradient position: layer i of L is at i/(L−1); other tensors at 0."""
        m = re.search(r"\.layers\.(\d+)\.", name)
        return int(m.group(1)) / (self.num_layers - 1) if m and self.num_layers > 1 else 0.0

    def param(self, key: str, name: str, entry: ModelEntry | None = None):
        t = self.layer_t(name)
        for source in ([entry.params] if entry else []) + [self.cfg.params]:
            if key in source:
                v = resolve(source[key], name, t)
                if v is not None:
                    return v
        default = METHODS[self.cfg.method].params[key].default
        if default is None:
            where = entry.label if entry else "parameters"
            raise MergeError(f"{where}: tensor {name}: no value for required parameter {key!r}")
        return default


def prepare(cfg: MergeConfig, scratch: str) -> Plan:
    """Open every model and check all names and shapes before any tensor is merged."""
    base = open_model(cfg.base, "base_model", scratch) if cfg.base else None
    if base is not None and not isinstance(base, Checkpoint):
        raise MergeError(f"base_model: {cfg.base} is an adapter; base_model must be a full model")
    models = [open_model(m.name, m.label, scratch) for m in cfg.models]
    reference = base or next((m for m in models if isinstance(m, Checkpoint)), None)
    if reference is None:
        raise MergeError("config: merging adapters needs base_model (the model they were trained on)")
    for m, entry in zip(models, cfg.models):
        if isinstance(m, Adapter) and base is None:
            raise MergeError(f"{entry.label}: an adapter needs base_model")
        if isinstance(m, Adapter) and m.base_name and cfg.base and not same_path(m.base_name, cfg.base):
            print(f"warning: {entry.label}: adapter_config.json names base {m.base_name!r}, "
                  f"merging onto {cfg.base!r}", file=sys.stderr)

    # lm_head stays tied only if the reference is tied and no model gives it its own values.
    unties = any(isinstance(m, Adapter) and HEAD in m.targets or
                 isinstance(m, Checkpoint) and m.tied_to is None and m.has(HEAD) for m in models)
    tied = reference.tied_to is not None and not unties
    names = reference.names + ([HEAD] if reference.tied_to is not None and not tied else [])
    for m in models:
        if m is not reference:
            check_against_base(m, reference, names)
    layers = [int(x) for n in names for x in re.findall(r"\.layers\.(\d+)\.", n)]
    num_layers = reference.config.get("num_hidden_layers") or (max(layers) + 1 if layers else 1)
    plan = Plan(cfg, reference, models, names, tied, num_layers)
    for name in names:
        check_weight_sum(plan, name)
    return plan


def check_weight_sum(plan: Plan, name: str) -> None:
    """MergeError if the weights of tensor `name` sum to ~0 where that has no meaning, before any
    tensor is merged (weights may differ per tensor: gradients, filters).

    With normalize the method divides by Σᵢ wᵢ, and mergekit then quietly divides by 1 instead;
    linear's plain Σᵢ wᵢ θᵢ with Σw = 0 is a difference of models (θ_F − θ_base for weights 1
    and −1), not a model either. TIES' normalize divides each entry by the weights that agree
    on its sign, which this does not concern (registry: sums_weights)."""
    method = METHODS[plan.cfg.method]
    if not method.sums_weights:
        return
    total = sum(plan.param("weight", name, e) for e in plan.cfg.models)
    normalize = plan.param("normalize", name)
    if abs(total) >= 1e-8 or not (normalize or method.inputs == "weights"):
        return
    why = "normalize divides by it" if normalize else "Σ wᵢ θᵢ would be a difference of models, not a model"
    raise MergeError(f"tensor {name}: the weights of {plan.cfg.method} sum to {total:g}; {why} "
                     f"(choose weights with a non-zero sum)")


def merge_tensor(plan: Plan, name: str, seed: int) -> torch.Tensor:
    """The merged value of one weight, in fp32 (fp64 stays fp64); the caller rounds it.

    The method's entry in merge/registry.py says what its function takes: the models' weights,
    a pair (slerp: base_model or the first model at t = 0, the last model at t = 1), or the base
    and the task vectors; then each parameter it uses, resolved for this tensor.
    """
    stored = plan.reference.read(name)
    if not stored.is_floating_point():
        return stored  # an integer buffer: nothing to merge
    base = stored.float() if stored.dtype != torch.float64 else stored
    method = METHODS[plan.cfg.method]
    if method.inputs == "weights":
        inputs = [[weight(m, name, base) for m in plan.models]]
    elif method.inputs == "pair":
        start = base if len(plan.models) == 1 else weight(plan.models[0], name, base)
        inputs = [start, weight(plan.models[-1], name, base)]
    else:  # "deltas"
        deltas = [task_vector(m, name, base) for m in plan.models]
        if all(d is None for d in deltas):
            return base  # no model changes this weight (adapters that do not touch it): τ = 0
        inputs = [base, [torch.zeros_like(base) if d is None else d for d in deltas]]
    args = {}
    for key, p in method.params.items():
        if p.arg:  # a per-model parameter is a list: one value per model
            args[p.arg] = [plan.param(key, name, e) for e in plan.cfg.models] if p.per_model else plan.param(key, name)
    if method.random:
        args["generator"] = M.tensor_generator(name, seed)
    return method.fn(*inputs, **args)
