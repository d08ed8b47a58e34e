"""Benchmarks of the PAFT sparsity kernels: fused AdamW + L1 prox, and the L1 of a low-rank product.

    python -m benchmarks.kernels_prox [--smoke]

prox: one optimizer step over a 64M-element fp32 tensor (1M with --smoke):
    fused      kernels.prox_adamw, Triton: reads p, g, m, v, writes p, m, v once
    torch      torch.optim.AdamW(foreach=True).step() then a torch soft threshold
    torch+fused-adamw   torch.optim.AdamW(fused=True).step() then the soft threshold (CUDA)
    reference  prox_adamw_step_torch (the single-tensor op sequence)
  GB/s counts the bytes the update must move, 28 per element (4 tensors read, 3 written,
  fp32), for every row alike, so it is an effective rate; on CUDA it is also given as a
  share of the measured device-to-device copy bandwidth (dst.copy_(src), 8 bytes per element).

l1: value and gradients of λ‖s·B A‖₁ for B (4096×16) A (16×4096) and B (11008×64) A (64×4096):
    triton     kernels.l1_lowrank (two kernels, B A never stored)
    dense      λ·|s·B @ A|.sum() with autograd backward (stores B A and its gradient)
    chunked    the torch reference (B A materialised 16M entries at a time)

Without CUDA the GPU rows are not run: the torch paths run once at smoke size on the CPU
so the script is exercised. Results: benchmarks/results/<cuda|cpu>_prox.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.common import write_result
from kernels.l1_lowrank import l1_lowrank_dense, l1_lowrank_torch, l1_lowrank_triton
from kernels.prox_adamw import prox_adamw_step, prox_adamw_step_torch, soft_threshold_

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LR, BETAS, EPS, WD, L1 = 1e-4, (0.9, 0.999), 1e-8, 0.01, 1e-3


def _time_ms(fn, device: str, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over iters calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_prox(device: str, smoke: bool = False) -> dict:
    cuda = device == "cuda"
    n = (1 << 20) if (smoke or not cuda) else (64 << 20)
    warmup, iters = (2, 5) if smoke or not cuda else (3, 20)
    gen = torch.Generator(device=device).manual_seed(0)
    p = torch.randn(n, device=device, generator=gen)
    g = torch.randn(n, device=device, generator=gen)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    nbytes = 28 * n  # read p, g, m, v; write p, m, v (fp32)
    rows = {}

    def row(name, ms):
        rows[name] = {"ms": round(ms, 4), "GB/s": round(nbytes / ms / 1e6, 2)}

    # The update is a fixed-size stream whatever the values, so stepping the same buffers
    # repeatedly (step count frozen at 10) times the real thing.
    if cuda:
        row("fused (triton)", _time_ms(lambda: prox_adamw_step(p, g, m, v, 10, LR, *BETAS, EPS, WD, L1,
                                                               backend="triton"), device, warmup, iters))
    row("reference (torch single-tensor)",
        _time_ms(lambda: prox_adamw_step_torch(p, g, m, v, 10, LR, *BETAS, EPS, WD, L1), device, warmup, iters))
    variants = [("torch AdamW(foreach) + threshold", dict(foreach=True))]
    if cuda:
        variants.append(("torch AdamW(fused) + threshold", dict(fused=True)))
    for name, kw in variants:
        param = torch.nn.Parameter(p.clone())
        param.grad = g
        opt = torch.optim.AdamW([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)

        def step(opt=opt, param=param):
            opt.step()
            with torch.no_grad():
                soft_threshold_(param, LR * L1)
        row(name, _time_ms(step, device, warmup, iters))
        del opt, param
    res = {"elements": n, "bytes_per_step": nbytes, "rows": rows}
    if cuda:
        src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
        copy_ms = _time_ms(lambda: dst.copy_(src), device, warmup, iters)
        copy_gbs = 8 * n / copy_ms / 1e6
        res["copy_GB/s"] = round(copy_gbs, 1)
        for r in rows.values():
            r["share_of_copy_bw"] = round(r["GB/s"] / copy_gbs, 3)
    return res


def bench_l1(device: str, smoke: bool = False) -> dict:
    cuda = device == "cuda"
    shapes = [(4096, 16, 4096), (11008, 64, 4096)]  # (out N, rank r, in K): B (N, r), A (r, K)
    if smoke or not cuda:
        shapes = [(N // 4, r, K // 4) for N, r, K in shapes]
    warmup, iters = (1, 3) if smoke or not cuda else (3, 10)
    scale, lam = 2.0, 1e-4
    out = {}
    for N, r, K in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        A = torch.randn(r, K, device=device, generator=gen) / r ** 0.5
        B = torch.randn(N, r, device=device, generator=gen) * 1e-3
        Ad, Bd = A.clone().requires_grad_(), B.clone().requires_grad_()

        def dense():
            Ad.grad = Bd.grad = None
            l1_lowrank_dense(Ad, Bd, scale, lam).backward()

        rpad = max(16, 1 << (r - 1).bit_length())
        flops = {"triton": 8 * N * K * rpad, "dense": 6 * N * K * r, "chunked": 6 * N * K * r}
        fns = {"dense": dense, "chunked": lambda: l1_lowrank_torch(A, B, scale, lam)}
        if cuda:
            fns = {"triton": lambda: l1_lowrank_triton(A, B, scale, lam), **fns}
        rows = {}
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            ms = _time_ms(fn, device, warmup, iters)
            rows[name] = {"ms": round(ms, 4), "TFLOP/s": round(flops[name] / ms / 1e9, 4)}
            if cuda:
                rows[name]["peak_extra_MB"] = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
        if cuda:  # agreement, so the timing is of a correct kernel
            v_t, dA_t, dB_t = l1_lowrank_triton(A, B, scale, lam)
            v_r, dA_r, dB_r = l1_lowrank_torch(A, B, scale, lam)
            rows["triton"]["rel_err_value"] = float((v_t - v_r).abs() / v_r.abs())
            rows["triton"]["rel_err_dA"] = float((dA_t - dA_r).abs().max() / dA_r.abs().max())
        out[f"B{N}x{r}_A{r}x{K}"] = rows
    return out


def _print_table(res: dict) -> None:
    prox = res["prox"]
    print(f"\nprox step, {prox['elements']:,} fp32 elements ({prox['bytes_per_step'] / 1e9:.2f} GB moved)")
    for name, r in res["prox"]["rows"].items():
        share = f"  {100 * r['share_of_copy_bw']:.0f}% of copy bw" if "share_of_copy_bw" in r else ""
        print(f"  {name:36s} {r['ms']:9.3f} ms  {r['GB/s']:8.1f} GB/s{share}")
    if "copy_GB/s" in res["prox"]:
        print(f"  {'device copy':36s} {'':9s}     {res['prox']['copy_GB/s']:8.1f} GB/s")
    for shape, rows in res["l1"].items():
        print(f"\nL1 of B A, value + grads, {shape}")
        for name, r in rows.items():
            mem = f"  +{r['peak_extra_MB']:.0f} MB peak" if "peak_extra_MB" in r else ""
            print(f"  {name:36s} {r['ms']:9.3f} ms  {r['TFLOP/s']:8.2f} TFLOP/s{mem}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="small sizes, a few iterations")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("No CUDA device: the GPU numbers (Triton kernels, copy bandwidth) were not run; "
              "smoke CPU run of the torch paths only.")
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "smoke": bool(args.smoke or device == "cpu"),
           "prox": bench_prox(device, smoke=args.smoke), "l1": bench_l1(device, smoke=args.smoke)}
    _print_table(res)
    write_result(res, os.path.join(RESULTS, f"{device}_prox.json"))


if __name__ == "__main__":
    main()
