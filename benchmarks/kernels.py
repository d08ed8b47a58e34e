"""Kernel benchmarks (kernels), one section per kernel family.

    python -m benchmarks.kernels [--smoke] [--only lora_linear] [--iters 20] [--warmup 5]

Sections
  lora_linear   the fused LoRA linear (kernels/lora_linear.py) against peft's LoRA layer
                (peft.tuners.lora.Linear wrapping an nn.Linear) and against the frozen base
                matmul alone, Llama-7B projection shapes (8192 tokens; 4096→4096, 4096→11008,
                11008→4096), r = 16 and 64, bf16, forward and forward+backward (gradients for
                x, A, B; W frozen). Median of CUDA-event timings.
                Targets: fused fwd+bwd ≤ 1.15× the base matmul's; peft ≥ 1.3× slower than fused.

With CUDA, results are merged into benchmarks/results/<device>.json under the section's key
(other sections' keys are kept). Without CUDA each section prints "no CUDA device: GPU kernel
benchmark not run" and runs a tiny CPU smoke version (torch reference vs peft, small shapes) so
that the script itself is exercised; nothing is written then, so no GPU numbers are invented.
--smoke runs small shapes on the GPU too and writes nothing unless --out is given.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn as nn

from benchmarks.common import device_slug

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NO_CUDA = "no CUDA device: GPU kernel benchmark not run"


# ----------------------------------------------------------------------------- shared helpers



def cuda_time_ms(fn, iters: int, warmup: int, setup=None) -> float:
    """Median milliseconds of fn() over `iters` runs, timed with CUDA events around each call.

    `setup` (untimed) runs before every call, e.g. to clear .grad so that backward writes
    gradients instead of accumulating into them.
    """
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if setup:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cpu_time_ms(fn, iters: int, warmup: int, setup=None) -> float:
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(iters):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def merge_results(path: str, key: str, value: dict) -> None:
    """Set results[key] = value in the JSON file at `path` (created if missing), atomically."""
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = value
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path} [{key!r}]")


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- section: lora_linear

LORA_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in K, out N): q/k/v/o, gate/up, down
LORA_RANKS = [16, 64]
LORA_TOKENS = 8192
FUSED_OVER_BASE_MAX = 1.15  # fused fwd+bwd time / base matmul fwd+bwd time
PEFT_OVER_FUSED_MIN = 1.3   # peft fwd+bwd time / fused fwd+bwd time


def _peft_layer(K: int, N: int, r: int, alpha: float, dropout: float, dtype, device):
    """peft's LoRA layer on a frozen bias-free nn.Linear (Llama projections have no bias)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    base = nn.Linear(K, N, bias=False, dtype=dtype, device=device)
    base.weight.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
    layer = PeftLoraLinear(base, "default", config=cfg, r=r, lora_alpha=alpha)
    layer.to(device=device, dtype=dtype)
    with torch.no_grad():  # a trained-looking B (peft initialises it to zero)
        layer.lora_B["default"].weight.normal_(0, 0.02)
    layer.train()
    return layer


