"""End-to-end training steps: the engine against the Hugging Face stack, on CPU and GPU.

    python -m benchmarks.train_step --list
    python -m benchmarks.train_step --config cpu-smollm2-lora-sft
    python -m benchmarks.train_step --config gpu-llama2-7b-qlora-sft-1024 --layers 8
    python -m benchmarks.train_step --config gpu-mistral-7b-lora-dpo-2048 --dry-run

One named configuration fixes the model, the adapter (LoRA or QLoRA), the
objective (SFT or DPO), the batch, the sequence length and the number of
steps. Every system then trains that same model from the same LoRA factors on
the same token ids, in the same order:

    ours    the engine: engine.models loads the model, engine.lora (engine.qlora for
            QLoRA) wraps it, engine.objectives computes the loss, and the step is the
            one engine/train.py runs: forward + loss under bf16 autocast on GPU,
            backward, grad-norm clip at 1.0, AdamW step, zero_grad.
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
    liger   GPU only. SFT: the `hf` loop on a model patched by liger_kernel (RMSNorm,
            RoPE, SwiGLU and the fused linear cross-entropy). DPO: TRL's DPOTrainer with
            use_liger_kernel=True (TRL 1.16 applies Liger's layer kernels; it has no fused
            DPO loss option). On CPU it is recorded as "n/a": Liger's kernels are Triton.

The same for everyone: LoRA r=16, alpha=32, dropout 0 (so no random masks stand
between the systems) on all seven projections, A from engine.lora's seeded init
(saved once, loaded by every system, B = 0); AdamW lr 1e-4 (SFT) / 5e-5 (DPO),
betas (0.9, 0.999), no weight decay; sigmoid DPO with beta 0.1 and the reference
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
nvidia-h200.json), merged with the runs already there; `python -m benchmarks.report`
turns these files into the README table and a PNG chart.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = -100
SYSTEMS = ("ours", "hf", "trl", "liger")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, alpha=32, dropout=0.0)
LR = {"sft": 1e-4, "dpo": 5e-5}
DPO_BETA = 0.1
SEED = 0
LIGER_CPU = "n/a: Liger's kernels are Triton, GPU only"

# The real shapes of the two 7B models (their config.json on the hub), built here with random weights.
# num_hidden_layers is the one knob (--layers): fewer layers, same per-layer shapes.
RANDOM_MODELS = {
    "random:llama2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                                       tie_word_embeddings=False)),
    "random:mistral-7b": ("mistral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                          max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                                          sliding_window=None, tie_word_embeddings=False)),
}


@dataclass(frozen=True)
class Config:
    name: str
    device: str            # "cpu" | "cuda"
    model: str             # engine model name, or a key of RANDOM_MODELS
    method: str            # "sft" | "dpo"
    qlora: bool            # frozen base stored as NF4 (engine.qlora; bitsandbytes for the peers)
    seq: int               # SFT: tokens per row. DPO: at most this many tokens per side (prompt + answer)
    batch: int             # SFT: rows per step. DPO: pairs per step (two rows each)
    steps: int             # timed steps
    warmup: int            # untimed steps before them
    layers: int | None     # num_hidden_layers override (random-init models only)
    systems: tuple[str, ...]
    threads: int = 0       # CPU threads for torch (0: one per core)


def _configs() -> dict[str, Config]:
    cfgs = [
        Config("cpu-smollm2-lora-sft", "cpu", "smollm2-135m-instruct", "sft", False, 256, 4, 10, 2, None,
               ("ours", "hf", "trl", "liger")),
        Config("cpu-smollm2-lora-dpo", "cpu", "smollm2-135m-instruct", "dpo", False, 256, 4, 8, 2, None,
               ("ours", "trl", "liger")),
        # Seconds-long smoke configurations on the built-in random 2-layer model (tests use them).
        Config("cpu-tiny-lora-sft", "cpu", "builtin:tiny-llama", "sft", False, 64, 2, 2, 1, None, ("ours", "hf", "trl")),
        Config("cpu-tiny-lora-dpo", "cpu", "builtin:tiny-llama", "dpo", False, 64, 2, 2, 1, None, ("ours", "trl")),
        # QLoRA SFT smoke (run_gpu.sh --dry-run rehearses the QLoRA row with it)
        Config("cpu-tiny-qlora-sft", "cpu", "builtin:tiny-llama", "sft", True, 64, 2, 2, 1, None, ("ours",)),
    ]
    for short in ("llama2-7b", "mistral-7b"):
        for adapter in ("lora", "qlora"):
            for method in ("sft", "dpo"):
                for seq in (1024, 2048):
                    # The same tokens per step for SFT and DPO: 4 rows (4 SFT rows, or 2 pairs).
                    batch = 4 if method == "sft" else 2
                    systems = ("ours", "hf", "trl", "liger") if method == "sft" else ("ours", "trl", "liger")
                    cfgs.append(Config(f"gpu-{short}-{adapter}-{method}-{seq}", "cuda", f"random:{short}", method,
                                       adapter == "qlora", seq, batch, 6, 2, None, systems))
    return {c.name: c for c in cfgs}


CONFIGS = _configs()


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
    ap.add_argument("--dry-run", action="store_true",
                    help="build the model config on the meta device, count parameters and FLOPs, print the plan")
    ap.add_argument("--child", choices=("setup",) + SYSTEMS, help=argparse.SUPPRESS)  # internal: one child process
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
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
    return run_benchmark(cfg, args.out)


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
    return {"config": cfg.name, "settings": settings_of(cfg), "model_config": _config_summary(hf_config),
            "counts": counts, "flops_per_step": step_flops(counts, cfg.method, lengths),
            "flops_formula": FLOPS_FORMULA[cfg.method],
            "notes": "text-data configs: rows are at most seq tokens; random-init configs: exactly seq"}


def run_benchmark(cfg: Config, out_dir: str) -> int:
    """Setup child, then one child per system; merge the results into <out_dir>/<device>.json."""
    workdir = tempfile.mkdtemp(prefix="paft-bench-")
    try:
        plan = {"config": dataclasses.asdict(cfg), "workdir": workdir}
        plan_path = os.path.join(workdir, "plan.json")
        with open(plan_path, "w") as f:
            json.dump(plan, f)
        print(f"[{cfg.name}] setup: model, data, LoRA init, matmul ceiling", flush=True)
        setup = _spawn("setup", plan_path)
        if "error" in setup:
            print(f"error: setup failed: {setup['error']}", file=sys.stderr)
            return 1
        with open(os.path.join(workdir, "data.json")) as f:
            data = json.load(f)
        systems = {}
        for system in cfg.systems:
            if system == "liger" and cfg.device == "cpu":
                systems[system] = {"status": LIGER_CPU}
                print(f"[{cfg.name}] {system}: {LIGER_CPU}", flush=True)
                continue
            print(f"[{cfg.name}] {system}: running {cfg.warmup}+{cfg.steps} steps", flush=True)
            systems[system] = _spawn(system, plan_path)
        run = summarize(cfg, setup, data, systems)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    from benchmarks.common import device_slug, merge_run
    slug = device_slug(setup["device_name"]) if cfg.device == "cuda" else f"cpu-{os.cpu_count()}core"
    path = os.path.join(out_dir, f"{slug}.json")
    merge_run(path, {"benchmark": "train_step", "device": slug}, cfg.name, run)
    print_summary(run)
    print(f"results: {path} (runs[{cfg.name!r}])")
    failed = [s for s, r in systems.items() if r.get("status", "").startswith("failed")]
    if failed:
        print(f"error: {', '.join(failed)} failed (see the status fields)", file=sys.stderr)
        return 1
    return 0


def _spawn(system: str, plan_path: str) -> dict:
    """Run one child process; its last stdout line starting with RESULT carries its JSON."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    # PAFT_BENCH_SYSTEM_TIMEOUT_S (run_gpu.sh sets it): a hung system loses its own row only
    limit = float(os.environ.get("PAFT_BENCH_SYSTEM_TIMEOUT_S", 0)) or None
    if limit and system == "setup":
        limit *= 2  # setup writes the random-init model once
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--child", system, "--plan", plan_path],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"  {system} failed: timed out after {limit:.0f} s", file=sys.stderr)
        return {"status": f"failed: timed out after {limit:.0f} s", "error": "timeout"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-25:]
        print(f"  {system} failed (exit {proc.returncode}):\n    " + "\n    ".join(tail), file=sys.stderr)
        last = tail[-1] if tail else f"exit status {proc.returncode}"
        return {"status": f"failed: {last}"[:300], "error": last}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"  {system}: done in {result['wall_s']} s", flush=True)
    return result


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
    print(f"  {'system':7s} {'tokens/s':>10s} {'peak MiB':>10s} {'loss 1st':>9s} {'loss last':>9s} {'MFU':>7s}")
    for name, r in run["systems"].items():
        if r.get("status") != "ok":
            print(f"  {name:7s} {r.get('status')}")
            continue
        print(f"  {name:7s} {r['tokens_per_s']:10.1f} {r['peak_mem_mib']:10.0f} {r['loss_first']:9.4f} "
              f"{r['loss_last']:9.4f} {100 * r['mfu']:6.2f}%")
    for peer, q in run["ratios"].items():
        print(f"  ours vs {peer}: {q['speedup']:.2f}x tokens/s, {q['memory']:.2f}x peak memory, "
              f"step-1 loss diff {q['initial_loss_diff']:.2e} ({'same' if q['same_initial_loss'] else 'DIFFERENT'})")
    for t in run["targets"]:
        m = "-" if t["measured"] is None else f"{t['measured']:.3f}"
        print(f"  target {t['target']}: {m} -> {t['result']}")


