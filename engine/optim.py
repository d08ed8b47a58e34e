"""Optimizer and learning-rate schedule.

AdamW (Loshchilov & Hutter) over the trainable parameters only: with LoRA
these are the factors A and B, a fraction of a percent of the model.

`train.optimizer` picks the implementation:

    adamw               AdamW (paft_kernels.prox_adamw.ProxAdamW: one flat buffer, one fused step; see
                        build_optimizer); moments m, v in fp32: 8 bytes per trainable parameter
    paged_adamw_32bit   bitsandbytes, the same update; moments of large tensors (>= 1e5 numbers)
                        live in CUDA unified memory, which the driver pages out to CPU RAM
                        under GPU memory pressure instead of failing with out-of-memory
    paged_adamw_8bit    the same, with m and v stored as 8-bit codes plus one fp32 scale per
                        256 numbers (blockwise dynamic quantization): ~2 bytes per parameter.
                        Tensors under 4096 numbers keep 32-bit moments

QLoRA uses the paged optimizers to survive memory spikes (long sequences). With LoRA the
moments are small anyway (8 bytes × r·(in+out) per layer), so adamw is the default.
The paged ones exist only on CUDA: asking for them without it is an error, not a silent
fallback to adamw, so a recipe never trains with an optimizer it did not name.

The schedule is a pure function of the optimizer step, so resuming needs no
scheduler object state, only the step number:

    warmup:   lr(t) = peak · (t + 1) / warmup              for t < warmup
    constant: lr(t) = peak
    linear:   lr(t) = peak · (1 − p)                        p = (t − warmup) / (T − warmup)
    cosine:   lr(t) = peak · ½ · (1 + cos(π · p))

`t` counts optimizer steps from 0 and `T` is `train.max_steps`; the value for
step t is the one used by the update that step t performs.
"""
from __future__ import annotations

import math

import torch

from engine.recipe import TrainConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, l1: float = 0.0,
                    announce=print) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names, over `params`, with the recipe's AdamW settings.

    adamw (and any l1 > 0, recipe `l1.on: factors`): paft_kernels.prox_adamw.ProxAdamW. The
    factors and their gradients are moved into one flat fp32 buffer and one step is one
    prox_adamw_step over it: AdamW, then the soft threshold p ← sign(p)·max(|p| − lr·l1, 0)
    when l1 > 0. On CUDA that is one Triton launch; on CPU the torch op sequence of
    torch.optim.AdamW(foreach=False), run once over the flat buffer instead of once per
    factor: the same arithmetic element by element (bit-identical; the bit-exact resume test
    relies on an update being the same arithmetic on every platform) and faster on the
    quickstart's 420 factors (docs/BENCHMARKS.md, the optimizer step on CPU: measured 150 ms against 1144-1530 ms for
    foreach=False and 387-467 ms for foreach=True, 2 threads).
    FSDP2 shards each factor into a DTensor of its own, which cannot live in a shared flat
    buffer: there it falls back to torch.optim.AdamW(foreach=False) and says so.
    `announce` receives the one start-up line that says which optimizer and route run.
    """
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw" or l1 > 0:
        if any(hasattr(p.data, "full_tensor") for p in params):  # DTensor shards (FSDP2)
            if l1 > 0:
                raise ValueError("l1.on: factors is not supported with train.distributed=fsdp2")
            announce("optimizer: torch.optim.AdamW(foreach=False), per tensor: under fsdp2 every factor is a "
                     "DTensor shard of its own, which cannot be a view of one flat buffer")
            return torch.optim.AdamW(params, **kwargs, foreach=False)
        from paft_kernels.prox_adamw import ProxAdamW, route
        # `cublas` names a LoRA-linear route; the optimizer step has no cuBLAS form, so it takes auto's choice
        backend = "auto" if cfg.kernels == "cublas" else cfg.kernels
        opt = ProxAdamW(params, **kwargs, l1=l1, backend=backend)
        announce(f"optimizer: ProxAdamW (AdamW{f' + L1 prox, lambda={l1:g}' if l1 > 0 else ''}) over one flat "
                 f"buffer of {opt.flat_param.numel():,} numbers ({len(params)} tensors), one "
                 f"{route(backend, opt.flat_param)} step per update")
        return opt
    missing = []
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # not installed, or a broken install
        missing.append(f"bitsandbytes is not importable: {e}")
    if not torch.cuda.is_available():
        missing.append("torch sees no CUDA device")
    elif any(p.device.type != "cuda" for p in params):
        missing.append("the trainable parameters are not on the GPU (train.device)")
    if missing:
        raise ValueError(f"train.optimizer: {cfg.optimizer} needs bitsandbytes and a CUDA device "
                         f"({'; '.join(missing)}); use train.optimizer=adamw")
    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}
    return cls[cfg.optimizer](params, **kwargs)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.scheduler == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
