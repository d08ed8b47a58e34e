"""What every kernel module needs and none should write again: the optional Triton import, the
interpreter and availability checks, choosing a route, and the measured route tables.

The kernel modules hold their math, their Triton kernels, the torch references and `compile_specs`,
and take these helpers from here. paft_kernels is the bottom layer: neither this module nor any
kernel module imports engine/, merge/, paft_evals/ or benchmarks/.

Routes. Each op takes backend="auto" | "triton" | "torch" (lora_linear also "cublas"):
`check_backend` validates the name, `resolve_backend` turns "auto" into "triton" on CUDA tensors
the kernel supports and "torch" everywhere else. The LoRA linear's auto route on a GPU is not a
rule but a measurement: `measured_route` looks the shape up in paft_kernels/routes/<op>_<gpu>.json,
the table `python -m benchmarks.kernels --write-routes` writes from a GPU run.

Autotuning and compile checks: `layout_of` gives the operand-layout flag an autotune key carries (a forward
reading Wᵀ as a view and a backward reading W are tuned apart even when every size matches), `record_pick`
keeps the config each kernel role used, and `compile_spec` builds the CompileSpec of one autotune config
for the sm_90 compile check (python -m benchmarks.aot).
"""
from __future__ import annotations

import functools
import json
import os
import re

import torch

try:  # Triton is optional: every op has a torch route that runs everywhere.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None

HAS_TRITON = triton is not None
ROUTES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "routes")

# ----------------------------------------------------------------------------- the interpreter

if HAS_TRITON:
    @triton.jit
    def _probe():
        """Never launched: its type says how @triton.jit decorates in this process."""
        pass


def triton_interpreted() -> bool:
    """True when the kernels of paft_kernels were defined under TRITON_INTERPRET=1 (the interpreter's
    functions: they take CPU tensors, and numpy does their arithmetic).

    Why one probe for all modules: @triton.jit reads TRITON_INTERPRET when it decorates a function, and
    every kernel module imports this one before it defines its kernels, so `_probe` was decorated under
    the setting they were. (Set the variable before paft_kernels is imported; nf4's dequantization also
    copes with it being set later, see `interpret_requested`.)
    """
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_probe, InterpretedFunction)