# =========================================================================== model shapes and FLOPs

FLOPS_FORMULA = {
    "sft": "per row of T tokens: 4*N*T + 6*N_lora*T + 12*L*d*T^2 (N: frozen matmul weights incl. LM head)",
    "dpo": "per row of T tokens: 6*N*T + 6*N_lora*T + 16*L*d*T^2 (policy forward+backward + reference forward)",
}


def step_flops(counts: dict, method: str, lengths: list[int]) -> float:
    """Model FLOPs of one step whose rows have these lengths (formula in the module docstring)."""
    n, n_lora, attn = counts["matmul_params"], counts["lora_params"], counts["layers"] * counts["attn_dim"]
    dense, attention = (4, 12) if method == "sft" else (6, 16)
    return float(sum(dense * n * t + 6 * n_lora * t + attention * attn * t * t for t in lengths))


def model_config(cfg: Config):
    """The transformers config of the configuration's model (with the layer override).

    Built in code for the random-init models; read from the model directory otherwise (for SmolLM2
    that is the engine's safetensors cache, converted from the GGUF file once if not there yet).
    """
    import transformers
    if cfg.model in RANDOM_MODELS:
        kind, shape = RANDOM_MODELS[cfg.model]
        cls = transformers.LlamaConfig if kind == "llama" else transformers.MistralConfig
        tok = byte_tokenizer()
        hf_config = cls(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
        if cfg.layers is not None:
            hf_config.num_hidden_layers = cfg.layers
        return hf_config
    return transformers.AutoConfig.from_pretrained(model_dir(cfg, create=True))


def _config_summary(hf_config) -> dict:
    return {k: getattr(hf_config, k) for k in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                                               "num_attention_heads", "num_key_value_heads", "vocab_size")}


