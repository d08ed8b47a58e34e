"""Write a merge: an HF model directory (write_model) or one exact LoRA adapter (write_adapter),
built beside --out and renamed into place (run).

Every file goes through engine.safeio's atomic writers, inside a directory that engine.safeio's
atomic_dir renames into place only once it is complete: a failed merge leaves no directory that
looks complete, and --overwrite keeps the old output until the new one is in place.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile

import torch

from engine.model_out import TOKENIZER_FILES, claim_model_out, is_model_file
from engine.rounding import LOSSY_BOUND, RoundingLoss
from engine.writes import atomic_dir, atomic_write, save_safetensors, temporary_dir_prefix, write_text
from merge.config import load_config
from merge.deltas import ADAPTER_CONFIG, ADAPTER_PREFIX, ADAPTER_WEIGHTS, Adapter, MergeError, remove_tree
from merge.plan import Plan, merge_tensor, prepare

SHARD_BYTES = 2_000_000_000  # ≤ 2 GB per output file
COPIED_FILES = ("generation_config.json",) + TOKENIZER_FILES  # from the base, when it has them
COMMAND = "python -m merge"
TEMPORARIES = ("scratch", "tmp", "old")  # what a merge builds beside --out: .<out>.<kind>-XXXXXXXX


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

    def __init__(self, f, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        """f: a file open for binary writing (engine.writes.atomic_write's)."""
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in specs:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # pad so the data starts 8-byte aligned, as safetensors does
        self.expected = [(n, d, tuple(s)) for n, d, s in specs]
        self.f = f
        self.f.write(len(text).to_bytes(8, "little"))
        self.f.write(text)
        self.written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp = self.expected[self.written]
        if (name, tensor.dtype, tuple(tensor.shape)) != exp:  # the header promised exactly this
            raise RuntimeError(f"internal: wrote {name} {tensor.dtype} {tuple(tensor.shape)}, header has {exp}")
        self.f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self.written += 1

    def finish(self) -> None:
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
        with atomic_write(os.path.join(out, file), "wb") as f:
            writer = StreamingSafetensors(f, shard)
            for name, dtype, _ in shard:
                merged = merge_tensor(plan, name, seed)
                rounded = merged.to(dtype)  # the one rounding
                check_finite(name, merged, rounded)
                if dtype in (torch.bfloat16, torch.float16) and merged.is_floating_point():
                    base = plan.reference.read(name)  # θ₀ as stored: the update is merged − θ₀
                    losses.setdefault(dtype, RoundingLoss(dtype)).add(name, merged, base)
                writer.write(name, rounded)
            writer.finish()
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
    copy_base_files(plan, out)
    return len(shards)


def check_finite(name: str, merged: torch.Tensor, rounded: torch.Tensor) -> None:
    """MergeError unless every value of a merged tensor is finite, in fp32 and in the output dtype.

    A NaN or inf in one model, or a parameter that overflows, would otherwise be written with exit
    0, and export and evals downstream would report on a broken model as if it were one."""
    if not rounded.is_floating_point() or torch.isfinite(rounded).all():
        return
    if not torch.isfinite(merged).all():
        raise MergeError(f"tensor {name}: the merge is not finite (nan or inf); check the models' weights and "
                         f"the merge parameters (nothing was written)")
    raise MergeError(f"tensor {name}: finite in fp32 but overflows {str(rounded.dtype).removeprefix('torch.')} "
                     f"(set dtype: float32; nothing was written)")


def copy_base_files(plan: Plan, out: str) -> None:
    """The reference model's generation config and tokenizer files, copied as they are; a base
    without tokenizer files gives a merge without them, which is said (AutoTokenizer will not
    load the merged folder by itself)."""
    copied = []
    for file in COPIED_FILES:
        src = os.path.join(plan.reference.path, file)
        if os.path.isfile(src):
            with open(src, "rb") as source, atomic_write(os.path.join(out, file), "wb") as f:
                shutil.copyfileobj(source, f)
            copied.append(file)
    if not set(copied) & set(TOKENIZER_FILES):
        print(f"warning: {plan.reference.label} ({plan.reference.path}) has no tokenizer files, so the merge "
              f"has none: copy them into the output before loading it with AutoTokenizer", file=sys.stderr)


def _write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
        for key, merged in ((a_key, torch.cat(As, dim=0)), (b_key, torch.cat(Bs, dim=1))):
            rounded = merged.to(dtype).contiguous()
            check_finite(f"{ADAPTER_PREFIX}{module}.{key}", merged, rounded)
            tensors[f"{ADAPTER_PREFIX}{module}.{key}"] = rounded
    save_safetensors(tensors, os.path.join(out, ADAPTER_WEIGHTS), metadata={"format": "pt"})
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


# ---------------------------------------------------------------------------- a whole merge

def run(config_path: str, out: str, as_adapter: bool = False, seed: int = 0, overwrite: bool = False,
        allow_lossy: bool = False) -> Plan:
    """Merge as the config says into `out` (atomically). Raises MergeError on bad input, OutputError
    (engine.outputs) on an --out that cannot be written, OSError when a write fails.

    `out` is held for the whole merge (engine.model_out.claim_model_out: one merge at a time, an
    --out inside an input refused, a symlink's target written, a killed merge's temporaries
    removed). An existing non-empty `out` is refused unless `overwrite`, and even then unless it
    holds only a model folder's files; the new result is complete beside it before the old one
    is moved away, so a failed merge keeps the old output. A model written in a 16-bit dtype that
    keeps less than 1 - LOSSY_BOUND of the merge's update (see engine/rounding.py) is refused
    unless `allow_lossy`, and nothing is written."""
    cfg = load_config(config_path)
    inputs = [cfg.base] + [m.name for m in cfg.models] + [m.adapter_of for m in cfg.models]
    with claim_model_out(out, COMMAND, overwrite, inputs, TEMPORARIES) as dest:
        # Where models that are not safetensors directories yet (builtin:, .gguf) are materialised.
        scratch = tempfile.mkdtemp(prefix=temporary_dir_prefix(dest, "scratch"), dir=os.path.dirname(dest))
        try:
            plan = prepare(cfg, scratch)
            with atomic_dir(dest, replace=overwrite, own=is_model_file) as tmp:  # .<out>.tmp-XXXX, renamed at the end
                if as_adapter:
                    write_adapter(plan, tmp)
                else:
                    write_model(plan, tmp, seed)
                _check_rounding(plan, allow_lossy)
            return plan
        finally:
            remove_tree(scratch)


def _check_rounding(plan: Plan, allow_lossy: bool) -> None:
    """Refuse (MergeError) a 16-bit output that loses more than LOSSY_BOUND of the update; warn if allowed."""
    for loss in plan.rounding:
        if loss.lost > LOSSY_BOUND:
            what = (f"dtype {str(loss.dtype).removeprefix('torch.')}: {loss.summary()}; the saved model "
                    f"would not be the merge")
            if not allow_lossy:
                raise MergeError(f"{what} (set dtype: float32, or pass --allow-lossy to save it anyway)")
            print(f"warning: {what} (--allow-lossy)", file=sys.stderr)
