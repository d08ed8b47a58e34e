"""ProxAdamW over a real LoRA factor list, and the L1 of a low-rank product, against torch.

    python -m benchmarks.kernels_prox [--dry-run] [--out FILE.json]

optimizer: one step over every factor of an r=16 all-linear adapter (q, k, v, o, gate, up,
down of every layer: 2 factors each), shapes built from the model's dimensions (no weights
loaded): Llama-2-7B on CUDA (224 layers, 448 factors, 40.0M numbers), SmolLM2-135M (the
quickstart) and the tiny test model on CPU. Systems, each on its own copy of the same
parameters and gradients:
    ours      paft_kernels.prox_adamw.ProxAdamW: factors and gradients in one flat fp32 buffer,
              one prox_adamw_step per optimizer step (Triton on CUDA, the torch op sequence on
              CPU); with l1 = 0 (the AdamW comparison) and with l1 > 0 (the prox step's price)
    torch     torch.optim.AdamW(foreach=False), (foreach=True) and, on CUDA, (fused=True),
              over the separate factor tensors
Bytes: an AdamW step must read p, g, m, v and write p, m, v: 28 bytes per fp32 number. GB/s
is that over the measured time for every row alike; on CUDA it is also a share of the copy
bandwidth measured in the same run (dst.copy_(src) of as many fp32 numbers: 8 bytes each).
Times: CUDA events through triton.testing.do_bench (median); CPU: median wall time of
interleaved calls. Each row records the code path that ran: for ours the launch counter
paft_kernels.prox_adamw.LAUNCHES (triton / torch) over the timed calls; on CUDA also the peak
memory the system allocated beyond the parameters and gradients (a separate, untimed call: the timed
calls run inside do_bench, whose 256 MiB L2-flush buffer would count otherwise). The JSON is rewritten
after every model and every L1 shape, so a run stopped by its time limit keeps what it finished.

l1: value and gradients of λ‖s·B A‖₁ at 7B MLP/attention shapes (triton, the dense autograd
path that stores B A, the chunked torch reference).

--dry-run: tiny shapes, two timed calls, on the CPU (the Triton rows under TRITON_INTERPRET=1
when it is set): rehearses the script and the JSON without a GPU. Numbers from a dry run
mean nothing. Default output: benchmarks/results/<device>_prox.json.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from benchmarks.common import cpu_model_name, device_slug, gpu_driver, write_json, write_result
from paft_kernels import prox_adamw as pak
from paft_kernels.l1_lowrank import l1_lowrank_dense, l1_lowrank_torch, l1_lowrank_triton
from paft_kernels.prox_adamw import ProxAdamW
from paft_kernels.utils import triton_interpreted

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LR, BETAS, EPS, WD, L1 = 1e-4, (0.9, 0.999), 1e-8, 0.01, 1e-3

# (layers, hidden, intermediate, k/v width): the projections' shapes, from the models' configs
MODELS = {
    "llama-2-7b": (32, 4096, 11008, 4096),
    "smollm2-135m": (30, 576, 1536, 192),   # 9 heads of 64, 3 KV heads: k/v project to 192
    "tiny-llama": (2, 64, 128, 32),         # engine.models builtin:tiny-llama (4 heads of 16, 2 KV heads)
}


def factor_shapes(model: str, r: int = 16) -> list[tuple[int, int]]:
    """Shapes of A (r, in) and B (out, r) of every all-linear LoRA layer, in module order."""
    layers, h, inter, kv = MODELS[model]
    proj = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # (in, out): q k v o gate up down
    return [s for _ in range(layers) for k_in, n_out in proj for s in ((r, k_in), (n_out, r))]


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["driver"] = gpu_driver()
    else:
        env["cpu"] = cpu_model_name()
        env["threads"] = torch.get_num_threads()
    return env


def time_ms(fns: dict, device: str, warmup: int, iters: int) -> dict:
    """Median milliseconds per call of each fn: CUDA events (do_bench) on GPU; on CPU the fns take
    turns call by call, so that noise on a shared machine hits all of them alike."""
    if device == "cuda":
        import triton.testing
        return {k: float(triton.testing.do_bench(fn, warmup=warmup, rep=iters, return_mode="median"))
                for k, fn in fns.items()}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _params(shapes, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    return ps


def bench_optimizer(model: str, device: str, dry: bool) -> dict:
    shapes = factor_shapes(model)
    n = sum(a * b for a, b in shapes)
    cuda = device == "cuda"
    systems = {
        "ours ProxAdamW flat, l1=0": lambda ps: ProxAdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, l1=0.0),
        "ours ProxAdamW flat, l1>0": lambda ps: ProxAdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, l1=L1),
        "torch AdamW(foreach=False)": lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS,
                                                                   weight_decay=WD, foreach=False),
        "torch AdamW(foreach=True)": lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS,
                                                                  weight_decay=WD, foreach=True),
    }
    if not cuda and triton_interpreted():  # dry run under TRITON_INTERPRET=1: the kernel's route too
        systems["ours ProxAdamW flat, triton interpreted"] = lambda ps: ProxAdamW(
            ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, l1=L1, backend="triton")
    if cuda:
        systems["torch AdamW(fused=True)"] = lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS,
                                                                          weight_decay=WD, fused=True)
    rows, fns = {}, {}
    for name, make in systems.items():
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
        ps = _params(shapes, device, seed=0)
        opt = make(ps)
        opt.step()  # creates the state; the update is a fixed-size stream whatever the values
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            opt.step()
            torch.cuda.synchronize()
            rows[name] = {"state_and_params_MiB": round((before - base) / 2 ** 20, 1),
                          "peak_extra_MiB_in_step": round((torch.cuda.max_memory_allocated() - before) / 2 ** 20, 1)}
        else:
            rows[name] = {}
        fns[name] = opt.step
    warmup, iters = (1, 2) if dry else ((25, 200) if cuda else (3, 15))
    ms = time_ms(fns, device, warmup, iters)
    res = {"model": model, "r": 16, "factors": len(shapes), "numbers": n, "bytes_per_step": 28 * n, "rows": rows}
    for name, t in ms.items():
        rows[name].update({"ms": round(t, 4), "GB/s": round(28 * n / t / 1e6, 2)})
        if name.startswith("ours"):  # one more counted step of this system alone: the route it really takes
            before = dict(pak.LAUNCHES)
            fns[name]()
            launched = {k: v - before[k] for k, v in pak.LAUNCHES.items() if v - before[k]}
            rows[name]["launches_per_step"] = launched
            rows[name]["backend"] = "paft_kernels.prox_adamw, flat buffer, " + "+".join(launched)
        else:
            rows[name]["backend"] = name
    if cuda:
        src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
        copy_ms = time_ms({"copy": lambda: dst.copy_(src)}, device, warmup, iters)["copy"]
        res["copy_GB/s"] = round(8 * n / copy_ms / 1e6, 1)
        for r in rows.values():
            r["share_of_copy_bw"] = round(r["GB/s"] / res["copy_GB/s"], 3)
    return res


def bench_l1(device: str, dry: bool, out: dict | None = None, save=lambda: None) -> dict:
    """Fills `out` shape by shape, calling save() after each (the caller writes its JSON then)."""
    cuda = device == "cuda"
    shapes = [(4096, 16, 4096), (11008, 16, 4096), (11008, 64, 4096)]  # (out N, rank r, in K)
    if dry or not cuda:
        shapes = [(97, 16, 80), (130, 64, 64)]
    warmup, iters = (1, 2) if dry else ((10, 100) if cuda else (1, 3))
    scale, lam = 2.0, 1e-4
    interp = triton_interpreted()
    out = {} if out is None else out
    for N, r, K in shapes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        A = (torch.randn(r, K, generator=gen) / r ** 0.5).to(device)
        B = (torch.randn(N, r, generator=gen) * 1e-3).to(device)
        Ad, Bd = A.clone().requires_grad_(), B.clone().requires_grad_()

        def dense():
            Ad.grad = Bd.grad = None
            l1_lowrank_dense(Ad, Bd, scale, lam).backward()

        fns = {"dense autograd": dense, "chunked torch": lambda: l1_lowrank_torch(A, B, scale, lam)}
        if cuda or interp:
            fns = {"triton": lambda: l1_lowrank_triton(A, B, scale, lam), **fns}
        rows = {}
        for name, fn in fns.items():
            rows[name] = {"ms": round(time_ms({name: fn}, device, warmup, iters)[name], 4)}
            if cuda:  # one more, untimed call: do_bench's 256 MiB L2-flush buffer is not in the peak
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                rows[name]["peak_extra_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
        if "triton" in rows:  # agreement, so the timing is of a correct kernel
            v_t, dA_t, dB_t = l1_lowrank_triton(A, B, scale, lam)
            v_r, dA_r, dB_r = l1_lowrank_torch(A, B, scale, lam)
            rows["triton"]["rel_err_value"] = float((v_t - v_r).abs() / v_r.abs())
            rows["triton"]["rel_err_dA"] = float((dA_t - dA_r).abs().max() / dA_r.abs().max())
            rows["triton"]["rel_err_dB"] = float((dB_t - dB_r).abs().max() / dB_r.abs().max())
        out[f"B{N}x{r}_A{r}x{K}"] = rows
        save()
    return out


def _print(res: dict) -> None:
    for opt in res["optimizer"]:
        print(f"\noptimizer step, {opt['model']} r=16 all-linear: {opt['factors']} factors, "
              f"{opt['numbers']:,} fp32 numbers ({opt['bytes_per_step'] / 1e6:.1f} MB moved)")
        for name, r in opt["rows"].items():
            share = f"  {100 * r['share_of_copy_bw']:5.1f}% of copy" if "share_of_copy_bw" in r else ""
            print(f"  {name:30s} {r['ms']:10.3f} ms {r['GB/s']:9.1f} GB/s{share}   [{r['backend']}]")
        if "copy_GB/s" in opt:
            print(f"  {'device copy':30s} {'':10s}    {opt['copy_GB/s']:9.1f} GB/s")
    for shape, rows in res["l1"].items():
        print(f"\nL1 of B A, value + grads, {shape}")
        for name, r in rows.items():
            print(f"  {name:30s} {r['ms']:10.3f} ms")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, two calls: rehearse the script")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>_prox.json)")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    models = ["tiny-llama"] if args.dry_run else (["llama-2-7b"] if device == "cuda" else ["smollm2-135m", "tiny-llama"])
    if device == "cpu" and not args.dry_run:
        print("No CUDA device: CPU run (SmolLM2-135M and tiny factor lists, torch paths); no GPU numbers.")
    env = environment(device)
    name = "cpu" if device == "cpu" else device_slug(env["gpu"])
    path = args.out or os.path.join(RESULTS, f"{name}{'_dry' if args.dry_run else ''}_prox.json")
    # written after every model and every L1 shape ("complete": false until the end): a run stopped by
    # its time limit keeps what it measured
    res = {"benchmark": "kernels_prox", "device": device, "dry_run": args.dry_run, "complete": False,
           "environment": env, "optimizer": [], "l1": {}}
    for m in models:
        res["optimizer"].append(bench_optimizer(m, device, args.dry_run))
        write_json(res, path)
    bench_l1(device, args.dry_run, res["l1"], save=lambda: write_json(res, path))
    res["complete"] = True
    _print(res)
    write_result(res, path)


if __name__ == "__main__":
    main()
