"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021), in peft's file format.

A frozen linear layer y = x Wᵀ + b, W (out, in), gets a trainable low-rank update:

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ        A (r, in), B (out, r), r << min(in, out)
    s = alpha / r                               (rsLoRA: s = alpha / sqrt(r))

A starts kaiming-uniform with a=sqrt(5) (each entry in ±1/sqrt(in), peft's default) or
normal with std 1/r ('gaussian'); B starts at zero, so B A = 0 and the wrapped model
computes exactly the base model at step 0. Only A and B are trained: r·(in + out)
numbers per layer instead of in·out. Dropout acts on the low-rank path only.

Merging folds the update into the weight, W' = W + s · B A, giving a plain nn.Linear
with no inference overhead.

Files are peft's: `adapter_config.json` plus `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` (r, in) and `....lora_B.weight` (out, r),
so an adapter trained here loads with `peft.PeftModel.from_pretrained` and back.
"""
from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from paft_kernels.lora_linear import lora_linear
from engine.recipe import LoRAConfig
from engine.adapter_config import CONFIG_FILE, WEIGHTS_FILE, check_finite, read_adapter_config
from engine.safeio import load_safetensors
from engine.writes import atomic_file, write_text

KEY_PREFIX = "base_model.model."  # peft wraps the model twice: PeftModel.base_model (LoraModel).model


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the trainable update s · B A."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming", generator: torch.Generator | None = None):
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.kernels = "auto"  # "auto" | "cublas" | "triton" | "torch": the LoRA linear route (paft_kernels/lora_linear.py)
        # The factors are the trainable master copy: fp32 even when the base is bf16.
        # skip_init: no throwaway default init (which would also draw from the global RNG).
        # They are initialised on the CPU, so a seed gives the same A on every device.
        self.lora_A = nn.utils.skip_init(nn.Linear, base_layer.in_features, r, bias=False, dtype=torch.float32)
        self.lora_B = nn.utils.skip_init(nn.Linear, r, base_layer.out_features, bias=False, dtype=torch.float32)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / r, generator=generator)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(base_layer.weight.device)
        self.lora_B.to(base_layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, in) -> (B, T, out)
        if self.disabled:
            return self.base_layer(x)
        if isinstance(self.base_layer, nn.Linear):
            # y = x Wᵀ + b + s·dropout(x) Aᵀ Bᵀ by the route `kernels` names (train.kernels): cuBLAS GEMM +
            # in-place addmm_, the fused Triton kernel, or the torch reference (paft_kernels/lora_linear.py).
            p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
            return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A.weight,
                               self.lora_B.weight, self.scaling, p, self.training, backend=self.kernels)
        # Any other frozen base (QLoRA's NF4Linear): base output, then the low-rank path in x's dtype;
        # the cast is differentiable, so gradients still land in the fp32 factors.
        y = self.base_layer(x)
        A = self.lora_A.weight.to(x.dtype)  # (r, in)
        B = self.lora_B.weight.to(x.dtype)  # (out, r)
        return y + F.linear(F.linear(self.dropout(x), A), B) * self.scaling  # (B, T, r) -> (B, T, out)


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def _matches(path: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, path) is not None  # a regex matches the whole path
    return any(path == t or path.endswith("." + t) for t in target_modules)  # a name matches a path's tail


def target_module_names(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Full paths of the nn.Linear modules that `target_modules` selects, in module order."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if target_modules == "all-linear":
        # Every linear layer but the output head (the vocabulary projection), as peft does.
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        picked = [name for name in linear if model.get_submodule(name) is not head]
    else:
        if isinstance(target_modules, str):
            try:
                re.compile(target_modules)
            except re.error as e:
                raise ValueError(f"lora.target_modules: not a valid regex {target_modules!r} ({e})") from None
        picked = [name for name in linear if _matches(name, target_modules)]
    if not picked:
        raise ValueError(f"lora.target_modules: no nn.Linear matches {target_modules!r}; "
                         f"linear modules look like: {', '.join(linear[:5]) or '(none)'}")
    return picked


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int | None = None, wrap=None) -> list[str]:
    """Freeze the whole model, wrap each targeted nn.Linear in a LoRALinear; return their paths.

    `wrap` builds the layer instead of LoRALinear (same arguments) for every target but the LM
    head: engine.qlora.apply_qlora passes QLoRALinear (lora.quantize_base: nf4), then quantizes
    every other linear layer but the head.
    """
    if cfg.quantize_base and wrap is None:
        raise ValueError(f"lora.quantize_base={cfg.quantize_base}: apply the adapter with engine.qlora.apply_qlora")
    if _lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA layers")
    names = target_module_names(model, cfg.target_modules)
    # r larger than a layer's smaller side is an error, not a warning: B A (out, in) has rank at most
    # min(in, out), so the extra rank buys no capacity, still costs memory and optimizer state, and
    # s = alpha / r shrinks the update against the r meant: most likely a typo. One key fixes it.
    for name in names:
        w = model.get_submodule(name).weight  # (out, in)
        if cfg.r > min(w.shape):
            raise ValueError(f"lora.r: {cfg.r} is more than the smaller side of {name} ({w.shape[0]} x {w.shape[1]}): "
                             f"B A has rank at most {min(w.shape)} there, so r > {min(w.shape)} adds no capacity; "
                             f"lower lora.r or leave that layer out of lora.target_modules")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name in names:
        parent_name, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        args = (linear, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, cfg.init, generator)
        # the head stays a plain LoRALinear even when targeted (QLoRA leaves it unquantized: it may be tied)
        layer = wrap(*args) if wrap is not None and linear is not head else LoRALinear(*args)
        setattr(model.get_submodule(parent_name), child, layer)
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable factors, A then B for each LoRA layer, in module order."""
    return [p for _, m in _lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The factors under peft's keys: base_model.model.<path>.lora_A.weight / .lora_B.weight."""
    sd = {}
    for name, m in _lora_modules(model):
        sd[f"{KEY_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        sd[f"{KEY_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return sd


def set_kernels(model: nn.Module, backend: str) -> None:
    """Choose the LoRA linear route of every LoRA layer: "auto", "cublas", "triton" or "torch"."""
    for _, m in _lora_modules(model):
        m.kernels = backend


def kernel_routes(model: nn.Module, device, dtype: torch.dtype) -> dict[str, list[tuple[str, str]]]:
    """{layer family (q_proj, ...): [(route, why), ...] over its layers}: what lora_linear will run."""
    from paft_kernels.lora_linear import describe_route
    routes: dict[str, list[tuple[str, str]]] = {}
    for name, m in _lora_modules(model):
        family = name.rpartition(".")[2]
        K, N = m.lora_A.weight.shape[1], m.lora_B.weight.shape[0]
        routes.setdefault(family, []).append(describe_route(m.kernels, device, K, N, m.r, dtype))
    return routes


def kernel_routes_line(model: nn.Module, device, dtype: torch.dtype) -> str:
    """The start-up line: 'kernels: lora_linear q_proj=cublas, ... (cublas: <why>)', one entry per family."""
    routes = kernel_routes(model, device, dtype)
    parts, whys = [], {}
    for family, choices in routes.items():
        counts: dict[str, int] = {}
        for route, why in choices:
            counts[route] = counts.get(route, 0) + 1
            whys.setdefault(route, set()).add(why)
        parts.append(f"{family}=" + ",".join(r if len(counts) == 1 else f"{r}×{n}" for r, n in counts.items()))
    why = "; ".join(f"{r}: {', '.join(sorted(w))}" for r, w in whys.items())
    return f"kernels: lora_linear {' '.join(parts)} ({why}; {str(dtype).removeprefix('torch.')} on {device})"


@contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block every LoRA layer computes its base layer only (e.g. DPO's reference model)."""
    layers = [m for _, m in _lora_modules(model)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, before):
            m.disabled = d


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """W += s · B A in every LoRA layer, then put the plain nn.Linear back (peft's merge_and_unload)."""
    for name, m in _lora_modules(model):
        if not isinstance(m.base_layer, nn.Linear):  # a QLoRALinear: its base is 4-bit NF4
            raise ValueError(f"merge_lora: {name} has an NF4 base; merge the saved adapter with "
                             f"`python -m engine.export` (it explains the choice of base)")
    for name, m in _lora_modules(model):
        W = m.base_layer.weight  # (out, in)
        delta = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scaling  # (out, r) @ (r, in)
        # Sum in fp32 and round once: adding a small delta to bf16 W in bf16 would lose most of it.
        W.copy_((W.float() + delta.to(W.device)).to(W.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.base_layer)


def _saved_targets(model: nn.Module, cfg: LoRAConfig) -> list[str] | str:
    """target_modules for the config file: the regex as given, else the short names of the wrapped
    layers, or their full paths if the short names would also select other linear layers."""
    if isinstance(cfg.target_modules, str) and cfg.target_modules != "all-linear":
        return cfg.target_modules
    wrapped = [name for name, _ in _lora_modules(model)]
    short = sorted({name.rpartition(".")[2] for name in wrapped})
    inner = (".base_layer", ".lora_A", ".lora_B")  # the nn.Linear parts inside a LoRALinear
    # a frozen linear layer: nn.Linear, or one QLoRA quantized (engine.qlora.NF4Linear says so)
    candidates = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)
                  or ((isinstance(m, nn.Linear) or getattr(m, "frozen_linear", False)) and not name.endswith(inner))]
    return short if [n for n in candidates if _matches(n, short)] == wrapped else wrapped


def save_adapter(model: nn.Module, out_dir: str, cfg: LoRAConfig, base_model_name: str) -> None:
    """Write adapter_config.json and adapter_model.safetensors (peft's format) into out_dir."""
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    if not tensors:
        raise ValueError("save_adapter: the model has no LoRA layers")
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha  # peft writes an int
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
        "r": cfg.r, "lora_alpha": alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
        "target_modules": _saved_targets(model, cfg), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True, "inference_mode": True,
        "modules_to_save": None, "use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
    }
    os.makedirs(out_dir, exist_ok=True)
    with atomic_file(os.path.join(out_dir, WEIGHTS_FILE)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_text(os.path.join(out_dir, CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True) + "\n")


# peft options that only say which layers carry the adapter: merge reads the tensors as they are,
# but wrapping by target_modules would put factors on layers these options leave out.
_WRAPPING_ONLY = ("exclude_modules", "layers_to_transform")


def load_adapter(model: nn.Module, adapter_dir: str) -> LoRAConfig:
    """Wrap `model` as the adapter in adapter_dir says and load its factors; return its LoRAConfig.

    The config is read by engine.adapter_config.read_adapter_config, the checks merge uses too
    (r a positive int, lora_alpha finite, use_rslora a real boolean, ...)."""
    path = os.path.join(adapter_dir, CONFIG_FILE)
    raw = read_adapter_config(adapter_dir)
    for key in _WRAPPING_ONLY:
        if raw.get(key) not in (None, False, "none", {}, []):
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported (plain LoRA only)")
    init = raw["init_lora_weights"]
    cfg = LoRAConfig(r=raw["r"], alpha=raw["lora_alpha"], dropout=raw["lora_dropout"], rslora=raw["use_rslora"],
                     target_modules=raw["target_modules"], init="gaussian" if init == "gaussian" else "kaiming")
    try:
        apply_lora(model, cfg)
    except ValueError as e:  # e.g. the adapter targets modules this model does not have
        raise ValueError(f"{path}: {e}") from None

    weights = os.path.join(adapter_dir, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: adapter weights not found")
    # Older peft files keep the adapter name in the key: ....lora_A.default.weight
    loaded = {re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", k): v for k, v in load_safetensors(weights).items()}
    copy_lora_tensors(model, loaded, weights)
    return cfg


@torch.no_grad()
def copy_lora_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy factors saved under peft's keys into the model's LoRA layers; every key must match exactly
    (so each factor has the shape the config's r gives), and every value must be finite."""
    params = lora_state_dict(model)
    for key in tensors:
        if key not in params:
            raise ValueError(f"{source}: unexpected key {key} (no such LoRA layer in the model)")
    for key, p in params.items():
        if key not in tensors:
            raise ValueError(f"{source}: missing key {key}")
        if tensors[key].shape != p.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, "
                             f"the model expects {tuple(p.shape)}")
        check_finite(tensors[key], key, source)
    for key, p in params.items():  # only once all are checked: a refused adapter changes nothing
        p.copy_(tensors[key])  # p is a detached view of the parameter, so this writes into it
