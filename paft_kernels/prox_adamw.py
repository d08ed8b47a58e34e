"""Fused AdamW + L1 proximal step: one pass over a parameter tensor.

PAFT's sparse SFT (Pentyala et al. 2024) adds λ‖·‖₁ to the loss. Applied to the LoRA
factors themselves (`l1: {on: factors}`), the L1 term is best handled not as a
(sub)gradient but as a proximal step after each AdamW update, which drives entries to
exact zeros instead of making them oscillate around zero:

    t ← t + 1
    m ← β1 m + (1−β1) g                   (computed as torch does: m.lerp_(g, 1−β1))
    v ← β2 v + (1−β2) g²
    m̂ = m / (1−β1ᵗ),  v̂ = v / (1−β2ᵗ)
    p ← p · (1 − lr·wd)                   decoupled weight decay (torch.optim.AdamW)
    p ← p − lr · m̂ / (√v̂ + ε)
    p ← sign(p) · max(|p| − lr·λ, 0)      prox of lr·λ‖p‖₁: the soft threshold

Arithmetic order. torch.optim.AdamW (foreach=False, adam.py `_single_tensor_adam`)
computes the Adam part as

    p.mul_(1 − lr·wd)                              (skipped when wd = 0)
    m.lerp_(g, 1 − β1)                             = fma(w, g − m, m) for w < 0.5
    v.mul_(β2).addcmul_(g, g, value=1 − β2)        = fma((1−β2)·g, g, v·β2)
    denom = (v.sqrt() / √(1−β2ᵗ)).add_(ε)
    p.addcdiv_(m, denom, value=−lr/(1−β1ᵗ))        p + ((−step_size)·m) / denom

with the scalars (1 − lr·wd, step_size, √(1−β2ᵗ)) computed in Python doubles and
rounded to fp32 where they meet the tensor (the fma forms are what torch's compiled CPU
kernels do; checked bit for bit). The kernel takes the same fp32 scalars and performs
the same operations in the same order, with explicit fma and correctly rounded sqrt and
division (tl.sqrt_rn, tl.div_rn: Triton's default `/` and sqrt on NVIDIA are
approximate). Measured against torch.optim.AdamW(foreach=False) on CPU (Triton
interpreter): m and v are bit-identical; p differs by at most 1 ulp in a few percent of
elements, because torch's vectorised CPU sqrt is itself not correctly rounded (1 ulp off
in ~20% of inputs). Over 5 steps the max relative error is ~1e-7; the tests use 1e-6.
On CUDA torch's sqrt and division are correctly rounded, so only fma-contraction choices
of the two compilers can differ (not measured here: no GPU in this environment). With
λ = 0 the threshold is exact (|p| − 0 keeps every non-zero p bit for bit), so
ProxAdamW(l1=0) is AdamW.

bf16/fp16 parameters: the kernel loads, computes in fp32 and rounds once when storing;
the torch reference here does the same (fp32 copies, one copy_ back), so both backends
agree to one bf16 rounding. Plain torch AdamW on bf16 tensors rounds every intermediate
to bf16 and so differs from both by more. The engine's LoRA factors are fp32.

One launch for the whole adapter. A 7B r=16 all-linear adapter has 448 factors of 65k to
241k numbers each (40.0M in all): stepped one tensor at a time, the update is bound by launch
and Python overhead, not by memory. ProxAdamW (below) keeps every factor, gradient and moment
as a view of one flat buffer each (padded to a multiple of 64 with zeros, which step to zero),
so one step is one call of the update over all 40M numbers: one launch, per-step scalars
computed once on the host. The kernel needs no per-tensor metadata at all: the hyper-
parameters are the same for every factor (one parameter group).

Cost per element (fp32): reads p, g, m, v (16 B), writes p, m, v (12 B): 28 B and ~20
FLOPs, so the step is purely memory-bound: time ≈ 28·n / HBM bandwidth. The unfused
torch equivalent streams the tensors once per op: foreach AdamW is mul_ (8 B), lerp_ (12),
mul_ (8), addcmul_ (12), sqrt (8), div_ (8), add_ (8), addcdiv_ (16) ≈ 80 B, and the soft
threshold sign, abs, sub, clamp_, mul_, copy_ ≈ 52 B more: ≈ 130 B/element, ~4.7× the
fused traffic (torch's own fused=True AdamW is 28 B + the 52 B threshold ≈ 80 B).
"""
from __future__ import annotations

