"""Kernel benchmarks, one section per kernel family.

    python -m benchmarks.kernels --only lora_linear [--out x.json] [--write-routes [--routes-out R.json]]  # GPU
    python -m benchmarks.kernels --only lora_linear --dry-run                         # CPU rehearsal
    python -m benchmarks.kernels --write-routes FROM.json [--routes-out R.json]       # route table from a result

Sections
  lora_linear   y = x Wᵀ + s·x Aᵀ Bᵀ fwd+bwd (gradients for x, A, B; W frozen), bf16, at Llama-2-7B and
                Llama-3-8B projection shapes, r ∈ {16, 64}, seq 2048 / 512 / 8192 (8k, 4k, 32k tokens
                per micro-batch). Each point: the base GEMM alone (the floor), peft's LoRA layer, the
                `cublas` and `triton` routes on peft's bf16 factors, and both routes as training runs
                them (`train_cublas`, `train_triton`: fp32 factors, bf16 activations under bf16
                autocast, engine/lora.py's master copy), timed by CUDA events (triton.testing.do_bench),
                each with its launch counters (which code really ran), peak memory (one more, untimed
                call: do_bench's 256 MiB L2-flush buffer and the autotuner's trials are not in it) and,
                for triton, the autotuner's pick per kernel role (xa, fwd, dyB, dx, dA). Targets (judged
                on a GPU only): best route ≤ 1.15× base, peft ≥ 1.3× the best route. --write-routes
                turns a GPU result into the table train.kernels=auto follows (paft_kernels/routes/
                lora_linear_<gpu>.json, or --routes-out), chosen on the training pair where measured.
  prox_l1       benchmarks/kernels_prox.py;  nf4_dequant  benchmarks/nf4_dequant.py (their own files).

Without CUDA no number is produced: --dry-run runs every lora point's code on tiny fp32 shapes on the
CPU (the training pair under bf16 autocast; the triton route too when TRITON_INTERPRET=1) so the script
is rehearsed, and says so in its JSON.

The JSON is rewritten (atomically) after every point, with "complete": false until the last, so a run
killed by its time limit keeps every point it finished. --budget-s counts from this process's start
(imports included) or run_gpu.sh's PAFT_BENCH_DEADLINE, whichever ends first; a point starts only if
the slowest point so far still fits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

from benchmarks.common import deadline, device_slug, gpu_driver, seconds_left, write_json

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NO_CUDA = "no CUDA device: GPU kernel benchmark not run"


# ----------------------------------------------------------------------------- shared helpers

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


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- section: lora_linear
# Points: (model, projection family, K = in, N = out) at r ∈ LORA_RANKS and (seq, rows) ∈ LORA_SEQS,
# fwd+bwd (gradients for x, A, B; W frozen), bf16. Systems at each point:
#   base          F.linear(x, W) and its dx = dy W alone: the physical floor (no LoRA at all)
#   peft          peft.tuners.lora.Linear around the same frozen nn.Linear (dropout 0: peft skips it)
#   cublas        paft_kernels.lora_linear route "cublas" (torch GEMM + in-place addmm_), peft's bf16 factors
#   triton        paft_kernels.lora_linear route "triton" (the fused, autotuned kernels), peft's bf16 factors
#   train_cublas  route "cublas" as training runs it: fp32 factors (engine/lora.py's master copy), bf16 x
#   train_triton  and route "triton" so; under bf16 autocast, as engine/train.py runs its step
# Every system's launch counters (paft_kernels.lora_linear.ROUTE_CALLS / lora_triton.LAUNCHES) are recorded with its
# time, so a silent fallback would show; so are the peak memory and the autotuner's picks per kernel role.

LORA_SHAPES = [("llama2-7b", "q/k/v/o_proj", 4096, 4096), ("llama2-7b", "gate/up_proj", 4096, 11008),
               ("llama2-7b", "down_proj", 11008, 4096), ("llama3-8b", "k/v_proj", 4096, 1024),
               ("llama3-8b", "gate/up_proj", 4096, 14336), ("llama3-8b", "down_proj", 14336, 4096)]
# (llama3-8b's q/o_proj is 4096 -> 4096, the same GEMM as llama2-7b's: measured once)
LORA_RANKS = [16, 64]
LORA_SEQS = [(2048, 4), (512, 8), (8192, 4)]  # (seq, rows): 8k first (the route table's), then 4k and 32k tokens
DRY_SHAPES = [("tiny", "proj", 48, 40), ("tiny", "square", 48, 48)]  # square: fwd and dx share every size
DRY_SEQS = [(16, 2)]
DRY_RANKS = [4]
FUSED_OVER_BASE_MAX = 1.15  # issue 13 targets, judged on a GPU only: best route fwd+bwd / base
PEFT_OVER_FUSED_MIN = 1.3   # peft fwd+bwd / best route
SYSTEMS = ("base", "peft", "cublas", "triton", "train_cublas", "train_triton")
TRAIN_ROUTES = ("train_cublas", "train_triton")  # what training runs: the route table is chosen among these


def _peft_layer(K: int, N: int, r: int, alpha: float, dtype, device):
    """peft's LoRA layer on a frozen bias-free nn.Linear (Llama projections have no bias)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    base = nn.Linear(K, N, bias=False, dtype=dtype, device=device)
    base.weight.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0)
    layer = PeftLoraLinear(base, "default", config=cfg, r=r, lora_alpha=alpha)
    layer.to(device=device, dtype=dtype)
    with torch.no_grad():  # a trained-looking B (peft initialises it to zero)
        layer.lora_B["default"].weight.normal_(0, 0.02)
    layer.train()
    return layer


