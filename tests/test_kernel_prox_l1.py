"""Fused AdamW + L1 prox (paft_kernels.prox_adamw) and the L1 of a low-rank product
(paft_kernels.l1_lowrank): torch references against independent formulas and
torch.optim.AdamW in this process; the Triton kernels under the Triton interpreter in a
subprocess (TRITON_INTERPRET=1 must be in the environment before triton is imported, and
other test modules of this pytest process import triton through torch/transformers).

Inputs are fresh random tensors each run (the seed is in every failure message); shapes
are deliberately not multiples of the block sizes.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from paft_kernels import prox_adamw as pak
from paft_kernels import utils
from paft_kernels.l1_lowrank import L1LowRank, l1_lowrank, l1_lowrank_dense, l1_lowrank_torch, sparsity_of_product
from paft_kernels.prox_adamw import ProxAdamW, prox_adamw_step_torch

SEED = random.SystemRandom().randrange(2 ** 31)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def gen(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


# --------------------------------------------------------------------------------------
# prox AdamW, torch path
# --------------------------------------------------------------------------------------

def _adamw_prox_f64(p, grads, lr, betas, eps, wd, l1):
    """Textbook formula in float64, independent of torch's op order."""
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p * (1 - lr * wd) - lr * mhat / (vhat.sqrt() + eps)
        p = p.sign() * (p.abs() - lr * l1).clamp_min(0)
    return p


@pytest.mark.parametrize("wd,l1", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.3), (0.1, 0.3)])
def test_prox_reference_matches_formula(wd, l1):
    g = gen()
    p0 = torch.randn(37, 45, generator=g) * 0.02
    grads = [torch.randn(37, 45, generator=g) for _ in range(4)]
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, gr in enumerate(grads, start=1):
        prox_adamw_step_torch(p, gr, m, v, t, 1e-2, 0.9, 0.999, 1e-8, wd, l1)
    ref = _adamw_prox_f64(p0, grads, 1e-2, (0.9, 0.999), 1e-8, wd, l1)
    assert rel(p, ref) < 1e-5, f"seed {SEED}"
    if l1 > 0:  # threshold lr·λ = 3e-3 on |p| ~ 2e-2 plus steps of ~1e-2: some land inside it
        assert (p == 0).any() and torch.equal(p == 0, ref == 0), f"seed {SEED}"


def _two_params(g):
    return [torch.nn.Parameter(torch.randn(37, 45, generator=g)), torch.nn.Parameter(torch.randn(5, 45, generator=g))]


def test_proxadamw_l1_zero_is_adamw_bitwise():
    """Torch backend: the same op sequence as torch.optim.AdamW(foreach=False) → bit-identical."""
    g = gen()
    ps = _two_params(g)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = ProxAdamW(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, l1=0.0, backend="torch")
    ref = torch.optim.AdamW(qs, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, foreach=False)
    for _ in range(5):
        for a, b in zip(ps, qs):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    for a, b in zip(ps, qs):
        assert torch.equal(a, b), f"seed {SEED}"
        sa, sb = ours.state[a], ref.state[b]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert torch.equal(sa["step"], sb["step"])


def test_soft_threshold_makes_exact_zeros():
    # With g = 0 at step 1 the Adam update is 0 (m = 0), so the step is the threshold alone:
    # |p| ≤ lr·λ → exactly 0, else shrunk by lr·λ towards 0.
    p = torch.nn.Parameter(torch.tensor([0.5, -0.5, 0.01, -0.01, 0.02, -0.0201, 0.0]))
    opt = ProxAdamW([p], lr=0.1, weight_decay=0.0, l1=0.2, backend="torch")  # threshold 0.02
    p.grad = torch.zeros_like(p)
    opt.step()
    expect = torch.tensor([0.48, -0.48, 0.0, 0.0, 0.0, -0.0001, 0.0])
    assert torch.allclose(p.detach(), expect, atol=1e-7)
    assert (p.detach()[2:5] == 0).all() and p.detach()[6] == 0


def test_prox_nan_propagates():
    p = torch.tensor([float("nan"), 1.0])
    prox_adamw_step_torch(p, torch.ones(2), torch.zeros(2), torch.zeros(2), 1, 0.1, 0.9, 0.999, 1e-8, 0.0, 1.0)
    assert p[0].isnan()


