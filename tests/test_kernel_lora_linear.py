"""Fused LoRA linear (kernels/lora_linear.py): the Triton kernels against the torch reference.

No GPU here, so the Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1, numpy
on CPU tensors). The variable must be set before triton is first imported, and other test
modules import torch / transformers (which may import triton), so the interpreted checks run
in a child process: this file, executed as a script with TRITON_INTERPRET=1, runs every
`check_*` function below and prints one JSON line of results; `test_triton_interpreted`
starts that process once per session and reports each check as its own test. Each check
also verifies that the kernels really ran: the kernel objects are the interpreter's, the
launch counter moved, and every output buffer starts NaN-filled (an element the kernel
does not write fails the comparison).

In this process: the torch twin of the autograd.Function against the reference, float64
gradcheck, the dropout mask, and dispatch.
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

from kernels import lora_linear as LL
from kernels.lora_linear import LoRALinearFunction, dropout_noise, lora_linear, lora_linear_torch

REPO = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
MARKER = "LORA_LINEAR_INTERPRETED_RESULTS "


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|, in float64 (NaN if a has NaN: unwritten poisoned elements fail)."""
    a, ref = a.double(), ref.double()
    err = (a - ref).abs().max()
    if torch.isnan(err):
        return float("nan")
    return (err / ref.abs().max().clamp_min(1e-30)).item()


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


def torch_function(x, W, b, A, B, s, p, training):
    return LoRALinearFunction.apply(x, W, b, A, B, s, p, training, "torch")


