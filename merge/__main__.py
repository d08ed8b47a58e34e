"""Merge models and LoRA adapters, streaming tensor by tensor.

    python -m merge CONFIG.yaml --out DIR [--as-adapter] [--seed N] [--overwrite] [--allow-lossy]

CONFIG.yaml is a mergekit config (the keys mergekit users know):

    merge_method: ties            # linear | task_arithmetic | ties | dare_linear | dare_ties | slerp
    base_model: smollm2-135m-instruct   # an HF dir, builtin:tiny-llama, smollm2-135m-instruct, a .gguf
    models:
      - model: out/run-a/adapter  # a full HF checkpoint dir or a peft LoRA adapter dir
        parameters: {weight: 1.0, density: 0.5}
      - model: out/run-b/adapter  # (mergekit's BASE+ADAPTER spelling is read too)
        parameters: {weight: 0.5, density: 0.5}
    parameters: {lambda: 1.0, normalize: true}   # method-level defaults; a model's own override
    dtype: bfloat16               # bfloat16 | float16 | float32 (default: the base's dtypes)

Parameters, with mergekit's defaults:
    linear           weight (required), normalize (true)
    task_arithmetic  weight (required), lambda (1), normalize (false); density accepted, unused
    ties             weight (required), density (1), lambda (1), normalize (true)
    dare_linear      weight (required), density (1), lambda (1), normalize (false), rescale (true)
    dare_ties        weight (required), density (1), lambda (1), normalize (false), rescale (true)
    slerp            t (required): base_model at t = 0, the other model at t = 1; or, with two
                     models besides base_model (e.g. an SFT and a DPO adapter of that base, as
                     Thakkar et al. 2024 merge them), the first at t = 0 and the second at t = 1
A value is a number, a gradient [v0, v1, ...] interpolated over the layers (t = layer/(L−1);
tensors outside the layers get v0), or a list of {filter: SUBSTRING, value: ...}, the first
whose filter occurs in the tensor name winning: mergekit's rules. `int8_mask` is accepted
and ignored (our masks are booleans already).

Each weight is read from every model, merged in fp32 and rounded once to the output dtype,
then written; an adapter's τ = s·B A is formed for that weight only (merge/deltas.py). The
output is an HF model directory (safetensors shards of ≤ 2 GB, config.json, generation config
and tokenizer files from the base) that AutoModelForCausalLM.from_pretrained loads.

--as-adapter (linear and task_arithmetic over adapters only) writes one exact LoRA adapter
instead: every merged weight is θ₀ + Σᵢ cᵢ sᵢ Bᵢ Aᵢ with cᵢ the adapter's coefficient
(λ·wᵢ, /Σw when normalized), and

    Σᵢ cᵢ sᵢ Bᵢ Aᵢ = [c₁s₁B₁ | … | cₙsₙBₙ] [A₁; …; Aₙ]

so A is stacked along the rank, B side by side with cᵢsᵢ folded in, r = Σ rᵢ and
lora_alpha = r (scale 1). A module an adapter does not touch gets a zero block.

Output is written into a temporary directory beside --out and renamed into place at the
end: a failed merge leaves no directory that looks complete. An existing --out is refused
unless --overwrite. A bfloat16/float16 output is checked against the fp32 merge (the share of
the update the rounding loses, merge/rounding.py): past 1 % it is refused unless --allow-lossy. Bad input is one
`error: ...` line on stderr naming the model and the tensor, and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

# OpenMP worker threads spin while they wait for work by default. On a machine shared with
# other jobs a spinning thread burns the core another job (or our other thread) needs, and
# we measured the same merge going from 3 s to 15-60 s. The merge is memory-bound with a
# serial selection step, so passive waiting costs little. libgomp reads this when torch loads
# it: it must be set before the first `import torch` (a value you set yourself wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from merge import methods as M  # noqa: E402
from merge.rounding import LOSSY_BOUND, RoundingLoss  # noqa: E402
from merge.deltas import (ADAPTER_CONFIG, ADAPTER_PREFIX, ADAPTER_WEIGHTS, HEAD, Adapter, Checkpoint,  # noqa: E402
                          MergeError, check_against_base, open_model, remove_tree, task_vector, weight)

# parameter -> (kind, default); a default of None means required
_WEIGHT = {"weight": ("number", None)}
_GTA = {**_WEIGHT, "lambda": ("number", 1.0)}
_SPARSE = {"density": ("density", 1.0), "int8_mask": ("bool", False)}
METHODS: dict[str, dict[str, tuple[str, object]]] = {
    "linear": {**_WEIGHT, "normalize": ("bool", True)},
    # mergekit declares density for every task-arithmetic method; here it has no effect
    "task_arithmetic": {**_GTA, **_SPARSE, "normalize": ("bool", False)},
    "ties": {**_GTA, **_SPARSE, "normalize": ("bool", True)},
    "dare_linear": {**_GTA, **_SPARSE, "normalize": ("bool", False), "rescale": ("bool", True)},
    "dare_ties": {**_GTA, **_SPARSE, "normalize": ("bool", False), "rescale": ("bool", True)},
    "slerp": {"t": ("unit", None)},
}
PER_MODEL = ("weight", "density")  # the parameters a model entry may set for itself
TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHARD_BYTES = 2_000_000_000  # ≤ 2 GB per output file
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                "chat_template.json")


# ---------------------------------------------------------------------------- the config

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


def _scalars(setting, where: str):
    """Every scalar in a mergekit parameter setting (number, gradient list, filtered list)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float)):
        yield setting
    elif isinstance(setting, list) and setting:
        for e in setting:
            if isinstance(e, dict):
                unknown = set(e) - {"filter", "value"}
                if unknown or "value" not in e:
                    raise MergeError(f"{where}: a filtered value is {{filter: ..., value: ...}}, got {e}")
                yield from _scalars(e["value"], where)
            elif isinstance(e, (bool, int, float)):
                yield e
            else:
                raise MergeError(f"{where}: not a number, gradient or filtered list: {e!r}")
    else:
        raise MergeError(f"{where}: not a number, gradient or filtered list: {setting!r}")


