"""NF4 dequantization throughput: kernels.nf4 against bitsandbytes on the same weight.

    python -m benchmarks.nf4_dequant [--runs 20] [--warmup 3] [--threads N]

A 4096x4096 and a 4096x11008 weight (Llama-7B attention / MLP sizes) are quantized once with
quantize_nf4 (blocksize 64, with and without double quantization); both libraries then
dequantize the very same bytes (to_bnb hands bitsandbytes the NF4Tensor's own tensors):

    ours   CUDA: the Triton kernel (dequantize_nf4_triton), output bf16
           CPU:  the torch reference (dequantize_nf4_torch), output fp32
    bnb    bitsandbytes.functional.dequantize_4bit (its CUDA kernel / its CPU C++ kernel)

Time: median of --runs calls after --warmup calls, the two libraries taking turns call by call
(CUDA: synchronised around each call).
GB/s counts the bytes a dequantization must move: read packed codes + scales
(NF4Tensor.nbytes(): 0.5625 or 0.516 byte/weight) and write the output (2 or 4 byte/weight).
The roofline is the copy bandwidth, measured as torch.empty_like(x).copy_(x) on a 256 MiB
tensor (read + write counted); "of copy" is the kernel's share of it. The outputs of the two
libraries are compared bit for bit ("identical").
Writes benchmarks/results/<device>_nf4_dequant.json (device "cpu" or the CUDA name, slugged).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time

import torch

from kernels.nf4 import dequantize_nf4_torch, dequantize_nf4_triton, quantize_nf4, to_bnb

SHAPES = [(4096, 4096), (4096, 11008)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_medians(fns: list, device: torch.device, runs: int, warmup: int) -> list[float]:
    """Median wall time in seconds of each fn(). The fns take turns call by call, so that noise
    from a shared machine hits all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    times = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def copy_bandwidth(device: torch.device, runs: int, warmup: int) -> float:
    """GB/s of a plain device copy (bytes read + bytes written) on a 256 MiB tensor."""
    x = torch.empty(64 * 2**20, dtype=torch.float32, device=device).uniform_()
    (t,) = time_medians([lambda: torch.empty_like(x).copy_(x)], device, runs, warmup)
    return 2 * x.numel() * x.element_size() / t / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>_nf4_dequant.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours_name = "triton" if device.type == "cuda" else "torch reference"
    ours_fn = dequantize_nf4_triton if device.type == "cuda" else dequantize_nf4_torch

    try:
        import bitsandbytes.functional as bnbF
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnbF, bnb_version = None, None

    copy_gbs = copy_bandwidth(device, args.runs, args.warmup)
    rows = []
    torch.manual_seed(0)
    for shape in SHAPES:
        w = (torch.randn(shape, device=device) * 0.02).to(out_dtype)
        for dq in (False, True):
            q = quantize_nf4(w, double_quant=dq)
            moved = q.nbytes() + w.numel() * torch.finfo(out_dtype).bits // 8  # read + write
            ours_out = ours_fn(q, out_dtype)
            impls = [(f"ours ({ours_name})", lambda q=q: ours_fn(q, out_dtype))]
            identical = None
            if bnbF is not None:
                packed, state = to_bnb(q)
                state.dtype = out_dtype
                bnb_out = bnbF.dequantize_4bit(packed, state, quant_type="nf4")
                identical = bool(torch.equal(bnb_out.reshape(shape), ours_out))
                impls.append(("bitsandbytes", lambda p=packed, s=state: bnbF.dequantize_4bit(p, s, quant_type="nf4")))
            medians = time_medians([fn for _, fn in impls], device, args.runs, args.warmup)
            for (name, _), t in zip(impls, medians):
                gbs = moved / t / 1e9
                rows.append({
                    "shape": list(shape), "double_quant": dq, "impl": name, "out_dtype": str(out_dtype),
                    "ms": round(t * 1e3, 4), "GB_per_s": round(gbs, 2),
                    "share_of_copy": round(gbs / copy_gbs, 3), "bytes_moved": moved,
                    "identical_to_bnb": identical,
                })

    res = {
        "benchmark": "nf4_dequant",
        "device": device_name(device),
        "torch": torch.__version__,
        "bitsandbytes": bnb_version,
        "runs": args.runs, "warmup": args.warmup,
        "copy_GB_per_s": round(copy_gbs, 2),
        "rows": rows,
    }
    print(f"\nNF4 dequantization -> {out_dtype}, {res['device']}; copy bandwidth {copy_gbs:.1f} GB/s\n")
    print(f"{'shape':>12} {'DQ':>3} {'impl':<24} {'ms':>9} {'GB/s':>8} {'of copy':>8} {'identical':>9}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>12} {'y' if r['double_quant'] else 'n':>3} {r['impl']:<24} "
              f"{r['ms']:>9.3f} {r['GB_per_s']:>8.1f} {r['share_of_copy']:>8.0%} {str(r['identical_to_bnb']):>9}")
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"{device_slug(device)}_nf4_dequant.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
