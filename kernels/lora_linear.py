"""Fused LoRA linear layer: the low-rank update rides in the epilogue of the frozen base GEMM.

Math
----
x (M, K) (leading dims flattened), W (N, K) frozen, b (N,) frozen or None,
A (r, K), B (N, r) trainable, s the LoRA scale (alpha / r, or alpha / sqrt(r) for rsLoRA),
p the LoRA dropout (peft semantics: dropout on the input of the low-rank path only):

    noise = m / (1 - p),  m ~ Bernoulli(1 - p)  (M, K)    (only when training and p > 0)
    xd    = x ⊙ noise                           (M, K)    (= F.dropout(x, p); xd = x without dropout)
    xa    = xd Aᵀ                               (M, r)
    y     = x Wᵀ + b + s · xa Bᵀ                (M, N)

Backward (W and b are frozen: no gradient for them):

    dyB = dy B                                  (M, r)
    dx  = dy W + noise ⊙ (s · dyB A)            (M, K)    (dropout's mask hits the LoRA part only)
    dA  = s · dyBᵀ xd                           (r, K)
    dB  = s · dyᵀ xa                            (N, r)

Design: two launches per direction, the low-rank term fused into the base GEMM's epilogue
------------------------------------------------------------------------------------------
Forward
  1. `_xa_kernel`: xa = dropout(x) Aᵀ, a skinny GEMM (M, K) @ (K, r) into an fp32 (M, r)
     buffer. One program per BLOCK_M rows, all of r in one tile (r ≤ 128, padded up to
     BLOCK_R = max(16, next_pow2(r)) with masks because tl.dot wants dims ≥ 16). With
     dropout it loads the x tile and the noise tile and multiplies them on the fly, so the
     dropped x is never written to memory.
  2. `_matmul_lora_kernel`: the base GEMM x Wᵀ, tiled BLOCK_M × BLOCK_N with a K-loop, and
     an epilogue that loads the (BLOCK_M, r) rows of xa and the (r, BLOCK_N) columns of Bᵀ,
     scales the small xa tile by s and accumulates xa Bᵀ into the same fp32 accumulator (one
     more small tl.dot on the tensor cores, K-dimension r), adds the bias, and stores y once.
     There is no (M, N) pass for the LoRA term and no second (M, N) tile in registers.
Backward reuses the same two kernels with other operands:
  3. `_xa_kernel` with X = dy, "A" = Bᵀ (a strided view):  dyB = dy B          (M, r) fp32
  4. `_matmul_lora_kernel` with X = dy, Wᵀ-operand = W (N, K), L = dyB, R = A, and the
     dropout noise applied in the epilogue:            dx = dy W + noise ⊙ (s · dyB A)
     (with dropout the LoRA product needs its own (BM, BN) tile to be masked before the add).
  5. dA = s · dyBᵀ xd and dB = s · dyᵀ xa: two small GEMMs with an r-sized dimension, done with
     torch.matmul (cuBLAS handles these shapes well; they are 2·M·r·(K+N) FLOPs, a few % of
     the base GEMM, and not worth a kernel in a teaching engine).

Why not the one-kernel alternative (accumulate x Aᵀ as a second accumulator in the base
GEMM's K-loop, so x tiles are loaded once)? Every N-tile would recompute its rows of xa:
2·M·K·BLOCK_R·⌈N/BLOCK_N⌉ FLOPs instead of 2·M·K·r. For N = 4096, BLOCK_N = 128 that is
32× the skinny GEMM: +12.5% of the base GEMM's FLOPs at r = 16 and +50% at r = 64. The
two-kernel design instead pays one extra read of x (M·K·e bytes) and an (M, r) fp32 round
trip; at Llama-7B sizes (M = 8192, K = N = 4096, bf16) that is 64 MiB ≈ 20 µs at 3.3 TB/s
against a ≈ 0.45 ms GEMM, ~4%, and the FLOP overhead is only 2·M·K·r (r / N = 0.4% at r = 16).

Counts (e = bytes per element of x; e_f for the factors; ideal bytes, i.e. each operand read
from HBM once; tile re-reads of W, xa, A, B are L2 hits in practice; the tensor cores do the
r-sized products on r padded to BLOCK_R, so issued FLOPs use BLOCK_R where r < 16 or not 2^k)
  forward
    xa kernel   FLOPs 2·M·K·r                 bytes M·K·e (x) [+ M·K·e noise] + r·K·e_f + M·r·4
    GEMM+epi    FLOPs 2·M·N·K + 2·M·N·r       bytes M·K·e + N·K·e + N·r·e_f + M·r·4 + N·e + M·N·e (y)
  backward
    dyB kernel  FLOPs 2·M·N·r                 bytes M·N·e (dy) + N·r·e_f + M·r·4
    dx GEMM+epi FLOPs 2·M·K·N + 2·M·K·r       bytes M·N·e + N·K·e + r·K·e_f + M·r·4 [+ M·K·e noise] + M·K·e (dx)
    dA (torch)  FLOPs 2·r·M·K                 bytes M·K·e (xd) + M·r·e + r·K·e   [+ 3·M·K·e to rebuild xd = x ⊙ noise]
    dB (torch)  FLOPs 2·N·M·r                 bytes M·N·e + M·r·e + N·r·e
  fwd+bwd total: 4·M·N·K (what the frozen base alone costs: y and dx) + 6·M·r·(N + K) FLOPs.
  For comparison the unfused peft layer (y = base(x) + lora_B(lora_A(drop(x))) · s) adds
  ~6·M·N·e bytes in the forward alone (write the lora_B output, read+write it for · s,
  read two and write one (M, N) for the sum) and a similar amount in the backward, plus an
  (M, K) dx_lora tensor and its sum with dy W. Those are the passes this design removes.

Dropout and memory
  The mask is drawn with torch: noise = F.dropout(ones_like(x), p, True) is exactly the scaled
  keep-mask m / (1 - p) that F.dropout(x, p) multiplies x by, drawn from the same random
  numbers (same shape, dtype, layout), so x ⊙ noise is bit-identical to F.dropout(x, p) on
  CPU; on CUDA the mask is the same and the product may differ from F.dropout's fused
  kernel in the last bit of bf16. Saved for backward: x (a view of the input, shared with
  whoever else keeps it), xa (M, r) fp32 and, with dropout, noise (M, K) in x's dtype, i.e.
  M·K·e extra bytes per layer (what peft's saved dropped-x costs too); xd is rebuilt as
  x ⊙ noise in the backward for dA. With p == 0 (or not training) no mask is created.

Numerics: tiles are loaded in the storage dtype and fed to tl.dot in x's dtype (bf16 on the
tensor cores, fp32 with IEEE precision unless torch allows TF32) with an fp32 accumulator; the
fp32 factors of a bf16 model are cast to bf16 tile by tile inside the kernels (as the torch
path casts the whole factor); xa / dyB stay fp32 in memory, and s · xa (s · dyB) is rounded
to x's dtype only as the epilogue's tl.dot operand; y gets one rounding at the store (the torch reference rounds the base
output, the LoRA output, the scaled LoRA output and the sum separately).

Implementations and dispatch
  lora_linear_torch      the reference, plain autograd: F.linear(x, W, b) + F.linear(F.linear(
                         F.dropout(x, p, training), A), B) * s.
  LoRALinearFunction     the autograd.Function above; impl="triton" runs the kernels,
                         impl="torch" runs the same forward/backward math with torch ops
                         (float64-gradcheckable; tests/test_kernel_lora_linear.py).
  lora_linear            backend="auto": Triton for CUDA tensors (when W and b are frozen),
                         the reference otherwise; "triton" / "torch" force one.
Under TRITON_INTERPRET=1 (set before triton is imported) the kernels run on CPU tensors,
which is how the tests exercise them without a GPU; a slow test also compiles them ahead of
time for sm_90 (Hopper) to catch GPU-only compile errors and shared-memory overflows. The
interpreter (numpy) has no bf16 arithmetic, so there the tiles are upcast to fp32 before
tl.dot (bf16 values are exact in fp32, so the products are the same; only the accumulation
order differs), and its truncating fp32 -> bf16 cast is replaced by round-to-nearest-even
as on the GPU (`_cast`).
"""
from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import check_triton_device, is_interpreted