def _check_value(key: str, kind: str, setting, where: str) -> None:
    for v in _scalars(setting, where):
        if kind == "bool":
            if not isinstance(v, bool):
                raise MergeError(f"{where}: {key} must be true or false, got {v!r}")
        elif isinstance(v, bool):
            raise MergeError(f"{where}: {key} must be a number, got {v!r}")
        elif kind == "density" and not 0 < v <= 1:
            raise MergeError(f"{where}: density must be in (0, 1], got {v}")
        elif kind == "unit" and not 0 <= v <= 1:
            raise MergeError(f"{where}: t must be in [0, 1], got {v}")


def _check_params(params, method: str, allowed: tuple[str, ...] | None, where: str) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise MergeError(f"{where}: parameters must be a mapping, got {params!r}")
    spec = METHODS[method]
    for key, setting in params.items():
        if key not in spec or (allowed is not None and key not in allowed):
            ok = [k for k in spec if allowed is None or k in allowed]
            raise MergeError(f"{where}: unknown parameter {key!r} for {method} (known: {', '.join(ok) or 'none'})")
        _check_value(key, spec[key][0], setting, where)
    return params


def load_config(path: str) -> MergeConfig:
    import yaml
    if not os.path.isfile(path):
        raise MergeError(f"config: file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise MergeError(f"config: {path}: not valid YAML ({str(e).splitlines()[0]})") from None
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
        params = _check_params(e.get("parameters"), method, PER_MODEL, label)
        models.append(ModelEntry(e["model"], params, label))
    params = _check_params(raw.get("parameters"), method, None, "parameters")
    for key, (_, default) in METHODS[method].items():
        for m in models:
            if default is None and key in PER_MODEL and key not in m.params and key not in params:
                raise MergeError(f"{m.label}: no value for required parameter {key!r}")
        if default is None and key not in PER_MODEL and key not in params:
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
    others = [m for m in cfg.models if not _same(m.name, cfg.base)]
    base_and_one = len(others) == 1 and len(cfg.models) <= 2  # base_model at t=0, the other at t=1
    two_of_base = len(others) == len(cfg.models) == 2          # two models of base_model: first at t=0
    if cfg.method == "slerp" and not (base_and_one or two_of_base):
        raise MergeError(f"config: slerp takes two models (base_model at t=0 and one other, or two others "
                         f"of base_model), got: {', '.join([cfg.base] + [m.name for m in others])}")
    if not others:
        raise MergeError(f"config: {cfg.method}: no model besides base_model to merge")
    cfg.models = others  # mergekit leaves the base out of the task vectors (τ = 0 anyway)


def _same(a: str, b: str) -> bool:
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


# ---------------------------------------------------------------------------- the plan

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
        default = METHODS[self.cfg.method][key][1]
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
        if isinstance(m, Adapter) and m.base_name and cfg.base and not _same(m.base_name, cfg.base):
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
    return Plan(cfg, reference, models, names, tied, num_layers)


# ---------------------------------------------------------------------------- one tensor

def merge_tensor(plan: Plan, name: str, seed: int) -> torch.Tensor:
    """The merged value of one weight, in fp32 (fp64 stays fp64); the caller rounds it."""
    cfg, entries = plan.cfg, plan.cfg.models
    stored = plan.reference.read(name)
    if not stored.is_floating_point():
        return stored  # an integer buffer: nothing to merge
    base = stored.float() if stored.dtype != torch.float64 else stored
    method = cfg.method
    if method == "linear":
        tensors = [weight(m, name, base) for m in plan.models]
        return M.linear(tensors, [plan.param("weight", name, e) for e in entries], plan.param("normalize", name))
    if method == "slerp":
        start = base if len(plan.models) == 1 else weight(plan.models[0], name, base)
        return M.slerp(start, weight(plan.models[-1], name, base), plan.param("t", name))

    deltas = [task_vector(m, name, base) for m in plan.models]
    if all(d is None for d in deltas):
        return base  # no model changes this weight (adapters that do not touch it): τ = 0
    deltas = [torch.zeros_like(base) if d is None else d for d in deltas]
    w = [plan.param("weight", name, e) for e in entries]
    lam = plan.param("lambda", name)
    normalize = plan.param("normalize", name)
    if method == "task_arithmetic":
        return M.task_arithmetic(base, deltas, w, lam, normalize)
    density = [plan.param("density", name, e) for e in entries]
    if method == "ties":
        return M.ties(base, deltas, w, density, lam, normalize)
    gen = M.tensor_generator(name, seed)
    rescale = plan.param("rescale", name)
    fn = M.dare_linear if method == "dare_linear" else M.dare_ties
    return fn(base, deltas, w, density, gen, lam, normalize, rescale)


# ---------------------------------------------------------------------------- writing safetensors

_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


class StreamingSafetensors:
    """Write a safetensors file tensor by tensor, without holding the tensors.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's
    dtype, shape and byte range, then the raw bytes. Shapes and dtypes are known before any
    tensor is computed, so the header goes first and each tensor's bytes are appended as soon
    as it exists; safetensors.torch.save_file would need all of them in memory at once.
    """

    def __init__(self, path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in specs:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # pad so the data starts 8-byte aligned, as safetensors does
        self.expected = [(n, d, tuple(s)) for n, d, s in specs]
        self.f = open(path, "wb")
        self.f.write(len(text).to_bytes(8, "little"))
        self.f.write(text)
        self.written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp = self.expected[self.written]
        if (name, tensor.dtype, tuple(tensor.shape)) != exp:  # the header promised exactly this
            raise RuntimeError(f"internal: wrote {name} {tensor.dtype} {tuple(tensor.shape)}, header has {exp}")
        self.f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self.written += 1

    def close(self) -> None:
        self.f.close()
        if self.written != len(self.expected):
            raise RuntimeError(f"internal: {self.written} of {len(self.expected)} tensors written")


def _out_dtype(plan: Plan, name: str) -> torch.dtype:
    stored = plan.reference.dtype(name)
    return plan.cfg.dtype if plan.cfg.dtype is not None and stored.is_floating_point else stored


def write_model(plan: Plan, out: str, seed: int) -> int:
    """Merge every tensor into `out` as HF safetensors shards; return the number of shards."""
    specs = [(n, _out_dtype(plan, n), plan.reference.shape(n)) for n in plan.names]
    shards, size = [[]], 0
    for spec in specs:  # greedy, in order: a new shard when the next tensor would pass the limit
        nbytes = math.prod(spec[2]) * spec[1].itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    losses: dict[torch.dtype, RoundingLoss] = {}  # how much of the merge's update a 16-bit output keeps
    for file, shard in zip(files, shards):
        writer = StreamingSafetensors(os.path.join(out, file), shard)
        try:
            for name, dtype, _ in shard:
                merged = merge_tensor(plan, name, seed)
                if dtype in (torch.bfloat16, torch.float16) and merged.is_floating_point():
                    base = plan.reference.read(name)  # θ₀ as stored: the update is merged − θ₀
                    losses.setdefault(dtype, RoundingLoss(dtype)).add(name, merged, base)
                writer.write(name, merged.to(dtype))  # the one rounding
        finally:
            writer.f.close()
        writer.close()
    plan.rounding = list(losses.values())
    if len(shards) > 1:
        total = sum(math.prod(s) * d.itemsize for _, d, s in specs)
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f for f, shard in zip(files, shards) for n, _, _ in shard}}
        _write_json(os.path.join(out, "model.safetensors.index.json"), index)

    config = dict(plan.reference.config)
    if config:
        if plan.cfg.dtype is not None:
            config["dtype"] = str(plan.cfg.dtype).removeprefix("torch.")
            if "torch_dtype" in config:
                config["torch_dtype"] = config["dtype"]
        config["tie_word_embeddings"] = plan.tied
        _write_json(os.path.join(out, "config.json"), config)
    for file in COPIED_FILES:
        src = os.path.join(plan.reference.path, file)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out, file))
    return len(shards)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ---------------------------------------------------------------------------- --as-adapter

