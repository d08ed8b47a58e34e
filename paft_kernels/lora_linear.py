"""The fused LoRA linear layer: its math, autograd Function, and the dispatcher that picks one of three
routes per shape.

Math
----
x (M, K) (leading dims flattened), W (N, K) frozen, b (N,) frozen or None,
A (r, K), B (N, r) trainable, s the LoRA scale (alpha / r, or alpha / sqrt(r) for rsLoRA),
p the LoRA dropout (peft semantics: on the input of the low-rank path only):

    noise = m / (1 - p),  m ~ Bernoulli(1 - p)  (M, K)    (only when training and p > 0)
    xd    = x ⊙ noise                           (M, K)
    xa    = xd Aᵀ                               (M, r)
    y     = x Wᵀ + b + s · xa Bᵀ                (M, N)
    dyB   = dy B                                (M, r)
    dx    = dy W + noise ⊙ (s · dyB A)          (M, K)    (W, b frozen: no gradient for them)
    dA    = s · dyBᵀ xd                         (r, K)
    dB    = s · dyᵀ xa                          (N, r)

Routes (`train.kernels`, or backend= here)
------------------------------------------
  torch    the reference with plain autograd (paft_kernels/lora_torch.py); CPU default.
  cublas   torch GEMMs (cuBLAS) with the low-rank term added in place, `y.addmm_(xa, Bᵀ, alpha=s)`,
           backward likewise (paft_kernels/lora_torch.py: CublasLoRAFunction). The floor to beat.
  triton   the fused kernels (paft_kernels/lora_triton.py): the low-rank term rides in the epilogue of
           the base GEMM, and dropout's mask is regenerated from one seed, never stored.
  auto     CPU: torch. CUDA: the route a committed table measured faster for this GPU and shape
           (paft_kernels/routes/lora_linear_<gpu>.json, written by `python -m benchmarks.kernels
           --write-routes`); without a table, cublas. `describe_route` says which and why, and
           the engine prints it per layer family at start-up.

Saved for backward (triton): x (a view the caller keeps anyway), xa (M, r) fp32, the factors, the
  seed, and W unless W is a function (QLoRA's NF4 dequant), which backward calls again only when dx
  is needed: with no dx (the first layer's q/k/v, whose input needs no gradient) W is not rebuilt.

The triton route's forward and backward below (`lora_forward_triton`, `lora_backward_triton`) and
their torch twin (`lora_forward_torch`, `lora_backward_torch`: the same formulas with torch ops and the
same Philox mask) sit side by side; the kernels' design, numerics and tiles are lora_triton.py's docstring.
"""
from __future__ import annotations

import collections
import functools

import torch
from torch import Tensor

from paft_kernels.lora_torch import CublasLoRAFunction, apply_noise, draw_seed, lora_linear_torch, philox_noise
from paft_kernels.lora_triton import MAX_RANK, TRITON_DTYPES, dA_triton, matmul_lora_triton, xa_triton
from paft_kernels.utils import HAS_TRITON, check_backend, check_triton, measured_route, triton_interpreted

ROUTES = ("cublas", "triton", "torch")
ROUTE_CALLS: collections.Counter = collections.Counter()  # lora_linear calls per route (tests, benchmarks)


def compile_specs() -> list:
    """No Triton kernels in this module (paft_kernels/lora_triton.py lists the LoRA kernels' specs)."""
    return []


# ----------------------------------------------------------------------------- the triton route

