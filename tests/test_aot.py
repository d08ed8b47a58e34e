"""Every shipped Triton config compiles for Hopper (sm_90) on this CPU, within Hopper's limits.

benchmarks.aot compiles each paft_kernels.CompileSpec with Triton's compile API for
GPUTarget("cuda", 90, 32) and reads registers/spills (ptxas -v) and shared memory. This runs in
CI, GPU or not. The compiles run in spawned processes with TRITON_INTERPRET removed from their
environment, so the test is valid even inside an interpreted pytest session (where this
process's jit functions are the interpreter's). One module-scoped compile of everything feeds
all the assertions (Triton's cache makes a rerun fast).
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
from benchmarks import aot  # noqa: E402

OWN_MODULES = ("l1_lowrank", "nf4", "prox_adamw")  # paft_kernels/lora_triton.py's specs come with its own work


@pytest.fixture(scope="module")
def compiled():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:  # a triton without the ahead-of-time API cannot be checked at all
        pytest.fail(f"this triton has no ahead-of-time compile API: {e}")
    return aot.compile_all(jobs=max(1, min(4, os.cpu_count() or 1)))


def test_every_kernel_module_is_listed(compiled):
    assert set(OWN_MODULES) <= set(compiled["modules"]), compiled["modules"]
    for mod in OWN_MODULES:
        assert isinstance(compiled["modules"][mod], int) and compiled["modules"][mod] > 0, compiled["modules"]
    # a module without compile_specs() is reported by name, not dropped
    assert all(isinstance(v, int) or v == "no compile_specs()" for v in compiled["modules"].values())


def test_no_spills_at_rank_64_or_less_and_shared_memory_fits(compiled):
    assert compiled["kernels"], "nothing compiled"
    over_smem = [(k["name"], k["shared_bytes"]) for k in compiled["kernels"] if k["shared_bytes"] > aot.HOPPER_SHARED]
    assert not over_smem, over_smem
    spills = [(k["name"], k["spill_bytes"]) for k in compiled["kernels"]
              if k["tags"].get("rank", 0) <= 64 and k["spill_bytes"] != 0]
    assert not spills, spills
    assert all(k["registers"] and k["registers"] <= 255 for k in compiled["kernels"])


def test_l1_lowrank_uses_tensor_cores(compiled):
    l1 = [k for k in compiled["kernels"] if k["module"] == "l1_lowrank"]
    assert len(l1) == 24 and all(k["wgmma"] for k in l1), [(k["name"], k["wgmma"]) for k in l1]


def test_nf4_has_no_byte_loads(compiled):
    """The packed codes are loaded a word (or more) at a time: no per-byte mask left in the PTX. The
    one byte load a double-quantized config keeps is its 8-bit absmax code (1 byte per 64 weights)."""
    full = [k for k in compiled["kernels"] if k["module"] == "nf4" and not k["name"].endswith("tail]")]
    assert full and all(k["byte_loads"] == (1 if ",dq," in k["name"] else 0) for k in full), \
        [(k["name"], k["byte_loads"]) for k in full]
    assert all(k["wide_loads"] > 0 for k in full if k["num_warps"] <= 4)  # 8 warps: 4 bytes a thread, one b32


def test_prox_adamw_loads_are_vectorised(compiled):
    prox = [k for k in compiled["kernels"] if k["module"] == "prox_adamw"]
    assert prox and all(k["wide_loads"] >= 4 for k in prox), [(k["name"], k["wide_loads"]) for k in prox]