def interpret_requested() -> bool:
    """TRITON_INTERPRET as the environment says now, which may differ from `triton_interpreted()` when
    it was set or removed after import. nf4's dequantization runs its kernel's Python in the
    interpreter on demand, so for CPU tensors it asks this rather than how the kernel was decorated."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_triton(*tensors: torch.Tensor) -> None:
    """One clear error for every case in which backend='triton' cannot run on these tensors: no triton,
    CPU tensors without the interpreter, CUDA tensors with it. The caller's own checks (dtypes, shapes,
    ranks) come after this one."""
    on_cuda = all(t.is_cuda for t in tensors)
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    interpreted = triton_interpreted()
    if not on_cuda and not interpreted:
        raise RuntimeError("backend='triton' on CPU tensors runs only under the Triton interpreter: set "
                           "TRITON_INTERPRET=1 in the environment before triton (and this module) is imported, "
                           "or use backend='torch'")
    if on_cuda and interpreted:
        raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreted kernels take CPU tensors, not CUDA ones")


# ----------------------------------------------------------------------------- choosing a route

def check_backend(backend: str, routes: tuple[str, ...] = ("triton", "torch")) -> None:
    """ValueError unless backend is "auto" or one of `routes` (the same message from every op)."""
    names = ("auto",) + tuple(routes)
    if backend not in names:
        listed = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
        raise ValueError(f"backend must be {listed}, not {backend!r}")


def resolve_backend(backend: str, *tensors: torch.Tensor, fits: bool = True) -> str:
    """The route an op with routes "triton" / "torch" takes: a forced backend as given; "auto" is
    "triton" when triton is installed, not interpreted, every tensor is on CUDA and the kernel takes
    these inputs (`fits`: the caller's dtype, rank or layout conditions), and "torch" otherwise."""
    check_backend(backend)
    if backend != "auto":
        return backend
    ok = HAS_TRITON and all(t.is_cuda for t in tensors) and not triton_interpreted() and fits
    return "triton" if ok else "torch"


# ----------------------------------------------------------------------------- measured route tables

def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


@functools.lru_cache(maxsize=None)
def route_table(op: str, device_name: str, key: tuple[tuple[str, type], ...],
                routes: tuple[str, ...]) -> tuple[str, dict]:
    """(path, {key values: route}) of the committed table ROUTES_DIR/<op>_<gpu>.json measured on this GPU
    ({} if there is none). Each row holds the `key` fields, (name, type) pairs, and a "route", which must
    be one of `routes`."""
    path = os.path.join(ROUTES_DIR, f"{op}_{_slug(device_name)}.json")
    if not os.path.exists(path):
        return path, {}
    with open(path) as f:
        doc = json.load(f)
    table = {}
    for row in doc["routes"]:
        if row["route"] not in routes:
            raise ValueError(f"{path}: route {row['route']!r} must be " + " or ".join(repr(r) for r in routes))
        table[tuple(typ(row[name]) for name, typ in key)] = row["route"]
    return path, table


def measured_route(op: str, device, key: tuple[tuple[str, type], ...], values: tuple,
                   routes: tuple[str, ...]) -> tuple[str | None, str]:
    """(route, why) from the committed table of this CUDA device for the shape `values` (in `key`'s
    order), or (None, why) when the device has no table or the shape is not in it: the caller then
    takes its default route."""
    path, table = route_table(op, _device_name(device), key, routes)
    if not table:
        return None, f"no measured route table for {_device_name(device)} ({os.path.relpath(path)})"
    if values in table:
        return table[values], f"measured ({os.path.basename(path)})"
    return None, f"shape not in {os.path.basename(path)}"


# ----------------------------------------------------------------------------- autotune keys and picks

def layout_of(*tensors: torch.Tensor) -> str:
    """One letter per 2-D operand: 'r' row-major (unit stride along the last dim), 'c' column-major (a
    transposed view), 's' neither. Autotuned kernels take it as a constexpr in their key: the forward
    reads Wᵀ as a view ('c') and the backward W itself ('r'), so on a square shape the two share every
    size in the key and would otherwise reuse each other's tile pick, tuned for the other layout."""
    return "".join("r" if t.stride(-1) == 1 else "c" if t.stride(0) == 1 else "s" for t in tensors)


def record_pick(picks: dict, role: str, kernel: str, config: dict, tuned: bool, key: dict) -> None:
    """picks[role] = the config a kernel launch used for that role (the forward GEMM, the backward dx
    GEMM, ...), with its autotune key. Per role, not per kernel: the same kernel serves several roles,
    and a per-kernel record would keep only the last one (the backward's)."""
    picks[role] = {"kernel": kernel, "config": dict(config), "autotuned": tuned, "key": key}


def compile_spec(name: str, fn, args: dict, consts: dict, config: dict, tags: dict):
    """A paft_kernels.CompileSpec from `args` (every runtime argument's Triton type, or 1 for a unit stride),
    the constexprs and one autotune config (its tiles are constexprs too, its warps and stages options).
    Unit strides become constants, as the JIT specializes an int argument equal to 1 at launch."""
    sig, cx = {}, dict(consts)
    cx.update({k: v for k, v in config.items() if k not in ("num_warps", "num_stages")})
    for arg in fn.arg_names:
        if arg in cx:
            continue
        t = args[arg]
        if t == 1:
            cx[arg] = 1
        else:
            sig[arg] = t
    # At the shapes that matter (tokens, in/out features, r, row strides all multiples of 16) the JIT also
    # marks those ints as divisible by 16, which vectorized and pipelined loads rely on; the seed and the
    # dropout threshold are arbitrary. Pointers from torch allocations are 16-byte aligned.
    tags = dict(tags, divisible_by_16=tuple(a for a, v in sig.items()
                                            if v.startswith("*") or (v == "i32" and a not in ("seed", "thresh"))))
    from paft_kernels import CompileSpec
    return CompileSpec(name=name, fn=fn, signature=sig, constexprs=cx, num_warps=config["num_warps"],
                       num_stages=config["num_stages"], tags=tags)