import torch

from paft_kernels import CompileSpec
from paft_kernels.utils import check_backend, check_triton, resolve_backend, tl, triton

PAD = 64  # flat buffers are padded to a multiple of this (see flatten_params_)
LAUNCHES = {"triton": 0, "torch": 0}  # prox_adamw_step calls per route, since import
BLOCK = 1024  # elements per program: 4 warps × 32 lanes × 8 elements each (vectorised loads)


# --------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------

def _scalars(step: int, lr: float, beta1: float, beta2: float, weight_decay: float):
    """Host-side scalars, in Python doubles exactly as torch's single-tensor AdamW."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    return 1 - lr * weight_decay, step_size, bias_correction2_sqrt


def soft_threshold_(p: torch.Tensor, threshold: float) -> torch.Tensor:
    """p ← sign(p)·max(|p| − threshold, 0), in place. NaN stays NaN (a diverged run shows)."""
    if threshold > 0:
        p.copy_(torch.sign(p).mul_((p.abs() - threshold).clamp_min_(0)))
    return p


@torch.no_grad()
def prox_adamw_step_torch(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                          step: int, lr: float, beta1: float, beta2: float, eps: float,
                          weight_decay: float, l1: float) -> None:
    """In-place AdamW step (`step` = t after increment, ≥ 1) followed by the L1 prox.

    For fp32/fp64 the Adam part is the very op sequence of torch.optim.AdamW(foreach=False),
    so with l1 = 0 this is bit-identical to it; bf16/fp16 tensors are stepped in fp32.
    """
    if p.dtype in (torch.float16, torch.bfloat16):
        # fp32 math, one rounding on store: the kernel's numerics (see the module docstring).
        p32, m32, v32 = p.float(), m.float(), v.float()
        prox_adamw_step_torch(p32, g.float(), m32, v32, step, lr, beta1, beta2, eps, weight_decay, l1)
        p.copy_(p32)
        m.copy_(m32)
        v.copy_(v32)
        return
    decay, step_size, bc2_sqrt = _scalars(step, lr, beta1, beta2, weight_decay)
    if weight_decay != 0:
        p.mul_(decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)
    soft_threshold_(p, lr * l1)


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _prox_adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n_elements,
                           decay, w1, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps, threshold,
                           LERP_SMALL: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        # int64 offsets: a 64M-element tensor is fine in int32, but 2³¹ elements is not far off.
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        # Everything in fp32 registers whatever the storage dtype; one rounding on store.
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)

        p = p * decay  # decay = 1 − lr·wd; exactly 1.0 (a no-op) when wd = 0
        # torch's lerp: weight < 0.5 → m + w·(g − m), else g − (1 − w)·(g − m), each as one fma.
        if LERP_SMALL:
            m = tl.fma(w1, g - m, m)
        else:
            m = tl.fma(w1 - 1.0, g - m, g)
        # torch's addcmul_ (v·β2) + ((1−β2)·g)·g is compiled with the last multiply-add
        # contracted into one fma; doing the same makes v (and so p) match bit for bit on CPU.
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p + tl.div_rn(neg_step_size * m, denom)

        # Soft threshold. Written with comparisons rather than sign()·max() so that a NaN
        # stays NaN (a <= 0 and p >= 0 are both false for NaN) and threshold = 0 is exact.
        a = tl.abs(p) - threshold
        p = tl.where(a <= 0, 0.0, tl.where(p >= 0, a, -a))

        _store(p_ptr + offs, p, mask)
        _store(m_ptr + offs, m, mask)
        _store(v_ptr + offs, v, mask)

    @triton.jit
    def _store(ptrs, x, mask):
        """Store fp32 `x` into the pointer's dtype, rounding to nearest even.

        That is what .to(bf16) does on a GPU, but the Triton interpreter truncates, which
        would bias bf16 state towards zero in the CPU tests. For bf16 the rounding is spelled
        out on the bits (add 0x7FFF plus the lowest kept bit, drop the low 16 bits), after which
        the conversion is exact on every backend. NaN is passed through untouched.
        """
        if ptrs.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@torch.no_grad()
def prox_adamw_step_triton(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                           step: int, lr: float, beta1: float, beta2: float, eps: float,
                           weight_decay: float, l1: float) -> None:
    """The same update as prox_adamw_step_torch, in one Triton kernel (in place)."""
    check_triton(p, g, m, v)
    for name, t in (("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
        if t.shape != p.shape or t.device != p.device:
            raise ValueError(f"prox_adamw: {name} {tuple(t.shape)} on {t.device} does not match the "
                             f"parameter {tuple(p.shape)} on {p.device}")
    if not all(t.is_contiguous() for t in (p, g, m, v)):
        raise ValueError("prox_adamw_step_triton needs contiguous tensors (use backend='torch')")
    n = p.numel()
    if n == 0:
        return
    decay, step_size, bc2_sqrt = _scalars(step, lr, beta1, beta2, weight_decay)
    w1 = 1 - beta1
    grid = (triton.cdiv(n, BLOCK),)
    _prox_adamw_kernel[grid](p, g, m, v, n,
                             decay, w1, beta2, 1 - beta2, -step_size, bc2_sqrt, eps, lr * l1,
                             LERP_SMALL=abs(w1) < 0.5, BLOCK=BLOCK, num_warps=4)


def compile_specs():
    """Every config prox_adamw_step_triton launches on a GPU: storage dtype × the lerp form."""
    if triton is None:
        return []
    specs = []
    for tname in ("fp32", "bf16", "fp16"):
        for small in (True, False):
            sig = {"p_ptr": "*" + tname, "g_ptr": "*" + tname, "m_ptr": "*" + tname, "v_ptr": "*" + tname,
                   "n_elements": "i32", **{k: "fp32" for k in ("decay", "w1", "beta2", "one_minus_beta2",
                                                               "neg_step_size", "bc2_sqrt", "eps", "threshold")}}
            specs.append(CompileSpec(name=f"prox_adamw[{tname},{'lerp<0.5' if small else 'lerp>=0.5'},BLOCK={BLOCK}]",
                                     fn=_prox_adamw_kernel, signature=sig,
                                     constexprs=dict(LERP_SMALL=small, BLOCK=BLOCK), num_warps=4, num_stages=3,
                                     # the flat buffer's length is a multiple of PAD: the JIT marks it so
                                     tags=dict(dtype=tname, divisible_by_16=("n_elements",))))
    return specs


def route(backend: str, *tensors: torch.Tensor) -> str:
    """The route prox_adamw_step takes for these tensors: 'triton' or 'torch' (auto: the kernel on
    contiguous CUDA tensors)."""
    return resolve_backend(backend, *tensors, fits=all(t.is_contiguous() for t in tensors))


def prox_adamw_step(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                    step: int, lr: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, l1: float, backend: str = "auto") -> None:
    """Fused AdamW + soft threshold, in place. auto: Triton on (contiguous) CUDA tensors, torch else."""
    if step < 1:
        raise ValueError(f"prox_adamw: step counts from 1 (the value after the increment), got {step}")
    if l1 < 0:
        raise ValueError(f"prox_adamw: l1 must be >= 0, got {l1}")
    chosen = route(backend, p, g, m, v)
    LAUNCHES[chosen] += 1  # which code path really ran (benchmarks and the start-up line read it)
    fn = prox_adamw_step_triton if chosen == "triton" else prox_adamw_step_torch
    fn(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, l1)


# --------------------------------------------------------------------------------------
# Optimizer over one flat buffer
# --------------------------------------------------------------------------------------

def flatten_params_(params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Move `params` into one flat buffer and their gradients into another, in place.

    Afterwards p.data is the view flat_param[o : o + p.numel()].view_as(p) and p.grad the same
    view of flat_grad (o = the sum of the numels before p, in list order). Autograd accumulates
    into an existing .grad in place (`grad += new`), clip_grad_norm_ scales it in place and a
    DDP all-reduce can run on flat_grad directly, so the views stay views as long as nobody
    assigns a new tensor to .grad: ProxAdamW.zero_grad zeroes in place, never sets None.
    Returns (flat_param (n_pad,), flat_grad (n_pad,)), n_pad = n rounded up to a multiple of PAD = 64
    with a zero tail (an element count divisible by 16 lets the compiled kernel keep 16-byte vector
    loads: Triton's bound mask is then constant over each vector); existing gradients are copied
    over, others are 0.
    """
    if not params:
        raise ValueError("ProxAdamW: no parameters")
    dtypes, devices = {p.dtype for p in params}, {p.device for p in params}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(f"ProxAdamW: one flat buffer needs one dtype and one device, got {sorted(map(str, dtypes))} "
                         f"on {sorted(map(str, devices))}")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("ProxAdamW: a parameter appears twice")
    n = sum(p.numel() for p in params)
    n_pad = -(-n // PAD) * PAD  # a multiple of 64: the kernel's bound check is then uniform per 16-vector
    dtype, device = params[0].dtype, params[0].device
    flat_param = torch.zeros(n_pad, dtype=dtype, device=device)  # the tail stays 0: p = g = m = v = 0 steps to 0
    flat_grad = torch.zeros(n_pad, dtype=dtype, device=device)
    offset = 0
    for p in params:
        k = p.numel()
        view = flat_param[offset:offset + k].view(p.shape)
        view.copy_(p.detach())
        grad = flat_grad[offset:offset + k].view(p.shape)
        if p.grad is not None:
            grad.copy_(p.grad)
        p.data = view  # the Parameter object stays the same (modules keep theirs); its storage is the flat buffer
        p.grad = grad
        offset += k
    return flat_param, flat_grad


def is_view_of(t: torch.Tensor, flat: torch.Tensor) -> bool:
    """True when t's memory lies inside flat's (t is one of its views)."""
    if t.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
        return False
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    return lo <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= hi


class ProxAdamW(torch.optim.Optimizer):
    """AdamW followed by the L1 proximal step (l1 = 0: plain AdamW), over one flat buffer.

    At construction the parameters (one group: the LoRA factors, one dtype, one device) are
    moved into one contiguous buffer and their gradients into another (flatten_params_), and
    the moments m, v are two more buffers of the same length, so one step is ONE
    prox_adamw_step call over all of them: one Triton launch on CUDA, or one pass of the
    torch op sequence of AdamW(foreach=False) over the flat tensors (then bit-identical to
    torch's AdamW, which is elementwise: see the module docstring). The per-step scalars
    (bias corrections, step size, decay) are computed once, in Python.

    Differences from torch.optim.AdamW, all about gradients: every parameter has a gradient
    at every step (a parameter whose .grad is None steps with g = 0: its moments decay and
    weight decay applies, where AdamW would skip it; the LoRA factors always get one), and
    zero_grad(set_to_none=True) zeroes in place instead (None would cut the view). A .grad
    or .data that something replaced anyway is copied back into the buffers at the next
    step (_restore_views), so assigning p.grad = g still works, at the price of a copy.

    The state is AdamW's per parameter ("step" 0-dim fp32 tensor, "exp_avg", "exp_avg_sq",
    here views of the flat moments), so state_dict() has AdamW's layout and engine.checkpoint
    saves and restores it unchanged; load_state_dict copies into the flat buffers.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, l1: float = 0.0, backend: str = "auto"):
        if lr < 0 or eps < 0 or weight_decay < 0 or l1 < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"ProxAdamW: invalid hyper-parameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay} l1={l1}")
        check_backend(backend)
        self.backend = backend
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, l1=l1))
        if len(self.param_groups) != 1:
            raise ValueError("ProxAdamW keeps one flat buffer: pass one parameter group")
        ps = self.param_groups[0]["params"]
        if any(p.is_sparse for p in ps):
            raise ValueError("ProxAdamW does not support sparse parameters")
        self.flat_param, self.flat_grad = flatten_params_(ps)
        self._param_views = self._views(self.flat_param)  # what each p.data and p.grad must stay
        self._grad_views = [p.grad for p in ps]
        self.exp_avg = self.exp_avg_sq = None  # (n,) each, created by the first step (AdamW is lazy too)
        self._step_count = torch.tensor(0.0)  # one counter: every parameter steps every time

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in self.param_groups[0]["params"]:
            out.append(flat[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return out

    def _init_state(self) -> None:
        self.exp_avg = torch.zeros_like(self.flat_param)
        self.exp_avg_sq = torch.zeros_like(self.flat_param)
        for p, m, v in zip(self.param_groups[0]["params"], self._views(self.exp_avg), self._views(self.exp_avg_sq)):
            self.state[p] = {"step": self._step_count, "exp_avg": m, "exp_avg_sq": v}

    def _restore_views(self) -> None:
        """Put back any parameter or gradient that something re-pointed away from the buffers.

        A .grad set to None (zero_grad(set_to_none=True) of a caller that did not go through
        this class, or `p.grad = None`) counts as a zero gradient; a .grad or .data replaced by a
        new tensor (`p.grad = g`, `load_state_dict(assign=True)`) is copied into the buffer and
        the view put back. Identity and pointer checks only: cheap enough for every step.
        """
        ps = self.param_groups[0]["params"]
        for p, pv, gv in zip(ps, self._param_views, self._grad_views):
            if p.data_ptr() != pv.data_ptr():
                pv.copy_(p.detach())
                p.data = pv
            if p.grad is not gv:
                if p.grad is None:
                    gv.zero_()
                else:
                    gv.copy_(p.grad)
                p.grad = gv

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._restore_views()
        if self.exp_avg is None:
            self._init_state()
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        self._step_count += 1
        prox_adamw_step(self.flat_param, self.flat_grad, self.exp_avg, self.exp_avg_sq, int(self._step_count.item()),
                        group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["l1"],
                        backend=self.backend)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient in place (set_to_none is ignored: the views must survive)."""
        self.flat_grad.zero_()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load (hyper-parameters, per-parameter tensors), then the tensors copied into the
        flat buffers and the state re-pointed to views of them."""
        super().load_state_dict(state_dict)
        for key, value in self.defaults.items():  # a torch AdamW state has no "l1": 0 is its meaning
            self.param_groups[0].setdefault(key, value if key != "l1" else 0.0)
        ps = self.param_groups[0]["params"]
        loaded = [self.state.get(p, {}) for p in ps]
        if not any(loaded):
            self.state.clear()
            self.exp_avg = self.exp_avg_sq = None
            return
        missing = [i for i, s in enumerate(loaded) if not {"step", "exp_avg", "exp_avg_sq"} <= s.keys()]
        steps = {float(s["step"]) for s in loaded if "step" in s}
        if missing or len(steps) != 1:
            raise ValueError(f"ProxAdamW: the saved state must hold step, exp_avg, exp_avg_sq for every parameter, "
                             f"with one step count (missing for {missing}, steps {sorted(steps)})")
        self._step_count = torch.tensor(steps.pop())
        self._init_state()
        for p, s_old in zip(ps, loaded):
            self.state[p]["exp_avg"].copy_(s_old["exp_avg"])
            self.state[p]["exp_avg_sq"].copy_(s_old["exp_avg_sq"])


def l1_norm_of(params) -> float:
    """Σ‖p‖₁ over params (for logging the penalty the prox step optimises)."""
    return float(sum(p.detach().abs().sum().item() for p in params))


def zero_fraction(params) -> float:
    """Share of exact zeros over params: what the soft threshold produces."""
    zeros = sum(int((p.detach() == 0).sum().item()) for p in params)
    total = sum(p.numel() for p in params)
    return zeros / max(1, total)


__all__ = ["prox_adamw_step", "prox_adamw_step_torch", "prox_adamw_step_triton", "soft_threshold_",
           "ProxAdamW", "route", "flatten_params_", "is_view_of", "l1_norm_of", "zero_fraction", "LAUNCHES"]
