"""LoRA linear (paft_kernels/lora_linear.py, lora_triton.py, lora_torch.py): every route against the reference.

No GPU here, so the Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1, numpy
on CPU tensors). The variable must be set before triton is first imported, and other test
modules import torch / transformers (which may import triton), so the interpreted checks run
in a child process: this file, executed as a script with TRITON_INTERPRET=1, runs every
`check_*` function below and prints one JSON line of results; `test_triton_interpreted`
starts that process once per session and reports each check as its own test. Each check
also verifies that the kernels really ran: the kernel objects are the interpreter's, the
launch counter moved, and every output buffer starts NaN-filled (an element the kernel
does not write fails the comparison).

Bounds. fp32: relative 1e-5 of the output's max (TF32 is a GPU matter; the interpreter computes
fp32 dots exactly, so only the accumulation order differs). bf16: in units of one bf16 ulp of the
reference value (`ulps`), against a float64 reference that rounds where the kernel rounds (its
operands rounded to bf16 exactly as the kernel rounds them, one rounding of the result): the
kernel must land on the same bf16 value or its neighbour (≤ 1 ulp). End to end (through several
roundings of the plain reference) the bound is stated per check.

In this process: the cublas route against the reference (values and gradients, dropout mask,
QLoRA weight function), the torch twin, float64 gradcheck, the Philox replica, and dispatch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from paft_kernels import lora_linear as LL, lora_triton as LT, utils
from paft_kernels.lora_linear import LoRALinearFunction, describe_route, lora_linear
from paft_kernels.lora_torch import (CublasLoRAFunction, draw_seed, dropout_noise, lora_linear_torch, philox_noise,
                                philox_randint)
from paft_kernels.utils import triton_interpreted

REPO = Path(__file__).resolve().parents[1]
FP32_REL = 1e-5
MARKER = "LORA_LINEAR_INTERPRETED_RESULTS "


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|, in float64 (NaN if a has NaN: unwritten poisoned elements fail)."""
    a, ref = a.double(), ref.double()
    err = (a - ref).abs().max()
    if torch.isnan(err):
        return float("nan")
    return (err / ref.abs().max().clamp_min(1e-30)).item()