def count_params(hf_config, cfg: Config) -> dict:
    """Matmul weights, LoRA factors, layers and attention width, counted on a meta-device model."""
    import torch
    import transformers
    from engine.lora import LoRALinear, apply_lora, lora_parameters
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    # Counted without quantization: NF4 changes how the frozen weights are stored, not the FLOPs.
    apply_lora(model, dataclasses.replace(lora_config(cfg), quantize_base=None), seed=SEED)
    lora_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    inside = {id(x) for m in lora_layers for x in (m.base_layer, m.lora_A, m.lora_B)}
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in inside)
    matmul += sum(m.base_layer.weight.numel() for m in lora_layers)  # the frozen projections; the rest is the head
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return {"total_params": sum(p.numel() for p in model.parameters()),
            "matmul_params": matmul, "lora_params": sum(p.numel() for p in lora_parameters(model)),
            "layers": hf_config.num_hidden_layers, "attn_dim": hf_config.num_attention_heads * head_dim}


def lora_config(cfg: Config):
    from engine.recipe import LoRAConfig
    return LoRAConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], target_modules=list(TARGETS),
                      quantize_base="nf4" if cfg.qlora else None)


def byte_tokenizer():
    """builtin:tiny-llama's byte-level tokenizer: the tokenizer saved beside the random-init models."""
    import torch
    from engine.models import load_model_and_tokenizer
    from engine.recipe import ModelConfig
    return load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))[1]


