"""λ‖s·B A‖₁ of a LoRA update and its gradients, without storing B A.

PAFT's sparse SFT penalises the weight delta of each adapted layer, δ = s·B A with
A (r, K=in), B (N=out, r), s = alpha/r > 0:

    value = λ·‖s·B A‖₁ = λ·s·Σ_ij |(B A)_ij|
    dA    = λ·s·Bᵀ sign(B A)        (r, K)
    dB    = λ·s·sign(B A) Aᵀ        (N, r)

(sign(0) = 0, torch.sign's subgradient: at LoRA's B = 0 start the penalty and its
gradient are both zero, and the SFT loss moves B off zero first.)

The product is N×K, as large as the frozen weight (11008×4096 = 45M entries, 180 MB in
fp32 for one MLP projection), while A and B are tiny. The kernels recompute it tile by
tile, (BLOCK_N × r) @ (r × BLOCK_K), use the tile for |·| and sign(·), and drop it.

One kernel on a 2-D grid, (row tile i, split s of K): program (i, s) loads its rows B_i
(BLOCK_N × r) once and walks the K tiles k of its split. For each it forms the tile product
once, T = B_i A_k (BLOCK_N × BLOCK_K, tensor cores, fp32 accumulation), and takes from that one
T everything the three outputs need:

    value partial  += Σ|T|
    dB_i partial   += sign(T) A_kᵀ          (BLOCK_N × r, in registers across the split)
    dA_k share      = B_iᵀ sign(T)          (r × BLOCK_K, written to workspace row i)

No two programs write the same memory (no atomics, a deterministic result): the host sums
the dB partials over the splits (workspace S × N × r), the dA shares over the row tiles
(workspace ⌈N/BLOCK_N⌉ × r × K) and the value partials, in a fixed order. The dA workspace
is r/BLOCK_N of one N×K fp32 matrix (r = 16: 1/8; r = 64: 1/2; freed after the call), where
the dense path holds the whole N×K product and its gradient; the alternative that needs no
workspace (two kernels, rows then columns) computes every T twice. S is chosen so that the
grid has ≥ 264 programs (2 per SM on a 132-SM H100/H200); at 4096 × 4096, r = 16 that is
32 row tiles × 8 splits = 256 programs instead of the 32 of a 1-D grid over row tiles.

FLOPs (r padded to R = max(16, next pow2 r) for tl.dot): 2·N·K·R each for T, dB and dA:
6·N·K·R in all, the same as the dense autograd path's product and two matmuls with the sign
matrix (at R = r). For 11008×4096, r = 64: 17 GFLOP.
Bytes (HBM): read A and B (each program re-reads its split of A, which stays in L2), write
the workspaces (4·(N·r·S + ⌈N/BLOCK_N⌉·r·K) bytes) and read them back once to sum: for
11008×4096, r = 16, ~25 MB in all, against ≥ 4·N·K·4 ≈ 720 MB for the dense path's product,
its sign and its gradient.
Precision: see _precision. bf16/fp16 tiles multiply exactly into fp32; fp32 tiles run in
TF32 on the tensor cores. Value, dA and dB accumulate in fp32 and are cast to the input dtype
at the end (the value stays fp32).
Registers, spills and shared memory per config (sm_90, compiled on the CPU): python -m
benchmarks.aot; none spills at r ≤ 64 (tests/test_aot.py).
"""
from __future__ import annotations

import torch

from paft_kernels import CompileSpec
from paft_kernels.utils import check_triton, resolve_backend, tl, triton, triton_interpreted

CHUNK_ELEMENTS = 1 << 24  # torch reference: rows per chunk so a chunk of B A is ≤ 16M entries


# --------------------------------------------------------------------------------------
# torch references
# --------------------------------------------------------------------------------------

def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check(A: torch.Tensor, B: torch.Tensor, scale: float, lam: float) -> None:
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"l1_lowrank: need A (r, in) and B (out, r), got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if not scale > 0:
        raise ValueError(f"l1_lowrank: scale must be > 0 (sign(s·BA) = sign(BA)), got {scale}")
    if lam < 0:
        raise ValueError(f"l1_lowrank: lam must be >= 0, got {lam}")