def _lora_case(K: int, N: int, r: int, M: int, dropout: float, dtype, device, backend: str, timer,
               iters: int, warmup: int) -> dict:
    from kernels.lora_linear import lora_linear

    alpha = 2.0 * r
    peft_layer = _peft_layer(K, N, r, alpha, dropout, dtype, device)
    W = peft_layer.base_layer.weight                 # (N, K) frozen
    A = peft_layer.lora_A["default"].weight          # (r, K) trainable, the same tensors peft trains
    B = peft_layer.lora_B["default"].weight          # (N, r)
    s = peft_layer.scaling["default"]
    x = torch.randn(M, K, dtype=dtype, device=device)
    dy = torch.randn(M, N, dtype=dtype, device=device)
    xg = x.clone().requires_grad_()                  # fwd+bwd: dx wanted, as inside a network

    def clear():
        xg.grad = None
        A.grad = None
        B.grad = None

    fns = {
        "base": lambda inp: torch.nn.functional.linear(inp, W),
        "fused": lambda inp: lora_linear(inp, W, None, A, B, s, dropout, True, backend=backend),
        "peft": lambda inp: peft_layer(inp),
    }
    with torch.no_grad():  # one correctness look at the same parameters (dropout off for it)
        peft_layer.eval()
        y_peft = peft_layer(x)
        y_fused = lora_linear(x, W, None, A, B, s, 0.0, False, backend=backend)
        peft_layer.train()
    row = {"K": K, "N": N, "r": r, "tokens": M, "fused_vs_peft_rel_err": rel_err(y_fused, y_peft),
           "fwd_ms": {}, "fwd_bwd_ms": {}}
    for name, fn in fns.items():
        with torch.no_grad():
            row["fwd_ms"][name] = timer(lambda: fn(x), iters, warmup)
        row["fwd_bwd_ms"][name] = timer(lambda: fn(xg).backward(dy), iters, warmup, setup=clear)
    fb = row["fwd_bwd_ms"]
    row["fused_over_base_fwd_bwd"] = fb["fused"] / fb["base"]
    row["peft_over_fused_fwd_bwd"] = fb["peft"] / fb["fused"]
    row["meets_targets"] = {"fused_within_1.15x_base": row["fused_over_base_fwd_bwd"] <= FUSED_OVER_BASE_MAX,
                            "fused_1.3x_faster_than_peft": row["peft_over_fused_fwd_bwd"] >= PEFT_OVER_FUSED_MIN}
    # achieved throughput of the fused fwd+bwd: 4·M·N·K (base y and dx) + 6·M·r·(N + K) (LoRA)
    flops = 4 * M * N * K + 6 * M * r * (N + K)
    row["fused_fwd_bwd_tflops"] = flops / (fb["fused"] * 1e-3) / 1e12
    return row


def _print_lora_table(rows: list[dict], targets: bool = True) -> None:
    """One line per (shape, r): times in ms, the two ratios the targets are about, and the forward's
    max relative difference fused vs peft. `targets=False` (CPU smoke) leaves out the verdicts."""
    print(f"{'shape':>13} {'r':>3} | {'fwd ms: base':>13} {'fused':>8} {'peft':>8} | "
          f"{'fwd+bwd: base':>13} {'fused':>8} {'peft':>8} | {'fused/base':>10} {'peft/fused':>10} | {'rel err':>8}")
    for row in rows:
        f, fb = row["fwd_ms"], row["fwd_bwd_ms"]
        ok1 = ("ok" if row["fused_over_base_fwd_bwd"] <= FUSED_OVER_BASE_MAX else "MISS") if targets else ""
        ok2 = ("ok" if row["peft_over_fused_fwd_bwd"] >= PEFT_OVER_FUSED_MIN else "MISS") if targets else ""
        print(f"{row['K']:>6}→{row['N']:<6} {row['r']:>3} | {f['base']:>13.3f} {f['fused']:>8.3f} {f['peft']:>8.3f} | "
              f"{fb['base']:>13.3f} {fb['fused']:>8.3f} {fb['peft']:>8.3f} | "
              f"{row['fused_over_base_fwd_bwd']:>6.2f}× {ok1:<3} {row['peft_over_fused_fwd_bwd']:>6.2f}× {ok2:<3} | "
              f"{row['fused_vs_peft_rel_err']:>8.1e}")
    if targets:
        print(f"targets: fused fwd+bwd ≤ {FUSED_OVER_BASE_MAX}× base matmul fwd+bwd; "
              f"peft fwd+bwd ≥ {PEFT_OVER_FUSED_MIN}× fused")
    else:
        print("(CPU: 'fused' is the torch reference path; the GPU targets do not apply)")