def environment() -> dict:
    """What the numbers were measured with: GPU, driver, torch, triton, peft (recorded in every JSON)."""
    import platform
    from importlib import metadata
    env = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    for pkg in ("peft", "transformers", "numpy"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["driver"] = gpu_driver()
    else:
        env["gpu"], env["driver"] = None, None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    return env


def _counters() -> dict:
    from paft_kernels import lora_linear as LL, lora_triton as LT
    return {**{f"route:{k}": v for k, v in LL.ROUTE_CALLS.items()}, **{f"kernel:{k}": v for k, v in LT.LAUNCHES.items()}}


def _delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def _lora_point(K, N, r, M, dtype, device, timer, triton_ok: bool) -> dict:
    from paft_kernels import lora_triton as LT
    from paft_kernels.lora_linear import lora_linear

    peft_layer = _peft_layer(K, N, r, 2.0 * r, dtype, device)
    W = peft_layer.base_layer.weight                 # (N, K) frozen
    A = peft_layer.lora_A["default"].weight          # (r, K) trainable: the same tensors for every system
    B = peft_layer.lora_B["default"].weight          # (N, r)
    A32 = A.detach().float().requires_grad_()        # the same values as training's fp32 master factors
    B32 = B.detach().float().requires_grad_()
    s = peft_layer.scaling["default"]
    x = torch.randn(M, K, dtype=dtype, device=device, requires_grad=True)  # dx wanted, as inside a network
    dy = torch.randn(M, N, dtype=dtype, device=device)
    dy16 = dy.to(torch.bfloat16)
    amp = lambda: torch.autocast(device, dtype=torch.bfloat16)  # noqa: E731 - engine/train.py's autocast

    def train(route):
        def run():
            with amp():
                return lora_linear(x, W, None, A32, B32, s, 0.0, True, backend=route)
        return run
    systems = {
        "base": lambda: torch.nn.functional.linear(x, W),
        "peft": lambda: peft_layer(x),
        "cublas": lambda: lora_linear(x, W, None, A, B, s, 0.0, True, backend="cublas"),
        "triton": lambda: lora_linear(x, W, None, A, B, s, 0.0, True, backend="triton"),
        "train_cublas": train("cublas"),
        "train_triton": train("triton"),
    }
    with torch.no_grad():
        ref = peft_layer(x)
    row = {"K": K, "N": N, "r": r, "tokens": M, "systems": {}}
    for name, fn in systems.items():
        if name.endswith("triton") and not triton_ok:
            row["systems"][name] = {"status": "not run: the Triton route needs CUDA or TRITON_INTERPRET=1"}
            continue
        try:
            with torch.no_grad():
                err = rel_err(fn(), ref) if name != "base" else None

            def step():
                y = fn()
                y.backward(dy if y.dtype == dy.dtype else dy16)  # autocast's output is bf16 (CPU dry run too)

            def clear():
                x.grad = A.grad = B.grad = A32.grad = B32.grad = None

            LT.PICKS.clear()
            LT.RECORD_PICKS = name.endswith("triton")  # off in training; on here to report the picks
            before = _counters()
            try:
                ms = timer(step, clear)
            finally:
                LT.RECORD_PICKS = False
            res = {"status": "ok", "fwd_bwd_ms": ms, "launches": _delta(before, _counters()),
                   "rel_err_vs_peft": err}
            if name.endswith("triton"):
                res["picks"] = {role: dict(v) for role, v in LT.PICKS.items()}
            if device == "cuda":
                res.update(_peak_memory(step, clear))
            row["systems"][name] = res
        except Exception as e:  # one system's failure loses its own cell only
            row["systems"][name] = {"status": f"failed: {type(e).__name__}: {e}"[:300]}
    ok = {n: v["fwd_bwd_ms"] for n, v in row["systems"].items() if v.get("status") == "ok"}
    for suffix, pair in (("", ("cublas", "triton")), ("_train", TRAIN_ROUTES)):
        routes = {n: t for n, t in ok.items() if n in pair}
        if "base" in ok and routes:
            best = min(routes, key=routes.get)
            row["best_route" + suffix] = best.removeprefix("train_")
            row["best_over_base" + suffix] = routes[best] / ok["base"]
            if "peft" in ok:
                row["peft_over_best" + suffix] = ok["peft"] / routes[best]
    row["flops"] = 4 * M * N * K + 6 * M * r * (N + K)  # y and dx of the base, plus LoRA's six skinny GEMMs
    return row


def _peak_memory(step, clear) -> dict:
    """Peak CUDA memory of one more, untimed fwd+bwd (after timing, so the autotuner has picked already):
    do_bench's L2-flush buffer and the autotuner's trial runs are not in it."""
    clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mem_mib": peak / 2 ** 20, "peak_extra_mib": (peak - base) / 2 ** 20,
            "mem_method": "max_memory_allocated over one untimed fwd+bwd after timing"}