try:  # Triton is optional: the torch path is the reference and runs everywhere.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

MAX_RANK = 128  # the whole r dimension is one tile: (BLOCK_M, r) accumulators must fit in registers
_TRITON_DTYPES = (torch.float32, torch.bfloat16)

# How many times each kernel was launched in this process (tests check the kernels really ran).
LAUNCHES: collections.Counter = collections.Counter()


def _empty(shape, dtype, device) -> Tensor:
    """Allocator for the kernels' outputs and buffers; tests swap in a NaN-filled one (poisoning)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- torch reference

def lora_linear_torch(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: float,
                      dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """The reference: y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ, with plain autograd. x (..., K) -> (..., N)."""
    return F.linear(x, W, b) + F.linear(F.linear(F.dropout(x, dropout_p, training), A), B) * s


def dropout_noise(x: Tensor, p: float, training: bool) -> Tensor | None:
    """The scaled keep-mask m / (1 - p) that F.dropout(x, p, training) would multiply x by, or None.

    F.dropout of a tensor of ones *is* that mask, and it draws the same random numbers as
    F.dropout(x) (same shape, dtype, device, layout), so the same RNG state gives the same mask.
    """
    if not training or p == 0.0:
        return None
    return F.dropout(torch.ones_like(x), p, True)  # (..., K) in x's dtype: 0 or 1/(1-p)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _cast(v, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
        """v.to(dtype). On a GPU that rounds fp32 -> bf16 to nearest even; the interpreter's cast
        truncates, so there (EMULATE_RNE) we round by hand first and the tests see GPU rounding."""
        if EMULATE_RNE and dtype == tl.bfloat16:
            if v.dtype == tl.float32:
                u = v.to(tl.uint32, bitcast=True)
                u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000  # round half to even at bit 16
                v = u.to(tl.float32, bitcast=True)
        return v.to(dtype)

    @triton.jit
    def _xa_kernel(X, NOISE, A, XA, M, K, R,
                   stride_xm, stride_xk, stride_nm, stride_nk, stride_ar, stride_ak, stride_om, stride_or,
                   HAS_NOISE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """XA (M, R) fp32 = (X ⊙ NOISE) Aᵀ, X (M, K), A (R, K). One program per BLOCK_M rows."""
        pid = tl.program_id(0)
        # int64 row offsets: M · stride can pass 2^31 for long token batches
        offs_m = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BM,)
        offs_r = tl.arange(0, BLOCK_R)  # (BR,) all of r in one tile
        m_mask = offs_m < M
        r_mask = offs_r < R  # r padded up to BLOCK_R (≥ 16 for tl.dot): the pad columns load 0
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xk_mask = m_mask[:, None] & k_mask[None, :]
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=xk_mask, other=0.0)  # (BM, BK)
            if HAS_NOISE:
                noise = tl.load(NOISE + offs_m[:, None] * stride_nm + offs_k[None, :] * stride_nk,
                                mask=xk_mask, other=0.0)  # (BM, BK) 0 or 1/(1-p)
                # dropout(x) = x · noise, rounded to x's dtype as torch's x * noise is
                x = _cast(x.to(tl.float32) * noise.to(tl.float32), X.dtype.element_ty, UPCAST)
            # Aᵀ tile (BK, BR) read straight from A (R, K) through its strides: no transpose copy
            a = tl.load(A + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                        mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            a = _cast(a, X.dtype.element_ty, UPCAST)  # fp32 factors of a bf16 model: bf16 operands, as torch casts them
            if UPCAST:  # interpreter only: numpy has no bf16 arithmetic
                x = x.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(x, a, acc, input_precision=PRECISION)  # (BM, BR) fp32
        tl.store(XA + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or, acc,
                 mask=m_mask[:, None] & r_mask[None, :])

    @triton.jit
    def _matmul_lora_kernel(X, WT, L, RT, NOISE, BIAS, OUT, M, N, K, R,
                            stride_xm, stride_xk, stride_wk, stride_wn, stride_lm, stride_lr,
                            stride_rr, stride_rn, stride_nm, stride_nn, stride_om, stride_on,
                            scale,
                            HAS_BIAS: tl.constexpr, HAS_NOISE: tl.constexpr, UPCAST: tl.constexpr,
                            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
        """OUT (M, N) = X WT + scale · NOISE ⊙ (L RT) + BIAS.

        X (M, K), WT (K, N) (forward: Wᵀ as a strided view of W; backward: W itself),
        L (M, R) fp32 (xa or dyB), RT (R, N) (forward: Bᵀ; backward: A), NOISE (M, N) optional.
        """
        # Grouped launch order: GROUP_M consecutive M-tiles walk the N-tiles together, so the
        # W tiles they share are still in L2 (the Triton matmul tutorial's swizzle).
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BM,)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BN,)
        m_mask = offs_m < M
        n_mask = offs_n < N

        # main loop: the base GEMM, fp32 accumulator (BM, BN)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
            w = tl.load(WT + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # (BK, BN)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)

        # epilogue: the low-rank term, (BM, r) @ (r, BN), while the tile is still in registers
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        lo = tl.load(L + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # (BM, BR) fp32
        ro = tl.load(RT + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # (BR, BN)
        # s folded into the small (BM, r) operand before it is rounded to x's dtype; both operands
        # in x's dtype: a tensor-core dot, like torch's bf16 F.linear(xa, B)
        lo = _cast(lo * scale, X.dtype.element_ty, UPCAST)
        ro = _cast(ro, X.dtype.element_ty, UPCAST)
        if UPCAST:
            lo = lo.to(tl.float32)
            ro = ro.to(tl.float32)
        out_mask = m_mask[:, None] & n_mask[None, :]
        if HAS_NOISE:  # backward: dropout's mask scales the LoRA part of dx only: a second (BM, BN) tile
            noise = tl.load(NOISE + offs_m[:, None] * stride_nm + offs_n[None, :] * stride_nn,
                            mask=out_mask, other=0.0)
            acc += tl.dot(lo, ro, input_precision=PRECISION) * noise.to(tl.float32)
        else:  # accumulate straight into the base tile: no second (BM, BN) fp32 tile in registers
            acc = tl.dot(lo, ro, acc, input_precision=PRECISION)
        if HAS_BIAS:
            bias = tl.load(BIAS + offs_n, mask=n_mask, other=0.0)  # (BN,)
            acc += bias.to(tl.float32)[None, :]
        tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 _cast(acc, OUT.dtype.element_ty, UPCAST), mask=out_mask)


def triton_interpreted() -> bool:
    """True when this module's kernels were defined under TRITON_INTERPRET=1 (they run on CPU tensors)."""
    return triton is not None and is_interpreted(_matmul_lora_kernel)