def lora_forward_triton(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: float,
                        seed: int | None = None, p: float = 0.0, out: Tensor | None = None,
                        xa_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ for 2-D x (M, K); returns (y (M, N), xa (M, r) fp32)."""
    xa = xa_triton(x, A, seed, p, out=xa_out)                         # (M, r) fp32
    y = matmul_lora_triton(x, W.t(), xa, B.t(), s, bias=b, out=out)  # (M, N); W.t(), B.t() are views
    return y, xa


def lora_backward_triton(dy: Tensor, x: Tensor, W, A: Tensor, B: Tensor, s: float, seed: int | None, p: float,
                         xa: Tensor, need_dx: bool = True, need_dA: bool = True, need_dB: bool = True,
                         dx_out: Tensor | None = None, dyb_out: Tensor | None = None):
    """(dx (M, K) in x's dtype, dA (r, K), dB (N, r) in the factors' dtypes) for 2-D dy (M, N), x (M, K).
    W may be a function (QLoRA): it is called only when dx is needed."""
    dx = dA = dB = None
    dt = x.dtype
    if need_dx or need_dA:
        dyB = xa_triton(dy, B.t(), out=dyb_out, role="dyB")  # (M, r) fp32; Bᵀ (r, N) is a strided view of B
    if need_dx:
        W = W() if callable(W) else W
        dx = matmul_lora_triton(dy, W, dyB, A, s, seed=seed, p=p, out=dx_out, role="dx")  # dy W + noise ⊙ s·dyB A
    if need_dA:
        if seed is None:  # s folded into the (M, r) operand: one small elementwise op, one rounding
            dA = ((dyB * s).to(dt).t() @ x).to(A.dtype)  # (r, M) @ (M, K): cuBLAS
        else:
            dA = dA_triton(dyB, x, s, seed, p, A.dtype)  # xd rebuilt tile by tile in the kernel
    if need_dB:
        dB = (dy.t() @ (xa * s).to(dt)).to(B.dtype)  # (N, M) @ (M, r): cuBLAS
    return dx, dA, dB


# ----------------------------------------------------------------------------- torch twin of the kernels

def lora_forward_torch(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, s: float,
                       noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The Function's forward math with torch ops, 2-D x (M, K): (y (M, N), xa (M, r))."""
    dt = x.dtype
    xd = x if noise is None else apply_noise(x, noise)
    xa = torch.nn.functional.linear(xd, A.to(dt))  # (M, r)
    return torch.nn.functional.linear(x, W, b) + torch.nn.functional.linear(xa, B.to(dt)) * s, xa


def lora_backward_torch(dy: Tensor, x: Tensor, W, A: Tensor, B: Tensor, s: float, noise: Tensor | None,
                        xa: Tensor, need_dx: bool = True, need_dA: bool = True, need_dB: bool = True):
    """The Function's backward math with torch ops (same formulas as lora_backward_triton)."""
    dt = x.dtype
    dx = dA = dB = None
    dyB = dy @ B.to(dt)  # (M, r)
    if need_dx:
        W = W() if callable(W) else W
        dx_lora = (dyB @ A.to(dt)) * s  # (M, K)
        if noise is not None:
            dx_lora = dx_lora * noise.to(dt)
        dx = dy @ W + dx_lora
    if need_dA:
        xd = x if noise is None else apply_noise(x, noise)
        dA = ((dyB.t() @ xd) * s).to(A.dtype)  # (r, K)
    if need_dB:
        dB = ((dy.t() @ xa.to(dt)) * s).to(B.dtype)  # (N, r)
    return dx, dA, dB


# ----------------------------------------------------------------------------- autograd

class LoRALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ with gradients for x, A, B (W and b frozen).

    apply(x, W, b, A, B, s, dropout_p, training, impl): impl "triton" runs the kernels, "torch" the
    same math with torch ops and the same Philox mask (float64-gradcheckable, a readable twin).
    W may be a zero-argument function returning the weight (QLoRA: dequantize the NF4 base); it is
    called again in backward, only if dx is needed, instead of keeping the float weight alive.
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, s, dropout_p, training, impl):
        ctx.weight_fn = W if callable(W) else None
        W = W() if callable(W) else W
        if impl == "triton":
            _check_triton_inputs(x, W, b, A, B)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise ValueError("LoRALinearFunction treats W and b as frozen and computes no gradient for "
                             "them; freeze them (requires_grad_(False)) or use lora_linear(backend='torch')")
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)  # (M, K), a view when x is contiguous
        seed = draw_seed() if training and dropout_p > 0.0 else None
        if impl == "triton":
            y2, xa = lora_forward_triton(x2, W, b, A, B, s, seed, dropout_p)
        else:
            noise = None if seed is None else philox_noise(seed, x2.shape[0], K, dropout_p, x.device)
            y2, xa = lora_forward_torch(x2, W, b, A, B, s, noise)
        ctx.save_for_backward(x2, None if ctx.weight_fn else W, A, B, xa)
        ctx.s, ctx.impl, ctx.x_shape, ctx.seed, ctx.p = s, impl, x.shape, seed, dropout_p
        return y2.reshape(*lead, W.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, W, A, B, xa = ctx.saved_tensors
        W = ctx.weight_fn or W  # a function stays a function: called only if dx is needed
        dy2 = dy.reshape(-1, B.shape[0])  # (M, N); any strides (the kernels take strides)
        need = dict(need_dx=ctx.needs_input_grad[0], need_dA=ctx.needs_input_grad[3],
                    need_dB=ctx.needs_input_grad[4])
        if ctx.impl == "triton":
            dx, dA, dB = lora_backward_triton(dy2, x2, W, A, B, ctx.s, ctx.seed, ctx.p, xa, **need)
        else:
            noise = None if ctx.seed is None else philox_noise(ctx.seed, x2.shape[0], x2.shape[1], ctx.p, x2.device)
            dx, dA, dB = lora_backward_torch(dy2, x2, W, A, B, ctx.s, noise, xa, **need)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, None, None, dA, dB, None, None, None, None


def _check_triton_inputs(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor) -> None:
    """Clear errors for everything the Triton route does not do (the torch and cublas routes do it all)."""
    check_triton(x)
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"lora_linear backend='triton' supports float32 and bfloat16 activations, not {x.dtype} "
                        "(use backend='cublas' or 'torch')")
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
        raise ValueError(f"lora_linear backend='triton' supports 1 ≤ r ≤ {MAX_RANK}, got r={r} (use backend='cublas')")


