"""An adapter's adapter_config.json, read and checked once for every command that loads adapters.

engine.lora.load_adapter (evals, export; resume's factors go through engine.lora.copy_lora_tensors)
and merge.deltas.Adapter read the same peft-format file, and both compute the update

    τ = s · B A        s = lora_alpha / r   (use_rslora: lora_alpha / √r)

from it. The file is JSON written by whatever tool the user had, or by hand, so it can hold anything
JSON can: `r: null` or `[8]` (a TypeError deep in a layer), `r: 0` (a division by zero),
`lora_alpha: NaN` or `1e300` (a model that computes NaN, saved with exit 0), `use_rslora: "false"`
(a non-empty string, which Python's bool() reads as true: the wrong scale, silently). So
`read_adapter_config` checks every key the update depends on, by type and range, and returns the
values as the types the code expects; `check_finite` refuses a factor holding NaN or inf. Every
problem is one ValueError naming the file and the key (or tensor), which each command line prints
as one `error:` line with exit status 2. Two readers with two sets of checks would drift apart: this
module is the only place an adapter config is interpreted.
"""
from __future__ import annotations

import math
import os

import torch

from engine.safeio import read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

MAX_RANK = 1 << 16   # more than any layer's smaller side in today's models; r only needs to be sane here
MAX_ALPHA = 1 << 16  # s = alpha / r above this is no fine-tune: the update swamps the weights (and fp16 overflows)

# peft options that change what an adapter computes, so that τ = s·B A is not its update; only plain
# LoRA is read. Each is harmless when missing, null, false, empty or "none".
UNSUPPORTED = ("bias", "modules_to_save", "use_dora", "rank_pattern", "alpha_pattern", "lora_bias",
               "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora",
               "alora_invocation_tokens", "arrow_config", "velora_config", "monteclora_config", "kasa_config",
               "use_bdlora")
# init_lora_weights values that leave the base weights as they were (pissa, olora, loftq, corda ... move
# part of the base into the factors, so the base plus s·B A is no longer the trained model)
PLAIN_INITS = (True, False, "gaussian")


def _number(raw: dict, key: str, default, path: str, kind: type) -> float | int:
    """raw[key] (default when missing) as a real number of `kind` (int: no floats); bools, null, strings,
    lists and non-finite values are refused: JSON has no other way to say 'a number'."""
    value = raw.get(key, default)
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{path}: {key}: expected {what}, got {value!r}")
    if kind is float:
        if isinstance(value, int):
            value = float(value) if abs(value) < 1e308 else math.inf  # an int past float's range: not finite
        if not math.isfinite(value):
            raise ValueError(f"{path}: {key}: must be a finite number, got {value!r}")
    return value


def _flag(raw: dict, key: str, path: str) -> bool:
    """raw[key] as a JSON boolean (false when missing): the string "false" is refused, not read as true."""
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{path}: {key}: expected true or false, got {value!r}")
    return value


def read_adapter_config(adapter_dir: str) -> dict:
    """adapter_dir/adapter_config.json, checked; the raw mapping with the keys the update depends on
    replaced by checked values: r (int), lora_alpha (float), lora_dropout (float), use_rslora (bool),
    fan_in_fan_out (False), target_modules (a list of names or one regex), init_lora_weights,
    base_model_name_or_path (a string or None). ValueError (FileNotFoundError) names the file and key."""
    path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: adapter config not found")
    raw = read_json(path)  # engine.safeio: damaged, too deep -> one error naming the file
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type is {raw.get('peft_type')!r}, only 'LORA' is supported")
    for key in UNSUPPORTED:
        if raw.get(key) not in (None, False, "none", {}, []):
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported (plain LoRA only)")
    init = raw.get("init_lora_weights", True)
    if not any(init is ok or (isinstance(ok, str) and init == ok) for ok in PLAIN_INITS):
        raise ValueError(f"{path}: init_lora_weights={init!r} is not supported (it changes the base weights, "
                         f"so base + s·B A is not the trained model)")

    r = _number(raw, "r", 8, path, int)  # 8 and 8: peft's defaults
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"{path}: r: must be a positive integer (at most {MAX_RANK}), got {r!r}")
    alpha = _number(raw, "lora_alpha", 8, path, float)
    if not 0 < alpha <= MAX_ALPHA:
        raise ValueError(f"{path}: lora_alpha: must be in (0, {MAX_ALPHA}], got {alpha!r}")
    dropout = _number(raw, "lora_dropout", 0.0, path, float)
    if not 0 <= dropout < 1:
        raise ValueError(f"{path}: lora_dropout: must be in [0, 1), got {dropout!r}")
    rslora = _flag(raw, "use_rslora", path)
    if _flag(raw, "fan_in_fan_out", path):
        raise ValueError(f"{path}: fan_in_fan_out=True is not supported (plain LoRA only)")

    targets = raw.get("target_modules")
    names = targets if isinstance(targets, list) else [targets]
    if not targets or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"{path}: target_modules: expected a non-empty list of module names or a regex, "
                         f"got {targets!r}")
    base = raw.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{path}: base_model_name_or_path: expected a model name or path, got {base!r}")
    return {**raw, "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
            "fan_in_fan_out": False, "target_modules": targets, "init_lora_weights": init,
            "base_model_name_or_path": base or None}


def lora_scale(config: dict) -> float:
    """s of a checked config: lora_alpha / r, or lora_alpha / √r with use_rslora."""
    r = config["r"]
    return config["lora_alpha"] / (math.sqrt(r) if config["use_rslora"] else r)


def check_finite(tensor: torch.Tensor, key: str, source: str) -> None:
    """Refuse a factor holding NaN or inf: every weight it touches would become NaN, and the model
    would be saved, scored or merged with exit 0."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{source}: tensor {key}: {bad} of {tensor.numel()} values are NaN or inf")
