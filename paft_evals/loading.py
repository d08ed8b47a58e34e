"""What `python -m paft_evals TARGET` evaluates: TARGET -> (model, tokenizer, description).

TARGET is one of

* a peft-format adapter directory (it has adapter_config.json): the base model named by
  the config's base_model_name_or_path (or `base`, which overrides it) is loaded through
  engine.models, then engine.lora.load_adapter wraps it. The adapters stay separate, so the
  preference task can switch them off for a reference model.
* a Hugging Face model directory (config.json + safetensors), e.g. what
  `python -m engine.export` writes for a merged model.
* an engine model name: `builtin:tiny-llama`, `smollm2-135m-instruct`, a .gguf, a hub id.
"""
from __future__ import annotations

import os

import torch

from engine.adapter_config import read_adapter_config
from engine.lora import CONFIG_FILE, load_adapter, merge_lora
from engine.models import load_model_and_tokenizer
from engine.recipe import ModelConfig


def adapter_base(adapter_dir: str) -> str:
    """base_model_name_or_path from an adapter's config (checked whole before the base is loaded)."""
    path = os.path.join(adapter_dir, CONFIG_FILE)
    name = read_adapter_config(adapter_dir)["base_model_name_or_path"]  # damaged or mistyped: one error naming it
    if not name:
        raise ValueError(f"{path}: no base_model_name_or_path; pass --base NAME")
    return name


def load_target(target: str, base: str | None = None, device: torch.device | None = None,
                dtype: str = "auto", keep_adapters: bool = True) -> tuple[object, object, dict]:
    """(model in eval mode, tokenizer, {"target", "kind": adapter|model_dir|name, "base", "adapters"}).

    keep_adapters=False (no task needs the reference model) folds an adapter into float32 weights,
    W += s·B A (engine.lora.merge_lora): the same function up to fp32 rounding, without the
    r-wide side path in each of the ~200 adapted layers. On 2 CPU cores (SmolLM2, r = 16, two runs
    each, 2026-12-03): a (10, 128) forward 2.5-2.8 s folded vs 3.0-3.1 s separate; 10 prompts x 32
    greedy tokens 5.1-6.0 s vs 6.5-6.7 s.
    Weights in bf16/fp16 keep the adapters separate: rounding W + δ there would lose most of δ."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    is_adapter = os.path.isfile(os.path.join(target, CONFIG_FILE))
    if base is not None and not is_adapter:
        raise ValueError(f"--base is only for adapters, and {target!r} has no {CONFIG_FILE}")
    if is_adapter:
        base_name = base or adapter_base(target)
        model, tokenizer = load_model_and_tokenizer(ModelConfig(name=base_name, dtype=dtype), device)
        load_adapter(model, target)
        fold = not keep_adapters and next(model.parameters()).dtype == torch.float32
        if fold:
            merge_lora(model)
        info = {"target": target, "kind": "adapter", "base": base_name,
                "adapters": "folded into fp32 weights" if fold else "separate"}
    else:
        model, tokenizer = load_model_and_tokenizer(ModelConfig(name=target, dtype=dtype), device)
        info = {"target": target, "kind": "model_dir" if os.path.isdir(target) else "name", "base": None,
                "adapters": None}
    model.eval()
    model.config.use_cache = True  # greedy generation reuses the KV cache
    return model, tokenizer, info
