"""Compile every kernel config the dispatchers can launch for Hopper (sm_90), on the CPU.

    python -m benchmarks.aot [--jobs N] [--json FILE] [--module NAME ...]

No GPU needed: Triton's compile API with GPUTarget("cuda", 90, 32) runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas -> cubin) with the ptxas Triton ships. Every module
paft_kernels/<name>.py that defines `compile_specs()` contributes its list of paft_kernels.CompileSpec;
a module without one is reported as such, not skipped silently.

Per spec it prints the registers per thread, the spill bytes (stores + loads to local memory),
the shared memory per block, and from the PTX: vector global loads (ld.global.v2/v4), single-
byte global loads (ld.global.u8: what a per-byte mask leaves) and whether tl.dot became wgmma. Registers and spills come from `ptxas -v` (the ptxas Triton
picks for sm_90, run again on the PTX Triton produced, with -arch=sm_90a); shared memory is
Triton's own number (metadata.shared: the static allocation of the TTGIR, pipelining buffers
included). Hopper allows 232448 bytes (227 KB) of shared memory per block.

The specialization the JIT applies at launch is reproduced: pointer arguments get 16-byte
divisibility hints (torch allocations are aligned), arguments the spec lists in constexprs
(e.g. unit strides) become constants, and integers named in tags["divisible_by_16"] get the
hint the JIT gives a multiple of 16. Compiles run in a process pool (spawned, so the
children never inherit TRITON_INTERPRET=1) and land in Triton's cache: a second run is fast.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

HOPPER_SHARED = 232448  # bytes of shared memory one block may use on sm_90


def kernel_modules() -> list[str]:
    import paft_kernels
    return sorted(m.name for m in pkgutil.iter_modules(paft_kernels.__path__) if not m.name.startswith("_"))


def _ptxas() -> str:
    """The ptxas Triton itself uses for sm_90 (it ships two; the PTX version decides which)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(90).path


def _ptxas_usage(ptx: str, kernel_name: str) -> dict:
    """Registers and spill bytes from `ptxas -v` on the PTX (Triton's own ptxas, sm_90a)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(), "-v", "-arch=sm_90a", src, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {kernel_name}: {text[-2000:]}")
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": (int(spill.group(1)) + int(spill.group(2))) if spill else None}


def compile_one(module: str, index: int) -> dict:
    """Compile spec `index` of paft_kernels.<module> for sm_90 and return its resource usage."""
    os.environ.pop("TRITON_INTERPRET", None)  # the jit functions must be real ones, not the interpreter's
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said explicitly (no warning)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.import_module(f"paft_kernels.{module}").compile_specs()[index]
    fn = spec.fn
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in spec.constexprs:
            sig[name] = "constexpr"
        else:
            if name not in spec.signature:
                raise KeyError(f"{spec.name}: argument {name!r} has neither a type nor a constexpr value")
            sig[name] = spec.signature[name]
            if sig[name].startswith("*") or name in spec.tags.get("divisible_by_16", ()):
                attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.perf_counter()
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    options.update({key: spec.tags[key] for key in ("enable_fp_fusion",) if key in spec.tags})  # launch options
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    usage = _ptxas_usage(k.asm["ptx"], spec.name)
    ptx = k.asm["ptx"]
    return {"module": module, "name": spec.name, "num_warps": spec.num_warps, "num_stages": spec.num_stages,
            **usage, "shared_bytes": int(k.metadata.shared), "compile_s": round(time.perf_counter() - t0, 2),
            "wide_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ptx)),
            "byte_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.[usb]8\b", ptx)),
            "wgmma": "wgmma" in ptx, "tags": {k2: v for k2, v in spec.tags.items()}}


def _count_specs(module: str) -> int | str:
    os.environ.pop("TRITON_INTERPRET", None)
    mod = importlib.import_module(f"paft_kernels.{module}")
    if not hasattr(mod, "compile_specs"):
        return "no compile_specs()"
    return len(mod.compile_specs())


def compile_all(modules: list[str] | None = None, jobs: int | None = None) -> dict:
    """{"modules": {name: n_specs or why none}, "kernels": [usage per spec]}, compiled in a spawned pool."""
    modules = modules or kernel_modules()
    ctx = get_context("spawn")  # fresh interpreters: no inherited TRITON_INTERPRET, no imported jit state
    env_before = os.environ.get("TRITON_INTERPRET")
    os.environ.pop("TRITON_INTERPRET", None)  # spawned children copy os.environ at start
    try:
        with ProcessPoolExecutor(max_workers=jobs or os.cpu_count() or 1, mp_context=ctx) as pool:
            counts = dict(zip(modules, pool.map(_count_specs, modules)))
            work = [(m, i) for m in modules if isinstance(counts[m], int) for i in range(counts[m])]
            results = list(pool.map(compile_one, *zip(*work))) if work else []
    finally:
        if env_before is not None:
            os.environ["TRITON_INTERPRET"] = env_before
    return {"target": "cuda sm_90 (GPUTarget('cuda', 90, 32))", "shared_limit_bytes": HOPPER_SHARED,
            "modules": counts, "kernels": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    ap.add_argument("--module", nargs="*", default=None, help="only these paft_kernels/<module>.py")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = compile_all(args.module, args.jobs)
    for mod, n in res["modules"].items():
        print(f"paft_kernels/{mod}.py: {n if isinstance(n, str) else f'{n} specs'}")
    print(f"\n{'kernel config':64s} {'warps':>5s} {'regs':>5s} {'spill B':>7s} {'smem B':>7s} {'v-ld':>4s} {'u8-ld':>5s} {'wgmma':>5s}")
    bad = 0
    for r in res["kernels"]:
        flag = ""
        if r["spill_bytes"] or r["shared_bytes"] > HOPPER_SHARED:
            flag, bad = "  <-- spills or shared memory over the limit", bad + 1
        print(f"{r['name']:64s} {r['num_warps']:5d} {r['registers']:5d} {r['spill_bytes']:7d} "
              f"{r['shared_bytes']:7d} {r['wide_loads']:4d} {r['byte_loads']:5d} {'yes' if r['wgmma'] else 'no':>5s}{flag}")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"\n{len(res['kernels'])} configs compiled for sm_90 in {res['wall_s']} s; registers/spills from ptxas -v, "
          f"shared memory from Triton's metadata; {bad} over a limit")
    if args.json:
        from benchmarks.common import write_json
        write_json(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