def test_proxadamw_state_dict_layout_and_checkpoint_roundtrip(tmp_path):
    """AdamW's state layout, saved and restored through engine.checkpoint's own helpers."""
    from safetensors.torch import load_file, save_file

    from engine.checkpoint import _load_optimizer, _optimizer_tensors

    g = gen()
    ps = _two_params(g)
    grads = [[torch.randn(p.shape, generator=g) for p in ps] for _ in range(6)]
    opt = ProxAdamW(ps, lr=1e-2, weight_decay=0.01, l1=0.05, backend="torch")
    adamw = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ps], foreach=False)

    def run(o, params, steps):
        for gs in steps:
            for p, gr in zip(params, gs):
                p.grad = gr.clone()
            o.step()

    run(opt, ps, grads[:3])
    run(adamw, adamw.param_groups[0]["params"], grads[:3])
    sd, sd_ref = opt.state_dict(), adamw.state_dict()
    assert sd["state"].keys() == sd_ref["state"].keys()
    for i in sd["state"]:
        assert sd["state"][i].keys() == sd_ref["state"][i].keys() == {"step", "exp_avg", "exp_avg_sq"}
        step, step_ref = sd["state"][i]["step"], sd_ref["state"][i]["step"]
        assert torch.is_tensor(step) and step.dtype == step_ref.dtype and step.shape == step_ref.shape
    assert sd["param_groups"][0]["l1"] == 0.05

    tensors, groups = _optimizer_tensors(opt)
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    groups = json.loads(json.dumps(groups))  # as trainer_state.json stores them
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = ProxAdamW(ps2, lr=1.0, l1=0.0, backend="torch")  # hyper-parameters come from the checkpoint
    _load_optimizer(opt2, load_file(str(tmp_path / "optimizer.safetensors")), groups)
    run(opt, ps, grads[3:])
    run(opt2, ps2, grads[3:])
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b), f"seed {SEED}"


# --------------------------------------------------------------------------------------
# L1 of the low-rank product, torch path
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l1_reference_matches_dense(dtype):
    g = gen()
    A = torch.randn(5, 45, generator=g, dtype=dtype)
    B = torch.randn(37, 5, generator=g, dtype=dtype)
    value, dA, dB = l1_lowrank_torch(A, B, 1.7, 3e-4, chunk_rows=8)  # 37 rows: 5 chunks, the last short
    Ad, Bd = A.double().requires_grad_(), B.double().requires_grad_()
    ref = l1_lowrank_dense(Ad, Bd, 1.7, 3e-4)
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel(value, ref.detach()) < tol and rel(dA, Ad.grad) < tol and rel(dB, Bd.grad) < tol, f"seed {SEED}"
    assert dA.dtype == dtype and dB.dtype == dtype


