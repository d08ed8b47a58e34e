"""The training loop: `python -m engine.train recipe.yaml [key.path=value ...]`.

Read this file top to bottom; every step of a run is here:

    setup:   recipe ─► (resume checks) ─► model + tokenizer ─► LoRA ─► data ─► objective
             ─► optimizer ─► (resume) ─► the run directory and its log
    loop:    for each optimizer step:
               lr ─► micro-batches ─► train_step ─► log ─► held-out loss ─► checkpoint
             (train_step, engine/step.py: forward ─► loss ─► backward  (× grad_accum micro-batches)
              ─► L1 ─► clip ─► optimizer step ─► finiteness checks)
    finish:  final checkpoint ─► adapter/ (peft format), metrics.jsonl, loss.png, summary.json

The set-up functions that turn a recipe into batches and a loss are in engine/train_setup.py.

The loss of one optimizer step is the mean NLL over every trained token of its
micro-batches: each micro-batch contributes (sum of its token NLLs) / (tokens
in the whole step), so accumulation gives exactly the gradient of one big batch.

Several GPUs: `torchrun --nproc_per_node N -m engine.train recipe.yaml train.distributed=ddp`
(or fsdp2). The loop below is the same; the lines marked `dist:` shard the data, sum the
step's counts, gradients and stats over ranks, and keep files to rank 0 (engine/distributed.py).

Exit status: 0 done, 2 bad input, a damaged file, an output that cannot be written or is in
use by another run (one `error:` line on stderr that names the key or file; nothing is written
before a run is accepted), 3 the loss, the gradients or the updated weights became NaN/Inf (no
such update is checkpointed; the error names the last good checkpoint, which is verified intact
and finite, so it resumes), 130 Ctrl-C and 143 SIGTERM (one line naming the last checkpoint).

One run per output_dir: the run holds its lock from before the first read of a checkpoint to
the end (engine/outputs.py); a second run on it exits 2 naming the first.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from typing import Callable, Optional

import numpy as np
import torch
import yaml

from engine import distributed as dist
from engine.checkpoint import (check_resumable, find_resume_dir, last_good_checkpoint, list_checkpoints,
                               load_checkpoint, remove_stale_temporaries, save_checkpoint, set_aside,
                               verify_checkpoint)
from engine.generate import exact_match
from engine.interrupts import Interrupted, as_interrupted, interruptible, raise_pending
from engine.log import RunLog, plot_loss, read_metrics
from engine.lora import kernel_routes_line, lora_parameters, save_adapter, set_kernels
from engine.losses import dpo_loss
from engine.models import describe, load_model_and_tokenizer
from engine.objectives import delta_sparsity
from engine.optim import build_optimizer, lr_at, set_lr
from engine.outputs import claim_output
from engine.qlora import apply_adapter, base_memory_report
from engine.recipe import Recipe, RecipeError, load_recipe, recipe_help, recipe_to_dict
from engine.writes import os_error_line, write_json, write_text
from engine.step import NonFiniteLoss, evaluate, train_step
from engine.train_setup import make_objectives, preference_data, sft_data


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


@dataclasses.dataclass
class Run:
    """Everything the loop works with, made by `setup`."""
    recipe: Recipe
    device: torch.device
    autocast: Callable
    model: torch.nn.Module
    tokenizer: object
    params: list
    optimizer: torch.optim.Optimizer
    objective: Callable
    eval_objective: Callable
    train_batches: object
    eval_batches: Optional[object]
    eval_rows: list
    counts: dict
    state: dict  # what a checkpoint restores besides weights: data position, tokens, early-stopping state
    log: Optional[RunLog] = None


def run(recipe: Recipe, command: str = "python -m engine.train") -> dict:
    # One run per output_dir, checked writable before any work (engine/outputs.py).
    holder = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 (dist.init has not run yet)
    with claim_output(recipe.output_dir, command, key="output_dir") if holder else nullcontext():
        r = setup(recipe)
        step, stop_reason = train_loop(r)
        return finish(r, step, stop_reason)


# --------------------------------------------------------------------------- set-up

def setup(recipe: Recipe) -> Run:
    tc = recipe.train
    device = dist.init(tc.distributed, pick_device(tc.device))  # dist: join torchrun's processes (none: no-op)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    # bf16 autocast on GPU; CPU runs in the weights' dtype (fp32 by default).
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext

    # ---- everything that can refuse the run, before the first write (a refused run writes nothing)
    resume_dir, damaged = check_resume(recipe)

    # ---- model, tokenizer, LoRA
    model, tokenizer = load_model_and_tokenizer(recipe.model, device)
    print(f"model: {describe(model)}")  # before LoRA: quantization turns weights into non-parameters
    targets = apply_adapter(model, recipe.lora, seed=tc.seed)  # LoRA, or QLoRA (lora.quantize_base)
    set_kernels(model, tc.kernels)
    # which LoRA linear route each layer family runs, and why (never chosen silently)
    print(kernel_routes_line(model, device, torch.bfloat16 if device.type == "cuda" else next(
        p.dtype for p in model.parameters() if p.is_floating_point())))
    n_trainable = sum(p.numel() for p in lora_parameters(model))
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
    optimizer = build_optimizer(params, tc, l1=recipe.l1.lam if recipe.l1.on == "factors" else 0.0)
    state = {"micro_batch": 0, "trained_tokens": 0, "best_eval_loss": None, "evals_without_gain": 0,
             "exact_match_before": None}
    if resume_dir:
        state.update(load_checkpoint(resume_dir, model, optimizer))
        print(f"resumed from {resume_dir} at step {state['step']}")
    r = Run(recipe, device, autocast, model, tokenizer, params, optimizer, objective, eval_objective,
            train_batches, eval_batches, eval_rows, counts, state)
    start_run_dir(r, damaged)
    return r


def check_resume(recipe: Recipe) -> tuple[str | None, list]:
    """The checkpoint to resume (intact, same run) and the damaged ones to set aside; the run's
    metrics log is read, so a damaged one refuses here, not mid-run."""
    run_dir = recipe.output_dir
    resume_dir, damaged = find_resume_dir(recipe.train.resume, run_dir)  # resume=auto skips damaged newer checkpoints
    for ckpt, why in damaged:
        print(f"warning: train.resume=auto: skipping damaged checkpoint {ckpt} ({why}); "
              f"it is set aside as {os.path.basename(ckpt)}.damaged", file=sys.stderr)
    if resume_dir is None and list_checkpoints(run_dir):
        raise ValueError(f"output_dir: {run_dir} already holds checkpoints; set train.resume=auto to continue "
                         f"that run, or choose another output_dir")
    if resume_dir:  # the same run: the same recipe but for what may change (engine/checkpoint.py)
        check_resumable(resume_dir, verify_checkpoint(resume_dir), recipe_to_dict(recipe))
        read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return resume_dir, damaged


def start_run_dir(r: Run, damaged: list) -> None:
    """The first write: the run directory, cleared of a killed run's half-written leftovers; then the
    held-out exact match before training, and the run's log."""
    recipe, run_dir, state = r.recipe, r.recipe.output_dir, r.state
    start_step = state.get("step", 0)
    if dist.is_main():
        os.makedirs(run_dir, exist_ok=True)
        for path in remove_stale_temporaries(run_dir):
            print(f"note: removed {path}, left by an interrupted write")
        set_aside(damaged)
        write_text(os.path.join(run_dir, "recipe.yaml"), yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        if start_step == 0 and os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            os.remove(os.path.join(run_dir, "metrics.jsonl"))
    dist.barrier()

    if recipe.eval.exact_match and state["exact_match_before"] is None:
        state["exact_match_before"] = _exact_match(r)["exact_match"]
        print(f"held-out exact match before training: {state['exact_match_before']:.3f}")

    wandb_cfg = None
    if recipe.logging.wandb:
        wandb_cfg = {"project": recipe.logging.wandb_project, "mode": recipe.logging.wandb_mode,
                     "config": recipe_to_dict(recipe), "id": _stable_id(run_dir)}
    r.log = RunLog(run_dir, recipe.train.max_steps, start_step, recipe.logging.progress_bar, wandb_cfg,
                   enabled=dist.is_main())


# --------------------------------------------------------------------------- the loop

def train_loop(r: Run) -> tuple[int, str]:
    """Optimizer steps from the resumed step to train.max_steps (or early stopping); returns the
    last step and why the loop stopped."""
    tc, state, log = r.recipe.train, r.state, r.log
    r.model.train()
    step, stop_reason = state.get("step", 0), "max_steps"
    try:
        while step < tc.max_steps:
            raise_pending()  # a Ctrl-C whose exception Python dropped (engine/interrupts.py) stops here
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            set_lr(r.optimizer, lr)

            # batch: the step's micro-batches are a pure function of the data position (resumable)
            micro = [r.train_batches.batch(state["micro_batch"] + i) for i in range(tc.grad_accum)]
            loss, grad_norm, stats, trained, seen = train_step(
                r.model, r.objective, micro, r.optimizer, r.params, device=r.device, autocast=r.autocast,
                max_grad_norm=tc.max_grad_norm, l1_lambda=r.recipe.l1.lam, l1_on=r.recipe.l1.on,
                kernels=tc.kernels, step=step)
            if tc.method == "dpo" and step == 0:
                check_initial_dpo_loss(stats["dpo_loss"], r.recipe.dpo, log)
            if tc.method == "dpo" and step == 2 and stats["rewards/chosen"] == stats["rewards/rejected"] == 0.0:
                log.message("warning: DPO rewards are still exactly zero after 2 updates: the policy and the "
                            "reference are the same model (are the adapters being disabled for the reference?)")
            step += 1
            state["micro_batch"] += tc.grad_accum
            state["trained_tokens"] += trained
            dt = time.perf_counter() - t0

            # log
            if step % tc.log_every == 0 or step == tc.max_steps:
                log.write({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": seen / dt, "trained_tokens": state["trained_tokens"],
                           "step_time_s": dt, **stats})
            log.advance(1, {"loss": loss, "lr": lr})

            # held-out loss (and preference accuracy for DPO/ORPO), early stopping
            if r.eval_batches is not None and tc.eval_every and step % tc.eval_every == 0:
                if held_out_check(r, step):
                    return step, "early_stopping"

            # checkpoint
            if tc.save_every and step % tc.save_every == 0:
                checkpoint(r, step)
    except NonFiniteLoss as e:
        log.close()
        dist.barrier()
        last, _ = last_good_checkpoint(r.recipe.output_dir)  # intact and finite, so it resumes
        where = (f"the last good checkpoint is {last} (train.resume={last} continues from it)" if last
                 else "no checkpoint was saved yet")
        if dist.is_main():
            print(f"error: non-finite {e}; training stopped, {where}. "
                  f"Try a lower train.lr or train.max_grad_norm.", file=sys.stderr)
        raise
    return step, stop_reason


def held_out_check(r: Run, step: int) -> bool:
    """Held-out loss (+ preference accuracy, delta sparsity), logged; True when early stopping says stop."""
    tc, state = r.recipe.train, r.state
    held = evaluate(r.model, r.eval_objective, r.eval_batches, tc.eval_batches, r.device, r.autocast)
    with dist.full_lora(r.model):  # dist: FSDP2 gathers the sharded factors
        held["sparsity"] = delta_sparsity(r.model)
    r.log.write({"step": step, **held})
    eval_loss = held["eval_loss"]
    if state["best_eval_loss"] is None or eval_loss < state["best_eval_loss"]:
        state["best_eval_loss"], state["evals_without_gain"] = eval_loss, 0
    else:
        state["evals_without_gain"] += 1
    if tc.early_stopping_patience and state["evals_without_gain"] >= tc.early_stopping_patience:
        r.log.message(f"early stopping at step {step}: held-out loss has not improved for "
                      f"{state['evals_without_gain']} evaluations (best {state['best_eval_loss']:.4f})")
        return True
    return False


def checkpoint(r: Run, step: int) -> str:
    state = r.state
    return save_checkpoint(r.recipe.output_dir, step, r.model, r.optimizer, r.recipe.lora, r.recipe.model.name,
                           {**{k: state[k] for k in ("micro_batch", "trained_tokens", "best_eval_loss",
                                                     "evals_without_gain", "exact_match_before")},
                            "recipe": recipe_to_dict(r.recipe)},  # what a resume must match
                           keep=r.recipe.train.keep_checkpoints)


# --------------------------------------------------------------------------- finish

def finish(r: Run, step: int, stop_reason: str) -> dict:
    """Final checkpoint, the adapter in peft format, held-out metrics, the loss plot and summary.json."""
    run_dir, state = r.recipe.output_dir, r.state
    r.log.close()
    if not list_checkpoints(run_dir) or not list_checkpoints(run_dir)[-1].endswith(f"step-{step:06d}"):
        checkpoint(r, step)
    with dist.full_lora(r.model):  # dist: FSDP2 gathers the sharded factors; only rank 0 writes
        if dist.is_main():
            save_adapter(r.model, os.path.join(run_dir, "adapter"), r.recipe.lora, r.recipe.model.name)
        sparsity = delta_sparsity(r.model)
    summary = {"steps": step, "stop_reason": stop_reason, "trained_tokens": state["trained_tokens"],
               "adapter": os.path.join(run_dir, "adapter"), "sparsity": sparsity, "data": r.counts}
    print(f"delta sparsity (share of |s·B A| < 1e-5, averaged over layers): {summary['sparsity']:.4f}")
    if r.eval_batches is not None:
        summary.update(evaluate(r.model, r.eval_objective, r.eval_batches, r.recipe.train.eval_batches, r.device,
                                r.autocast))
        print(f"held-out loss: {summary['eval_loss']:.4f}" + (
            f", preference accuracy: {summary['eval_rewards/accuracies']:.3f}"
            if "eval_rewards/accuracies" in summary else ""))
    if r.recipe.eval.exact_match:
        after = _exact_match(r)
        summary["exact_match_before"] = state["exact_match_before"]
        summary["exact_match_after"] = after["exact_match"]
        summary["exact_match_samples"] = after["samples"]
        print(f"held-out exact match: before {state['exact_match_before']:.3f} -> after {after['exact_match']:.3f} "
              f"(n={after['n']})")
    if dist.is_main():
        plot_loss(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "loss.png"), title=r.recipe.model.name)
        write_json(os.path.join(run_dir, "summary.json"), summary, indent=1)
    dist.barrier()  # dist: every rank returns once rank 0's files are written
    print(f"done: {step} steps; adapter in {summary['adapter']}; metrics in {os.path.join(run_dir, 'metrics.jsonl')}")
    return summary