def bench_lora_linear(args) -> dict:
    """The LoRA linear routes vs peft vs the base GEMM. Returns the section's JSON, which it also writes
    to `args.out` after every point."""
    import importlib.util
    end = deadline(args.budget_s)  # counted from this process's start (imports included)
    cuda = torch.cuda.is_available() and not args.dry_run
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    triton_ok = importlib.util.find_spec("triton") is not None and (cuda or interp)
    print(f"== lora_linear: y = x Wᵀ + s · x Aᵀ Bᵀ, fwd+bwd ({'bf16, CUDA events' if cuda else 'dry run on CPU'}) ==")
    if cuda:
        device, dtype = "cuda", torch.bfloat16
        shapes, seqs, ranks = LORA_SHAPES, LORA_SEQS, LORA_RANKS

        if args.smoke:
            seqs, ranks = seqs[:1], ranks[:1]

        def timer(step, clear):
            return _do_bench(step, clear, args)
        timing = "median of CUDA-event times (triton.testing.do_bench), grads cleared between calls"
    else:
        if not args.dry_run:
            print(NO_CUDA + " (use --dry-run for the CPU rehearsal)")
        device, dtype = "cpu", torch.float32
        shapes, seqs, ranks = DRY_SHAPES, DRY_SEQS, DRY_RANKS
        torch.set_num_threads(args.threads)

        def timer(step, clear):
            return cpu_time_ms(step, 3, 1, setup=clear)
        timing = "CPU wall clock (dry run: rehearses the script, not a benchmark)"
    env = environment()
    path = args.out
    if path is None and cuda:
        path = os.path.join(RESULTS_DIR, f"kernels_lora_{device_slug(env['gpu'])}.json")
    doc = {"benchmark": "kernels_lora", "dry_run": not cuda, "complete": False, "environment": env,
           "dtype": str(dtype).removeprefix("torch."), "timing": timing, "lora_dropout": 0.0,
           "systems": {"cublas/triton": "peft's bf16 factors (a variant training never launches; the sm_90 "
                                        "compile specs cover fp32 factors)",
                       "train_cublas/train_triton": "fp32 factors, bf16 x under bf16 autocast: what training runs "
                                                    "(the route table's pair; compile-checked for sm_90)"},
           "targets": {"best_over_base_max": FUSED_OVER_BASE_MAX, "peft_over_best_min": PEFT_OVER_FUSED_MIN,
                       "judged": "on a GPU run only" if cuda else "not judged (dry run)"},
           "source": os.path.basename(path) if path else None, "rows": [], "skipped": []}
    t0, slowest = time.perf_counter(), 0.0
    for (seq, rows_per_batch) in seqs:
        for r in ranks:
            for model, family, K, N in shapes:
                point = dict(model=model, family=family, seq=seq, rows=rows_per_batch)
                left = seconds_left(end)
                if left < 1.2 * slowest + 2:  # the slowest point so far would not fit: it would be killed half-way
                    doc["skipped"].append({**point, "K": K, "N": N, "r": r,
                                           "status": f"skipped: {left:.0f} s of the budget left"})
                    continue
                t_point = time.perf_counter()
                row = {**point, **_lora_point(K, N, r, seq * rows_per_batch, dtype, device, timer, triton_ok)}
                slowest = max(slowest, time.perf_counter() - t_point)
                doc["rows"].append(row)
                _print_row(row)
                doc["wall_s"] = round(time.perf_counter() - t0, 1)
                if path:
                    write_json(doc, path)  # after every point: a killed run keeps what it finished
                if cuda:
                    torch.cuda.empty_cache()
    doc["complete"] = True
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    if path:
        write_json(doc, path)
        print(f"wrote {path} ({len(doc['rows'])} points, {len(doc['skipped'])} skipped)")
    return doc


