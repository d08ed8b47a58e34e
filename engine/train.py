"""The training loop: `python -m engine.train recipe.yaml [key.path=value ...]`.

Read this file top to bottom; every step of a run is here:

    recipe ─► model + tokenizer ─► LoRA ─► data ─► optimizer ─► (resume)
      └─► for each optimizer step:
            batch ─► forward ─► loss ─► backward   (× grad_accum micro-batches)
            ─► clip ─► step ─► log ─► held-out loss ─► checkpoint
      └─► adapter/ (peft format), metrics.jsonl, loss.png, summary.json

The loss of one optimizer step is the mean NLL over every trained token of its
micro-batches: each micro-batch contributes (sum of its token NLLs) / (tokens
in the whole step), so accumulation gives exactly the gradient of one big batch.

Several GPUs: `torchrun --nproc_per_node N -m engine.train recipe.yaml train.distributed=ddp`
(or fsdp2). The loop below is the same; the lines marked `dist:` shard the data, sum the
step's counts, gradients and stats over ranks, and keep files to rank 0 (engine/distributed.py).

Exit status: 0 done, 2 bad input or a damaged file (one `error:` line on stderr that names
the key or file; nothing is written before a run is accepted), 3 the loss, the gradients or
the updated weights became NaN/Inf (no such update is checkpointed; the error names the last
good checkpoint, which is verified intact and finite, so it resumes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import yaml

from engine import distributed as dist
from engine.checkpoint import (find_resume_dir, last_good_checkpoint, list_checkpoints, load_checkpoint,
                               remove_stale_temporaries, save_checkpoint, set_aside, verify_checkpoint)
from functools import cache, partial

from engine.data import Batches, PairBatches, encode_all, encode_pairs, load_examples, load_preference_examples
from engine.log import RunLog, plot_loss, read_metrics
from engine.lora import apply_lora, kernel_routes_line, lora_parameters, save_adapter, set_kernels
from engine.losses import dpo_loss
from engine.models import cache_root, describe, load_model_and_tokenizer
from paft_kernels.prox_adamw import l1_norm_of, zero_fraction
from engine.objectives import (delta_sparsity, dpo_objective, l1_penalty, orpo_objective, sft_objective,
                               step_totals)
from engine.optim import build_optimizer, lr_at, set_lr
from engine.pipeline import PipelineStepFailed, is_pipeline, load_pipeline, pipeline_to_dict, run_pipeline
from engine.qlora import base_memory_report
from engine.reference import load_or_compute_reference
from engine.recipe import Recipe, RecipeError, load_recipe, recipe_help, recipe_to_dict


REJECTED_TOKENS = 64  # length of the base model's own answers used as builtin:harmbench's rejected side


class NonFiniteLoss(RuntimeError):
    pass


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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def input_tokens(batch: dict) -> int:
    """Tokens the model reads: real tokens when there is padding, every position in packed rows."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


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


def sft_data(recipe: Recipe, tokenizer):
    """Rows ─► chat template ─► token ids + loss mask ─► (train batches, held-out batches, held-out rows)."""
    d, tc = recipe.data, recipe.train
    if d.format == "auto":
        train_rows, report = load_examples(d, "train")
        eval_rows, _ = load_examples(d, "eval")
    else:  # a preference dataset used for SFT: train on the prompt and its chosen answer (Thakkar et al.)
        train_rows, report = load_preference_examples(d, "train")
        eval_rows, _ = load_preference_examples(d, "eval")
        train_rows, eval_rows = ([{"messages": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]}
                                  for r in rows] for rows in (train_rows, eval_rows))
    train_enc, enc_report = encode_all(train_rows, tokenizer, d.template, d.max_length)
    eval_enc, _ = encode_all(eval_rows, tokenizer, d.template, d.max_length)
    counts = data_counts(d, report, enc_report)
    print(f"data: {len(train_enc)} training samples ({report['bad']} malformed rows skipped, "
          f"{enc_report.get('dropped', 0)} with no trained token after truncation), {len(eval_enc)} held out")
    args = dict(batch_size=tc.batch_size, seed=tc.seed, pad_id=tokenizer.pad_token_id, packing=d.packing,
                max_length=d.max_length)
    return Batches(train_enc, **args), (Batches(eval_enc, **args) if eval_enc else None), eval_rows, counts


