"""End-to-end training steps: the engine against the Hugging Face stack, on CPU and GPU.

    python -m benchmarks.train_step --list
    python -m benchmarks.train_step --config cpu-smollm2-lora-sft
    python -m benchmarks.train_step --config gpu-llama2-7b-qlora-sft-1024 --layers 8
    python -m benchmarks.train_step --config gpu-mistral-7b-lora-dpo-2048 --dry-run

One named configuration fixes the model, the adapter (LoRA or QLoRA), the
objective (SFT or DPO), the batch, the sequence length and the number of
steps. Every system then trains that same model from the same LoRA factors on
the same token ids, in the same order:

    ours    the engine: engine.models loads the model, engine.qlora.apply_adapter wraps it
            (LoRA, or QLoRA's NF4 base), engine.objectives computes the loss, and the
            timed step is engine.step.train_step itself, the function engine/train.py's
            loop calls (not a copy of it): forward + loss under bf16 autocast on GPU,
            backward, grad-norm clip at 1.0, the finiteness checks, the optimizer step,
            zero_grad. The optimizer is the recipe default that engine.optim.build_optimizer
            returns: ProxAdamW, AdamW's update over one flat buffer of the factors.
            train.kernels=auto, as a recipe leaves it: on CUDA the route table's choice per
            shape, or cublas where no table was measured (the row records the routes and why).
    ours_triton  the same with train.kernels=triton: the fused LoRA kernels (and the Triton
            optimizer step) end to end. Both rows record the LoRA linear routes that ran, the
            Triton launches and the optimizer's route, counted over the timed steps.
    hf      a plain loop as a transformers + peft user writes it (SFT only):
            loss = peft_model(input_ids, attention_mask=..., labels=...).loss; the same
            backward / clip / AdamW. QLoRA: the model loaded with bitsandbytes 4-bit
            (NF4, double quantization, bf16 compute), as `from_pretrained` does it.
    trl     TRL's SFTTrainer or DPOTrainer with a peft LoraConfig, TRL's defaults except
            where the work would differ: constant learning rate, no gradient
            checkpointing, rows in order (no shuffle), no truncation. Both get token ids
            (SFT: input_ids + labels, which TRL takes as is; DPO: prompt_ids / chosen_ids /
            rejected_ids, the columns TRL's own tokenization makes, so that step is skipped).
            QLoRA: the bitsandbytes model; TRL runs prepare_model_for_kbit_training on it.
    liger   SFT: the `hf` loop on a model patched by liger_kernel (RMSNorm,
            RoPE, SwiGLU and the fused linear cross-entropy). DPO: TRL's DPOTrainer with
            use_liger_kernel=True (TRL 1.16 applies Liger's layer kernels; it has no fused
            DPO loss option). On CPU it is rehearsed up to its first step where liger_kernel is
            installed (Liger's kernels do not run under the Triton interpreter: the row says
            "rehearsed"), and recorded as "n/a" where it is not.

The same for everyone: LoRA r=16, alpha=32, dropout 0 (so no random masks stand
between the systems) on all seven projections, A from engine.lora's seeded init
(saved once, loaded by every system, B = 0); AdamW (ours: ProxAdamW, the same
update) lr 1e-4 (SFT) / 5e-5 (DPO), betas (0.9, 0.999), no weight decay; sigmoid DPO with beta 0.1 and the reference
= the base with the adapter switched off (TRL does the same for a peft model).
No gradient checkpointing anywhere.

Data (identical ids for every system, fixed seed):
    real model (SmolLM2, tiny-llama): multi-turn arithmetic chat cut to exactly `seq`
      tokens per row, loss on the assistant tokens (SFT); or pairs of a question, a
      correct and a wrong answer, at most `seq` tokens per side (DPO).
    random-init model (7B shapes): random token ids; an SFT row is `seq` tokens, the
      first half prompt (no loss) and the second half answer; a DPO pair is a
      seq/2 prompt with two seq/2 answers.

How each system is measured. Each runs in its OWN child process, started one
after the other by this script: a process's peak memory is then its own. A child
loads everything, then resets the peak counter, then runs `warmup + steps`
steps. Reported per system:
    tokens/s    median over the timed steps (after warm-up) of step tokens / step time;
                step tokens = the real (non-padding) input tokens of all rows of the step,
                chosen and rejected rows both for DPO. The clock brackets one optimizer
                step (on GPU after a device synchronize); building the batch on the CPU
                is outside it, copying it to the device inside, for every system.
    peak memory CUDA max_memory_allocated over the training steps (GPU), or the peak RSS
                over the training steps (CPU, /proc/self VmHWM reset after setup).
    loss        every step's loss; step 1 is before any update, so with the same model,
                factors and data every system must show the same number there (checked:
                `same_initial_loss`), and the last step shows both kept doing the same work.
    MFU         model FLOPs per second / the matmul ceiling measured in the same run
                (one large bf16 GEMM on GPU, fp32 GEMM on CPU, torch.matmul, median).

Model FLOPs per step (one count for every system, so MFU ratios equal speed ratios).
With N the weights of every frozen matrix multiply (the seven projections of each
layer and the LM head), N_lora the LoRA factors, L layers, d = heads x head_dim,
and per row of length T:
    SFT   4 N T + 6 N_lora T + 12 L d T^2
    DPO   6 N T + 6 N_lora T + 16 L d T^2
summed over the step's rows. Why: the rule "6N per token" (Kaplan et al. 2020,
sec. 2.1; Hoffmann et al. 2022, Chinchilla, app. F; PaLM, Chowdhery et al. 2022,
app. B, which adds 12 L d T for attention) is 2N forward + 4N backward, the
backward being the gradient with respect to the input (2N) and to the weight (2N).
A LoRA base is frozen: its weight gradient is never computed, so it costs 4N per
token, and the LoRA factors, which are trained, cost the full 6 N_lora. Attention
scores and mixing (QK^T, AV: 4 L d T per token forward) have no weights; backward
still needs both their input gradients, so 12 L d T per token, counted for the full
T x T square as PaLM does (causal masking halves the useful part). DPO adds the
reference forward: 2N + 4 L d T per token. The LM head is counted at every
position, although the engine only evaluates it where a label is trained: that
saving shows as higher MFU, not as less counted work.

Targets (issue 8; judged here and written into the JSON, not asserted by tests):
GPU QLoRA SFT >= 1.5x the hf loop's tokens/s at <= 0.7x its peak memory; GPU DPO
>= 1.5x TRL; CPU SFT no slower than each peer; CPU DPO >= 1.3x TRL.

Output: runs[<config>] of benchmarks/results/<device>.json (e.g. cpu-2core.json,
nvidia-h200.json; --out DIR writes DIR/<device>.json instead), merged with the runs
already there; `python -m benchmarks.report` turns these files into the table in docs/BENCHMARKS.md
and a PNG chart.

Time limits (run_gpu.sh sets them): --budget-s counts from this process's start (or
PAFT_BENCH_DEADLINE, an epoch second, whichever ends first); each child gets at most
PAFT_BENCH_SYSTEM_TIMEOUT_S (--system-timeout-s) and never more than is left. The result file is
rewritten after the setup and after every system, so a run killed half-way keeps every system that
finished; a timed-out or failed child's last lines of output are printed.

Files: this one is the parent (command line, plan, one child process per system,
summary); benchmarks/train_step_setup.py holds the configurations, the model, FLOP
count, LoRA init and data every system shares; benchmarks/train_step_children.py
holds the child processes, one function per system.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import deadline, seconds_left

# Config, CONFIGS and the shared pieces live in train_step_setup; they are imported here by name,
# so `from benchmarks.train_step import CONFIGS, step_flops, ...` keeps working.
from benchmarks.train_step_setup import (CONFIGS, DPO_BETA, FINISHED, FLOPS_FORMULA, LIGER_CPU, LORA, LR,
                                         RANDOM_MODELS, REPO, SYSTEMS, TARGETS, Config, config_summary, count_params,
                                         model_config, step_flops)


# =========================================================================== the parent: plan, children, results

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="configurations:\n  " + "\n  ".join(CONFIGS))
    ap.add_argument("--config", help="a configuration name (see --list)")
    ap.add_argument("--list", action="store_true", help="print the configuration names and exit")
    ap.add_argument("--steps", type=int, help="timed steps (default: the configuration's)")
    ap.add_argument("--warmup", type=int, help="untimed warm-up steps before them")
    ap.add_argument("--layers", type=int, help="decoder layers of a random-init model (default: the real count)")
    ap.add_argument("--seq", type=int, help="tokens per row (SFT) or per side (DPO)")
    ap.add_argument("--batch", type=int, help="rows (SFT) or pairs (DPO) per step")
    ap.add_argument("--systems", help=f"comma-separated subset of {','.join(SYSTEMS)} (default: the configuration's)")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: one per core)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"),
                    help="results directory; the run is merged into <out>/<device>.json")
    ap.add_argument("--budget-s", type=float, help="seconds from this process's start; a system that would "
                    "start with less than 10 s left is skipped (default: no limit)")
    ap.add_argument("--system-timeout-s", type=float, help="seconds each child may take (default: "
                    "$PAFT_BENCH_SYSTEM_TIMEOUT_S, else no limit; the setup child twice that)")
    ap.add_argument("--dry-run", action="store_true",
                    help="build the model config on the meta device, count parameters and FLOPs, print the plan")
    ap.add_argument("--child", choices=("setup",) + SYSTEMS, help=argparse.SUPPRESS)  # internal: one child process
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        from benchmarks.train_step_children import run_child  # the children's code, loaded in the children only
        return run_child(args.child, args.plan)
    if args.list:
        for c in CONFIGS.values():
            print(f"{c.name:32s} {c.device:4s} {c.model:22s} {c.method} {'qlora' if c.qlora else 'lora'} "
                  f"seq {c.seq} batch {c.batch} steps {c.warmup}+{c.steps} systems {','.join(c.systems)}")
        return 0
    if not args.config:
        ap.error("--config is required (see --list)")
    try:
        cfg = resolve_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(dry_run(cfg), indent=1))
        return 0
    cap = args.system_timeout_s or float(os.environ.get("PAFT_BENCH_SYSTEM_TIMEOUT_S", 0)) or None
    return run_benchmark(cfg, args.out, end=deadline(args.budget_s), system_cap=cap)


def resolve_config(args) -> Config:
    """The named configuration with the command line's overrides, checked."""
    if args.config not in CONFIGS:
        raise ValueError(f"--config: unknown configuration {args.config!r} (see --list)")
    cfg = CONFIGS[args.config]
    changes = {k: getattr(args, k) for k in ("steps", "warmup", "layers", "seq", "batch", "threads")
               if getattr(args, k) is not None}
    if args.systems:
        changes["systems"] = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    cfg = dataclasses.replace(cfg, **changes)
    for s in cfg.systems:
        if s not in SYSTEMS:
            raise ValueError(f"--systems: unknown system {s!r} (known: {', '.join(SYSTEMS)})")
    if "hf" in cfg.systems and cfg.method == "dpo":
        raise ValueError("--systems: 'hf' is the plain transformers + peft SFT loop; the DPO peer is 'trl'")
    if cfg.layers is not None and cfg.model not in RANDOM_MODELS:
        raise ValueError(f"--layers: only for random-init models; {cfg.model} is loaded with its own layers")
    for key in ("steps", "seq", "batch", "layers"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ValueError(f"--{key}: must be >= 1")
    if cfg.warmup < 0 or cfg.threads < 0:
        raise ValueError("--warmup and --threads must be >= 0")
    return cfg


def dry_run(cfg: Config) -> dict:
    """The plan, without running anything: the model config is built on the meta device (no memory)."""
    hf_config = model_config(cfg)
    counts = count_params(hf_config, cfg)
    rows = cfg.batch if cfg.method == "sft" else 2 * cfg.batch
    lengths = [cfg.seq] * rows  # random-init rows are exactly seq; text rows at most seq
    return {"config": cfg.name, "settings": settings_of(cfg), "model_config": config_summary(hf_config),
            "counts": counts, "flops_per_step": step_flops(counts, cfg.method, lengths),
            "flops_formula": FLOPS_FORMULA[cfg.method],
            "notes": "text-data configs: rows are at most seq tokens; random-init configs: exactly seq"}


class Killed(Exception):
    """SIGTERM (run_gpu.sh's section `timeout`): stop, record what ran, write the file, exit."""


def _on_sigterm(signum, frame):
    raise Killed(f"signal {signum}")


MIN_START_S = 10  # a child that would start with less time than this left is skipped, not started


def run_benchmark(cfg: Config, out_dir: str, end: float = float("inf"), system_cap: float | None = None) -> int:
    """Setup child, then one child per system; the result is merged into <out_dir>/<device>.json after the
    setup and after every system, so whatever finished is kept if this process is killed."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    workdir = tempfile.mkdtemp(prefix="paft-bench-")
    systems = {name: {"status": "not run yet"} for name in cfg.systems}
    setup = data = None
    try:
        plan = {"config": dataclasses.asdict(cfg), "workdir": workdir}
        plan_path = os.path.join(workdir, "plan.json")
        with open(plan_path, "w") as f:
            json.dump(plan, f)
        print(f"[{cfg.name}] setup: model, data, LoRA init, matmul ceiling", flush=True)
        setup = _spawn("setup", plan_path, cfg, end, 2 * system_cap if system_cap else None)
        if setup.get("status") != "ok":
            print(f"error: setup failed: {setup['status']}", file=sys.stderr)
            return 1
        with open(os.path.join(workdir, "data.json")) as f:
            data = json.load(f)
        _write(cfg, out_dir, setup, data, systems)
        for system in cfg.systems:
            if seconds_left(end) < MIN_START_S:
                systems[system] = {"status": f"skipped: {max(0, seconds_left(end)):.0f} s of the section's budget left"}
                print(f"[{cfg.name}] {system}: {systems[system]['status']}", flush=True)
                continue
            if system == "liger" and cfg.device == "cpu" and importlib.util.find_spec("liger_kernel") is None:
                systems[system] = {"status": LIGER_CPU}  # where it is installed, the CPU row is a rehearsal
                print(f"[{cfg.name}] {system}: {LIGER_CPU}", flush=True)
                continue
            print(f"[{cfg.name}] {system}: running {cfg.warmup}+{cfg.steps} steps", flush=True)
            systems[system] = {"status": "running"}
            systems[system] = _spawn(system, plan_path, cfg, end, system_cap)
            _write(cfg, out_dir, setup, data, systems)
    except Killed as e:
        for name, r in systems.items():
            if r["status"] in ("not run yet", "running"):
                systems[name] = {"status": f"failed: the section was stopped ({e}) before it finished"
                                 if r["status"] == "running" else "skipped: the section was stopped"}
        print(f"[{cfg.name}] stopped ({e}); writing what finished", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    if setup is None or setup.get("status") != "ok":
        return 1
    path, run = _write(cfg, out_dir, setup, data, systems)
    print_summary(run)
    print(f"results: {path} (runs[{cfg.name!r}])")
    bad = [s for s, r in systems.items() if not r.get("status", "").startswith(FINISHED)]
    if bad:
        print(f"error: {', '.join(bad)} did not finish (see the status fields)", file=sys.stderr)
        print(f"RERUN {cfg.name} {','.join(bad)}", flush=True)  # for the log; gpu/status.py writes the rerun line
        return 1
    return 0


def _write(cfg: Config, out_dir: str, setup: dict, data: dict, systems: dict) -> tuple[str, dict]:
    """Summarize what ran so far and merge it into <out_dir>/<device>.json (atomically). Systems of an
    earlier run of this configuration with the same settings that this run does not include are kept,
    marked with that run's timestamp, so a rerun of the systems that failed completes the row."""
    from benchmarks.common import device_slug, merge_run
    slug = device_slug(setup["device_name"]) if cfg.device == "cuda" else f"cpu-{os.cpu_count()}core"
    path = os.path.join(out_dir, f"{slug}.json")
    run = summarize(cfg, setup, data, {k: dict(v) for k, v in systems.items()})
    try:
        with open(path) as f:
            earlier = json.load(f)["runs"][cfg.name]
    except (OSError, ValueError, KeyError):
        earlier = None
    if earlier and earlier.get("settings") == run["settings"]:
        for name, r in earlier["systems"].items():
            if name not in systems and r.get("status") == "ok":
                run["systems"][name] = {**r, "from_earlier_run": earlier.get("timestamp")}
        if len(run["systems"]) > len(systems):
            run = summarize(cfg, setup, data, {k: dict(v) for k, v in run["systems"].items()})
    merge_run(path, {"benchmark": "train_step", "device": slug}, cfg.name, run)
    return path, run


def _spawn(system: str, plan_path: str, cfg: Config, end: float, cap: float | None) -> dict:
    """Run one child process; its last stdout line starting with RESULT carries its JSON. Its output goes
    to a file in the work directory; on a failure or a timeout the last lines are printed."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if cfg.device == "cpu" and system == "ours_triton":
        env["TRITON_INTERPRET"] = "1"  # the dry run: the fused kernels by Triton's interpreter
    limit = min(x for x in (cap, seconds_left(end)) if x is not None)
    limit = None if limit == float("inf") else max(1.0, limit)
    log = os.path.join(os.path.dirname(plan_path), f"{system}.log")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(child_argv(system, plan_path), cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _stop(proc)
            _print_tail(system, log, f"timed out after {limit:.0f} s")
            return {"status": f"failed: timed out after {limit:.0f} s", "error": "timeout",
                    "wall_s": round(time.perf_counter() - t0, 1)}
        except BaseException:  # Killed (SIGTERM) or Ctrl-C: the child goes too, and its output is shown
            _stop(proc)
            _print_tail(system, log, "stopped with the section")
            raise
    with open(log) as f:
        lines = f.read().splitlines()
    results = [ln for ln in lines if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        tail = _print_tail(system, log, f"exit {proc.returncode}")
        last = tail[-1] if tail else f"exit status {proc.returncode}"
        return {"status": f"failed: {last}"[:300], "error": last, "wall_s": round(time.perf_counter() - t0, 1)}
    result = json.loads(results[-1][len("RESULT "):])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"  {system}: {result['status']} in {result['wall_s']} s", flush=True)
    return result


def child_argv(system: str, plan_path: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.train_step", "--child", system, "--plan", plan_path]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _print_tail(system: str, log: str, why: str, n: int = 25) -> list[str]:
    try:
        with open(log) as f:
            tail = [ln for ln in f.read().strip().splitlines() if not ln.startswith("RESULT ")][-n:]
    except OSError:
        tail = []
    print(f"  {system} failed ({why}); its last output:\n    " + ("\n    ".join(tail) or "(none)"),
          file=sys.stderr, flush=True)
    return tail


# --------------------------------------------------------------------------- turning raw child numbers into a result

def step_tokens_and_lengths(cfg: Config, data: dict) -> list[tuple[int, list[int]]]:
    """Per step: (real input tokens, row lengths). The same for every system: they read the same rows."""
    out = []
    for i in range(cfg.warmup + cfg.steps):
        rows = data["rows"][i * cfg.batch:(i + 1) * cfg.batch]
        if cfg.method == "sft":
            lengths = [len(r["input_ids"]) for r in rows]
        else:
            lengths = [len(r["prompt_ids"]) + len(r[k]) for k in ("chosen_ids", "rejected_ids") for r in rows]
        out.append((sum(lengths), lengths))
    return out


def summarize(cfg: Config, setup: dict, data: dict, systems: dict) -> dict:
    """Tokens/s, MFU, ratios ours/peer, the fairness check and the targets, from the children's raw numbers."""
    steps = step_tokens_and_lengths(cfg, data)
    flops = [step_flops(setup["counts"], cfg.method, lengths) for _, lengths in steps]
    ceiling = setup["ceiling_flops"]
    for name, r in systems.items():
        if r.get("status") != "ok":
            continue
        timed = range(cfg.warmup, cfg.warmup + cfg.steps)
        r["tokens_per_s"] = statistics.median(steps[i][0] / r["step_s"][i] for i in timed)
        r["model_tflops"] = statistics.median(flops[i] / r["step_s"][i] for i in timed) / 1e12
        r["mfu"] = r["model_tflops"] * 1e12 / ceiling
        r["step_s_median"] = statistics.median(r["step_s"][i] for i in timed)
        r["loss_first"], r["loss_last"] = r["losses"][0], r["losses"][-1]

    # Relative tolerance of the step-1 check. fp32 on CPU: the systems agree to rounding. bf16 on GPU:
    # different kernels (and two NF4 implementations for QLoRA) round differently. On a random-init
    # model the check is weaker than it looks: any tokens give a loss near ln(vocab), so there it
    # mainly catches a broken setup (wrong labels, factors not loaded); on a real model it is strict.
    tol = 5e-3 if cfg.device == "cuda" else 1e-4
    ratios = {}
    ours = systems.get("ours", {})
    for name, r in systems.items():
        if name == "ours" or r.get("status") != "ok" or ours.get("status") != "ok":
            continue
        diff = abs(ours["loss_first"] - r["loss_first"])
        ratios[name] = {
            "speedup": ours["tokens_per_s"] / r["tokens_per_s"],            # > 1: ours is faster
            "memory": ours["peak_mem_mib"] / r["peak_mem_mib"],             # < 1: ours uses less
            "initial_loss_diff": diff,
            "same_initial_loss": diff <= tol * max(1.0, abs(ours["loss_first"])),
            "final_loss_diff": abs(ours["loss_last"] - r["loss_last"]),
        }
    return {
        "config": cfg.name, "settings": settings_of(cfg),
        "environment": setup["environment"],
        "model": {"name": cfg.model, **setup["model_config"], **setup["counts"]},
        "data": setup["data_note"],
        "flops_formula": FLOPS_FORMULA[cfg.method],
        "matmul_ceiling": {"tflops": ceiling / 1e12, "how": setup["ceiling_how"]},
        "tokens_per_step": [t for t, _ in steps],
        "systems": systems, "ratios": ratios, "targets": judge_targets(cfg, ratios),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def settings_of(cfg: Config) -> dict:
    return {"device": cfg.device, "method": cfg.method, "adapter": "qlora" if cfg.qlora else "lora",
            "seq": cfg.seq, "batch": cfg.batch, "unit": "rows" if cfg.method == "sft" else "pairs",
            "steps": cfg.steps, "warmup": cfg.warmup, "layers": cfg.layers,
            "threads": cfg.threads or (os.cpu_count() if cfg.device == "cpu" else None),
            "lora": {**LORA, "target_modules": TARGETS}, "lr": LR[cfg.method],
            "optimizer": "AdamW betas (0.9, 0.999), weight decay 0, grad-norm clip 1.0",
            "dpo_beta": DPO_BETA if cfg.method == "dpo" else None,
            "precision": "bf16 weights + bf16 autocast, fp32 LoRA factors" if cfg.device == "cuda" else "fp32",
            "gradient_checkpointing": False}


def judge_targets(cfg: Config, ratios: dict) -> list[dict]:
    """Issue 8's targets for this configuration, each with the measured ratio and pass / miss / not measured."""
    wanted = []  # (peer, metric, op, threshold)
    if cfg.device == "cuda" and cfg.method == "sft" and cfg.qlora:
        wanted += [("hf", "speedup", ">=", 1.5), ("hf", "memory", "<=", 0.7)]
    if cfg.device == "cuda" and cfg.method == "dpo":
        wanted += [("trl", "speedup", ">=", 1.5)]
    if cfg.device == "cpu" and cfg.method == "sft":
        wanted += [(p, "speedup", ">=", 1.0) for p in ("hf", "trl") if p in cfg.systems]
    if cfg.device == "cpu" and cfg.method == "dpo":
        wanted += [("trl", "speedup", ">=", 1.3)]
    out = []
    for peer, metric, op, threshold in wanted:
        measured = ratios.get(peer, {}).get(metric)
        ok = None if measured is None else (measured >= threshold if op == ">=" else measured <= threshold)
        what = "tokens/s" if metric == "speedup" else "peak memory"
        out.append({"target": f"ours {what} {op} {threshold}x {peer}", "peer": peer, "metric": metric,
                    "threshold": threshold, "measured": measured,
                    "result": "not measured" if ok is None else ("pass" if ok else "miss")})
    return out


def print_summary(run: dict) -> None:
    print(f"\n{run['config']}: {run['model']['name']} layers={run['model']['num_hidden_layers']} "
          f"ceiling {run['matmul_ceiling']['tflops']:.2f} TFLOP/s")
    print(f"  {'system':11s} {'tokens/s':>10s} {'peak MiB':>10s} {'loss 1st':>9s} {'loss last':>9s} {'MFU':>7s}")
    for name, r in run["systems"].items():
        if r.get("status") != "ok":
            print(f"  {name:11s} {r.get('status')}")
            continue
        print(f"  {name:11s} {r['tokens_per_s']:10.1f} {r['peak_mem_mib']:10.0f} {r['loss_first']:9.4f} "
              f"{r['loss_last']:9.4f} {100 * r['mfu']:6.2f}%")
    for peer, q in run["ratios"].items():
        print(f"  ours vs {peer}: {q['speedup']:.2f}x tokens/s, {q['memory']:.2f}x peak memory, "
              f"step-1 loss diff {q['initial_loss_diff']:.2e} ({'same' if q['same_initial_loss'] else 'DIFFERENT'})")
    for t in run["targets"]:
        m = "-" if t["measured"] is None else f"{t['measured']:.3f}"
        print(f"  target {t['target']}: {m} -> {t['result']}")


if __name__ == "__main__":
    sys.exit(main())
