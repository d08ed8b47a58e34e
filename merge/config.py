"""The mergekit config `python -m merge` reads: checked whole before any model is opened.

    load_config(path)   the YAML file -> MergeConfig (MergeError names the key that is wrong)
    parse_config(raw)   the same for a config already read (the PAFT pipeline checks its merges
                        with it before any stage trains; no file is opened)
    resolve(setting, name, t)   a parameter's value for one tensor, by mergekit's rules

Which methods exist and which parameters each takes (defaults, checks, per model or not) is
merge/registry.py; the keys, the accepted values and the errors are mergekit's (see
`python -m merge --help`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from engine.safeio import CorruptFile, read_yaml
from merge.deltas import MergeError
from merge.registry import METHODS

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ModelEntry:
    name: str                 # as written in the config
    params: dict              # its own parameters
    label: str                # "models[i] (name)" for error messages
    adapter_of: str | None = None  # mergekit's BASE+ADAPTER: the BASE part


@dataclass
class MergeConfig:
    method: str
    base: str | None
    models: list[ModelEntry]
    params: dict = field(default_factory=dict)
    dtype: torch.dtype | None = None


def _scalar(v, param, key: str, where: str):
    """One scalar of a setting, checked (merge/registry.py: finite, in range, true/false).

    A string that spells a number is that number, as a recipe's float is (engine/schema.py):
    YAML 1.1 reads `1e-3` (no dot) as the string "1e-3"."""
    if isinstance(v, str) and param.check != "bool":
        try:
            v = float(v)
        except ValueError:
            raise MergeError(f"{where}: {key}: not a number, gradient or filtered list: {v!r}") from None
    elif not isinstance(v, (bool, int, float)):
        raise MergeError(f"{where}: {key}: not a number, gradient or filtered list: {v!r}")
    problem = param.problem(key, v)
    if problem:
        raise MergeError(f"{where}: {problem}")
    return v


def _setting(setting, param, key: str, where: str):
    """A mergekit parameter setting, checked, with numeric strings as numbers: a scalar, a
    gradient [v0, v1, ...] (numbers only) or a filtered list [{filter: ..., value: ...}, ...]."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return _scalar(setting, param, key, where)
    if not setting or not (all(isinstance(e, dict) for e in setting) or not any(isinstance(e, dict) for e in setting)):
        raise MergeError(f"{where}: {key}: a gradient is a non-empty list of numbers and a filtered list one of "
                         f"{{filter: ..., value: ...}}, got {setting!r}")
    if param.check == "bool" and not isinstance(setting[0], dict):
        raise MergeError(f"{where}: {key} must be true or false (or a filtered list of them), got {setting!r}")
    out = []
    for e in setting:
        if isinstance(e, dict):
            if set(e) - {"filter", "value"} or "value" not in e or not isinstance(e.get("filter", ""), (str, type(None))):
                raise MergeError(f"{where}: a filtered value is {{filter: SUBSTRING, value: ...}}, got {e}")
            out.append({**e, "value": _setting(e["value"], param, key, where)})
        else:
            out.append(_scalar(e, param, key, where))
    return out