def check_initial_dpo_loss(value: float, cfg, log: RunLog) -> None:
    """With the adapter at zero the policy is the reference, Δ = 0, and the loss is known (ln 2 for sigmoid)."""
    zero = torch.zeros(1)
    expected = float(dpo_loss(zero, zero, zero, zero, cfg.beta, cfg.loss_type, cfg.label_smoothing)[0][0])
    ok = abs(value - expected) < 1e-4
    log.message(f"check: step-0 DPO loss {value:.6f}, expected {expected:.6f} for a zero adapter "
                f"({'ln 2, ' if cfg.loss_type == 'sigmoid' else ''}{'ok' if ok else 'MISMATCH'})")
    log.write({"step": 0, "check/step0_dpo_loss": value, "check/expected": expected, "check/ok": ok})


def _exact_match(r: Run) -> dict:
    e = r.recipe.eval
    return exact_match(r.model, r.tokenizer, r.eval_rows[: e.num_samples], r.recipe.data.template,
                       e.max_new_tokens, e.batch_size)


def _stable_id(run_dir: str) -> str:
    return hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:12]


def interrupted(e: Interrupted, target) -> int:
    """Ctrl-C or SIGTERM: one line saying where the run (or pipeline) stopped and how it continues."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second one must not cut this line short
        signal.signal(sig, signal.SIG_IGN)
    if isinstance(target, Recipe):
        ckpts = list_checkpoints(target.output_dir)
        where = (f"the last checkpoint is {ckpts[-1]} (train.resume=auto continues from it)" if ckpts
                 else "no checkpoint was saved yet")
    elif target is not None:  # a pipeline: engine/pipeline/run.py says which step stopped
        where = f"{getattr(e, 'detail', None) or 'the pipeline stopped'}; finished steps under {target.output_dir} " \
                f"are kept: rerun the same command to continue"
    else:
        where = "nothing was written"
    if dist.is_main():
        print(f"interrupted ({e.name}): {where}", file=sys.stderr)
    return e.exit_code


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
    # The command line's dispatch: a pipeline recipe runs the PAFT pipeline, which sits on top of this
    # library (it trains through this very command), so it is imported here and nowhere below.
    from engine.pipeline import PipelineStepFailed, is_pipeline, load_pipeline, pipeline_to_dict, run as run_pipeline
    command, target = f"python -m engine.train {args.recipe}", None  # target: the recipe an interrupt stopped
    with interruptible():  # SIGTERM stops the run as Ctrl-C does (engine/interrupts.py)
        try:
            if os.path.isfile(args.recipe) and is_pipeline(args.recipe):  # stages + merges + evals
                load, to_dict, start = load_pipeline, pipeline_to_dict, run_pipeline
            else:
                load, to_dict, start = load_recipe, recipe_to_dict, run
            target = load(args.recipe, args.overrides)
            if args.print_config:
                print(yaml.safe_dump(to_dict(target), sort_keys=False), end="")
                return 0
            start(target, command)
            return 0
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM: 130 or 143
            if args.debug:
                raise
            return interrupted(as_interrupted(e), target)
        except NonFiniteLoss:
            if args.debug:
                raise
            return 3
        except (RecipeError, ValueError, OSError, ImportError, PipelineStepFailed) as e:  # OSError: disk full, ...
            if args.debug:
                raise
            message = os_error_line(e) if isinstance(e, OSError) else " ".join(str(e).split())  # one line
            where = "" if dist.is_main() else f"[rank {dist.rank()}] "  # several ranks: say which one
            print(f"error: {where}{message}", file=sys.stderr)
            return 2
        finally:
            dist.teardown()  # leave torchrun's process group (nothing to do in a single process)


if __name__ == "__main__":
    sys.exit(main())