def _do_bench(step, clear, args) -> float:
    """Median ms of step() by CUDA events (triton.testing.do_bench); clear() zeroes the grads first so
    backward writes rather than accumulates (do_bench's grad_to_none does exactly that)."""
    import triton.testing
    clear()
    return triton.testing.do_bench(lambda: (clear(), step()), warmup=args.warmup_ms, rep=args.rep_ms,
                                   return_mode="median")


def _print_row(row: dict) -> None:
    cells = []
    for name in SYSTEMS:
        v = row["systems"].get(name, {})
        cells.append(f"{name} {v['fwd_bwd_ms']:7.3f}" if v.get("status") == "ok" else f"{name} {'-':>7}")
    extra = "".join(f" best{sfx}={row['best_route' + sfx]} {row['best_over_base' + sfx]:.2f}× base"
                    for sfx in ("", "_train") if "best_route" + sfx in row)
    print(f"{row['model']:>10} {row['family']:>13} {row['K']:>5}→{row['N']:<5} r={row['r']:<3} "
          f"tokens={row['tokens']:<6} | " + " | ".join(cells) + extra, flush=True)
    for name in SYSTEMS:
        status = row["systems"].get(name, {}).get("status", "ok")
        if status != "ok":
            print(f"{'':>12}{name}: {status}", flush=True)