@torch.no_grad()
def l1_lowrank_torch(A: torch.Tensor, B: torch.Tensor, scale: float, lam: float, need_grad: bool = True,
                     chunk_rows: int | None = None):
    """(value, dA, dB) of λ‖s·B A‖₁, materialising B A a chunk of rows at a time.

    Computes in fp32 (fp64 for fp64 inputs); dA, dB come back in A's and B's dtypes
    (None when need_grad is False); value is a 0-dim tensor in the compute dtype.
    """
    _check(A, B, scale, lam)
    cd = _compute_dtype(A, B)
    A_c = A.to(cd)
    N, K = B.shape[0], A.shape[1]
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // max(1, K))
    total = torch.zeros((), dtype=cd, device=A.device)
    dA = torch.zeros_like(A_c) if need_grad else None
    dB = torch.empty((N, A.shape[0]), dtype=cd, device=B.device) if need_grad else None
    for n0 in range(0, N, rows):
        B_c = B[n0:n0 + rows].to(cd)
        P = B_c @ A_c  # (rows, K): the only large temporary
        total += P.abs().sum()
        if need_grad:
            S = torch.sign(P)
            dB[n0:n0 + rows] = S @ A_c.T
            dA += B_c.T @ S
    c = lam * scale
    value = total * c
    if not need_grad:
        return value, None, None
    return value, (dA * c).to(A.dtype), (dB * c).to(B.dtype)


def l1_lowrank_dense(A: torch.Tensor, B: torch.Tensor, scale: float, lam: float) -> torch.Tensor:
    """The obvious differentiable version: λ·|s·B A|.sum() through autograd (stores B A)."""
    return lam * (scale * (B @ A)).abs().sum()


@torch.no_grad()
def sparsity_of_product(A: torch.Tensor, B: torch.Tensor, scale: float, threshold: float = 1e-5,
                        chunk_rows: int | None = None) -> float:
    """Share of entries of s·B A with |value| < threshold (PAFT Figure 2), chunked over rows."""
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"sparsity_of_product: need A (r, in) and B (out, r), got {tuple(A.shape)}, {tuple(B.shape)}")
    cd = _compute_dtype(A, B)
    A_c = A.to(cd)
    N, K = B.shape[0], A.shape[1]
    if N * K == 0:
        return 0.0
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // max(1, K))
    small = 0
    for n0 in range(0, N, rows):
        P = (B[n0:n0 + rows].to(cd) @ A_c).mul_(scale)
        small += int((P.abs() < threshold).sum().item())
    return small / (N * K)


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------

# Tile config per padded rank, the only shapes the dispatcher launches: (BLOCK_N, BLOCK_K,
# num_warps). BLOCK_N = 128 halves the dA workspace against 64; at R_PAD = 128 the narrower K
# tile keeps the five register tiles (b, a, t, db, da) without spills. Checked by
# `python -m benchmarks.aot` / tests/test_aot.py (sm_90: registers, spills, shared memory).
CONFIGS = {16: (128, 64, 4), 32: (128, 64, 8), 64: (128, 64, 8), 128: (64, 64, 8)}
FP32_R128 = (64, 32, 8)  # fp32 at R_PAD = 128: 64×64 spilled 284 bytes (sm_90), 64×32 does not
NUM_STAGES = 2  # the K loop streams only the small A tiles: double buffering is enough
TARGET_PROGRAMS = 264  # 2 per SM of an H100/H200 (132 SMs): the split of K is sized to reach it
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if triton is not None:
    @triton.jit
    def _sign(t):
        return tl.where(t > 0, 1.0, tl.where(t < 0, -1.0, 0.0))

    @triton.jit
    def _l1_lowrank_kernel(A_ptr, B_ptr, partial_ptr, dB_ws_ptr, dA_ws_ptr, N, K, R, n_k_tiles, tiles_per_split,
                           stride_ar, stride_ak, stride_bn, stride_br,
                           NEED_GRAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                           R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)   # row tile i: rows i·BLOCK_N .. of B
        pid_s = tl.program_id(1)   # K split s: K tiles s·tiles_per_split .. (s+1)·tiles_per_split − 1
        n_splits = tl.num_programs(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, R_PAD)
        # This program's B rows, loaded once. Padded rank columns (rr >= R) and rows past N load
        # as 0: they add 0 to T, their T entries have sign 0, so nothing needs masking later.
        b = tl.load(B_ptr + rn[:, None].to(tl.int64) * stride_bn + rr[None, :] * stride_br,
                    mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)   # (BLOCK_N, R_PAD)
        if UPCAST:
            b = b.to(tl.float32)
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)            # Σ|T| per row, reduced at the end
        db = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)          # this split's share of dB_i
        t_lo = pid_s * tiles_per_split
        t_hi = tl.minimum(t_lo + tiles_per_split, n_k_tiles)
        for kt in range(t_lo, t_hi):
            rk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            a = tl.load(A_ptr + rr[:, None] * stride_ar + rk[None, :].to(tl.int64) * stride_ak,
                        mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)   # (R_PAD, BLOCK_K)
            if UPCAST:
                a = a.to(tl.float32)
            # The one tile product: (BLOCK_N, R_PAD) @ (R_PAD, BLOCK_K) on tensor cores, fp32 accumulate.
            t = tl.dot(b, a, input_precision=PRECISION)           # (BLOCK_N, BLOCK_K) of B A
            total += tl.sum(tl.abs(t), axis=1)
            if NEED_GRAD:
                # ±1/0 are exact in every dtype: cast to the inputs' so both dots run at their precision.
                s = _sign(t).to(a.dtype)
                db = tl.dot(s, tl.trans(a), db, input_precision=PRECISION)           # += sign(T) A_kᵀ
                da = tl.dot(tl.trans(b), s, input_precision=PRECISION)               # B_iᵀ sign(T)
                # dA_k's share from row tile i: workspace row pid_n (summed over i by the host)
                ws = dA_ws_ptr + pid_n.to(tl.int64) * R * K
                tl.store(ws + rr[:, None] * K + rk[None, :], da, mask=(rr[:, None] < R) & (rk[None, :] < K))
        tl.store(partial_ptr + pid_n * n_splits + pid_s, tl.sum(total, axis=0))
        if NEED_GRAD:
            ws = dB_ws_ptr + pid_s.to(tl.int64) * N * R
            tl.store(ws + rn[:, None] * R + rr[None, :], db, mask=(rn[:, None] < N) & (rr[None, :] < R))