def model_dir(cfg: Config, create: bool) -> str:
    """An HF model directory (safetensors + tokenizer) that every system loads with from_pretrained.

    SmolLM2: the engine's own safetensors cache of the GGUF file. tiny-llama and the random-init
    models: written once under <cache root>/bench/ and reused, so every child (and every later
    run) reads the very same weights.
    """
    from engine.models import cache_root, convert_gguf, gguf_cache_dir, resolve_gguf
    from engine.recipe import ModelConfig
    root = cache_root(ModelConfig(name=cfg.model))
    gguf = resolve_gguf(cfg.model) if cfg.model not in RANDOM_MODELS and not cfg.model.startswith("builtin:") else None
    if gguf is not None:
        path = gguf_cache_dir(gguf, root)
        if create and not os.path.isdir(path):
            convert_gguf(gguf, path)
        return path
    layers = f"-L{cfg.layers}" if cfg.layers is not None else ""
    path = os.path.join(root, "bench", cfg.model.replace(":", "-") + layers)
    if create and not os.path.isdir(path):
        _write_model_dir(cfg, path)
    return path


def _write_model_dir(cfg: Config, path: str) -> None:
    import torch
    import transformers
    from engine.models import load_model_and_tokenizer
    from engine.recipe import ModelConfig
    if cfg.model in RANDOM_MODELS:
        device = torch.device(cfg.device)
        torch.manual_seed(SEED)
        with device:  # initialise on the GPU when there is one: seconds instead of minutes for 7B shapes
            model = transformers.AutoModelForCausalLM.from_config(model_config(cfg), dtype=torch.bfloat16)
        tok = byte_tokenizer()
    else:
        model, tok = load_model_and_tokenizer(ModelConfig(name=cfg.model), torch.device("cpu"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, path)  # written under a temporary name, so a killed run never leaves half a model
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# =========================================================================== data (made once, in the setup child)

def text_sft_rows(tok, n: int, seq: int) -> list[dict]:
    """n multi-turn arithmetic chats, each cut to exactly `seq` tokens; loss on the assistant tokens."""
    from engine.data import arithmetic_rows, encode_all
    per_chat = seq // 8 + 1  # an exchange is more than 8 tokens, so every chat overflows seq and is cut there
    qa = arithmetic_rows("train", n * per_chat)
    chats = [{"messages": [m for r in qa[i * per_chat:(i + 1) * per_chat] for m in r["messages"]]} for i in range(n)]
    enc, _ = encode_all(chats, tok, "tokenizer", seq)
    if len(enc) != n or any(len(e["input_ids"]) != seq for e in enc):
        raise ValueError(f"data: could not fill {n} rows of {seq} tokens")
    return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in enc]