def bench_lora_linear(args) -> dict | None:
    """Fused LoRA linear vs peft vs the base matmul. Returns the section's JSON (None on CPU)."""
    print("== lora_linear: y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ (bf16) ==")
    if not torch.cuda.is_available():
        print(NO_CUDA)
        print("CPU smoke run (torch reference path vs peft, small fp32 shapes; not a kernel benchmark):")
        torch.set_num_threads(args.threads)
        rows = [_lora_case(K, N, r, 256, args.dropout, torch.float32, "cpu", "torch", cpu_time_ms, 10, 3)
                for K, N, r in [(128, 256, 8), (256, 128, 8)]]
        _print_lora_table(rows, targets=False)
        bad = [r for r in rows if r["fused_vs_peft_rel_err"] > 1e-5]
        if bad:
            raise SystemExit(f"lora_linear CPU smoke: torch path disagrees with peft: {bad}")
        return None
    tokens = 1024 if args.smoke else LORA_TOKENS
    shapes = [(1024, 2048)] if args.smoke else LORA_SHAPES
    ranks = [16] if args.smoke else LORA_RANKS
    rows = []
    for K, N in shapes:
        for r in ranks:
            rows.append(_lora_case(K, N, r, tokens, args.dropout, torch.bfloat16, "cuda", "triton",
                                   cuda_time_ms, args.iters, args.warmup))
            torch.cuda.empty_cache()
    _print_lora_table(rows)
    import triton
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "dtype": "bfloat16", "tokens": tokens, "lora_dropout": args.dropout, "iters": args.iters,
            "timing": "median of CUDA-event times per call",
            "targets": {"fused_over_base_fwd_bwd_max": FUSED_OVER_BASE_MAX,
                        "peft_over_fused_fwd_bwd_min": PEFT_OVER_FUSED_MIN},
            "smoke": bool(args.smoke), "rows": rows}


# ----------------------------------------------------------------------------- main

def bench_prox_and_l1(args) -> None:
    """The fused AdamW + soft-threshold step and the L1 of B A (benchmarks/kernels_prox.py)."""
    from benchmarks import kernels_prox
    kernels_prox.main(["--smoke"] if args.smoke else [])


def bench_nf4_dequant(args) -> None:
    """NF4 dequantization, ours vs bitsandbytes (benchmarks/nf4_dequant.py)."""
    from benchmarks import nf4_dequant
    nf4_dequant.main(["--runs", str(args.iters), "--warmup", str(args.warmup)])


# Each section prints its table; lora_linear returns its rows for <device>.json, the other two
# write their own files (<device>_prox.json, <device>_nf4_dequant.json).
SECTIONS = {
    "lora_linear": bench_lora_linear,
    "prox_l1": bench_prox_and_l1,
    "nf4_dequant": bench_nf4_dequant,
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Kernel benchmarks (kernels): " + ", ".join(SECTIONS),
                                 epilog="Results: benchmarks/results/<device>.json, one key per section "
                                        "(merged; written only with CUDA and not for --smoke unless --out).")
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    ap.add_argument("--smoke", action="store_true", help="small shapes, quick run; writes no results file")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per measurement (median)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed iterations first (compilation, caches)")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout for the lora_linear section")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the CPU smoke runs")
    ap.add_argument("--out", help="results JSON path (default benchmarks/results/<device>.json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.iters, args.warmup = min(args.iters, 5), min(args.warmup, 2)

    results = {}
    for name in args.only or list(SECTIONS):
        res = SECTIONS[name](args)
        if res is not None:
            results[name] = res
        print()
    if not results:
        return
    if args.smoke and not args.out:
        print("--smoke: results not written (pass --out to keep them)")
        return
    path = args.out or os.path.join(RESULTS_DIR, f"{device_slug(torch.cuda.get_device_name())}.json")
    for name, res in results.items():
        merge_results(path, name, res)


if __name__ == "__main__":
    main()