def test_l1_gradcheck_float64():
    g = gen()
    A = torch.randn(3, 9, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    # |·| has a kink at 0: with random inputs no entry of B A is within eps=1e-6 of it (p ≈ 1e-4).
    assert torch.autograd.gradcheck(lambda a, b: L1LowRank.apply(a, b, 2.0, 0.5, "torch"), (A, B),
                                    eps=1e-6, atol=1e-6, rtol=1e-5), f"seed {SEED}"


def test_l1_autograd_scales_with_upstream_and_is_zero_at_lora_init():
    g = gen()
    A = torch.randn(4, 11, generator=g, requires_grad=True)
    B = torch.zeros(6, 4, requires_grad=True)  # LoRA's B starts at 0: B A = 0, sign(0) = 0
    v = l1_lowrank(A, B, 2.0, 1e-3)
    (3 * v).backward()
    assert v.item() == 0 and (A.grad == 0).all() and (B.grad == 0).all()
    B2 = torch.randn(6, 4, generator=g, requires_grad=True)
    A.grad = None
    (3 * l1_lowrank(A, B2, 2.0, 1e-3)).backward()
    Ad, Bd = A.detach().double().requires_grad_(), B2.detach().double().requires_grad_()
    (3 * l1_lowrank_dense(Ad, Bd, 2.0, 1e-3)).backward()
    assert rel(A.grad, Ad.grad) < 1e-5 and rel(B2.grad, Bd.grad) < 1e-5, f"seed {SEED}"


def test_sparsity_of_product_constructed():
    # B: rows 0-3 zero, others positive; A: columns 0-1 zero, others positive. s·B A is zero
    # exactly on (4 rows × 8) ∪ (6 rows × 2 columns) = 32 + 12 = 44 of 80 entries, and ≥ 1 elsewhere.
    B = torch.ones(10, 3)
    B[:4] = 0
    A = torch.ones(3, 8)
    A[:, :2] = 0
    assert sparsity_of_product(A, B, 2.0, chunk_rows=3) == pytest.approx(44 / 80)
    # Threshold is strict (<) and applies to s·B A: entries 2·3·1e-6 = 6e-6 count below 1e-5, not below 5e-6.
    assert sparsity_of_product(A * 1e-6, B, 2.0) == 1.0
    assert sparsity_of_product(A * 1e-6, B, 2.0, threshold=5e-6) == pytest.approx(44 / 80)


def test_backend_errors():
    A, B = torch.randn(3, 4), torch.randn(5, 3)
    with pytest.raises(ValueError):
        l1_lowrank(A, B, 1.0, 1e-3, backend="cuda")
    with pytest.raises(ValueError):
        l1_lowrank(A, B, -1.0, 1e-3)
    with pytest.raises(ValueError):
        l1_lowrank(A, B.T, 1.0, 1e-3)
    if utils.triton is None or utils.triton_interpreted():
        pytest.skip("triton missing, or this process runs under TRITON_INTERPRET=1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        l1_lowrank(A, B, 1.0, 1e-3, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        pak.prox_adamw_step(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), 1, 1e-3, 0.9, 0.999,
                            1e-8, 0.0, 0.0, backend="triton")


# --------------------------------------------------------------------------------------
# Triton kernels, interpreted in a subprocess
# --------------------------------------------------------------------------------------

_INTERP_SCRIPT = textwrap.dedent(r'''
    import json, sys
    import torch
    import triton
    from paft_kernels import prox_adamw as pak, utils
    from paft_kernels.prox_adamw import ProxAdamW, prox_adamw_step_torch, prox_adamw_step_triton
    from paft_kernels.l1_lowrank import l1_lowrank, l1_lowrank_dense, l1_lowrank_triton

    seed = int(sys.argv[1])
    g = torch.Generator().manual_seed(seed)
    out = {"interpreted": utils.triton_interpreted(), "checks": {}}

    def rel(a, b):
        a, b = a.double(), b.double()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    def check(name, err, tol):
        out["checks"][name] = [err if err == err else float("inf"), tol]  # NaN (unwritten) -> inf

    MANT = {torch.bfloat16: (8, -133), torch.float16: (11, -24)}  # significant bits, log2 of the smallest spacing

    def ulps(a, ref, shift=0.0):
        """max |a − ref| in units of one last place of the 16-bit format (at the larger magnitude of the
        two): two roundings of (nearly) the same fp32 value differ by at most 1. `shift`: the result
        was x − shift in exact fp32 arithmetic (the soft threshold subtracts lr·λ): then the fp32
        inputs' own last place, at |ref| + shift, is added to the unit, since the subtraction
        exposes a 1-ulp fp32 difference of x (torch's CPU sqrt is not correctly rounded). A tensor
        `shift` is per element: for m = lerp(m, g, w), |m| + |w (g − m)|, the operands' scale, since
        torch >= 2.14 fuses the CPU lerp (one FMA) while the kernel rounds the product first: near a
        cancellation (m ≈ −w (g − m)) the two fp32 results differ by an fp32 ulp of the operands,
        which is many 16-bit ulps of the tiny result."""
        bits, tiny = MANT[ref.dtype]
        a, ref = a.double(), ref.double()
        _, e = torch.frexp(torch.maximum(a.abs(), ref.abs()))
        ulp = torch.exp2((e - bits).double()).clamp_min(2.0 ** tiny)
        if isinstance(shift, torch.Tensor) or shift:
            _, e32 = torch.frexp(ref.abs() + shift)
            ulp = ulp + torch.exp2((e32 - 24).double())
        return float(((a - ref).abs() / ulp).max())

    def ulps_beyond(a, exact, slack):
        """ulps(a, exact rounded), after moving `exact` toward `a` by at most `slack` per element."""
        exact = exact.double()
        moved = exact + (a.double() - exact).clamp(-slack, slack)
        return ulps(a, moved.to(a.dtype)) if bool((slack > 0).any()) else ulps(a, exact.to(a.dtype))

    # ---- prox step: Triton vs torch reference, 4 steps, per-step comparison --------------
    TOL = {torch.float32: 1e-6}
    for dtype in (torch.float32, torch.bfloat16):
        for wd, l1 in ((0.0, 0.0), (0.1, 0.0), (0.0, 0.5), (0.1, 0.5)):
            n = 37 * 45
            # p is the head of a larger NaN-filled buffer: a write past n (bad mask) shows up there.
            store = torch.full((n + 1000,), float("nan"), dtype=dtype)
            p = store[:n].view(37, 45)
            p.copy_(torch.randn(37, 45, generator=g) * 0.02)
            m, v = torch.zeros_like(p), torch.zeros_like(p)
            worst = 0.0
            zeros = 0
            for t in range(1, 5):
                grad = torch.randn(37, 45, generator=g).to(dtype)
                ref = [p.clone(), m.clone(), v.clone()]
                m_prev = m.clone()
                prox_adamw_step_torch(ref[0], grad, ref[1], ref[2], t, 1e-2, 0.9, 0.999, 1e-8, wd, l1)
                prox_adamw_step_triton(p, grad, m, v, t, 1e-2, 0.9, 0.999, 1e-8, wd, l1)
                # fp32: relative error; bf16: both round the same fp32 math once, so within 1 ulp per element
                if dtype == torch.float32:
                    worst = max(worst, *(rel(a, b) for a, b in zip((p, m, v), ref)))
                else:
                    lerp_scale = m_prev.double().abs() + 0.1 * (grad.double() - m_prev.double()).abs()
                    worst = max(worst, ulps(p, ref[0], shift=1e-2 * l1), ulps(m, ref[1], shift=lerp_scale),
                                ulps(v, ref[2]))
                zeros = max(zeros, int((p == 0).sum()))
            tag = f"prox/{str(dtype)[6:]}/wd={wd}/l1={l1}"
            check(tag, worst, TOL[dtype] if dtype == torch.float32 else 1.0 + 1e-9)
            check(tag + "/no_write_past_end", 0.0 if store[n:].isnan().all() else 1.0, 0.5)
            if l1 > 0:  # threshold 5e-3 against |p| ~ 2e-2: must produce exact zeros
                check(tag + "/exact_zeros", 0.0 if zeros > 0 else 1.0, 0.5)

    # ---- ProxAdamW(l1=0, triton) vs torch.optim.AdamW(foreach=False), 5 steps -------------
    ps = [torch.nn.Parameter(torch.randn(37, 45, generator=g)), torch.nn.Parameter(torch.randn(5, 45, generator=g))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = ProxAdamW(ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, l1=0.0, backend="triton")
    ref = torch.optim.AdamW(qs, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, foreach=False)
    launches = dict(pak.LAUNCHES)
    for _ in range(5):
        for a, b in zip(ps, qs):
            a.grad.copy_(torch.randn(a.shape, generator=g))  # into the flat gradient's views
            b.grad = a.grad.clone()
        ours.step(); ref.step()
    # one launch per step over both parameters (the flat buffer), all of them Triton
    check("proxadamw_vs_adamw/one_launch_per_step",
          abs(pak.LAUNCHES["triton"] - launches["triton"] - 5) + abs(pak.LAUNCHES["torch"] - launches["torch"]), 0.5)
    check("proxadamw_vs_adamw/p", max(rel(a, b) for a, b in zip(ps, qs)), 1e-6)
    check("proxadamw_vs_adamw/exp_avg",
          max(rel(ours.state[a]["exp_avg"], ref.state[b]["exp_avg"]) for a, b in zip(ps, qs)), 1e-6)
    check("proxadamw_vs_adamw/exp_avg_sq",
          max(rel(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"]) for a, b in zip(ps, qs)), 1e-6)
    # l1 > 0 through the optimizer: exact zeros, the same ones as the torch backend
    p1 = torch.nn.Parameter(torch.randn(37, 45, generator=g) * 0.01)
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = ProxAdamW([p1], lr=1e-2, l1=0.5, backend="triton")
    o2 = ProxAdamW([p2], lr=1e-2, l1=0.5, backend="torch")
    for _ in range(3):
        p1.grad = torch.randn(p1.shape, generator=g); p2.grad = p1.grad.clone()
        o1.step(); o2.step()
    check("proxadamw_l1/zeros_match", float(((p1 == 0) != (p2 == 0)).sum()), 0.5)
    check("proxadamw_l1/has_zeros", 0.0 if (p1 == 0).sum() > 0 else 1.0, 0.5)
    check("proxadamw_l1/p", rel(p1, p2), 1e-6)

    # ---- L1 of the low-rank product ------------------------------------------------------
    # N, r, K, BLOCK_N, BLOCK_K (None: the dispatcher's tiles and split of K; 300 x 333 gives a 3 x 6 grid)
    cases = [(37, 5, 45, 16, 16), (37, 5, 45, 64, 64), (29, 20, 33, 16, 32), (300, 20, 333, None, None),
             (70, 64, 97, 32, 16)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for N, r, K, bn, bk in cases:
            A = torch.randn(r, K, generator=g).to(dtype)
            B = torch.randn(N, r, generator=g).to(dtype)
            value, dA, dB = l1_lowrank_triton(A, B, 1.7, 3e-4, block_n=bn, block_k=bk, poison=True)
            Ad, Bd = A.double().requires_grad_(), B.double().requires_grad_()
            l1_lowrank_dense(Ad, Bd, 1.7, 3e-4).backward()
            dense = l1_lowrank_dense(A.double(), B.double(), 1.7, 3e-4)
            tag = f"l1/{str(dtype)[6:]}/{N}x{r}x{K}/blocks{bn}x{bk}"
            check(tag + "/value", rel(value, dense), 1e-5)  # fp32 whatever the inputs
            if dtype == torch.float32:
                check(tag + "/dA", rel(dA, Ad.grad), 1e-5)
                check(tag + "/dB", rel(dB, Bd.grad), 1e-5)
            else:  # the float64 gradient rounded to the same 16-bit format: within 1 ulp per element,
                # beyond what the kernel's fp32 sums may move it (the `slack` below, per element):
                # * sign(B A) is a coin toss where an entry of B A is within the fp32 summation error of
                #   zero (r terms, each exact in fp32): either sign moves dB[n, :] by 2·s·λ·|A[:, k]| and
                #   dA[:, k] by 2·s·λ·|B[n, :]|;
                # * dB sums K terms ±s·λ·A and dA sums N terms ±s·λ·B in fp32: near a cancellation the
                #   result is tiny and the sums' rounding (≤ terms·2⁻²⁴·Σ|term|) is many 16-bit ulps of it.
                A64, B64, sl = A.double(), B.double(), 1.7 * 3e-4
                coin = ((B64 @ A64).abs() <= 2 * r * 2.0 ** -24 * (B64.abs() @ A64.abs())).double()  # (N, K)
                slack_b = 2 * sl * (coin @ A64.abs().T) + sl * K * 2.0 ** -24 * A64.abs().sum(1)  # (N, r)
                slack_a = 2 * sl * (B64.abs().T @ coin) + sl * N * 2.0 ** -24 * B64.abs().sum(0)[:, None]  # (r, K)
                check(tag + "/dA", ulps_beyond(dA, Ad.grad, slack_a), 1.0 + 1e-9)
                check(tag + "/dB", ulps_beyond(dB, Bd.grad, slack_b), 1.0 + 1e-9)
            v_only, none_a, none_b = l1_lowrank_triton(A, B, 1.7, 3e-4, need_grad=False, block_n=bn, block_k=bk,
                                                       poison=True)
            check(tag + "/value_only", rel(v_only, dense) + (none_a is not None) + (none_b is not None), 1e-5)
    # strided (non-contiguous) A, and the autograd path with an upstream gradient of 3
    At = torch.randn(45, 5, generator=g).T
    B = torch.randn(37, 5, generator=g)
    A1, B1 = At.clone().requires_grad_(), B.clone().requires_grad_()
    (3 * l1_lowrank(At.requires_grad_(), B.requires_grad_(), 1.7, 3e-4, backend="triton")).backward()
    (3 * l1_lowrank_dense(A1.double(), B1.double(), 1.7, 3e-4)).backward()
    check("l1/autograd_strided/dA", rel(At.grad, A1.grad), 1e-4)
    check("l1/autograd_strided/dB", rel(B.grad, B1.grad), 1e-4)

    print("RESULT" + json.dumps(out))
''')


@pytest.fixture(scope="module")
def interp():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT, str(SEED)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"seed {SEED}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def _assert_checks(interp, prefix: str) -> None:
    checks = {k: v for k, v in interp["checks"].items() if k.startswith(prefix)}
    assert checks, f"no checks named {prefix}*"
    bad = {k: v for k, v in checks.items() if not v[0] < v[1]}
    assert not bad, f"seed {SEED}: [error, tolerance] {bad}"


def test_triton_really_interpreted(interp):
    assert interp["interpreted"]


@pytest.mark.parametrize("prefix", ["prox/float32", "prox/bfloat16", "proxadamw_vs_adamw", "proxadamw_l1"])
def test_triton_prox(interp, prefix):
    _assert_checks(interp, prefix)


@pytest.mark.parametrize("prefix", ["l1/float32", "l1/bfloat16", "l1/float16", "l1/autograd_strided"])
def test_triton_l1_lowrank(interp, prefix):
    _assert_checks(interp, prefix)
