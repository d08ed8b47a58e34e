"""LoRA linear in plain torch: the reference, the `cublas` route, and the Philox dropout mask.

Math (x (M, K) with leading dims flattened, W (N, K) frozen, b (N,) frozen or None,
A (r, K), B (N, r) trainable, s the LoRA scale, p the LoRA dropout on the low-rank input only):

    noise = m / (1 - p),  m ~ Bernoulli(1 - p)      (M, K)   (training and p > 0; else noise = 1)
    xd    = x ⊙ noise                               (M, K)
    xa    = xd Aᵀ                                   (M, r)
    y     = x Wᵀ + b + s · xa Bᵀ                    (M, N)

    dyB = dy B                                      (M, r)
    dx  = dy W + s · noise ⊙ (dyB A)                (M, K)
    dA  = s · dyBᵀ xd                               (r, K)
    dB  = s · dyᵀ xa                                (N, r)

Three things live here:

`lora_linear_torch`  the reference, plain autograd (what peft's layer computes). Dropout is
    F.dropout (torch's RNG), or an explicit `noise` tensor when a test wants a given mask.

`CublasLoRAFunction`  the `cublas` route, the floor any fused kernel must beat (the anchor is
    Unsloth's QLoRA path: dequant → cuBLAS GEMM → `addmm_`). The base GEMM is torch's (cuBLAS on
    a GPU), and the low-rank term is added into the GEMM's output in place,
    `y.addmm_(xa, Bᵀ, alpha=s)`: cuBLAS reads y as its `C` operand, so no (M, N) temporary for the
    LoRA term exists and y is rounded once more, not three times as in peft's
    `base(x) + lora_B(lora_A(x)) * s`. Backward likewise: `dx = dy W`, then
    `dx.addmm_(dyB, A, alpha=s)` without dropout. Saved: x (a view the caller keeps anyway),
    xa (M, r), the factors, the weight unless it is a function (QLoRA's NF4 dequant, then called
    again in backward, and only when dx is wanted), and with dropout the keep-mask as bool
    (M·K bytes, half of a bf16 x ⊙ noise); xd = x ⊙ noise is rebuilt in backward. The mask is
    drawn exactly as F.dropout(x, p) draws it, so this route equals the reference bit for bit in
    its dropout pattern under the same RNG state.

`philox_randint`, `philox_noise`  the `triton` route regenerates its dropout mask inside its
    kernels from one integer seed (Triton's `tl.randint`, Philox-4x32 with 10 rounds, Salmon et
    al. 2011), so no M×K mask is ever stored. These are that generator re-done in torch int64
    arithmetic, bit for bit, so the torch twin and the tests see the very same mask:

        counter (c0, c1, c2, c3) = (offset mod 2³², offset >> 32, 0, 0),  key (k0, k1) = seed
        round:  c0' = hi(B·c2) ^ c1 ^ k0    c2' = hi(A·c0) ^ c3 ^ k1    c1' = lo(B·c2)  c3' = lo(A·c0)
                k0 += 0x9E3779B9, k1 += 0xBB67AE85            (A = 0xD2511F53, B = 0xCD9E8D57)
        element (i, j) of an (M, K) mask uses offset i·K + j; kept iff (c0 >> 1) ≥ round(p · 2³¹)
        noise = kept / (1 - p) in fp32 (0 when p = 1)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compile_specs() -> list:
    """No Triton kernels in this module (paft_kernels/lora_triton.py lists the LoRA kernels' specs)."""
    return []


# ----------------------------------------------------------------------------- the reference

def lora_linear_torch(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: float,
                      dropout_p: float = 0.0, training: bool = False, noise: Tensor | None = None) -> Tensor:
    """The reference: y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ, with plain autograd. x (..., K) -> (..., N).

    `noise` (x's shape, fp32 or x's dtype), when given, is the dropout's scaled keep-mask; the dropped
    x is then (x · noise) rounded to x's dtype, as the Triton kernels compute it.
    """
    if noise is not None:
        xd = apply_noise(x, noise)
    else:
        xd = F.dropout(x, dropout_p, training)
    return F.linear(x, W, b) + F.linear(F.linear(xd, A), B) * s


def apply_noise(x: Tensor, noise: Tensor) -> Tensor:
    """x ⊙ noise computed in fp32 (or x's dtype if wider) and rounded once to x's dtype, as the kernels do."""
    wide = torch.promote_types(x.dtype, torch.float32)
    return (x.to(wide) * noise.to(wide)).to(x.dtype)


def dropout_noise(x: Tensor, p: float, training: bool) -> Tensor | None:
    """The scaled keep-mask m / (1 - p) that F.dropout(x, p, training) would multiply x by, or None.

    F.dropout of a tensor of ones *is* that mask, and it draws the same random numbers as
    F.dropout(x) (same shape, dtype, device, layout), so the same RNG state gives the same mask.
    """
    if not training or p == 0.0:
        return None
    return F.dropout(torch.ones_like(x), p, True)  # (..., K) in x's dtype: 0 or 1/(1-p)


# ----------------------------------------------------------------------------- Philox, as tl.randint

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a·b for a < 2³² and b (int64 tensor) < 2³², without int64 overflow."""
    t_hi = a * (b >> 16)           # < 2⁴⁸
    t_lo = a * (b & 0xFFFF)        # < 2⁴⁸
    mid = t_hi + (t_lo >> 16)      # a·b = mid·2¹⁶ + (t_lo mod 2¹⁶)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (t_lo & 0xFFFF)


def philox_randint(seed: int, offsets: Tensor, n_rounds: int = 10) -> Tensor:
    """Triton's tl.randint(seed, offsets) for int64 offsets: uint32 values, returned in an int64 tensor."""
    off = offsets.to(torch.int64)
    c0, c1 = off & _M32, (off >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(n_rounds):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def dropout_threshold(p: float) -> int:
    """Keep an element iff (randint >> 1) ≥ this: P(keep) = 1 - p to within 2⁻³¹ (int32, so p = 1 is capped)."""
    return min(int(round(p * 2 ** 31)), 2 ** 31 - 1)


def keep_scale(p: float) -> float:
    """The value a kept element is multiplied by: 1 / (1 - p); 0 for p = 1 (everything dropped)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def philox_noise(seed: int, M: int, K: int, p: float, device=None) -> Tensor:
    """(M, K) fp32 dropout noise, 0 or 1/(1-p), exactly as the Triton kernels regenerate it from `seed`."""
    offs = torch.arange(M, device=device, dtype=torch.int64)[:, None] * K + torch.arange(K, device=device)[None, :]
    keep = (philox_randint(seed, offs) >> 1) >= dropout_threshold(p)
    return keep.to(torch.float32) * keep_scale(p)


def draw_seed() -> int:
    """One dropout seed from torch's default (CPU) generator: torch.manual_seed fixes the masks, no device sync."""
    return int(torch.randint(0, 2 ** 31 - 1, (1,)).item())


# ----------------------------------------------------------------------------- the cublas route

LAUNCHES = {"cublas": 0}  # forward calls of this route in this process (benchmarks record what ran)


class CublasLoRAFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ with torch GEMMs and in-place `addmm_` for the low-rank term.

    apply(x, W, b, A, B, s, dropout_p, training). W may be a zero-argument function returning the
    weight (QLoRA's dequant): it is called in forward, and in backward only when dx is needed.
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, s, dropout_p, training):
        ctx.weight_fn = W if callable(W) else None
        W = W() if callable(W) else W
        if ctx.needs_input_grad[2] or (not ctx.weight_fn and ctx.needs_input_grad[1]):
            raise ValueError("the cublas route treats W and b as frozen; freeze them or use backend='torch'")
        dt, K = x.dtype, x.shape[-1]
        noise = dropout_noise(x, dropout_p, training)     # drawn on x's own layout, like F.dropout(x)
        x2 = x.reshape(-1, K)                              # (M, K)
        xd = x2 if noise is None else x2 * noise.reshape(-1, K)
        xa = F.linear(xd, A.to(dt))                        # (M, r) in x's dtype
        y = F.linear(x2, W, b)                             # (M, N): cuBLAS, bias in its epilogue
        y.addmm_(xa, B.to(dt).t(), alpha=s)                # y += s · xa Bᵀ, in place
        mask = None if noise is None else noise.reshape(-1, K) != 0  # (M, K) bool: 1 byte, not 2
        ctx.save_for_backward(x2, None if ctx.weight_fn else W, A, B, xa, mask)
        ctx.s, ctx.scale, ctx.x_shape = s, keep_scale(dropout_p), x.shape
        LAUNCHES["cublas"] += 1
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, W, A, B, xa, mask = ctx.saved_tensors
        need_dx, need_dA, need_dB = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dt, s = x2.dtype, ctx.s
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dt)          # (M, N)
        dx = dA = dB = None
        noise = None
        if mask is not None:  # the forward's noise values, rebuilt from the bool mask
            noise = torch.where(mask, torch.tensor(ctx.scale, dtype=dt, device=mask.device),
                                torch.zeros((), dtype=dt, device=mask.device))
        if need_dx or need_dA:
            dyB = dy2 @ B.to(dt)                           # (M, r)
        if need_dx:
            W = ctx.weight_fn() if ctx.weight_fn else W    # QLoRA: dequantized only here, only if needed
            dx = dy2 @ W                                   # (M, K)
            if noise is None:
                dx.addmm_(dyB, A.to(dt), alpha=s)          # dx += s · dyB A, in place
            else:
                dx.add_((dyB @ A.to(dt)).mul_(noise), alpha=s)
            dx = dx.reshape(ctx.x_shape)
        zero = torch.zeros((), dtype=dt, device=x2.device)  # addmm with beta = 0: s inside the GEMM, one rounding
        if need_dA:
            xd = x2 if noise is None else x2 * noise       # (M, K), transient
            dA = torch.addmm(zero, dyB.t(), xd, beta=0, alpha=s).to(A.dtype)  # (r, K)
        if need_dB:
            dB = torch.addmm(zero, dy2.t(), xa, beta=0, alpha=s).to(B.dtype)  # (N, r)
        return dx, None, None, dA, dB, None, None, None