def data_counts(d, report: dict, enc_report: dict) -> dict:
    """The training rows that will not be trained on, by cause; too many of them is an error.

    A row truncated to no trained token, or a pair whose two sides are the same tokens, is as
    useless as a malformed row, so all of them count toward data.max_bad_fraction."""
    counts = {"rows": report["rows"], "malformed": report["bad"], "no_trained_token": enc_report["dropped"],
              "identical_pairs": enc_report.get("identical", 0)}
    unusable = counts["malformed"] + counts["no_trained_token"] + counts["identical_pairs"]
    if counts["rows"] and unusable / counts["rows"] > d.max_bad_fraction:
        raise ValueError(f"data: {unusable} of {counts['rows']} training rows of {report['source']} are unusable "
                         f"({counts['malformed']} malformed or empty, {counts['no_trained_token']} with no trained "
                         f"token within data.max_length={d.max_length}, {counts['identical_pairs']} pairs whose chosen "
                         f"and rejected are the same tokens), more than data.max_bad_fraction={d.max_bad_fraction}")
    return counts


def preference_data(recipe: Recipe, tokenizer, model):
    """Preference rows ─► (prompt, chosen, rejected) ─► pair token ids + masks ─► pair batches."""
    d, tc = recipe.data, recipe.train

    # The model answers each prompt as training will see it: a pair longer than data.max_length keeps
    # the prompt's last tokens (engine/data/pairs.py), so generating from a contextual behaviour's
    # whole 1,000-token context would be an answer to a prompt it is never trained on, at ~10x the cost.
    context = max(16, d.max_length - REJECTED_TOKENS)

    # Whose answers are the rejected side: the model being trained (its adapter is still zero here,
    # so this is its base), or data.rejected_from (a pipeline's `after` stage: the shared base).
    author = d.rejected_from or recipe.model.name

    @cache  # the train and the held-out split each call generate_rejected: load another author once
    def author_model():
        if author == recipe.model.name:
            return model, tokenizer
        return load_model_and_tokenizer(dataclasses.replace(recipe.model, name=author), next(model.parameters()).device)

    def generate_rejected(prompts: list[list[dict]]) -> list[str]:
        from paft_evals.exact_match import generate, prompt_text
        gen_model, gen_tokenizer = author_model()
        texts = [prompt_text(p + [{"role": "assistant", "content": "."}], gen_tokenizer, d.template) for p in prompts]
        print(f"data: generating {len(texts)} completions of {author} for builtin:harmbench "
              f"(prompts cut to their last {context} tokens; cached afterwards)")
        return generate(gen_model, gen_tokenizer, texts, max_new_tokens=REJECTED_TOKENS, batch_size=16,
                        max_prompt_tokens=context)

    # The cache of generated answers is keyed by everything that shapes them: model, template, lengths.
    extra = dict(generate_fn=generate_rejected, cache_dir=cache_root(recipe.model),
                 model_key=f"{_safe_name(author)}-{d.template}-greedy{REJECTED_TOKENS}-ctx{context}")
    train_rows, report = load_preference_examples(d, "train", **extra)
    eval_rows, _ = load_preference_examples(d, "eval", **extra)
    train_enc, enc_report = encode_pairs(train_rows, tokenizer, d.template, d.max_length)
    eval_enc, _ = encode_pairs(eval_rows, tokenizer, d.template, d.max_length)
    counts = data_counts(d, report, enc_report)
    print(f"data: {len(train_enc)} training pairs ({report['bad']} malformed rows skipped, "
          f"{enc_report.get('dropped', 0)} dropped after truncation, {enc_report['identical']} dropped as "
          f"chosen = rejected within max_length), {len(eval_enc)} held out")
    if not train_enc:
        raise ValueError(f"data: no training pairs left in {report['source']} after truncation to "
                         f"data.max_length={d.max_length} and dropping identical pairs")
    args = dict(batch_size=tc.batch_size, seed=tc.seed, pad_id=tokenizer.pad_token_id)
    return PairBatches(train_enc, **args), (PairBatches(eval_enc, **args) if eval_enc else None), eval_rows, counts