def ulps(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| in bf16 ulps of ref (ulp(v) = 2^(⌊log2 |v|⌋ - 7)); values within 2⁻¹⁶·max|ref| of 0
    count in the ulp of that floor (there the fp32 accumulation error, not the rounding, is the limit)."""
    a, ref = a.double(), ref.double()
    floor = ref.abs().max().clamp_min(1e-30) * 2.0 ** -16
    mag = torch.maximum(ref.abs(), floor)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
    err = ((a - ref).abs() / ulp).max()
    return float("nan") if torch.isnan(err) else err.item()


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).double()


def close(a, ref, dtype, bound_ulps: float = 1.0, at_max: bool = False) -> tuple[bool, float]:
    """(ok, error): fp32 relative to the max; bf16 in ulps of each element, or (at_max) in ulps of the
    largest |ref| (2⁻⁸·max|ref|): the bound for comparisons with a reference that rounds elsewhere,
    where an output near 0 inherits the rounding of its large terms."""
    if dtype == torch.bfloat16:
        e = rel_err(a, ref) / 2.0 ** -8 if at_max else ulps(a, ref)
        return e <= bound_ulps, e
    e = rel_err(a, ref)
    return e <= FP32_REL, e


def make_inputs(lead, K, N, r, dtype, bias=True, factor_dtype=None, seed=0):
    """Fresh random inputs at a trained-LoRA scale (B nonzero, unlike at init)."""
    g = torch.Generator().manual_seed(seed)
    fd = factor_dtype or dtype
    x = torch.randn(*lead, K, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    A = (torch.randn(r, K, generator=g) / K ** 0.5).to(fd)
    B = torch.randn(N, r, generator=g).to(fd)
    return x, W, b, A, B


def run_both(fn_a, fn_b, x, W, b, A, B, s, p, training, seed=1234, dy_seed=7):
    """Forward + backward of two implementations under the same RNG state (so the same dropout mask)."""
    results = []
    for fn in (fn_a, fn_b):
        xx, AA, BB = (t.detach().clone().requires_grad_() for t in (x, A, B))
        torch.manual_seed(seed)
        y = fn(xx, W, b, AA, BB, s, p, training)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.dtype)
        y.backward(dy)
        results.append((y.detach(), xx.grad, AA.grad, BB.grad))
    return results


def philox_reference(x, W, b, A, B, s, p, training, seed=1234):
    """The reference with the Triton route's mask: the seed it draws after torch.manual_seed(seed)."""
    noise = None
    if training and p > 0:
        torch.manual_seed(seed)
        K = x.shape[-1]
        noise = philox_noise(draw_seed(), x.numel() // K, K, p).reshape(x.shape)
    return lora_linear_torch(x, W, b, A.to(x.dtype), B.to(x.dtype), s, p, training, noise=noise)


def torch_twin(x, W, b, A, B, s, p, training):
    return LoRALinearFunction.apply(x, W, b, A, B, s, p, training, "torch")


def cublas(x, W, b, A, B, s, p, training):
    return lora_linear(x, W, b, A, B, s, p, training, backend="cublas")


def reference(x, W, b, A, B, s, p, training):
    return lora_linear(x, W, b, A, B, s, p, training, backend="torch")


# ============================================================================ in-process tests

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
def test_dropout_noise_is_the_mask_of_F_dropout(dtype, p):
    x = torch.randn(3, 7, 11, dtype=dtype).transpose(0, 1)  # a non-contiguous layout too
    torch.manual_seed(3)
    expected = F.dropout(x, p, True)
    torch.manual_seed(3)
    noise = dropout_noise(x, p, True)
    assert torch.equal(x * noise, expected)  # bit-identical, same RNG draws
    assert dropout_noise(x, 0.0, True) is None and dropout_noise(x, p, False) is None


def test_philox_noise_keeps_one_minus_p_and_depends_on_seed_and_position():
    n = philox_noise(7, 300, 200, 0.25)
    assert set(n.unique().tolist()) == {0.0, torch.tensor(1 / 0.75, dtype=torch.float32).item()}
    assert abs((n > 0).float().mean().item() - 0.75) < 0.01  # 60k draws: 4σ ≈ 0.007
    assert not torch.equal(n, philox_noise(8, 300, 200, 0.25))
    assert torch.equal(philox_noise(7, 300, 200, 0.25), n)
    assert torch.equal(philox_noise(7, 301, 200, 0.25)[:300], n)  # element (i, j) depends on i·K + j only
    assert philox_noise(7, 4, 5, 1.0).abs().sum() == 0
    # offsets past 2³² use the counter's high word (int64 offsets in the kernels)
    offs = torch.tensor([5, 5 + 2 ** 32, 2 ** 40 + 3])
    r = philox_randint(11, offs)
    assert (r >= 0).all() and (r < 2 ** 32).all() and len(set(r.tolist())) == 3


# ---------------------------------------------------------------------------- the cublas route

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cublas_route_matches_the_reference_fp32(bias, p):
    x, W, b, A, B = make_inputs((2, 9), 13, 11, 4, torch.float32, bias=bias)
    got, ref = run_both(cublas, reference, x, W, b, A, B, 0.75, p, True)  # same RNG state: same F.dropout mask
    for name, g, r in zip(("y", "dx", "dA", "dB"), got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert rel_err(g, r) < FP32_REL, (name, rel_err(g, r))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_cublas_route_bf16_rounds_once_per_gemm(p):
    """bf16 with fp32 master factors: each output within 1 ulp of a float64 reference that rounds
    where the route rounds (the base GEMM, xa and dyB as torch computes them, then one rounding)."""
    M, K, N, r, s = 45, 61, 37, 6, 0.75
    x, W, b, A, B = make_inputs((M,), K, N, r, torch.bfloat16, factor_dtype=torch.float32, seed=9)
    xx, AA, BB = (t.clone().requires_grad_() for t in (x, A, B))
    torch.manual_seed(5)
    y = lora_linear(xx, W, b, AA, BB, s, p, True, backend="cublas")
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y.backward(dy)
    torch.manual_seed(5)
    noise = dropout_noise(x, p, True)
    xd = x if noise is None else x * noise
    Ab, Bb = A.to(torch.bfloat16), B.to(torch.bfloat16)
    xa = F.linear(xd, Ab)                                     # (M, r) bf16, as the route computes it
    dyB = dy @ Bb                                             # (M, r) bf16
    want = {"y": F.linear(x, W, b).double() + s * xa.double() @ Bb.double().t(),
            "dx": (dy @ W).double() + s * (dyB.double() @ Ab.double()) * (1 if noise is None else noise.double()),
            "dA": s * dyB.double().t() @ xd.double(), "dB": s * dy.double().t() @ xa.double()}
    bound = {"y": 1.0, "dx": 1.0, "dA": 1.0, "dB": 1.0}
    if noise is not None:  # with dropout dyB A and noise ⊙ (dyB A) are rounded (torch ops) before the add
        want["dx"] = (dy @ W).double() + s * bf16(bf16(dyB.double() @ Ab.double()) * noise.double())
        bound["dx"] = 2.0  # the in-place add with alpha=s rounds once more on CPU
    got = {"y": y, "dx": xx.grad, "dA": AA.grad, "dB": BB.grad}
    errs = {k: ulps(got[k], bf16(want[k])) for k in got}
    assert all(errs[k] <= bound[k] for k in errs), errs
    assert AA.grad.dtype == torch.float32 and BB.grad.dtype == torch.float32


def test_cublas_route_calls_the_weight_function_only_when_dx_is_needed():
    x, W, b, A, B = make_inputs((3, 5), 8, 6, 2, torch.float32)
    calls = []

    def weight():
        calls.append(1)
        return W

    AA, BB = (t.clone().requires_grad_() for t in (A, B))
    lora_linear(x, weight, b, AA, BB, 0.5, backend="cublas").sum().backward()  # x needs no grad
    assert len(calls) == 1  # forward only: no dequant in backward without dx
    xx = x.clone().requires_grad_()
    lora_linear(xx, weight, b, AA, BB, 0.5, backend="cublas").sum().backward()
    assert len(calls) == 3
    Ar, Br, xr = (t.clone().requires_grad_() for t in (A, B, x))
    lora_linear_torch(xr, W, b, Ar, Br, 0.5).sum().backward()
    assert rel_err(xx.grad, xr.grad) < FP32_REL


# ---------------------------------------------------------------------------- the torch twin of the Triton route

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_function_torch_twin_matches_the_reference_with_the_philox_mask(bias, p):
    x, W, b, A, B = make_inputs((2, 9), 13, 11, 4, torch.float32, bias=bias)
    got, ref = run_both(torch_twin, philox_reference, x, W, b, A, B, 0.75, p, True)
    for name, g, r in zip(("y", "dx", "dA", "dB"), got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert rel_err(g, r) < FP32_REL, (name, rel_err(g, r))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_function_torch_float64(bias, p):
    x, W, b, A, B = make_inputs((2, 3), 5, 4, 3, torch.float64, bias=bias, seed=5)
    x, A, B = (t.requires_grad_() for t in (x, A, B))

    def f(x, A, B):
        # reseed on every call so that gradcheck's repeated forwards see one dropout mask
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(11)
            return LoRALinearFunction.apply(x, W, b, A, B, 1.5, p, True, "torch")

    assert torch.autograd.gradcheck(f, (x, A, B), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_cublas_float64(p):
    x, W, b, A, B = make_inputs((2, 3), 5, 4, 3, torch.float64, seed=6)
    x, A, B = (t.requires_grad_() for t in (x, A, B))

    def f(x, A, B):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(12)
            return CublasLoRAFunction.apply(x, W, b, A, B, 1.5, p, True)

    assert torch.autograd.gradcheck(f, (x, A, B), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------- dispatch and routes

def test_auto_on_cpu_is_the_reference_and_no_mask_without_dropout():
    x, W, b, A, B = make_inputs((3, 5), 8, 6, 2, torch.float32)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    before = dict(LL.ROUTE_CALLS)
    y = lora_linear(x, W, b, A, B, 0.5, dropout_p=0.3, training=False)  # eval: no dropout, no RNG draw
    assert LL.ROUTE_CALLS["torch"] == before.get("torch", 0) + 1
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(y, lora_linear_torch(x, W, b, A, B, 0.5))
    with torch.no_grad():
        y2 = LoRALinearFunction.apply(x, W, b, A, B, 0.5, 0.0, True, "torch")
        y3 = lora_linear(x, W, b, A, B, 0.5, 0.0, True, backend="cublas")
    assert torch.equal(torch.get_rng_state(), state)  # p == 0: no mask drawn
    assert rel_err(y2, y) < 1e-6 and rel_err(y3, y) < 1e-6
    assert describe_route("auto", "cpu", 8, 6, 2, torch.float32) == ("torch", "cpu: the torch reference")
    assert describe_route("cublas", "cpu", 8, 6, 2, torch.float32) == ("cublas", "forced")


def test_auto_on_cuda_reads_the_committed_route_table(tmp_path, monkeypatch):
    """No GPU here: the device name is stubbed, the table logic is real."""
    monkeypatch.setattr(utils, "_device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(LL, "triton_interpreted", lambda: False)
    monkeypatch.setattr(utils, "ROUTES_DIR", str(tmp_path))
    utils.route_table.cache_clear()
    try:
        route, why = describe_route("auto", "cuda", 4096, 4096, 16, torch.bfloat16)
        assert route == "cublas" and "no measured route table for NVIDIA H200" in why
        (tmp_path / "lora_linear_nvidia-h200.json").write_text(json.dumps({"routes": [
            {"K": 4096, "N": 4096, "r": 16, "dtype": "bfloat16", "route": "triton"}]}))
        utils.route_table.cache_clear()
        assert describe_route("auto", "cuda", 4096, 4096, 16, torch.bfloat16)[0] == "triton"
        assert describe_route("auto", "cuda", 4096, 11008, 16, torch.bfloat16) == (
            "cublas", "shape not in lora_linear_nvidia-h200.json")
        assert describe_route("auto", "cuda", 4096, 4096, 16, torch.bfloat16, frozen=False)[0] == "torch"
    finally:
        utils.route_table.cache_clear()


def test_no_route_table_is_committed_without_a_gpu_measurement():
    # auto may only follow numbers a GPU produced: any committed table must name its results file
    for path in Path(utils.ROUTES_DIR).glob("*.json") if os.path.isdir(utils.ROUTES_DIR) else []:
        doc = json.loads(path.read_text())
        assert doc.get("measured_from") and doc.get("device"), path


def test_dispatch_errors():
    x, W, b, A, B = make_inputs((4,), 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        lora_linear(x, W, b, A, B, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, W, b, A, B, 1.0, dropout_p=1.5)
    if not triton_interpreted():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            lora_linear(x, W, b, A, B, 1.0, backend="triton")
    with pytest.raises(ValueError, match="frozen"):
        LoRALinearFunction.apply(x, W.clone().requires_grad_(), b, A, B, 1.0, 0.0, False, "torch")
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, W.clone().requires_grad_(), b, A, B, 1.0, backend="cublas")
    # an unfrozen base falls back to the reference under "auto" and gets its gradient there
    Wg = W.clone().requires_grad_()
    lora_linear(x, Wg, b, A, B, 1.0).sum().backward()
    assert Wg.grad is not None


def test_compile_specs_cover_every_config_the_dispatcher_can_launch():
    pytest.importorskip("triton")
    specs = LT.compile_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    for kind, sets in (("gemm", LT.GEMM_CONFIGS), ("gemm+dropout", LT.GEMM_DROPOUT_CONFIGS),
                       ("skinny", LT.SKINNY_CONFIGS), ("dA", LT.DA_CONFIGS)):
        for elem, configs in sets.items():
            for r in LT.SPEC_RANKS:
                got = {s.tags["config"] for s in specs if s.tags["r"] == r and s.tags["dtype"] == LT._TNAME[elem]
                       and s.tags["kernel"] == kind.split("+")[0]
                       and (s.tags["role"] == "dx+dropout") == (kind == "gemm+dropout")}
                assert got == set(range(len(configs))), (kind, elem, r, got)
    assert {LT._block_r(r) for r in range(1, LT.MAX_RANK + 1)} == {LT._block_r(r) for r in LT.SPEC_RANKS}
    for s in specs:  # every runtime and constexpr argument is named, once
        assert set(s.signature) | set(s.constexprs) == set(s.fn.arg_names), s.name
        assert not set(s.signature) & set(s.constexprs), s.name


# ---------------------------------------------------------------------------- GPU path, compiled ahead of time
# The interpreter runs the kernels' Python, not the GPU compiler: compile a few shipped specs for
# Hopper here (the full list is python -m benchmarks.aot) and read spills from ptxas.

H100_SHARED = 232448  # bytes of shared memory one block may use on sm_90


def _compile(spec):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton
    sig = {a: ("constexpr" if a in spec.constexprs else spec.signature[a]) for a in spec.fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(spec.fn.arg_names)
             if a in spec.tags.get("divisible_by_16", ())}
    src = ASTSource(fn=spec.fn, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 128),
                          options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))


@pytest.mark.slow
def test_gpu_kernels_compile_for_hopper_without_spills():
    pytest.importorskip("triton")
    if triton_interpreted():
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernels are interpreted, not compiled")
    import re
    import tempfile
    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    if not ptxas.exists():
        pytest.skip("no ptxas-blackwell in this triton")
    wanted = ("lora_gemm[fwd,128x128x64,w8s3,r=64,bf16]", "lora_gemm[dx+dropout,128x64x64,w8s3,r=64,bf16]",
              "lora_xa[xa+dropout,64x128,w4s3,r=64,bf16]", "lora_dA[dropout,64x128,w8s3,r=64,bf16]")
    for spec in [s for s in LT.compile_specs() if s.name in wanted]:
        k = _compile(spec)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "k.ptx").write_text(k.asm["ptx"])
            out = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", str(Path(d) / "k.ptx"), "-o",
                                  str(Path(d) / "k.o")], capture_output=True, text=True)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stdout + out.stderr)
        assert m and m.group(1) == m.group(2) == "0", (spec.name, out.stderr[-400:])
        assert k.metadata.shared <= H100_SHARED, (spec.name, k.metadata.shared)
        assert "async_copy_global_to_local" in k.asm["ttgir"], f"{spec.name}: the loads are not pipelined"
        assert "warp_group_dot" in k.asm["ttgir"], f"{spec.name}: no wgmma (Hopper tensor-core) dot"


# ============================================================================ interpreted Triton checks
# Each check_* runs in the TRITON_INTERPRET=1 child process (see the module docstring).

def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _launched(fn):
    before = dict(LT.LAUNCHES)
    out = fn()
    return out, {k: v - before.get(k, 0) for k, v in LT.LAUNCHES.items() if v - before.get(k, 0)}


def check_kernels_are_interpreted():
    assert triton_interpreted(), "TRITON_INTERPRET=1 was set but the kernels are not InterpretedFunction"
    return {}


def check_philox_replica_is_tl_randint():
    import triton
    import triton.language as tl

    @triton.jit
    def randint_kernel(O, seed, base, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs = base + i.to(tl.int64)
        r = tl.randint(seed, offs)
        tl.store(O + i, r.to(tl.int64), mask=i < n)

    errs = {}
    for seed, base in ((0, 0), (123456789, 2 ** 32 - 40), (2 ** 31 - 2, 2 ** 41 + 7)):
        out = torch.zeros(100, dtype=torch.int64)
        randint_kernel[(2,)](out, seed, base, 100, BLOCK=64)
        want = philox_randint(seed, base + torch.arange(100))
        assert torch.equal(out & 0xFFFFFFFF, want), (seed, base)
        errs[f"{seed}@{base}"] = 0
    return errs


def _stage_refs(x, W, b, A, B, s, noise):
    """float64 references for each kernel, from the operands as the kernel rounds them."""
    dt = x.dtype
    xd = x.double() if noise is None else bf16(x.double() * noise.double()) if dt == torch.bfloat16 \
        else x.double() * noise.double()
    return xd, A.to(dt).double(), B.to(dt).double()


def _check_forward_poisoned(dtype, bias, p, config=None, shape=(37, 45, 29, 5)):
    M, K, N, r = shape
    s = 0.5
    x, W, b, A, B = make_inputs((M,), K, N, r, dtype, bias=bias, factor_dtype=torch.float32, seed=1)
    seed = 99 if p > 0 else None
    noise = philox_noise(seed, M, K, p) if seed is not None else None
    y_out = torch.full((M, N), float("nan"), dtype=dtype)
    xa_out = torch.full((M, r), float("nan"), dtype=torch.float32)
    gemm = config or dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, PERSISTENT=False)  # masks on every edge

    def run():
        xa = LT.xa_triton(x, A, seed, p, out=xa_out, config=dict(BLOCK_M=16, BLOCK_K=16))
        return LT.matmul_lora_triton(x, W.t(), xa, B.t(), s, bias=b, out=y_out, config=gemm)

    y, launches = _launched(run)
    assert launches == {"skinny": 1, "gemm": 1}, launches
    assert y.data_ptr() == y_out.data_ptr()
    xd, Ad, Bd = _stage_refs(x, W, b, A, B, s, noise)
    e_xa = rel_err(xa_out, xd @ Ad.t())  # fp32 buffer: fp32 accumulation only
    lo = (xa_out.double() * s).to(dtype).double()  # s·xa rounded to x's dtype: the epilogue's operand
    want = x.double() @ W.double().t() + lo @ Bd.t() + (0 if b is None else b.double())
    ok, e_y = close(y_out, want.to(dtype) if dtype == torch.bfloat16 else want, dtype)
    assert e_xa < FP32_REL and ok, (e_xa, e_y)
    return {"rel_err_xa": e_xa, ("ulps_y" if dtype == torch.bfloat16 else "rel_err_y"): e_y}


def check_forward_poisoned_fp32():
    return _check_forward_poisoned(torch.float32, bias=True, p=0.0)


def check_forward_poisoned_fp32_nobias_dropout():
    return _check_forward_poisoned(torch.float32, bias=False, p=0.3)


def check_forward_poisoned_bf16():
    return _check_forward_poisoned(torch.bfloat16, bias=True, p=0.0)


def check_forward_poisoned_bf16_dropout():
    return _check_forward_poisoned(torch.bfloat16, bias=True, p=0.3)


def _check_backward_poisoned(dtype, p):
    M, K, N, r, s = 37, 45, 29, 5, 0.5
    x, W, b, A, B = make_inputs((M,), K, N, r, dtype, factor_dtype=torch.float32, seed=2)
    dy = torch.randn((M, N), generator=torch.Generator().manual_seed(7)).to(dtype)
    seed = 77 if p > 0 else None
    noise = philox_noise(seed, M, K, p) if seed is not None else None
    xd, Ad, Bd = _stage_refs(x, W, b, A, B, s, noise)
    xa = (xd @ Ad.t()).float()  # the forward's fp32 (M, r) buffer
    dx_out = torch.full((M, K), float("nan"), dtype=dtype)
    dyb_out = torch.full((M, r), float("nan"), dtype=torch.float32)
    LT._empty, saved = _nan_empty, LT._empty
    try:
        (dx, dA, dB), launches = _launched(lambda: LL.lora_backward_triton(
            dy, x, W, A, B, s, seed, p, xa, dx_out=dx_out, dyb_out=dyb_out))
    finally:
        LT._empty = saved
    assert launches == ({"skinny": 1, "gemm": 1} if seed is None else {"skinny": 1, "gemm": 1, "dA": 1}), launches
    assert dx.data_ptr() == dx_out.data_ptr()
    lo = (dyb_out.double() * s).to(dtype).double()  # s·dyB in x's dtype: operand of dx's epilogue and of dA
    lora = lo @ Ad
    if noise is not None:
        lora = lora * noise.double()
    want_dx = dy.double() @ W.double() + lora
    want_dA = lo.t() @ xd
    want_dB = dy.double().t() @ (xa.double() * s).to(dtype).double()
    rnd = (lambda t: t.to(dtype)) if dtype == torch.bfloat16 else (lambda t: t)
    errs = {"dyB": rel_err(dyb_out, dy.double() @ Bd)}
    assert errs["dyB"] < FP32_REL, errs
    for name, got, want in (("dx", dx, rnd(want_dx)), ("dB", dB, rnd(want_dB)),
                            # dA: the kernel (dropout) sums in fp32 and never rounds to bf16
                            ("dA", dA, want_dA if seed is not None else rnd(want_dA))):
        if name == "dA" and seed is not None:
            ok, e = rel_err(got, want) < FP32_REL, rel_err(got, want)
        else:
            ok, e = close(got, want, dtype)
        errs[name] = e
        assert ok, errs
    return errs


def check_backward_poisoned_fp32():
    return _check_backward_poisoned(torch.float32, p=0.0)


def check_backward_poisoned_fp32_dropout():
    return _check_backward_poisoned(torch.float32, p=0.25)


def check_backward_poisoned_bf16():
    return _check_backward_poisoned(torch.bfloat16, p=0.0)


def check_backward_poisoned_bf16_dropout():
    return _check_backward_poisoned(torch.bfloat16, p=0.25)


def _check_autograd(dtype, lead, K, N, r, bias, p, factor_dtype=None, s=0.5, bound_ulps=1.0):
    """lora_linear(backend='triton') end to end, every buffer NaN-poisoned, against the plain reference
    with the same Philox mask (which rounds more often than the kernels: bf16 bound in ulps, stated)."""
    x, W, b, A, B = make_inputs(lead, K, N, r, dtype, bias=bias, factor_dtype=factor_dtype, seed=3)
    LT._empty, saved = _nan_empty, LT._empty
    try:
        tri = lambda *a: lora_linear(*a, backend="triton")
        (got, want), launches = _launched(lambda: run_both(tri, philox_reference, x, W, b, A, B, s, p, True))
    finally:
        LT._empty = saved
    expect = {"skinny": 2, "gemm": 2}  # forward: xa + GEMM; backward: dyB + dx GEMM (+ dA with dropout)
    if p > 0:
        expect["dA"] = 1
    assert launches == expect, launches
    errs = {}
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        ok, errs[name] = close(g, w, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32, bound_ulps,
                               at_max=True)  # fp32 grads of bf16 math count in bf16 ulps too
        assert ok, (name, errs)
    return errs


def check_autograd_fp32_3d_bias():
    return _check_autograd(torch.float32, (3, 13), 45, 29, 5, bias=True, p=0.0)


def check_autograd_fp32_dropout_nobias():
    return _check_autograd(torch.float32, (37,), 45, 29, 5, bias=False, p=0.3)


def check_autograd_bf16_dropout():
    # the plain reference rounds xa, x Wᵀ, s·(xa Bᵀ) and the sum separately: 2 ulps of max|y| (2⁻⁷ relative)
    return _check_autograd(torch.bfloat16, (37,), 45, 29, 5, bias=True, p=0.3, s=0.75, bound_ulps=2.0)


def check_autograd_bf16_x_fp32_factors():
    # the engine's bf16 model with fp32 master factors: dA, dB come back fp32
    return _check_autograd(torch.bfloat16, (2, 19), 45, 29, 5, bias=True, p=0.1,
                           factor_dtype=torch.float32, s=2.0, bound_ulps=2.0)


def check_every_shipped_config():
    """Each autotune config (the GPU's tiles, persistent variant included) on a shape with ragged edges."""
    out = {}
    shape = (150, 90, 140, 20)
    for elem, sets in ((4, LT.GEMM_CONFIGS), (4, LT.GEMM_DROPOUT_CONFIGS)):
        for i, cfg in enumerate(sets[elem]):
            tiles = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
            p = 0.3 if sets is LT.GEMM_DROPOUT_CONFIGS else 0.0
            out[f"gemm{'_dropout' if p else ''}{i}"] = _check_forward_poisoned(
                torch.float32, bias=True, p=p, config=tiles, shape=shape)["rel_err_y"]
    M, K, r = 150, 90, 20
    x, _, _, A, _ = make_inputs((M,), K, 8, r, torch.float32, seed=12)
    noise = philox_noise(5, M, K, 0.3)
    xd = x.double() * noise.double()
    dyB = torch.randn(M, r)
    for i, cfg in enumerate(LT.SKINNY_CONFIGS[4]):
        tiles = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        out[f"skinny{i}"] = rel_err(LT.xa_triton(x, A, 5, 0.3, config=tiles), xd @ A.double().t())
    for i, cfg in enumerate(LT.DA_CONFIGS[4]):
        tiles = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
        out[f"dA{i}"] = rel_err(LT.dA_triton(dyB, x, 0.5, 5, 0.3, torch.float32, config=tiles),
                                0.5 * dyB.double().t() @ xd)
    assert all(e < FP32_REL for e in out.values()), out
    return out


def check_rank_tiles():
    # r exactly one tile (16), r padded 20 -> 32, r = 1, r = 64 (the largest); more M/N tiles than one
    return {f"r{r}": _check_autograd(torch.float32, (70,), 50, 40, r, bias=True, p=0.0)["y"] for r in (16, 20, 1, 64)}


def check_strided_inputs():
    """A transposed (non-contiguous) x and an expanded, stride-0 dy (from y.sum())."""
    M, K, N, r = 21, 33, 17, 3
    _, W, b, A, B = make_inputs((M,), K, N, r, torch.float32, seed=4)
    xt = torch.randn(K, M).t()  # (M, K) with strides (1, M)
    outs = []
    for backend in ("triton", "torch"):
        xx = xt.detach().requires_grad_()  # keeps the strides (1, M)
        AA, BB = (t.detach().clone().requires_grad_() for t in (A, B))
        lora_linear(xx, W, b, AA, BB, 1.0, backend=backend).sum().backward()
        outs.append((xx.grad, AA.grad, BB.grad))
    errs = {n: rel_err(g, w) for n, g, w in zip(("dx", "dA", "dB"), *outs)}
    assert all(e < FP32_REL for e in errs.values()), errs
    return errs


def check_autocast_bf16_fp32_model():
    """An fp32 model under bf16 autocast (the engine's GPU setting): same as the reference under autocast."""
    x, W, b, A, B = make_inputs((37,), 45, 29, 5, torch.float32, seed=8)

    def under_autocast(fn):
        def run(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args)
        return run

    tri = lambda *a: lora_linear(*a, backend="triton")
    ref = lambda x, W, b, A, B, s, p, t: philox_reference(x.to(torch.bfloat16), W.to(torch.bfloat16),
                                                          b.to(torch.bfloat16), A, B, s, p, t)
    got, want = run_both(under_autocast(tri), under_autocast(ref), x, W, b, A, B, 0.75, 0.2, True)
    errs = {}
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)  # y bf16; dx, dA, dB fp32 like their inputs
        ok, errs[name] = close(g, w, torch.bfloat16, 2.0, at_max=True)
        assert ok, errs
    return errs