def write_adapter(plan: Plan, out: str) -> int:
    """The exact concatenated adapter of a linear / task_arithmetic merge of adapters; returns r."""
    cfg = plan.cfg
    if cfg.method not in ("linear", "task_arithmetic"):
        raise MergeError(f"--as-adapter: only linear and task_arithmetic are exact as one adapter, not {cfg.method}")
    for m, e in zip(plan.models, cfg.models):
        if not isinstance(m, Adapter):
            raise MergeError(f"--as-adapter: {e.label} is a full model; every model must be a LoRA adapter")
    targets = [n for n in plan.names if any(n in m.targets for m in plan.models)]
    kinds = {n: next(m.targets[n]["embedding"] for m in plan.models if n in m.targets) for n in targets}
    r_total = sum(m.r for m in plan.models)
    dtype = cfg.dtype or torch.float32
    tensors = {}
    for name in targets:
        w = [plan.param("weight", name, e) for e in cfg.models]
        if cfg.method == "linear":
            total = sum(w)
            if not plan.param("normalize", name) and abs(total - 1) > 1e-6:
                raise MergeError(f"--as-adapter: tensor {name}: linear without normalize scales the base by "
                                 f"Σw = {total}; that is no adapter (set normalize: true or weights summing to 1)")
            coef = [wi / total for wi in w] if abs(total) >= 1e-8 else w
        else:
            total = sum(w) if plan.param("normalize", name) and abs(sum(w)) >= 1e-8 else 1.0
            coef = [plan.param("lambda", name) * wi / total for wi in w]
        As, Bs = [], []
        for m, c in zip(plan.models, coef):
            ab = m.factors(name)
            if ab is None:  # this adapter leaves the module alone: a zero block keeps r uniform
                a_shape, b_shape = _factor_shapes(plan.reference.shape(name), m.r, kinds[name])
                ab = torch.zeros(a_shape), torch.zeros(b_shape)
            A, B = ab
            if m.targets.get(name, {}).get("embedding", kinds[name]) != kinds[name]:
                raise MergeError(f"--as-adapter: tensor {name}: adapters disagree on embedding vs linear LoRA")
            As.append(A)
            Bs.append(B * (c * m.scale))  # fold cᵢ·sᵢ into B, in fp32
        module = name.removesuffix(".weight")
        a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if kinds[name] else ("lora_A.weight", "lora_B.weight"))
        tensors[f"{ADAPTER_PREFIX}{module}.{a_key}"] = torch.cat(As, dim=0).to(dtype).contiguous()
        tensors[f"{ADAPTER_PREFIX}{module}.{b_key}"] = torch.cat(Bs, dim=1).to(dtype).contiguous()
    from safetensors.torch import save_file
    save_file(tensors, os.path.join(out, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    first = plan.models[0].config
    config = {
        "peft_type": "LORA", "task_type": first.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": cfg.base, "r": r_total, "lora_alpha": r_total, "use_rslora": False,
        "lora_dropout": first.get("lora_dropout", 0.0),
        # full module paths: peft and engine.lora match a target by equality or as a path's tail
        "target_modules": [n.removesuffix(".weight") for n in targets],
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
    }
    _write_json(os.path.join(out, ADAPTER_CONFIG), config)
    return r_total


def _factor_shapes(weight_shape, r, embedding):
    rows, cols = weight_shape
    return ((r, rows), (cols, r)) if embedding else ((r, cols), (rows, r))


# ---------------------------------------------------------------------------- CLI

def run(config_path: str, out: str, as_adapter: bool = False, seed: int = 0, overwrite: bool = False,
        allow_lossy: bool = False) -> Plan:
    """Merge as the config says into `out` (atomically). Raises MergeError on bad input.

    An existing non-empty `out` is refused unless `overwrite`; then the new result is complete
    beside it before the old one is moved away, so a failed merge keeps the old output. A model
    written in a 16-bit dtype that keeps less than 1 - LOSSY_BOUND of the merge's update (see
    merge/rounding.py) is refused unless `allow_lossy`, and nothing is written."""
    cfg = load_config(config_path)
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise MergeError(f"--out: {out} is a file, not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise MergeError(f"--out: {out} already exists; remove it, choose another directory, or pass --overwrite")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.scratch-", dir=parent)
    tmp = old = None
    try:
        plan = prepare(cfg, scratch)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
        if as_adapter:
            write_adapter(plan, tmp)
        else:
            write_model(plan, tmp, seed)
        for loss in plan.rounding:
            if loss.lost > LOSSY_BOUND:
                what = (f"dtype {str(loss.dtype).removeprefix('torch.')}: {loss.summary()}; the saved model "
                        f"would not be the merge")
                if not allow_lossy:
                    raise MergeError(f"{what} (set dtype: float32, or pass --allow-lossy to save it anyway)")
                print(f"warning: {what} (--allow-lossy)", file=sys.stderr)
        if os.path.isdir(out):
            if os.listdir(out):  # --overwrite: keep the old output until the new one is in place
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
                os.rmdir(old)
                os.replace(out, old)
            else:
                os.rmdir(out)
        os.replace(tmp, out)
        tmp = None
        return plan
    finally:
        remove_tree(tmp)
        remove_tree(old)
        remove_tree(scratch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="mergekit-style YAML")
    parser.add_argument("--out", required=True, help="output directory (must not exist, or be empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (once the new merge is complete)")
    parser.add_argument("--allow-lossy", action="store_true",
                        help=f"save a 16-bit dtype even when it loses more than {LOSSY_BOUND:.0%} of the update")
    parser.add_argument("--as-adapter", action="store_true",
                        help="write one exact LoRA adapter (linear / task_arithmetic over adapters)")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's per-tensor masks (default 0)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        with torch.no_grad():  # scoped: main() is also called in-process (tests), never leak grad mode
            plan = run(args.config, args.out, args.as_adapter, args.seed, args.overwrite, args.allow_lossy)
    except (MergeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for loss in plan.rounding:
        print(f"merge: {loss.summary()}", file=sys.stderr)
    what = "adapter" if args.as_adapter else f"{len(plan.names)} tensors"
    print(f"merge: {plan.cfg.method} of {len(plan.models)} model(s) -> {args.out} ({what}, "
          f"{time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