def _precision(dtype: torch.dtype) -> str:
    """Tensor-core dots for every dtype. bf16/fp16 tiles multiply exactly into fp32. fp32 tiles run
    as TF32 (10-bit mantissa: each product carries a relative error up to ~1e-3): 3xTF32 would be
    fp32-accurate but needs three dots per product, 255 registers with spills and > 100 KB of
    shared memory at every rank (measured with benchmarks.aot). TF32 moves |B A| by ~1e-3
    relative and can flip the sign only of entries within ~1e-3·|B_i|·|A_k| of zero, where |·|
    is flat and sign is a subgradient choice anyway; the fp32 reference (backend='torch') is exact."""
    return "tf32"


def r_pad(r: int) -> int:
    return max(16, 1 << max(0, r - 1).bit_length())  # tl.dot wants every dimension >= 16, a power of 2


def tile_config(rp: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for padded rank rp and the inputs' dtype."""
    return FP32_R128 if (rp == 128 and dtype == torch.float32) else CONFIGS[rp]


def launch_grid(N: int, K: int, r: int, block_n: int | None = None, block_k: int | None = None,
                dtype: torch.dtype = torch.float32):
    """(BLOCK_N, BLOCK_K, num_warps, n_k_tiles, tiles_per_split, grid) the dispatcher launches."""
    bn, bk, warps = tile_config(r_pad(r), dtype)
    bn, bk = block_n or bn, block_k or bk
    n_tiles, n_k_tiles = -(-N // bn), -(-K // bk)
    splits = max(1, min(n_k_tiles, -(-TARGET_PROGRAMS // n_tiles)))  # enough programs to fill the GPU
    per_split = -(-n_k_tiles // splits)
    splits = -(-n_k_tiles // per_split)  # no empty split
    return bn, bk, warps, n_k_tiles, per_split, (n_tiles, splits)


@torch.no_grad()
def l1_lowrank_triton(A: torch.Tensor, B: torch.Tensor, scale: float, lam: float, need_grad: bool = True,
                      block_n: int | None = None, block_k: int | None = None, poison: bool = False):
    """(value, dA, dB) as l1_lowrank_torch, from one Triton kernel on a 2-D grid.

    poison=True fills every output and workspace buffer with NaN before the launch (tests: an
    element the kernel fails to write then shows up as NaN instead of as a plausible stale value).
    """
    _check(A, B, scale, lam)
    check_triton(A, B)
    for t in (A, B):
        if t.dtype not in TRITON_DTYPES:
            raise ValueError(f"l1_lowrank triton path takes fp32/bf16/fp16, got {t.dtype} (use backend='torch')")
    if B.dtype != A.dtype:
        raise ValueError(f"l1_lowrank: A and B must share a dtype, got {A.dtype} and {B.dtype}")
    R, K = A.shape
    N = B.shape[0]
    if R > 128:
        raise ValueError(f"l1_lowrank triton path takes r <= 128, got {R} (use backend='torch')")
    bn, bk, warps, n_k_tiles, per_split, grid = launch_grid(N, K, R, block_n, block_k, A.dtype)
    # The Triton interpreter's bf16/fp16 tl.dot multiplies the raw 16-bit patterns (wrong
    # results), so interpreted runs upcast tiles to fp32 first. Numerically that is the same
    # computation: a product of two bf16 numbers is exact in fp32, accumulation is fp32 either way.
    upcast = triton_interpreted()
    new = (lambda *s: torch.full(s, float("nan"), dtype=torch.float32, device=A.device)) if poison else \
        (lambda *s: torch.empty(s, dtype=torch.float32, device=A.device))
    partials = new(grid[0] * grid[1])
    dB_ws = new(grid[1], N, R) if need_grad else partials  # (dummy pointers when unused)
    dA_ws = new(grid[0], R, K) if need_grad else partials
    _l1_lowrank_kernel[grid](A, B, partials, dB_ws, dA_ws, N, K, R, n_k_tiles, per_split,
                             A.stride(0), A.stride(1), B.stride(0), B.stride(1),
                             NEED_GRAD=need_grad, UPCAST=upcast, PRECISION=_precision(A.dtype), R_PAD=r_pad(R),
                             BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=NUM_STAGES)
    c = lam * scale
    value = partials.sum() * c  # fixed-order sums of per-program partials: deterministic
    if not need_grad:
        return value, None, None
    return value, (dA_ws.sum(0) * c).to(A.dtype), (dB_ws.sum(0) * c).to(B.dtype)


def compile_specs():
    """Every config l1_lowrank_triton launches on a GPU: dtype × padded rank × value-only/with grads."""
    specs = []
    for dtype, tname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for rp in CONFIGS:
            bn, bk, warps = tile_config(rp, dtype)
            for need_grad in (True, False):
                sig = {"A_ptr": "*" + tname, "B_ptr": "*" + tname, "partial_ptr": "*fp32", "dB_ws_ptr": "*fp32",
                       "dA_ws_ptr": "*fp32", "N": "i32", "K": "i32", "R": "i32", "n_k_tiles": "i32",
                       "tiles_per_split": "i32", "stride_ar": "i32", "stride_bn": "i32"}
                specs.append(CompileSpec(
                    name=f"l1_lowrank[{tname},R_PAD={rp},BN={bn},BK={bk}{',grad' if need_grad else ',value'}]",
                    fn=_l1_lowrank_kernel, signature=sig,
                    # contiguous A (r, K) and B (N, r): the JIT makes the unit inner strides constants
                    constexprs=dict(stride_ak=1, stride_br=1, NEED_GRAD=need_grad, UPCAST=False,
                                    PRECISION=_precision(dtype), R_PAD=rp, BLOCK_N=bn, BLOCK_K=bk),
                    num_warps=warps, num_stages=NUM_STAGES,
                    tags=dict(rank=rp, dtype=tname)))
    return specs


# --------------------------------------------------------------------------------------
# autograd + dispatch
# --------------------------------------------------------------------------------------

class L1LowRank(torch.autograd.Function):
    """value = λ‖s·B A‖₁. The gradients cost about what the value costs and are always
    wanted when the value is (it is a loss term), so forward computes them (Liger-style)
    and backward only scales them by the upstream gradient. Not twice differentiable."""

    @staticmethod
    def forward(ctx, A, B, scale: float, lam: float, backend: str = "auto"):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        fits = A.shape[0] <= 128 and A.dtype == B.dtype and A.dtype in TRITON_DTYPES  # what the kernel takes
        impl = l1_lowrank_triton if resolve_backend(backend, A, B, fits=fits) == "triton" else l1_lowrank_torch
        value, dA, dB = impl(A, B, scale, lam, need_grad=need_grad)
        if need_grad:
            ctx.save_for_backward(dA, dB)
        return value

    @staticmethod
    def backward(ctx, grad_value):
        dA, dB = ctx.saved_tensors
        g = grad_value.to(dA.dtype)
        return dA * g, dB * g, None, None, None


def l1_lowrank(A: torch.Tensor, B: torch.Tensor, scale: float, lam: float, backend: str = "auto") -> torch.Tensor:
    """λ‖s·B A‖₁ as a differentiable 0-dim tensor. auto: Triton on CUDA, chunked torch else."""
    return L1LowRank.apply(A, B, float(scale), float(lam), backend)


__all__ = ["l1_lowrank", "L1LowRank", "l1_lowrank_torch", "l1_lowrank_triton", "l1_lowrank_dense",
           "sparsity_of_product", "compile_specs", "CONFIGS"]