def write_routes(result: dict, path: str | None = None) -> str:
    """The route table train.kernels=auto follows, from a GPU result: per (K, N, r), the route faster at the
    8k-token point (seq 2048), between the training pair (fp32 factors under bf16 autocast) where measured,
    else between cublas and triton on bf16 factors. Default path paft_kernels/routes/lora_linear_<gpu>.json.
    Refuses a dry run or a result without a GPU (ValueError, one line)."""
    env = result.get("environment") or {}
    if result.get("benchmark") != "kernels_lora":
        raise ValueError("--write-routes: not a kernels_lora result (benchmark field)")
    if result.get("dry_run") or not env.get("gpu"):
        raise ValueError("--write-routes: needs a GPU result (this one is a dry run or has no GPU)")
    from paft_kernels.utils import ROUTES_DIR, _slug
    gpu = env["gpu"]
    routes = []
    for row in result.get("rows", []):
        sfx = "_train" if "best_route_train" in row else ""
        if row.get("seq") == 2048 and "best_route" + sfx in row:
            routes.append({"K": row["K"], "N": row["N"], "r": row["r"], "dtype": result["dtype"],
                           "route": row["best_route" + sfx], "tokens": row["tokens"],
                           "factors": "fp32 (training)" if sfx else "bf16"})
    if not routes:
        raise ValueError("--write-routes: the result has no measured seq-2048 point with a best route")
    path = path or os.path.join(ROUTES_DIR, f"lora_linear_{_slug(gpu)}.json")
    doc = {"device": gpu, "measured_from": result.get("source") or "benchmarks.kernels lora_linear",
           "complete": result.get("complete", True), "environment": env, "routes": routes}
    write_json(doc, path)
    print(f"wrote {path} ({len(routes)} shapes)")
    return path


# ----------------------------------------------------------------------------- main

def bench_prox_and_l1(args) -> None:
    """The fused AdamW + soft-threshold step and the L1 of B A (benchmarks/kernels_prox.py)."""
    from benchmarks import kernels_prox
    kernels_prox.main(["--smoke"] if args.smoke else [])


def bench_nf4_dequant(args) -> None:
    """NF4 dequantization, ours vs bitsandbytes (benchmarks/nf4_dequant.py)."""
    from benchmarks import nf4_dequant
    nf4_dequant.main(["--runs", str(args.iters), "--warmup", str(args.warmup)])


SECTIONS = {"lora_linear": bench_lora_linear, "prox_l1": bench_prox_and_l1, "nf4_dequant": bench_nf4_dequant}


def routes_from_json(src: str, out: str | None) -> int:
    """--write-routes FROM.json: the route table from a returned result, here, without a GPU."""
    try:
        with open(src) as f:
            result = json.load(f)
        write_routes(result, out)
    except (OSError, json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
        print(f"error: --write-routes {src}: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Kernel benchmarks: " + ", ".join(SECTIONS))
    ap.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on the CPU (torch and cublas routes; triton under TRITON_INTERPRET=1): "
                         "rehearses the script, measures nothing")
    ap.add_argument("--smoke", action="store_true", help="GPU: only the seq-2048, r=16 points")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="lora_linear: seconds from this process's start after which no new point starts")
    ap.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up per measurement")
    ap.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time per measurement")
    ap.add_argument("--iters", type=int, default=20, help="(prox_l1, nf4_dequant) timed iterations")
    ap.add_argument("--warmup", type=int, default=5, help="(prox_l1, nf4_dequant) untimed iterations")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the dry run")
    ap.add_argument("--out", help="lora_linear: write its JSON here, after every point (default on a GPU: "
                                  "benchmarks/results/kernels_lora_<gpu>.json; a dry run writes only with --out)")
    ap.add_argument("--write-routes", nargs="?", const="", metavar="FROM_JSON",
                    help="lora_linear on a GPU: also write the route table for train.kernels=auto; with a path: "
                         "only build that table from a kernels_lora JSON written earlier (no GPU needed)")
    ap.add_argument("--routes-out",
                    help="where --write-routes writes (default paft_kernels/routes/lora_linear_<gpu>.json)")
    args = ap.parse_args(argv)
    if args.write_routes:  # a path: the table from a returned result, nothing measured
        return routes_from_json(args.write_routes, args.routes_out)

    for name in args.only or list(SECTIONS):
        res = SECTIONS[name](args)
        print()
        if name == "lora_linear" and args.write_routes is not None:
            try:
                write_routes(res, args.routes_out)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