def make_objectives(recipe: Recipe, model, train_batches, eval_batches, device, autocast):
    """The loss function for training and for the held-out set (they differ only in DPO's reference table)."""
    method = recipe.train.method
    if method == "sft":
        return sft_objective, sft_objective
    if method == "orpo":
        objective = partial(orpo_objective, cfg=recipe.orpo)
        return objective, objective
    train_ref = eval_ref = None
    if recipe.dpo.precompute_ref:
        root = cache_root(recipe.model)
        train_ref, path = load_or_compute_reference(model, train_batches, device, autocast, root, recipe.model.name)
        print(f"dpo: reference log-probs of {len(train_batches.samples)} pairs from {path}")
        if eval_batches is not None:
            eval_ref, _ = load_or_compute_reference(model, eval_batches, device, autocast, root, recipe.model.name)
    return (partial(dpo_objective, cfg=recipe.dpo, ref_table=train_ref),
            partial(dpo_objective, cfg=recipe.dpo, ref_table=eval_ref))


def check_initial_dpo_loss(value: float, cfg, log: RunLog) -> None:
    """With the adapter at zero the policy is the reference, Δ = 0, and the loss is known (ln 2 for sigmoid)."""
    zero = torch.zeros(1)
    expected = float(dpo_loss(zero, zero, zero, zero, cfg.beta, cfg.loss_type, cfg.label_smoothing)[0][0])
    ok = abs(value - expected) < 1e-4
    log.message(f"check: step-0 DPO loss {value:.6f}, expected {expected:.6f} for a zero adapter "
                f"({'ln 2, ' if cfg.loss_type == 'sigmoid' else ''}{'ok' if ok else 'MISMATCH'})")
    log.write({"step": 0, "check/step0_dpo_loss": value, "check/expected": expected, "check/ok": ok})