def text_pairs(n: int) -> list[dict]:
    """n preference pairs: a four-question prompt, the correct answers (chosen), wrong ones (rejected)."""
    from engine.data import arithmetic_rows
    qa = arithmetic_rows("train", 4 * n)
    pairs = []
    for i in range(n):
        qs = qa[4 * i: 4 * i + 4]
        prompt = "Please solve these and show each result: " + "; ".join(r["messages"][0]["content"] for r in qs)
        chosen = "Here are the results. " + " ".join(r["messages"][1]["content"] + "." for r in qs) + \
            " Each line shows the operation and its exact value."
        rejected = "I think the answers are roughly " + ", ".join(str(r["answer"] + 7) for r in qs) + \
            ", but I did not check them carefully and some may be wrong, sorry."
        pairs.append({"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected})
    return pairs


def text_dpo_rows(tok, n: int, seq: int) -> list[dict]:
    """The pairs tokenized by the engine (its chat template and truncation), split into prompt / answers.

    The answer is the run of trained tokens; whatever the template puts after it (an untrained
    newline) is dropped for every system alike, so TRL's (prompt_ids, chosen_ids, rejected_ids)
    and the engine's labelled rows are the same tokens with the same trained positions.
    """
    from engine.data import encode_pairs
    enc, _ = encode_pairs(text_pairs(n), tok, "tokenizer", seq)
    rows = []
    for p in enc:
        sides = {}
        for side in ("chosen", "rejected"):
            ids, labels = p[f"{side}_input_ids"], p[f"{side}_labels"]
            trained = [t for t, lab in enumerate(labels) if lab != IGNORE]
            start, end = trained[0], trained[-1] + 1
            if end - start != len(trained):
                raise ValueError("data: the trained answer tokens are not one contiguous run")
            sides[side] = (ids[:start], ids[start:end])
        if sides["chosen"][0] != sides["rejected"][0]:
            raise ValueError("data: chosen and rejected rows do not share their prompt tokens")
        rows.append({"prompt_ids": sides["chosen"][0], "chosen_ids": sides["chosen"][1],
                     "rejected_ids": sides["rejected"][1]})
    return rows


def random_rows(cfg: Config, vocab: int, n: int) -> list[dict]:
    """Random token ids (fixed seed): SFT rows of seq tokens, half prompt / half answer; DPO pairs likewise."""
    import torch
    g = torch.Generator().manual_seed(SEED)
    half = cfg.seq // 2
    if cfg.method == "sft":
        ids = torch.randint(0, vocab, (n, cfg.seq), generator=g).tolist()
        return [{"input_ids": r, "labels": [IGNORE] * half + r[half:]} for r in ids]
    ids = torch.randint(0, vocab, (n, half + 2 * (cfg.seq - half)), generator=g).tolist()
    return [{"prompt_ids": r[:half], "chosen_ids": r[half:cfg.seq], "rejected_ids": r[cfg.seq:]} for r in ids]


def make_data(cfg: Config, tok, vocab: int) -> tuple[dict, str]:
    n = cfg.batch * (cfg.warmup + cfg.steps)  # step i reads rows [i*batch, (i+1)*batch): every system, in order
    if cfg.model in RANDOM_MODELS:
        note = (f"random token ids (seed {SEED}); SFT rows of {cfg.seq} tokens, first half prompt" if cfg.method == "sft"
                else f"random token ids (seed {SEED}); prompt {cfg.seq // 2} + answers {cfg.seq - cfg.seq // 2} tokens")
        return {"method": cfg.method, "rows": random_rows(cfg, vocab, n)}, note
    if cfg.method == "sft":
        return ({"method": "sft", "rows": text_sft_rows(tok, n, cfg.seq)},
                f"multi-turn arithmetic chat, {cfg.seq} tokens per row, loss on assistant tokens")
    return ({"method": "dpo", "rows": text_dpo_rows(tok, n, cfg.seq)},
            "arithmetic preference pairs (4 questions; correct vs wrong answers), chat template")


def engine_batch(rows: list[dict], method: str, pad_id: int) -> dict:
    """The step's rows as the engine's data pipeline hands them to the loop (engine.data collate).

    The hf loop reads input_ids / attention_mask / labels of the same tensors. A DPO batch holds
    the chosen rows, then the rejected ones, as engine.data.PairBatches builds it.
    """
    from engine.data.batches import collate
    if method == "sft":
        return collate([[{"input_ids": r["input_ids"], "labels": r["labels"]}] for r in rows], pad_id)
    sides = [{"input_ids": r["prompt_ids"] + r[k], "labels": [IGNORE] * len(r["prompt_ids"]) + r[k]}
             for k in ("chosen_ids", "rejected_ids") for r in rows]
    batch = collate([[s] for s in sides], pad_id)
    batch["n_pairs"] = len(rows)
    return batch


# =========================================================================== the children

def run_child(system: str, plan_path: str) -> int:
    import torch
    with open(plan_path) as f:
        plan = json.load(f)
    cfg = Config(**{**plan["config"], "systems": tuple(plan["config"]["systems"])})
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads or os.cpu_count())
    elif not torch.cuda.is_available():
        raise SystemExit(f"{cfg.name} needs a CUDA device; torch sees none")
    fn = {"setup": child_setup, "ours": child_ours, "hf": child_hf, "trl": child_trl, "liger": child_liger}[system]
    result = fn(cfg, plan["workdir"])
    print("RESULT " + json.dumps(result))
    return 0


def child_setup(cfg: Config, workdir: str) -> dict:
    """Write the model directory (cached), the data and the shared LoRA init; measure the matmul ceiling."""
    import torch
    import transformers
    from safetensors.torch import save_file
    path = model_dir(cfg, create=True)
    hf_config = transformers.AutoConfig.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    data, note = make_data(cfg, tok, hf_config.vocab_size)
    with open(os.path.join(workdir, "data.json"), "w") as f:
        json.dump(data, f)

    save_file(initial_factors(hf_config, cfg), os.path.join(workdir, "lora_init.safetensors"))

    ceiling, how = matmul_ceiling(torch.device(cfg.device))
    name = torch.cuda.get_device_name(0) if cfg.device == "cuda" else "cpu"
    return {"status": "ok", "model_dir": path, "device_name": name, "counts": count_params(hf_config, cfg),
            "model_config": _config_summary(hf_config), "data_note": note, "ceiling_flops": ceiling,
            "ceiling_how": how, "environment": environment(cfg, name)}


def initial_factors(hf_config, cfg: Config) -> dict:
    """The LoRA factors every system starts from, under peft's key names: engine.lora's init.

    apply_lora draws A (Kaiming-uniform, B = 0) layer by layer, in module order, from one generator
    seeded with SEED. The same draws are made here on stand-in layers of the right shapes (the model
    itself is only a meta-device shell, and a stand-in's weight is allocated, never written: no
    weights are loaded). The "ours" child still copies these in after its own apply_lora, so all
    systems share them whatever happens.
    """
    import torch
    import transformers
    from engine.lora import KEY_PREFIX, LoRALinear, target_module_names
    with torch.device("meta"):
        shell = transformers.AutoModelForCausalLM.from_config(hf_config)
    lcfg = lora_config(cfg)
    generator = torch.Generator().manual_seed(SEED)
    factors = {}
    for name in target_module_names(shell, lcfg.target_modules):
        shape = shell.get_submodule(name)
        stand_in = torch.nn.utils.skip_init(torch.nn.Linear, shape.in_features, shape.out_features, bias=False)
        layer = LoRALinear(stand_in, lcfg.r, lcfg.alpha, lcfg.dropout, lcfg.rslora, lcfg.init, generator)
        factors[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().clone()
        factors[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().clone()
    return factors


def matmul_ceiling(device) -> tuple[float, str]:
    """FLOP/s of one large matrix product: bf16 8192^3 on GPU, fp32 2048^3 on CPU; median of timed runs."""
    import torch
    n, dtype, reps = (8192, torch.bfloat16, 10) if device.type == "cuda" else (2048, torch.float32, 5)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    times = []
    for i in range(reps + 3):  # 3 warm-ups
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    how = f"torch.matmul {n}x{n}x{n} {str(dtype).removeprefix('torch.')}, median of {reps}"
    return 2 * n ** 3 / statistics.median(times), how


def environment(cfg: Config, device_name: str) -> dict:
    import platform
    from importlib import metadata
    from benchmarks.common import cpu_model_name

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None
    env = {pkg: version(pkg) for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel",
                                         "accelerate", "datasets")}
    env.update(python=platform.python_version(), device=device_name, cpu=cpu_model_name(), cpu_count=os.cpu_count())
    if cfg.device == "cpu":
        import torch
        env["torch_threads"] = torch.get_num_threads()
    return env


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


class Meter:
    """Peak memory of the training steps: reset after setup, read after the last step."""

    def __init__(self, device):
        import torch
        self.device = device
        if device.type == "cuda":
            self.load_peak = torch.cuda.max_memory_allocated() / 2 ** 20  # loading / quantizing, for the record
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated over the training steps"
        else:
            from benchmarks.common import reset_peak_rss
            self.load_peak = None
            self.method = reset_peak_rss()

    def result(self) -> dict:
        import torch
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            from benchmarks.common import peak_rss_mib
            peak = peak_rss_mib(self.method)
        return {"peak_mem_mib": peak, "load_peak_mib": self.load_peak, "mem_method": self.method}


def _load_data(workdir: str) -> dict:
    with open(os.path.join(workdir, "data.json")) as f:
        return json.load(f)


def _init_factors(workdir: str) -> dict:
    from safetensors.torch import load_file
    return load_file(os.path.join(workdir, "lora_init.safetensors"))


def _batches(cfg: Config, workdir: str, pad_id: int) -> list[dict]:
    rows = _load_data(workdir)["rows"]
    return [engine_batch(rows[i * cfg.batch:(i + 1) * cfg.batch], cfg.method, pad_id)
            for i in range(cfg.warmup + cfg.steps)]


def timed_steps(batches: list[dict], device, step) -> tuple[list[float], list[float]]:
    """Run step(mb) -> loss (a float) on every batch; (seconds per step, losses). The clock brackets one
    whole optimizer step, after a device synchronize on both sides (the ours and hf loops share it)."""
    times, losses = [], []
    for mb in batches:
        _sync(device)
        t0 = time.perf_counter()
        losses.append(step(mb))
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, losses


def _autocast(device):
    """bf16 autocast on GPU, as engine/train.py runs it; nothing on CPU (fp32)."""
    import torch
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def child_ours(cfg: Config, workdir: str) -> dict:
    """The engine: its loader, LoRA / QLoRA, objective, optimizer, and train.py's step."""
    from functools import partial

    import torch
    from engine.lora import apply_lora, copy_lora_tensors, lora_parameters
    from engine.models import load_model_and_tokenizer
    from engine.objectives import dpo_objective, sft_objective, step_totals
    from engine.optim import build_optimizer
    from engine.recipe import DPOConfig, ModelConfig, TrainConfig
    from engine.train import to_device

    device = torch.device(cfg.device)
    model, tok = load_model_and_tokenizer(ModelConfig(name=model_dir(cfg, create=False)), device)
    apply_lora(model, lora_config(cfg), seed=SEED)
    copy_lora_tensors(model, _init_factors(workdir), "lora_init.safetensors")  # the same values, made explicit
    params = lora_parameters(model)
    optimizer = build_optimizer(params, TrainConfig(lr=LR[cfg.method]))
    objective = sft_objective if cfg.method == "sft" else partial(dpo_objective, cfg=DPOConfig(beta=DPO_BETA))

    def step(mb: dict) -> float:
        # engine/train.py's step, one micro-batch: forward + loss, backward, clip, AdamW, zero_grad
        totals = step_totals([mb])
        with _autocast(device):
            loss, stats = objective(model, to_device(mb, device), totals)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return stats["dpo_loss"] if cfg.method == "dpo" else stats["loss"]

    batches = _batches(cfg, workdir, tok.pad_token_id)
    model.train()
    meter = Meter(device)
    times, losses = timed_steps(batches, device, step)
    desc = ("engine: engine.qlora NF4 base" if cfg.qlora else "engine: engine.lora") + \
        f", {'sft_objective' if cfg.method == 'sft' else 'dpo_objective (reference = adapters off)'}, torch AdamW"
    return {"status": "ok", "description": desc, "step_s": times, "losses": losses, **meter.result()}


def load_peer_model(cfg: Config):
    """The model as a transformers user loads it: from_pretrained, bitsandbytes 4-bit for QLoRA."""
    import torch
    import transformers
    path = model_dir(cfg, create=False)
    dtype = torch.bfloat16 if cfg.device == "cuda" else torch.float32
    if cfg.qlora:
        # QLoRA as the paper's code and the peft docs set it up. No prepare_model_for_kbit_training: it
        # would upcast the embedding, norms and head to fp32 and turn on gradient checkpointing, work the
        # engine does not do (TRL calls it itself for a quantized model; that is TRL's default behaviour).
        bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=bnb,
                                                                  device_map={"": 0})
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(cfg.device)
    model.config.use_cache = False
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # as engine.models does, so every system pads with the same id
        tok.pad_token = tok.eos_token
    return model, tok


def peft_lora_config():
    import peft
    return peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                           target_modules=list(TARGETS), task_type="CAUSAL_LM")