def _check_triton(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor) -> None:
    """Clear errors for everything the Triton path does not do (backend='torch' does it all)."""
    check_triton_device(x.is_cuda, triton_interpreted(), triton)
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"lora_linear backend='triton' supports float32 and bfloat16 activations, not {x.dtype} "
                        "(use backend='torch')")
    if W.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise TypeError(f"lora_linear: W and b must have x's dtype {x.dtype} (got W {W.dtype}"
                        f"{'' if b is None else f', b {b.dtype}'})")
    if not (A.is_floating_point() and B.is_floating_point()):
        raise TypeError("lora_linear: A and B must be floating point")
    devices = {t.device for t in (x, W, A, B) + (() if b is None else (b,))}
    if len(devices) != 1:
        raise ValueError(f"lora_linear: all tensors must be on one device, got {sorted(map(str, devices))}")
    K, N, r = x.shape[-1], W.shape[0], A.shape[0]
    if W.shape != (N, K) or A.shape != (r, K) or B.shape != (N, r) or (b is not None and b.shape != (N,)):
        raise ValueError(f"lora_linear: shapes x (..., {K}), W {tuple(W.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}, b {None if b is None else tuple(b.shape)} do not fit "
                         "W (N, K), A (r, K), B (N, r), b (N,)")
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"lora_linear backend='triton' supports 1 ≤ r ≤ {MAX_RANK}, got r={r} (use backend='torch')")


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision. It only matters for fp32 operands: full IEEE fp32 unless torch itself
    allows TF32 for matmuls (torch's default is not to). For 16-bit operands pass Triton's default."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _config(kind: str, interpreted: bool, dtype: torch.dtype, block_r: int) -> dict:
    """Tile sizes. Fixed, not autotuned (a teaching simplification): 128×128×64 tiles with 8 warps
    and 3 pipeline stages are the usual good bf16 GEMM config on Ampere/Hopper. The skinny kernel's
    K-tile shrinks with r and the element size so that 3 stages of (x, noise, A) tiles stay within
    shared memory (~160 KiB on A100, ~227 KiB on H100). The interpreter gets small tiles so that a
    CPU run stays quick."""
    if interpreted:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32) if kind == "gemm" else dict(BLOCK_M=32, BLOCK_K=32)
    if kind == "gemm":
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if dtype != torch.float32 else 32,
                    GROUP_M=8, num_warps=8, num_stages=3)
    small = dtype != torch.float32
    block_k = (128 if block_r <= 32 else 64) if small else (64 if block_r <= 32 else 32)
    # (BM, r) fp32 accumulator: 8 warps for r > 64 so that it stays in registers
    return dict(BLOCK_M=64, BLOCK_K=block_k, num_warps=8 if block_r > 64 else 4, num_stages=3)