def run(recipe: Recipe) -> dict:
    tc = recipe.train
    run_dir = recipe.output_dir
    device = dist.init(tc.distributed, pick_device(tc.device))  # dist: join torchrun's processes (none: no-op)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    # bf16 autocast on GPU; CPU runs in the weights' dtype (fp32 by default).
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext

    # ---- everything that can refuse the run, before the first write (a refused run writes nothing):
    # the checkpoint to resume (intact, same run) and the run's metrics log.
    resume_dir, damaged = find_resume_dir(tc.resume, run_dir)  # resume=auto skips damaged newer checkpoints
    for ckpt, why in damaged:
        print(f"warning: train.resume=auto: skipping damaged checkpoint {ckpt} ({why}); "
              f"it is set aside as {os.path.basename(ckpt)}.damaged", file=sys.stderr)
    if resume_dir is None and list_checkpoints(run_dir):
        raise ValueError(f"output_dir: {run_dir} already holds checkpoints; set train.resume=auto to continue "
                         f"that run, or choose another output_dir")
    if resume_dir:
        _check_same_run(verify_checkpoint(resume_dir).get("run_fingerprint", {}), run_fingerprint(recipe),
                        resume_dir)
        read_metrics(os.path.join(run_dir, "metrics.jsonl"))  # a damaged log refuses here, not mid-run

    # ---- model, tokenizer, LoRA
    model, tokenizer = load_model_and_tokenizer(recipe.model, device)
    print(f"model: {describe(model)}")  # before LoRA: quantization turns weights into non-parameters
    targets = apply_lora(model, recipe.lora, seed=tc.seed)
    set_kernels(model, tc.kernels)
    # which LoRA linear route each layer family runs, and why (never chosen silently)
    print(kernel_routes_line(model, device, torch.bfloat16 if device.type == "cuda" else next(
        p.dtype for p in model.parameters() if p.is_floating_point())))
    params = lora_parameters(model)
    n_trainable = sum(p.numel() for p in params)
    print(f"lora: r={recipe.lora.r} alpha={recipe.lora.alpha} on {len(targets)} layers "
          f"({n_trainable:,} trainable parameters)")
    if recipe.lora.quantize_base:
        print(base_memory_report(model))

    # ---- data: rows ─► chat template ─► token ids + loss mask ─► batches; and the objective
    if tc.method == "sft":
        train_batches, eval_batches, eval_rows, counts = sft_data(recipe, tokenizer)
    else:
        train_batches, eval_batches, eval_rows, counts = preference_data(recipe, tokenizer, model)
    objective, eval_objective = make_objectives(recipe, model, train_batches, eval_batches, device, autocast)
    if eval_batches is None and (tc.eval_every or tc.early_stopping_patience):
        print("warning: train.eval_every/early_stopping_patience set but there is no held-out data", file=sys.stderr)

    # ---- dist: each rank takes its rows of every micro-batch; DDP/FSDP2 wrapping; own dropout stream per rank
    model = dist.wrap(model, device)
    params = lora_parameters(model)  # FSDP2 replaced them by sharded ones
    train_batches.shard(dist.rank(), dist.world())
    if eval_batches is not None:
        eval_batches.shard(dist.rank(), dist.world())
    dist.seed_rank_stream(tc.seed)

    # ---- optimizer, and the run's state (restored from a checkpoint when resuming)
    l1 = recipe.l1
    optimizer = build_optimizer(params, tc, l1=l1.lam if l1.on == "factors" else 0.0)
    state = {"micro_batch": 0, "trained_tokens": 0, "best_eval_loss": None, "evals_without_gain": 0,
             "exact_match_before": None}
    if resume_dir:
        state.update(load_checkpoint(resume_dir, model, optimizer))
        print(f"resumed from {resume_dir} at step {state['step']}")
    start_step = state.get("step", 0)

    # ---- the first write: the run directory, cleared of a killed run's half-written leftovers
    if dist.is_main():
        os.makedirs(run_dir, exist_ok=True)
        for path in remove_stale_temporaries(run_dir):
            print(f"note: removed {path}, left by an interrupted write")
        set_aside(damaged)
        _write_text(os.path.join(run_dir, "recipe.yaml"), yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        if start_step == 0 and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            os.remove(os.path.join(run_dir, "metrics.jsonl"))
    dist.barrier()

    if recipe.eval.exact_match and state["exact_match_before"] is None:
        state["exact_match_before"] = _exact_match(model, tokenizer, eval_rows, recipe)["exact_match"]
        print(f"held-out exact match before training: {state['exact_match_before']:.3f}")

    wandb_cfg = None
    if recipe.logging.wandb:
        wandb_cfg = {"project": recipe.logging.wandb_project, "mode": recipe.logging.wandb_mode,
                     "config": recipe_to_dict(recipe), "id": _stable_id(run_dir)}
    log = RunLog(run_dir, tc.max_steps, start_step, recipe.logging.progress_bar, wandb_cfg, enabled=dist.is_main())

    def checkpoint(step: int) -> str:
        return save_checkpoint(run_dir, step, model, optimizer, recipe.lora, recipe.model.name,
                               {**{k: state[k] for k in ("micro_batch", "trained_tokens", "best_eval_loss",
                                                         "evals_without_gain", "exact_match_before")},
                                "run_fingerprint": run_fingerprint(recipe)},
                               keep=tc.keep_checkpoints)

    # ---- the loop
    model.train()
    step, stop_reason = start_step, "max_steps"
    try:
        while step < tc.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            set_lr(optimizer, lr)

            # batch: the step's micro-batches are a pure function of the data position (resumable)
            micro = [train_batches.batch(state["micro_batch"] + i) for i in range(tc.grad_accum)]
            totals = step_totals(micro)  # the step's trained tokens / pairs: every micro-batch divides by these
            totals = dist.all_reduce_sum(totals)  # dist: the GLOBAL step's counts (this rank has only its rows)
            seen_tokens = dist.all_reduce_sum(sum(input_tokens(mb) for mb in micro))

            # forward, loss, backward (gradients accumulate in .grad; stats sum to the step's means)
            stats: dict[str, float] = {}
            for j, mb in enumerate(micro):
                dist.grad_sync(last=j == len(micro) - 1)  # dist: FSDP2 reduces gradients in the last backward only
                with autocast():
                    loss_mb, mb_stats = objective(model, to_device(mb, device), totals)
                loss_mb.backward()
                for k, v in mb_stats.items():
                    stats[k] = stats.get(k, 0.0) + v
            dist.sync_grads(params)  # dist: DDP sums the LoRA gradients over ranks (each holds its share)
            stats = dist.all_reduce_sum(stats)  # dist: every rank's share of the step's means, summed
            loss = stats.pop("loss")
            # L1 of the deltas (PAFT sparse SFT, l1.on: product): once per step, on top of the data gradient
            if l1.lam > 0 and l1.on == "product":
                penalty = l1_penalty(model, l1.lam, "auto" if tc.kernels == "cublas" else tc.kernels)
                penalty.backward()
                stats["l1"] = penalty.item()
            if tc.method == "dpo" and step == 0:
                check_initial_dpo_loss(stats["dpo_loss"], recipe.dpo, log)
            if tc.method == "dpo" and step == 2 and stats["rewards/chosen"] == stats["rewards/rejected"] == 0.0:
                log.message("warning: DPO rewards are still exactly zero after 2 updates: the policy and the "
                            "reference are the same model (are the adapters being disabled for the reference?)")

            # clip: the global L2 norm over all LoRA gradients, measured before clipping
            max_norm = tc.max_grad_norm if tc.max_grad_norm is not None else float("inf")
            grad_norm = dist.clip_grad_norm(params, max_norm)  # = clip_grad_norm_ (FSDP2: over all shards)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise NonFiniteLoss(f"loss or gradients at step {step + 1}: loss={loss} grad_norm={grad_norm}")

            # step: AdamW update of A and B, then clear the gradients; an update that overflowed is never
            # kept (nor checkpointed): the run stops at the last checkpoint saved before it
            optimizer.step()
            optimizer.zero_grad()  # ProxAdamW zeroes its flat gradient buffer in place: the .grad views stay
            step += 1
            if dist.all_reduce_sum(0 if weights_finite(params) else 1):  # dist: stop on every rank together
                raise NonFiniteLoss(f"weights after step {step}: the update overflowed (loss before it {loss:.4g}, "
                                    f"grad_norm {grad_norm:.4g})")
            if l1.lam > 0 and l1.on == "factors":  # the prox step optimises λ Σ|p| over A and B
                stats["l1"] = l1.lam * l1_norm_of(params)
                stats["zero_fraction"] = zero_fraction(params)
            state["micro_batch"] += tc.grad_accum
            state["trained_tokens"] += totals["tokens"]
            dt = time.perf_counter() - t0

            # log
            if step % tc.log_every == 0 or step == tc.max_steps:
                log.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": seen_tokens / dt, "trained_tokens": state["trained_tokens"],
                           "step_time_s": dt, **stats})
            log.advance(1, {"loss": loss, "lr": lr})

            # held-out loss (and preference accuracy for DPO/ORPO), early stopping
            if eval_batches is not None and tc.eval_every and step % tc.eval_every == 0:
                held = evaluate(model, eval_objective, eval_batches, tc.eval_batches, device, autocast)
                with dist.full_lora(model):  # dist: FSDP2 gathers the sharded factors
                    held["sparsity"] = delta_sparsity(model)
                log.write({"step": step, **held})
                eval_loss = held["eval_loss"]
                if state["best_eval_loss"] is None or eval_loss < state["best_eval_loss"]:
                    state["best_eval_loss"], state["evals_without_gain"] = eval_loss, 0
                else:
                    state["evals_without_gain"] += 1
                if tc.early_stopping_patience and state["evals_without_gain"] >= tc.early_stopping_patience:
                    log.message(f"early stopping at step {step}: held-out loss has not improved for "
                                f"{state['evals_without_gain']} evaluations (best {state['best_eval_loss']:.4f})")
                    stop_reason = "early_stopping"
                    break

            # checkpoint
            if tc.save_every and step % tc.save_every == 0:
                checkpoint(step)
    except NonFiniteLoss as e:
        log.close()
        dist.barrier()
        last, _ = last_good_checkpoint(run_dir)  # intact and finite, so it resumes
        where = (f"the last good checkpoint is {last} (train.resume={last} continues from it)" if last
                 else "no checkpoint was saved yet")
        if dist.is_main():
            print(f"error: non-finite {e}; training stopped, {where}. "
                  f"Try a lower train.lr or train.max_grad_norm.", file=sys.stderr)
        raise
    log.close()

    # ---- outputs: final checkpoint, adapter in peft format, held-out metrics, plot, summary
    if not list_checkpoints(run_dir) or not list_checkpoints(run_dir)[-1].endswith(f"step-{step:06d}"):
        checkpoint(step)
    with dist.full_lora(model):  # dist: FSDP2 gathers the sharded factors; only rank 0 writes
        if dist.is_main():
            save_adapter(model, os.path.join(run_dir, "adapter"), recipe.lora, recipe.model.name)
        sparsity = delta_sparsity(model)
    summary = {"steps": step, "stop_reason": stop_reason, "trained_tokens": state["trained_tokens"],
               "adapter": os.path.join(run_dir, "adapter"), "sparsity": sparsity, "data": counts}
    print(f"delta sparsity (share of |s·B A| < 1e-5, averaged over layers): {summary['sparsity']:.4f}")
    if eval_batches is not None:
        summary.update(evaluate(model, eval_objective, eval_batches, tc.eval_batches, device, autocast))
        print(f"held-out loss: {summary['eval_loss']:.4f}" + (
            f", preference accuracy: {summary['eval_rewards/accuracies']:.3f}"
            if "eval_rewards/accuracies" in summary else ""))
    if recipe.eval.exact_match:
        after = _exact_match(model, tokenizer, eval_rows, recipe)
        summary["exact_match_before"] = state["exact_match_before"]
        summary["exact_match_after"] = after["exact_match"]
        summary["exact_match_samples"] = after["samples"]
        print(f"held-out exact match: before {state['exact_match_before']:.3f} -> after {after['exact_match']:.3f} "
              f"(n={after['n']})")
    if dist.is_main():
        plot_loss(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "loss.png"), title=recipe.model.name)
        _write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=1))
    dist.barrier()  # dist: every rank returns once rank 0's files are written
    print(f"done: {step} steps; adapter in {summary['adapter']}; metrics in {os.path.join(run_dir, 'metrics.jsonl')}")
    return summary