# ----------------------------------------------------------------------------- choosing a route

# The committed tables (paft_kernels/routes/lora_linear_<gpu>.json): one row per shape and dtype.
TABLE_KEY = (("K", int), ("N", int), ("r", int), ("dtype", str))


def describe_route(backend: str, device, K: int, N: int, r: int, dtype: torch.dtype,
                   frozen: bool = True) -> tuple[str, str]:
    """(route, why) for one layer shape: what lora_linear(backend=...) will run for it."""
    check_backend(backend, ROUTES)
    if backend != "auto":
        return backend, "forced"
    device = torch.device(device)
    if not frozen:
        return "torch", "the base weight is trainable"
    if device.type != "cuda":
        return "torch", f"{device.type}: the torch reference"
    if not HAS_TRITON or triton_interpreted():
        return "cublas", "triton unavailable" if not HAS_TRITON else "TRITON_INTERPRET=1"
    route, why = measured_route("lora_linear", device, TABLE_KEY, (K, N, r, str(dtype).removeprefix("torch.")),
                                ("cublas", "triton"))
    return route or "cublas", why


@functools.lru_cache(maxsize=4096)
def _auto_route(device: torch.device, K: int, N: int, r: int, dtype: torch.dtype) -> str:
    return describe_route("auto", device, K, N, r, dtype)[0]


# ----------------------------------------------------------------------------- dispatch

def lora_linear(x: Tensor, W, b: Tensor | None, A: Tensor, B: Tensor, s: float,
                dropout_p: float = 0.0, training: bool = False, backend: str = "auto") -> Tensor:
    """y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ.  x (..., K), W (N, K) or a function returning it, b (N,) or
    None, A (r, K), B (N, r) -> (..., N).

    backend: "torch" (the reference), "cublas", "triton" (CUDA, or CPU under TRITON_INTERPRET=1),
    or "auto" (see the module docstring). A and B may be fp32 master factors of a bf16 model: every
    route computes the low-rank path in x's dtype and returns gradients in the factors' own dtype.
    Under torch.autocast every route computes in the autocast dtype, as F.linear does.
    """
    check_backend(backend, ROUTES)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    kind = x.device.type
    amp = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    fn = callable(W)
    if backend == "auto":
        frozen = fn or not (W.requires_grad or (b is not None and b.requires_grad))
        if not frozen or kind != "cuda":
            backend = "torch"
        else:
            N, K, r = B.shape[0], x.shape[-1], A.shape[0]
            backend = _auto_route(x.device, K, N, r, amp or x.dtype)
            if backend == "triton" and not (1 <= r <= MAX_RANK and (amp or x.dtype) in TRITON_DTYPES):
                backend = "cublas"
    ROUTE_CALLS[backend] += 1
    if backend == "torch" and not fn:
        # .to is a no-op for same-dtype factors and differentiable otherwise (grads land in fp32)
        return lora_linear_torch(x, W, b, A.to(x.dtype), B.to(x.dtype), s, dropout_p, training)
    # The Functions do not see autocast: cast x, W, b to its dtype here (differentiably for x).
    if amp is not None:
        x = x.to(amp)
        W = W if fn else W.to(amp)
        b = None if b is None else b.to(amp)
    if backend in ("cublas", "torch"):
        # "torch" with a weight function (QLoRA) runs the same plain-torch Function as cublas: plain
        # autograd would keep the dequantized weight alive until backward, which QLoRA exists to avoid.
        return CublasLoRAFunction.apply(x, W, b, A, B, float(s), float(dropout_p), bool(training))
    return LoRALinearFunction.apply(x, W, b, A, B, float(s), float(dropout_p), bool(training), "triton")