def xa_triton(x: Tensor, A: Tensor, noise: Tensor | None = None, out: Tensor | None = None,
              **blocks) -> Tensor:
    """(x ⊙ noise) Aᵀ: x (M, K), A (r, K) (any strides) -> (M, r) fp32. Also dy B with A = B.t()."""
    M, K = x.shape
    r = A.shape[0]
    if out is None:
        out = _empty((M, r), torch.float32, x.device)
    if M == 0:
        return out
    interp = triton_interpreted()
    cfg = {**_config("skinny", interp, x.dtype, _block_r(r)), **blocks}
    ns = noise if noise is not None else x  # a placeholder pointer when there is no noise
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    _xa_kernel[grid](x, ns, A, out, M, K, r,
                     x.stride(0), x.stride(1), ns.stride(0), ns.stride(1), A.stride(0), A.stride(1),
                     out.stride(0), out.stride(1),
                     HAS_NOISE=noise is not None, UPCAST=interp, PRECISION=_precision(x.dtype),
                     BLOCK_R=_block_r(r), **cfg)
    LAUNCHES["xa"] += 1
    return out


def matmul_lora_triton(x: Tensor, wt: Tensor, lo: Tensor, rt: Tensor, scale: float,
                       bias: Tensor | None = None, noise: Tensor | None = None, out: Tensor | None = None,
                       **blocks) -> Tensor:
    """x wt + scale · noise ⊙ (lo rt) + bias: x (M, K), wt (K, N), lo (M, r), rt (r, N) -> (M, N) in x's dtype."""
    M, K = x.shape
    N = wt.shape[1]
    r = lo.shape[1]
    if out is None:
        out = _empty((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return out
    interp = triton_interpreted()
    cfg = {"GROUP_M": 8, **_config("gemm", interp, x.dtype, _block_r(r)), **blocks}
    ns = noise if noise is not None else out  # placeholder pointers when absent
    bs = bias if bias is not None else out
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _matmul_lora_kernel[grid](x, wt, lo, rt, ns, bs, out, M, N, K, r,
                              x.stride(0), x.stride(1), wt.stride(0), wt.stride(1),
                              lo.stride(0), lo.stride(1), rt.stride(0), rt.stride(1),
                              ns.stride(0), ns.stride(1), out.stride(0), out.stride(1),
                              float(scale),
                              HAS_BIAS=bias is not None, HAS_NOISE=noise is not None, UPCAST=interp,
                              PRECISION=_precision(x.dtype), BLOCK_R=_block_r(r), **cfg)
    LAUNCHES["matmul_lora"] += 1
    return out


def lora_forward_triton(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: float,
                        noise: Tensor | None = None, out: Tensor | None = None,
                        xa_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """y = x Wᵀ + b + s · (x ⊙ noise) Aᵀ Bᵀ for 2-D x (M, K); returns (y (M, N), xa (M, r) fp32)."""
    xa = xa_triton(x, A, noise, out=xa_out)                         # (M, r) fp32
    y = matmul_lora_triton(x, W.t(), xa, B.t(), s, bias=b, out=out)  # (M, N); W.t(), B.t() are views
    return y, xa


def lora_backward_triton(dy: Tensor, x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float,
                         noise: Tensor | None, xa: Tensor, need_dx: bool = True, need_dA: bool = True,
                         need_dB: bool = True, dx_out: Tensor | None = None,
                         dyb_out: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx (M, K) in x's dtype, dA (r, K) and dB (N, r) in the factors' dtypes) for 2-D dy (M, N), x (M, K)."""
    dx = dA = dB = None
    if need_dx or need_dA:
        dyB = xa_triton(dy, B.t(), out=dyb_out)  # (M, r) fp32; Bᵀ (r, N) is a strided view of B
    if need_dx:
        dx = matmul_lora_triton(dy, W, dyB, A, s, noise=noise, out=dx_out)  # (M, K): dy W + noise ⊙ s·dyB A
    dt = x.dtype
    if need_dA:
        xd = x if noise is None else x * noise  # (M, K): the forward's dropped x, bit for bit
        # s folded into the (M, r) operand: one small elementwise op, one rounding to x's dtype
        dA = ((dyB * s).to(dt).t() @ xd).to(A.dtype)  # (r, M) @ (M, K): small GEMM, cuBLAS
    if need_dB:
        dB = (dy.t() @ (xa * s).to(dt)).to(B.dtype)  # (N, M) @ (M, r): small GEMM, cuBLAS
    return dx, dA, dB


# ----------------------------------------------------------------------------- torch twin of the kernels

def lora_forward_torch(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: float,
                       noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The Function's forward math with torch ops, 2-D x (M, K): (y (M, N), xa (M, r))."""
    dt = x.dtype
    xd = x if noise is None else x * noise
    xa = F.linear(xd, A.to(dt))  # (M, r)
    return F.linear(x, W, b) + F.linear(xa, B.to(dt)) * s, xa


def lora_backward_torch(dy: Tensor, x: Tensor, W: Tensor, A: Tensor, B: Tensor, s: float,
                        noise: Tensor | None, xa: Tensor, need_dx: bool = True, need_dA: bool = True,
                        need_dB: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The Function's backward math with torch ops (same formulas as lora_backward_triton)."""
    dt = x.dtype
    dx = dA = dB = None
    dyB = dy @ B.to(dt)  # (M, r)
    if need_dx:
        dx_lora = (dyB @ A.to(dt)) * s  # (M, K)
        if noise is not None:
            dx_lora = dx_lora * noise
        dx = dy @ W + dx_lora
    if need_dA:
        xd = x if noise is None else x * noise
        dA = ((dyB.t() @ xd) * s).to(A.dtype)  # (r, K)
    if need_dB:
        dB = ((dy.t() @ xa.to(dt)) * s).to(B.dtype)  # (N, r)
    return dx, dA, dB


# ----------------------------------------------------------------------------- autograd

class LoRALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ with gradients for x, A, B (W and b frozen).

    apply(x, W, b, A, B, s, dropout_p, training, impl): impl "triton" runs the fused kernels,
    "torch" the same math with torch ops (used for float64 gradcheck and as a readable twin).
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, s, dropout_p, training, impl):
        # W may also be a zero-argument function returning the weight (QLoRA: dequantize the NF4
        # base). It is then called again in backward instead of keeping the float weight alive
        # between forward and backward.
        ctx.weight_fn = W if callable(W) else None
        W = W() if callable(W) else W
        if ctx.weight_fn is not None and impl == "triton":
            _check_triton(x, W, b, A, B)  # checked here, where the weight exists, not by an extra dequant
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise ValueError("LoRALinearFunction treats W and b as frozen and computes no gradient for "
                             "them; freeze them (requires_grad_(False)) or use lora_linear(backend='torch')")
        lead, K = x.shape[:-1], x.shape[-1]
        noise = dropout_noise(x, dropout_p, training)  # (..., K) or None; drawn on x's own layout
        x2 = x.reshape(-1, K)                           # (M, K), a view when x is contiguous
        noise2 = None if noise is None else noise.reshape(-1, K)
        if impl == "triton":
            y2, xa = lora_forward_triton(x2, W, b, A, B, s, noise2)
        else:
            y2, xa = lora_forward_torch(x2, W, b, A, B, s, noise2)
        ctx.save_for_backward(x2, None if ctx.weight_fn else W, A, B, noise2, xa)
        ctx.s, ctx.impl, ctx.x_shape = s, impl, x.shape
        return y2.reshape(*lead, W.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, W, A, B, noise2, xa = ctx.saved_tensors
        W = ctx.weight_fn() if ctx.weight_fn else W  # (N, K), recomputed for a quantized base
        dy2 = dy.reshape(-1, W.shape[0])  # (M, N); any strides (the kernels take strides)
        need = dict(need_dx=ctx.needs_input_grad[0], need_dA=ctx.needs_input_grad[3],
                    need_dB=ctx.needs_input_grad[4])
        if ctx.impl == "triton":
            dx, dA, dB = lora_backward_triton(dy2, x2, W, A, B, ctx.s, noise2, xa, **need)
        else:
            dx, dA, dB = lora_backward_torch(dy2, x2, W, A, B, ctx.s, noise2, xa, **need)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, None, None, dA, dB, None, None, None, None


# ----------------------------------------------------------------------------- dispatch

def lora_linear(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: float,
                dropout_p: float = 0.0, training: bool = False, backend: str = "auto") -> Tensor:
    """y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ.  x (..., K), W (N, K), b (N,) or None, A (r, K), B (N, r) -> (..., N).

    backend "auto": the fused Triton kernels for CUDA tensors when W and b are frozen, the torch
    reference otherwise; "triton": the kernels (CUDA, or CPU under TRITON_INTERPRET=1); "torch": the
    reference. A and B may be fp32 master factors of a bf16 model: both paths compute the low-rank
    path in x's dtype and return their gradients in the factors' own dtype. Under torch.autocast
    both paths compute in the autocast dtype, as F.linear does (output in that dtype).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', not {backend!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    # Under autocast F.linear computes in the autocast dtype; the kernels do not see autocast, so the
    # Triton path casts x, W, b to it here (differentiably; the factors are cast tile by tile inside).
    kind = x.device.type
    amp = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    if callable(W):
        # A weight function (QLoRA's dequantize): always through the Function, so the float weight
        # is never saved for backward; "torch" runs the Function's torch twin.
        if backend == "auto":
            backend = "triton" if (triton is not None and x.is_cuda and not triton_interpreted()) else "torch"
        return LoRALinearFunction.apply(x, W, b, A, B, float(s), float(dropout_p), bool(training), backend)
    if backend == "auto":
        frozen = not (W.requires_grad or (b is not None and b.requires_grad))
        ok = (triton is not None and x.is_cuda and not triton_interpreted() and frozen
              and (amp or x.dtype) in _TRITON_DTYPES and 1 <= A.shape[0] <= MAX_RANK)
        backend = "triton" if ok else "torch"
    if backend == "torch":
        # .to is a no-op for same-dtype factors and differentiable otherwise (grads land in fp32)
        return lora_linear_torch(x, W, b, A.to(x.dtype), B.to(x.dtype), s, dropout_p, training)
    if amp is not None:
        x, W = x.to(amp), W.to(amp)
        b = None if b is None else b.to(amp)
    _check_triton(x, W, b, A, B)
    return LoRALinearFunction.apply(x, W, b, A, B, float(s), float(dropout_p), bool(training), "triton")