# ============================================================================ in-process tests

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
def test_dropout_noise_is_the_mask_of_F_dropout(dtype, p):
    x = torch.randn(3, 7, 11, dtype=dtype).transpose(0, 1)  # a non-contiguous layout too
    torch.manual_seed(3)
    expected = torch.nn.functional.dropout(x, p, True)
    torch.manual_seed(3)
    noise = dropout_noise(x, p, True)
    assert torch.equal(x * noise, expected)  # bit-identical, same RNG draws
    assert dropout_noise(x, 0.0, True) is None and dropout_noise(x, p, False) is None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_function_torch_twin_matches_reference(bias, p):
    x, W, b, A, B = make_inputs((2, 9), 13, 11, 4, torch.float32, bias=bias)
    got, ref = run_both(torch_function, lora_linear_torch, x, W, b, A, B, 0.75, p, True)
    for name, g, r in zip(("y", "dx", "dA", "dB"), got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert rel_err(g, r) < 1e-5, (name, rel_err(g, r))


def test_function_torch_twin_fp32_factors_of_a_bf16_model():
    # the engine's case: bf16 activations and base weight, fp32 master factors
    x, W, b, A, B = make_inputs((2, 9), 13, 11, 4, torch.bfloat16, factor_dtype=torch.float32)
    ref_fn = lambda *a: lora_linear(*a, backend="torch")  # casts A, B to x's dtype, differentiably
    got, ref = run_both(torch_function, ref_fn, x, W, b, A, B, 2.0, 0.2, True)
    for name, g, r in zip(("y", "dx", "dA", "dB"), got, ref):
        assert g.dtype == r.dtype, name  # dA, dB fp32 like the factors
        assert rel_err(g, r) < 2e-2, (name, rel_err(g, r))


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


def test_auto_on_cpu_is_the_reference_and_no_mask_without_dropout():
    x, W, b, A, B = make_inputs((3, 5), 8, 6, 2, torch.float32)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    y = lora_linear(x, W, b, A, B, 0.5, dropout_p=0.3, training=False)  # eval: no dropout, no RNG draw
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(y, lora_linear_torch(x, W, b, A, B, 0.5))
    with torch.no_grad():
        y2 = LoRALinearFunction.apply(x, W, b, A, B, 0.5, 0.0, True, "torch")
    assert torch.equal(torch.get_rng_state(), state)  # p == 0: no mask drawn
    assert rel_err(y2, y) < 1e-6


def test_dispatch_errors():
    x, W, b, A, B = make_inputs((4,), 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        lora_linear(x, W, b, A, B, 1.0, backend="cuda")
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, W, b, A, B, 1.0, dropout_p=1.5)
    if not LL.triton_interpreted():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            lora_linear(x, W, b, A, B, 1.0, backend="triton")
    with pytest.raises(ValueError, match="frozen"):
        LoRALinearFunction.apply(x, W.clone().requires_grad_(), b, A, B, 1.0, 0.0, False, "torch")
    # an unfrozen base falls back to the reference under "auto" and gets its gradient there
    Wg = W.clone().requires_grad_()
    lora_linear(x, Wg, b, A, B, 1.0).sum().backward()
    assert Wg.grad is not None


# ---------------------------------------------------------------------------- GPU path, compiled ahead of time
# The interpreter runs the kernels' Python, not the GPU compiler, so a kernel can pass every check
# above and still fail to compile for a GPU or need more shared memory than it has. With no GPU
# here, compile the CUDA path for Hopper (sm_90; Triton ships ptxas) with the specialization the
# JIT applies at launch (integer args equal to 1 become constants, pointers and multiples of 16
# get divisibility hints) and the launchers' own tile configs.

H100_SHARED = 232448  # bytes of shared memory one block may use on sm_90


def _aot_compile(kernel, types: dict, values: dict, consts: dict, opts: dict):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton
    sig, cx, attrs = {}, dict(consts), {}
    for i, name in enumerate(kernel.arg_names):
        v = values.get(name)
        if name in consts:
            sig[name] = "constexpr"
        elif isinstance(v, int) and v == 1:
            sig[name], cx[name] = "constexpr", 1
        else:
            sig[name] = types.get(name, "i32")
            if sig[name].startswith("*") or (isinstance(v, int) and v % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=cx, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def _gpu_cases(M=8192, K=4096, N=4096):
    """(name, kernel, types, values, consts, opts) for the forward GEMM, the dx GEMM with dropout,
    the xa kernel with dropout and the dyB kernel, as the launchers would start them (Llama sizes)."""
    for dtype, tname, r in ((torch.bfloat16, "bf16", 64), (torch.bfloat16, "bf16", 128), (torch.float32, "fp32", 128)):
        br = LL._block_r(r)
        gemm = {k: v for k, v in LL._config("gemm", False, dtype, br).items()}
        sk = LL._config("skinny", False, dtype, br)
        g_opts = {k: gemm.pop(k) for k in ("num_warps", "num_stages")}
        s_opts = {k: sk.pop(k) for k in ("num_warps", "num_stages")}
        prec = LL._precision(dtype)
        g_types = dict(X="*" + tname, WT="*" + tname, L="*fp32", RT="*fp32", NOISE="*" + tname, BIAS="*" + tname,
                       OUT="*" + tname, scale="fp32")
        s_types = dict(X="*" + tname, NOISE="*" + tname, A="*fp32", XA="*fp32")
        yield (f"forward GEMM {tname} r={r}", LL._matmul_lora_kernel, g_types,
               dict(M=M, N=N, K=K, R=r, stride_xm=K, stride_xk=1, stride_wk=1, stride_wn=K, stride_lm=r,
                    stride_lr=1, stride_rr=1, stride_rn=r, stride_nm=N, stride_nn=1, stride_om=N, stride_on=1),
               dict(HAS_BIAS=True, HAS_NOISE=False, UPCAST=False, PRECISION=prec, BLOCK_R=br, **gemm), g_opts)
        yield (f"dx GEMM + dropout {tname} r={r}", LL._matmul_lora_kernel, g_types,
               dict(M=M, N=K, K=N, R=r, stride_xm=N, stride_xk=1, stride_wk=K, stride_wn=1, stride_lm=r,
                    stride_lr=1, stride_rr=K, stride_rn=1, stride_nm=K, stride_nn=1, stride_om=K, stride_on=1),
               dict(HAS_BIAS=False, HAS_NOISE=True, UPCAST=False, PRECISION=prec, BLOCK_R=br, **gemm), g_opts)
        yield (f"xa + dropout {tname} r={r}", LL._xa_kernel, s_types,
               dict(M=M, K=K, R=r, stride_xm=K, stride_xk=1, stride_nm=K, stride_nk=1, stride_ar=K, stride_ak=1,
                    stride_om=r, stride_or=1),
               dict(HAS_NOISE=True, UPCAST=False, PRECISION=prec, BLOCK_R=br, **sk), s_opts)
        yield (f"dyB {tname} r={r}", LL._xa_kernel, s_types,
               dict(M=M, K=N, R=r, stride_xm=N, stride_xk=1, stride_nm=N, stride_nk=1, stride_ar=1, stride_ak=r,
                    stride_om=r, stride_or=1),
               dict(HAS_NOISE=False, UPCAST=False, PRECISION=prec, BLOCK_R=br, **sk), s_opts)


@pytest.mark.slow
def test_gpu_kernels_compile_for_hopper():
    pytest.importorskip("triton")
    if LL.triton_interpreted():
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernels are interpreted, not compiled")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no ahead-of-time compile API: {e}")
    for name, kernel, types, values, consts, opts in _gpu_cases():
        if "r=128" in name and not name.startswith("xa"):
            continue  # at r = 128 only the skinny kernel's shared memory is at stake (and compiles are slow)
        try:
            k = _aot_compile(kernel, types, values, consts, opts)
        except RuntimeError as e:
            if "ptxas" in str(e) and "not found" in str(e):
                pytest.skip(f"no ptxas: {e}")
            raise
        ttgir = k.asm["ttgir"]
        assert k.metadata.shared <= H100_SHARED, (name, k.metadata.shared)
        assert "async_copy_global_to_local" in ttgir, f"{name}: the K-loop loads are not pipelined"
        if "bf16" in name:
            assert "warp_group_dot" in ttgir, f"{name}: no wgmma (Hopper tensor-core) dot"


# ============================================================================ interpreted Triton checks
# Each check_* runs in the TRITON_INTERPRET=1 child process (see the module docstring).

def _nan_empty(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _launched(fn):
    before = dict(LL.LAUNCHES)
    out = fn()
    return out, {k: v - before.get(k, 0) for k, v in LL.LAUNCHES.items() if v - before.get(k, 0)}


def check_kernels_are_interpreted():
    assert LL.triton_interpreted(), "TRITON_INTERPRET=1 was set but the kernels are not InterpretedFunction"
    return {}


def _check_forward_poisoned(dtype, bias, p):
    M, K, N, r, s = 37, 45, 29, 5, 0.5
    x, W, b, A, B = make_inputs((M,), K, N, r, dtype, bias=bias, seed=1)
    torch.manual_seed(21)
    noise = dropout_noise(x, p, True)
    torch.manual_seed(21)
    ref = lora_linear_torch(x, W, b, A, B, s, p, True)
    y_out = torch.full((M, N), float("nan"), dtype=dtype)
    xa_out = torch.full((M, r), float("nan"), dtype=torch.float32)
    blocks = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)  # 3 × 2 tiles, 3 K-steps: masks on every edge

    def run():
        xa = LL.xa_triton(x, A, noise, out=xa_out, BLOCK_M=16, BLOCK_K=16)
        return LL.matmul_lora_triton(x, W.t(), xa, B.t(), s, bias=b, out=y_out, **blocks)

    y, launches = _launched(run)
    assert launches == {"xa": 1, "matmul_lora": 1}, launches
    assert y.data_ptr() == y_out.data_ptr()
    xd = x if noise is None else x * noise
    e_xa = rel_err(xa_out, xd.double() @ A.double().t())
    e_y = rel_err(y_out, ref)
    assert e_xa < TOL[dtype] and e_y < TOL[dtype], (e_xa, e_y)
    return {"rel_err_y": e_y, "rel_err_xa": e_xa}


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
    x, W, b, A, B = make_inputs((M,), K, N, r, dtype, seed=2)
    xx, AA, BB = (t.detach().clone().requires_grad_() for t in (x, A, B))
    torch.manual_seed(1234)
    y_ref = lora_linear_torch(xx, W, b, AA, BB, s, p, True)
    dy = torch.randn((M, N), generator=torch.Generator().manual_seed(7)).to(dtype)
    y_ref.backward(dy)
    dx_ref, dA_ref, dB_ref = xx.grad, AA.grad, BB.grad
    torch.manual_seed(1234)  # the same RNG state: the same mask
    noise = dropout_noise(x, p, True)
    xd = x if noise is None else x * noise
    xa = xd.float() @ A.float().t()  # the forward's fp32 (M, r) buffer
    dx_out = torch.full((M, K), float("nan"), dtype=dtype)
    dyb_out = torch.full((M, r), float("nan"), dtype=torch.float32)
    (dx, dA, dB), launches = _launched(lambda: LL.lora_backward_triton(
        dy, x, W, A, B, s, noise, xa, dx_out=dx_out, dyb_out=dyb_out))
    assert launches == {"xa": 1, "matmul_lora": 1}, launches
    assert dx.data_ptr() == dx_out.data_ptr()
    errs = {"dyB": rel_err(dyb_out, dy.double() @ B.double()), "dx": rel_err(dx, dx_ref),
            "dA": rel_err(dA, dA_ref), "dB": rel_err(dB, dB_ref)}
    assert all(e < TOL[dtype] for e in errs.values()), errs
    return errs


def check_backward_poisoned_fp32():
    return _check_backward_poisoned(torch.float32, p=0.0)


def check_backward_poisoned_fp32_dropout():
    return _check_backward_poisoned(torch.float32, p=0.25)


def check_backward_poisoned_bf16_dropout():
    return _check_backward_poisoned(torch.bfloat16, p=0.25)


def _check_autograd(dtype, lead, K, N, r, bias, p, factor_dtype=None, s=0.5):
    """lora_linear(backend='triton') end to end, every buffer NaN-poisoned, against the reference."""
    x, W, b, A, B = make_inputs(lead, K, N, r, dtype, bias=bias, factor_dtype=factor_dtype, seed=3)
    LL._empty, saved = _nan_empty, LL._empty
    try:
        tri = lambda *a: lora_linear(*a, backend="triton")
        ref = lambda *a: lora_linear(*a, backend="torch")
        (got, want), launches = _launched(lambda: run_both(tri, ref, x, W, b, A, B, s, p, True))
    finally:
        LL._empty = saved
    assert launches == {"xa": 2, "matmul_lora": 2}, launches  # forward: xa + GEMM; backward: dyB + dx GEMM
    errs = {}
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        errs[name] = rel_err(g, w)
    tol = TOL[dtype]
    assert all(e < tol for e in errs.values()), errs
    return errs


def check_autograd_fp32_3d_bias():
    return _check_autograd(torch.float32, (3, 13), 45, 29, 5, bias=True, p=0.0)


def check_autograd_fp32_dropout_nobias():
    return _check_autograd(torch.float32, (37,), 45, 29, 5, bias=False, p=0.3)


def check_autograd_bf16_dropout():
    return _check_autograd(torch.bfloat16, (37,), 45, 29, 5, bias=True, p=0.3, s=0.75)


def check_autograd_bf16_x_fp32_factors():
    # the engine's bf16 model with fp32 master factors: dA, dB come back fp32
    return _check_autograd(torch.bfloat16, (2, 19), 45, 29, 5, bias=True, p=0.1,
                           factor_dtype=torch.float32, s=2.0)


def check_rank_tiles():
    # r exactly one tile (16), r padded 20 -> 32, r = 1; more M/N tiles than one
    return {f"r{r}": _check_autograd(torch.float32, (70,), 50, 40, r, bias=True, p=0.0)["y"] for r in (16, 20, 1)}


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
    assert all(e < 1e-4 for e in errs.values()), errs
    return errs


def check_autocast_bf16_fp32_model():
    """An fp32 model under bf16 autocast (the engine's GPU setting): same as the reference under autocast."""
    x, W, b, A, B = make_inputs((37,), 45, 29, 5, torch.float32, seed=8)

    def under_autocast(backend):
        def fn(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return lora_linear(*args, backend=backend)
        return fn

    got, want = run_both(under_autocast("triton"), under_autocast("torch"), x, W, b, A, B, 0.75, 0.2, True)
    errs = {}
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)  # y bf16; dx, dA, dB fp32 like their inputs
        errs[name] = rel_err(g, w)
    assert all(e < 2e-2 for e in errs.values()), errs
    return errs


def check_no_dx_for_a_constant_input():
    """x without requires_grad (e.g. the first layer's input): the backward skips the dx GEMM."""
    x, W, b, A, B = make_inputs((37,), 45, 29, 5, torch.float32, seed=6)
    AA, BB = (t.detach().clone().requires_grad_() for t in (A, B))
    (_, launches) = _launched(lambda: lora_linear(x, W, b, AA, BB, 0.5, backend="triton").sum().backward())
    assert launches == {"xa": 2, "matmul_lora": 1}, launches
    Ar, Br = (t.detach().clone().requires_grad_() for t in (A, B))
    lora_linear_torch(x, W, b, Ar, Br, 0.5).sum().backward()
    errs = {"dA": rel_err(AA.grad, Ar.grad), "dB": rel_err(BB.grad, Br.grad)}
    assert all(e < 1e-4 for e in errs.values()), errs
    return errs


def check_triton_errors():
    x, W, b, A, B = make_inputs((4,), 8, 6, 2, torch.float64)
    try:
        lora_linear(x, W, b, A, B, 1.0, backend="triton")
    except TypeError as e:
        assert "float32 and bfloat16" in str(e)
    else:
        raise AssertionError("float64 on the Triton path should raise")
    x, W, b, A, B = make_inputs((4,), 8, 6, 130, torch.float32)
    try:
        lora_linear(x, W, b, A, B, 1.0, backend="triton")
    except ValueError as e:
        assert "r ≤" in str(e)
    else:
        raise AssertionError("r > 128 on the Triton path should raise")
    return {}


CHECKS = sorted(name for name in dict(globals()) if name.startswith("check_"))


def _run_checks() -> dict:
    torch.set_num_threads(1)  # the box is shared; the interpreter is numpy-bound anyway
    results = {}
    for name in CHECKS:
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
                          capture_output=True, text=True, timeout=300)
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