def check_no_dx_no_dequant():
    """x without requires_grad (the first layer's input): no dx GEMM and, for a weight function, no dequant."""
    x, W, b, A, B = make_inputs((37,), 45, 29, 5, torch.float32, seed=6)
    calls = []

    def weight():
        calls.append(1)
        return W

    AA, BB = (t.detach().clone().requires_grad_() for t in (A, B))
    (_, launches) = _launched(lambda: lora_linear(x, weight, b, AA, BB, 0.5, backend="triton").sum().backward())
    assert launches == {"skinny": 2, "gemm": 1}, launches
    assert len(calls) == 1, calls  # forward only
    Ar, Br = (t.detach().clone().requires_grad_() for t in (A, B))
    lora_linear_torch(x, W, b, Ar, Br, 0.5).sum().backward()
    errs = {"dA": rel_err(AA.grad, Ar.grad), "dB": rel_err(BB.grad, Br.grad)}
    assert all(e < FP32_REL for e in errs.values()), errs
    return errs


def check_triton_errors():
    x, W, b, A, B = make_inputs((4,), 8, 6, 2, torch.float64)
    try:
        lora_linear(x, W, b, A, B, 1.0, backend="triton")
    except TypeError as e:
        assert "float32 and bfloat16" in str(e)
    else:
        raise AssertionError("float64 on the Triton path should raise")
    x, W, b, A, B = make_inputs((4,), 8, 6, LT.MAX_RANK + 1, torch.float32)
    try:
        lora_linear(x, W, b, A, B, 1.0, backend="triton")
    except ValueError as e:
        assert "r ≤" in str(e)
    else:
        raise AssertionError("r > MAX_RANK on the Triton path should raise")
    return {}


CHECKS = sorted(name for name in dict(globals()) if name.startswith("check_"))


def _run_checks() -> dict:
    torch.set_num_threads(1)  # the box is shared; the interpreter is numpy-bound anyway
    results = {}
    only = os.environ.get("LORA_CHECKS")
    for name in CHECKS:
        if only and name not in only.split(","):
            continue
        t0 = time.perf_counter()
        try:
            metrics = globals()[name]()
            results[name] = {"ok": True, "metrics": metrics}
        except Exception as e:  # report, don't stop: each check is its own pytest test
            import traceback
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
        results[name]["seconds"] = round(time.perf_counter() - t0, 3)
    return results


@pytest.fixture(scope="module")
def interpreted_results():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    assert proc.returncode == 0 and lines, f"interpreted run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len(MARKER):])


@pytest.mark.parametrize("name", CHECKS)
def test_triton_interpreted(name, interpreted_results):
    res = interpreted_results[name]
    assert res["ok"], res["error"]


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (pytest does this itself: python -m pytest tests/test_kernel_lora_linear.py)")
    print(MARKER + json.dumps(_run_checks()))