def _check_params(params, method: str, per_model: bool, where: str) -> dict:
    """A `parameters:` mapping: the method's, or (per_model) those a model entry may set itself."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise MergeError(f"{where}: parameters must be a mapping, got {params!r}")
    spec = METHODS[method].params
    for key, setting in params.items():
        if key not in spec or (per_model and not spec[key].per_model):
            ok = [k for k, p in spec.items() if not per_model or p.per_model]
            raise MergeError(f"{where}: unknown parameter {key!r} for {method} (known: {', '.join(ok) or 'none'})")
    return {key: _setting(setting, spec[key], key, where) for key, setting in params.items()}


def load_config(path: str) -> MergeConfig:
    if not os.path.isfile(path):
        raise MergeError(f"config: file not found: {path}")
    try:
        raw = read_yaml(path)  # engine.safeio: no aliases (a YAML bomb), no deep nesting, 1e-3 is a number
    except CorruptFile as e:
        raise MergeError(f"config: {e}") from None
    if not isinstance(raw, dict):
        raise MergeError(f"config: {path}: expected a mapping of {', '.join(TOP_KEYS)}")
    return parse_config(raw)


def parse_config(raw: dict) -> MergeConfig:
    """Check a mergekit config (already read from YAML) and return it; MergeError names the key.
    No file is opened: the PAFT pipeline checks its merges with this before any stage trains."""
    for key in raw:
        if key not in TOP_KEYS:
            hint = " (use models: with base_model:; slices are not supported)" if key == "slices" else ""
            raise MergeError(f"config: unknown key {key!r}{hint} (known: {', '.join(TOP_KEYS)})")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise MergeError(f"config: merge_method {method!r} is not one of {', '.join(METHODS)}")
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"config: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    base = raw.get("base_model")
    if base is not None and not isinstance(base, str):
        raise MergeError(f"config: base_model must be a path or model name, got {base!r}")
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeError("config: models must be a non-empty list of {model: PATH, parameters: {...}}")
    models = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"model": e}
        if not isinstance(e, dict) or not isinstance(e.get("model"), str):
            raise MergeError(f"config: models[{i}] must be {{model: PATH, parameters: {{...}}}}, got {e!r}")
        unknown = set(e) - {"model", "parameters"}
        if unknown:
            raise MergeError(f"config: models[{i}]: unknown key {sorted(unknown)[0]!r} (known: model, parameters)")
        label = f"models[{i}] ({e['model']})"
        params = _check_params(e.get("parameters"), method, True, label)
        models.append(ModelEntry(e["model"], params, label))
    params = _check_params(raw.get("parameters"), method, False, "parameters")
    for key, p in METHODS[method].params.items():
        for m in models:
            if p.required and p.per_model and key not in m.params and key not in params:
                raise MergeError(f"{m.label}: no value for required parameter {key!r}")
        if p.required and not p.per_model and key not in params:
            raise MergeError(f"parameters: no value for required parameter {key!r}")
    cfg = MergeConfig(method, base, models, params, DTYPES[dtype] if dtype else None)
    _check_shape_of_merge(cfg)
    return cfg


def _check_shape_of_merge(cfg: MergeConfig) -> None:
    """Which models take part: the task-vector methods merge the models other than the base."""
    for m in cfg.models:  # mergekit's "BASE+ADAPTER": an adapter on the base model
        if "+" in m.name and not os.path.exists(m.name):
            left, right = m.name.split("+", 1)
            if cfg.base is None or os.path.normpath(left) != os.path.normpath(cfg.base):
                raise MergeError(f"{m.label}: BASE+ADAPTER needs BASE to be base_model ({cfg.base!r})")
            m.name, m.adapter_of = right, left
    if cfg.method == "linear":
        return
    if cfg.base is None:
        raise MergeError(f"config: {cfg.method} needs base_model")
    others = [m for m in cfg.models if not same_path(m.name, cfg.base)]
    base_and_one = len(others) == 1 and len(cfg.models) <= 2  # base_model at t=0, the other at t=1
    two_of_base = len(others) == len(cfg.models) == 2          # two models of base_model: first at t=0
    if cfg.method == "slerp" and not (base_and_one or two_of_base):
        raise MergeError(f"config: slerp takes two models (base_model at t=0 and one other, or two others "
                         f"of base_model), got: {', '.join([cfg.base] + [m.name for m in others])}")
    if not others:
        raise MergeError(f"config: {cfg.method}: no model besides base_model to merge")
    cfg.models = others  # mergekit leaves the base out of the task vectors (τ = 0 anyway)


def same_path(a: str, b: str) -> bool:
    return os.path.normpath(os.path.expanduser(a)) == os.path.normpath(os.path.expanduser(b))


def resolve(setting, name: str, t: float):
    """A parameter's value for one tensor, by mergekit's rules (mergekit/config.py evaluate_setting)."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
        x = t * (len(setting) - 1)  # a gradient: piecewise linear over t in [0, 1]
        i0 = int(x)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (x - i0)) * setting[i0] + (x - i0) * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or f in name:
            return resolve(cond["value"], name, t)
    return None