def set_factors(peft_model, workdir: str) -> None:
    """Load the shared init into a peft model (peft's own loader; every key must land)."""
    import peft
    result = peft.set_peft_model_state_dict(peft_model, _init_factors(workdir))
    if result.unexpected_keys:
        raise RuntimeError(f"LoRA init keys peft did not take: {result.unexpected_keys[:3]}")


def child_hf(cfg: Config, workdir: str, liger: bool = False) -> dict:
    """A plain transformers + peft (+ bitsandbytes) loop; with liger=True on a Liger-patched model."""
    import peft
    import torch
    if liger:
        import liger_kernel.transformers as lk
        from transformers import AutoConfig
        kind = AutoConfig.from_pretrained(model_dir(cfg, create=False)).model_type
        getattr(lk, f"apply_liger_kernel_to_{kind}")()  # patches the model classes before loading
    device = torch.device(cfg.device)
    base, tok = load_peer_model(cfg)
    model = peft.get_peft_model(base, peft_lora_config())
    set_factors(model, workdir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR[cfg.method], weight_decay=0.0)

    def step(mb: dict) -> float:
        with _autocast(device):
            loss = model(input_ids=mb["input_ids"].to(device), attention_mask=mb["attention_mask"].to(device),
                         labels=mb["labels"].to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    batches = _batches(cfg, workdir, tok.pad_token_id)
    model.train()
    meter = Meter(device)
    times, losses = timed_steps(batches, device, step)
    desc = "transformers + peft loop" + (" + bitsandbytes 4-bit" if cfg.qlora else "") + \
        (" on a liger_kernel-patched model" if liger else "") + ", torch AdamW"
    return {"status": "ok", "description": desc, "step_s": times, "losses": losses, **meter.result()}


def child_trl(cfg: Config, workdir: str, liger: bool = False) -> dict:
    """TRL's SFTTrainer / DPOTrainer on the same token ids, in order, from the same factors."""
    import datasets
    import torch
    import trl
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    device = torch.device(cfg.device)
    model, tok = load_peer_model(cfg)
    rows = _load_data(workdir)["rows"]
    times, losses = [], []
    state = {}

    class StepClock(TrainerCallback):
        """Times each optimizer step (Trainer fetches the batch before on_step_begin) and collects losses."""

        def on_train_begin(self, args, st, control, **kw):
            state["meter"] = Meter(device)

        def on_step_begin(self, args, st, control, **kw):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            _sync(device)
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, st, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class InOrder:
        """Rows in the given order, as every other system reads them (Trainer shuffles by default)."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    common = dict(output_dir=os.path.join(workdir, "trl"), per_device_train_batch_size=cfg.batch,
                  max_steps=cfg.warmup + cfg.steps, learning_rate=LR[cfg.method], lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False,
                  bf16=device.type == "cuda", use_cpu=device.type == "cpu", report_to=[], logging_steps=1,
                  save_strategy="no", dataloader_num_workers=0, seed=SEED, use_liger_kernel=liger)
    if cfg.method == "sft":
        args = trl.SFTConfig(**common, max_length=cfg.seq, packing=False)
        cls = type("SFTTrainerInOrder", (InOrder, trl.SFTTrainer), {})
    else:
        args = trl.DPOConfig(**common, beta=DPO_BETA, loss_type=["sigmoid"], max_length=None)

        def _prepare_dataset(self, dataset, *args, **kwargs):
            # The rows are already token ids (prompt_ids, chosen_ids, rejected_ids: the columns TRL's
            # own tokenization produces), so both systems train on identical ids; nothing to redo.
            return dataset
        cls = type("DPOTrainerInOrder", (InOrder, trl.DPOTrainer), {"_prepare_dataset": _prepare_dataset})
    trainer = cls(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                  peft_config=peft_lora_config(), callbacks=[StepClock()])
    set_factors(trainer.model, workdir)
    trainer.train()
    desc = f"trl {trl.__version__} {'SFTTrainer' if cfg.method == 'sft' else 'DPOTrainer'} + peft" + \
        (" + bitsandbytes 4-bit" if cfg.qlora else "") + (", use_liger_kernel" if liger else "") + \
        f", optim {args.optim}"
    return {"status": "ok", "description": desc, "step_s": times, "losses": losses, **state["meter"].result()}


def child_liger(cfg: Config, workdir: str) -> dict:
    """Liger-Kernel where it applies: SFT on a patched model in the hf loop; DPO through TRL's switch."""
    return child_hf(cfg, workdir, liger=True) if cfg.method == "sft" else child_trl(cfg, workdir, liger=True)


if __name__ == "__main__":
    sys.exit(main())
