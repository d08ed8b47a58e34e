"""Hand-written kernels (Triton on CUDA, torch references on CPU), one file per kernel family.

Each module carries its own Triton kernel(s), a torch reference, and a dispatch function
taking backend="auto" | "triton" | "torch"; a family over ~500 lines is split along its math
(lora_linear / lora_triton / lora_torch; nf4 / nf4_quant). The plumbing they share (the optional
Triton import, the interpreter and availability checks, route resolution, the measured route
tables) is utils.py. paft_kernels is the bottom layer: it imports nothing from engine/, merge/,
paft_evals/ or benchmarks/.

Why `paft_kernels` and not `kernels`: that is Hugging Face's hub-kernels package, which
transformers >= 5.25 requires and imports with every model class. A top-level folder named
`kernels` would shadow it whenever the repository root is on sys.path (`python -m` from the
root puts it first), and no model would load (tests/test_fresh_install.py checks both names).

Compile checks without a GPU: every kernel module defines `compile_specs()`, the list of
`CompileSpec`s (kernel, argument types, compile-time constants, warps, stages) that its
dispatcher can choose. `python -m benchmarks.aot` compiles each one for sm_90 on the CPU
and reports registers, spills and shared memory; tests/test_aot.py asserts on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompileSpec:
    """One compiled variant of a Triton kernel, as the dispatcher can launch it.

    signature: argument name -> Triton type string ("*bf16", "*fp32", "i32", "i64", "fp32", ...),
               for the runtime (non-constexpr) arguments, in order.
    constexprs: argument name -> value, for every tl.constexpr argument.
    """
    name: str                       # e.g. "lora_fwd[BM=128,BN=128,BK=64,r=16,bf16]"
    fn: Any                         # the @triton.jit function (not the autotuner wrapper)
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    tags: dict[str, Any] = field(default_factory=dict)  # free-form: rank, dtype, route ...

