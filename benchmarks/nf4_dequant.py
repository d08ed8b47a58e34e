"""NF4 dequantization throughput: paft_kernels.nf4 against bitsandbytes on the same weight.

    python -m benchmarks.nf4_dequant [--dry-run] [--out FILE.json] [--runs 20] [--warmup 3] [--threads N]

Llama-2-7B weight shapes, blocksize 64, with and without double quantization: q/k/v/o
(4096, 4096), gate/up (11008, 4096), down (4096, 11008). Each weight is quantized once with
quantize_nf4; both libraries then dequantize the very same bytes (to_bnb hands bitsandbytes
the NF4Tensor's own tensors):

    ours   CUDA: the Triton kernel (dequantize_nf4_triton), output bf16
           CPU:  the torch reference (dequantize_nf4_torch), output fp32; under
                 TRITON_INTERPRET=1 with --dry-run also the interpreted kernel
    bnb    bitsandbytes.functional.dequantize_4bit (its CUDA kernel / its CPU C++ kernel)

Time: CUDA events through triton.testing.do_bench (median); CPU: median wall time, the
libraries taking turns call by call. GB/s counts the bytes a dequantization must move: read
packed codes + scales (NF4Tensor.nbytes(): 0.5625 or 0.516 byte/weight) and write the output
(2 or 4 byte/weight). The roofline is the copy bandwidth, measured in the same run as
dst.copy_(src) of a 256 MiB tensor (read + write counted); "of copy" is each row's share of it.
The outputs of the two libraries are compared bit for bit ("identical"). Every row records the
route that ran (paft_kernels.nf4.LAUNCHES over its timed calls) and, on CUDA, the peak memory of one
more, untimed call (not do_bench's 256 MiB L2-flush buffer). The JSON is rewritten after every row.
--dry-run: small shapes, two calls, CPU: rehearses the script without a GPU (numbers meaningless).
Writes benchmarks/results/<device>_nf4_dequant.json unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from benchmarks.common import device_slug, write_json
from benchmarks.kernels_prox import environment
from paft_kernels import nf4
from paft_kernels.nf4 import dequantize_nf4_torch, dequantize_nf4_triton
from paft_kernels.nf4_quant import quantize_nf4, to_bnb
from paft_kernels.utils import HAS_TRITON

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
# 33 x 71: a partial last block (the tail launch); an odd last dim, where bitsandbytes' CPU kernel is right
DRY_SHAPES = [(64, 128), (33, 71)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_medians(fns: list, device: torch.device, runs: int, warmup: int) -> list[float]:
    """Median seconds per call of each fn: CUDA events (do_bench) on GPU; on CPU the fns take
    turns call by call, so that noise from a shared machine hits all of them alike."""
    if device.type == "cuda":
        import triton.testing
        return [float(triton.testing.do_bench(fn, warmup=max(warmup, 10), rep=max(runs, 50),
                                              return_mode="median")) / 1e3 for fn in fns]
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def copy_bandwidth(device: torch.device, runs: int, warmup: int, numel: int = 64 * 2**20) -> float:
    """GB/s of a plain device copy (bytes read + bytes written)."""
    x = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    (t,) = time_medians([lambda: y.copy_(x)], device, runs, warmup)
    return 2 * x.numel() * x.element_size() / t / 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>_nf4_dequant.json)")
    ap.add_argument("--dry-run", action="store_true", help="small shapes on the CPU, two calls: rehearse the script")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.runs, args.warmup = "cpu", 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch_route = lambda q, dtype: nf4.dequantize_nf4(q, dtype, backend="torch")  # noqa: E731 - counted dispatch
    ours = [("triton", dequantize_nf4_triton)] if device.type == "cuda" else [("torch reference", torch_route)]
    if device.type == "cpu" and args.dry_run and os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON:
        ours.append(("triton (interpreted)", dequantize_nf4_triton))

    try:
        import bitsandbytes.functional as bnbF
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnbF, bnb_version = None, None

    copy_gbs = copy_bandwidth(device, args.runs, args.warmup, numel=(1 << 20) if args.dry_run else 64 * 2**20)
    rows = []
    slug = "cpu" if device.type != "cuda" else device_slug(torch.cuda.get_device_name(device))
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"{slug}{'_dry' if args.dry_run else ''}_nf4_dequant.json")
    res = {
        "benchmark": "nf4_dequant",
        "device": device.type, "dry_run": args.dry_run, "environment": environment(device.type),
        "torch": torch.__version__,
        "bitsandbytes": bnb_version,
        "runs": args.runs, "warmup": args.warmup,
        "copy_GB_per_s": round(copy_gbs, 2),
        "complete": False, "rows": rows,
    }
    torch.manual_seed(0)
    for shape in (DRY_SHAPES if args.dry_run else SHAPES):
        w = (torch.randn(shape, device=device) * 0.02).to(out_dtype)
        for dq in (False, True):
            q = quantize_nf4(w, double_quant=dq)
            moved = q.nbytes() + w.numel() * torch.finfo(out_dtype).bits // 8  # read + write
            reference = dequantize_nf4_torch(q, out_dtype)
            impls, identical = [], {}
            for name, fn in ours:
                impls.append((f"ours ({name})", lambda q=q, fn=fn: fn(q, out_dtype)))
            bnb_out = None
            if bnbF is not None:
                packed, state = to_bnb(q)
                state.dtype = out_dtype
                bnb_out = bnbF.dequantize_4bit(packed, state, quant_type="nf4").reshape(shape)
                impls.append(("bitsandbytes", lambda p=packed, s=state: bnbF.dequantize_4bit(p, s, quant_type="nf4")))
            for name, fn in impls:
                out = fn().reshape(shape)
                identical[name] = {"to_torch_reference": bool(torch.equal(out, reference)),
                                   "to_bnb": None if bnb_out is None else bool(torch.equal(out, bnb_out))}
            for name, fn in impls:
                before = dict(nf4.LAUNCHES)
                (t,) = time_medians([fn], device, args.runs, args.warmup)
                gbs = moved / t / 1e9
                row = {"shape": list(shape), "double_quant": dq, "impl": name, "out_dtype": str(out_dtype),
                       "ms": round(t * 1e3, 4), "GB_per_s": round(gbs, 2), "share_of_copy": round(gbs / copy_gbs, 3),
                       "bytes_moved": moved, "identical": identical[name],
                       "paft_kernels.nf4 launches": {k: v - before[k] for k, v in nf4.LAUNCHES.items() if v - before[k]}
                       if name.startswith("ours") else None}
                if device.type == "cuda":  # one more, untimed call: not do_bench's L2-flush buffer
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    fn()
                    torch.cuda.synchronize()
                    row["peak_extra_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
                rows.append(row)
                write_json(res, path)  # after every row: a run stopped by its time limit keeps them

    print(f"\nNF4 dequantization -> {out_dtype}, {device}; copy bandwidth {copy_gbs:.1f} GB/s\n")
    print(f"{'shape':>12} {'DQ':>3} {'impl':<24} {'ms':>9} {'GB/s':>8} {'of copy':>8} {'identical':>9}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>12} {'y' if r['double_quant'] else 'n':>3} {r['impl']:<24} "
              f"{r['ms']:>9.3f} {r['GB_per_s']:>8.1f} {r['share_of_copy']:>8.0%} {str(r['identical']['to_bnb']):>9}")
    res["complete"] = True
    write_json(res, path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