def run_fingerprint(recipe: Recipe) -> dict:
    """The settings a checkpoint's factors and data position only make sense under.

    The learning rate or max_steps may change on resume (e.g. to extend a run); these may not.
    """
    d = recipe_to_dict(recipe)
    return {"model.name": d["model"]["name"], "train.batch_size": d["train"]["batch_size"],
            "train.grad_accum": d["train"]["grad_accum"], "train.seed": d["train"]["seed"],
            "train.optimizer": d["train"]["optimizer"],  # the optimizers' states do not convert
            **{f"lora.{k}": v for k, v in d["lora"].items()}, **{f"data.{k}": v for k, v in d["data"].items()}}


def _check_same_run(saved: dict, current: dict, ckpt: str) -> None:
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise ValueError(f"train.resume: {ckpt} was written with {key}={saved[key]!r}, this recipe has "
                             f"{value!r}; that would not continue the same run (use a new output_dir)")


def _exact_match(model, tokenizer, rows, recipe: Recipe) -> dict:
    from paft_evals.exact_match import exact_match
    return exact_match(model, tokenizer, rows[: recipe.eval.num_samples], recipe.data.template,
                       recipe.eval.max_new_tokens, recipe.eval.batch_size)


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _stable_id(run_dir: str) -> str:
    import hashlib
    return hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a causal LM with LoRA from a YAML recipe.",
        epilog="recipe keys (override any of them as key.path=value):\n" + recipe_help())
    parser.add_argument("recipe", help="YAML recipe file")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, value parsed as YAML")
    parser.add_argument("--print-config", action="store_true", help="print the validated recipe and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = parser.parse_args(argv)
    try:
        if os.path.isfile(args.recipe) and is_pipeline(args.recipe):  # stages + merges + evals
            cfg = load_pipeline(args.recipe, args.overrides)
            if args.print_config:
                print(yaml.safe_dump(pipeline_to_dict(cfg), sort_keys=False), end="")
                return 0
            run_pipeline(cfg)
            return 0
        recipe = load_recipe(args.recipe, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end="")
            return 0
        run(recipe)
        return 0
    except NonFiniteLoss:
        if args.debug:
            raise
        return 3
    except (RecipeError, ValueError, OSError, ImportError, PipelineStepFailed) as e:  # OSError: disk full, ...
        if args.debug:
            raise
        message = " ".join(str(e).split())  # one line, whatever the exception carried
        where = "" if dist.is_main() else f"[rank {dist.rank()}] "  # several ranks: say which one
        print(f"error: {where}{message}", file=sys.stderr)
        return 2
    finally:
        dist.teardown()  # leave torchrun's process group (nothing to do in a single process)


if __name__ == "__main__":
    sys.exit(main())
