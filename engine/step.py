"""One optimizer step, and the held-out pass: the work the loop (engine/train.py) repeats.

    train_step(model, objective, micro_batches, optimizer, params, ...) -> StepResult

does, in order:

    totals   the step's trained tokens / pairs, summed over every micro-batch (and every rank)
    forward + loss + backward, per micro-batch, under autocast; each micro-batch's loss is
             divided by the step's totals, so the accumulated gradient is the big batch's
    L1       PAFT's λ Σ‖s·B A‖₁ (l1.on: product): one extra backward, once per step
    clip     the global L2 norm of all LoRA gradients, measured before clipping
    check    a non-finite loss or gradient norm stops here, before the update
    step     the optimizer's update, then zero_grad
    check    a non-finite weight after the update stops here (the update is never checkpointed)

and returns (loss, grad_norm, stats, trained_tokens, input_tokens). `benchmarks/train_step.py`
times this very function against the Hugging Face stack, so the benchmark measures the step
users run.

The lines marked `dist:` are the several-process parts (engine/distributed.py); with one
process each is a no-op.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch

from engine import distributed as dist
from engine.objectives import l1_penalty, step_totals
from paft_kernels.prox_adamw import l1_norm_of, zero_fraction


class NonFiniteLoss(RuntimeError):
    """The loss, the gradients or the updated weights became NaN/Inf (exit 3)."""


class StepResult(NamedTuple):
    loss: float  # the step's loss: the sum of its micro-batches' losses (= the big batch's mean)
    grad_norm: float  # global L2 norm of the LoRA gradients before clipping
    stats: dict  # the objective's means over the step (+ l1, zero_fraction where L1 is on)
    trained_tokens: int  # tokens that carried loss, over all ranks
    input_tokens: int  # tokens the model read (real tokens; every position of packed rows), over all ranks


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def input_tokens(batch: dict) -> int:
    """Tokens the model reads: real tokens when there is padding, every position in packed rows."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


@torch.no_grad()
def weights_finite(params) -> bool:
    """True if every trainable weight is finite: one fused pass (torch._foreach_norm: a few kernel
    launches on CUDA for all tensors, or one for a flat buffer of factors) and one sync.

    A NaN or Inf anywhere makes its tensor's L2 norm non-finite; so does an entry beyond ~1e19
    (its square overflows fp32), which is no trainable weight either: the next forward would
    overflow. FSDP2's sharded parameters are checked shard by shard (the caller sums over ranks).
    """
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    norms = torch._foreach_norm([p.detach() for p in local if p.numel()])
    return bool(torch.isfinite(torch.stack(norms)).all()) if norms else True


def train_step(model, objective, micro_batches: list[dict], optimizer, params: list, *, device: torch.device,
               autocast=nullcontext, max_grad_norm: float | None = None, l1_lambda: float = 0.0,
               l1_on: str = "product", kernels: str = "auto", step: int = 0) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation); see the module docstring.

    objective(model, micro_batch, totals) -> (loss, stats) (engine/objectives.py); params: the LoRA
    factors the optimizer updates; step: this step's index (0 = the first), for error messages.
    Raises NonFiniteLoss before an update from a non-finite loss or gradient, and after an update
    that made a weight non-finite."""
    totals = step_totals(micro_batches)  # the step's trained tokens / pairs: every micro-batch divides by these
    totals = dist.all_reduce_sum(totals)  # dist: the GLOBAL step's counts (this rank has only its rows)
    seen_tokens = dist.all_reduce_sum(sum(input_tokens(mb) for mb in micro_batches))

    # forward, loss, backward (gradients accumulate in .grad; stats sum to the step's means)
    stats: dict[str, float] = {}
    for j, mb in enumerate(micro_batches):
        dist.grad_sync(last=j == len(micro_batches) - 1)  # dist: FSDP2 reduces gradients in the last backward only
        with autocast():
            loss_mb, mb_stats = objective(model, to_device(mb, device), totals)
        loss_mb.backward()
        for k, v in mb_stats.items():
            stats[k] = stats.get(k, 0.0) + v
    dist.sync_grads(params)  # dist: DDP sums the LoRA gradients over ranks (each holds its share)
    stats = dist.all_reduce_sum(stats)  # dist: every rank's share of the step's means, summed
    loss = stats.pop("loss")

    # L1 of the deltas (PAFT sparse SFT, l1.on: product): once per step, on top of the data gradient
    if l1_lambda > 0 and l1_on == "product":
        penalty = l1_penalty(model, l1_lambda, "auto" if kernels == "cublas" else kernels)
        penalty.backward()
        stats["l1"] = penalty.item()

    # clip: the global L2 norm over all LoRA gradients, measured before clipping
    grad_norm = dist.clip_grad_norm(params, max_norm=max_grad_norm if max_grad_norm is not None else float("inf"))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteLoss(f"loss or gradients at step {step + 1}: loss={loss} grad_norm={grad_norm}")

    # step: AdamW update of A and B, then clear the gradients; an update that overflowed is never
    # kept (nor checkpointed): the run stops at the last checkpoint saved before it
    optimizer.step()
    optimizer.zero_grad()  # ProxAdamW zeroes its flat gradient buffer in place: the .grad views stay
    if dist.all_reduce_sum(0 if weights_finite(params) else 1):  # dist: stop on every rank together
        raise NonFiniteLoss(f"weights after step {step + 1}: the update overflowed (loss before it {loss:.4g}, "
                            f"grad_norm {grad_norm:.4g})")
    if l1_lambda > 0 and l1_on == "factors":  # the prox step optimises λ Σ|p| over A and B
        stats["l1"] = l1_lambda * l1_norm_of(params)
        stats["zero_fraction"] = zero_fraction(params)
    return StepResult(loss, grad_norm, stats, totals["tokens"], seen_tokens)


@torch.no_grad()
def evaluate(model, objective, batches, n_batches: int, device, autocast) -> dict:
    """Held-out means of the objective's stats over the first `n_batches` micro-batches, as `eval_*`."""
    model.eval()
    micro = [batches.batch(i) for i in range(min(n_batches, len(batches)))]
    totals = dist.all_reduce_sum(step_totals(micro))  # normalise over the whole held-out pass (all ranks' shares)
    sums: dict[str, float] = {}
    for mb in micro:
        with autocast():
            _, stats = objective(model, to_device(mb, device), totals)
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    model.train()
    return {f"eval_{k}": v for k, v in dist.all_reduce_sum(sums).items()}
