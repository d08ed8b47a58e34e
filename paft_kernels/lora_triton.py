"""The LoRA linear's `triton` route: its kernels, their tile sets, the launchers and the sm_90 compile specs.

The op itself (its math, the routes, the autograd Function and the dispatcher) is
paft_kernels/lora_linear.py; shapes below as there: x (M, K), W (N, K), A (r, K), B (N, r).

Triton design: two launches per direction, the low-rank term fused into the base GEMM's epilogue
  forward   `_xa_kernel`: xa = dropout(x) Aᵀ, a skinny GEMM into an fp32 (M, r) buffer, all of r in
            one tile (padded to BLOCK_R = max(16, next_pow2(r)) with masks, since tl.dot wants ≥ 16).
            `_matmul_lora_kernel`: x Wᵀ tiled BLOCK_M × BLOCK_N with a K-loop; its epilogue loads the
            (BLOCK_M, r) rows of xa and the (r, BLOCK_N) columns of Bᵀ and accumulates s·xa Bᵀ into
            the same fp32 accumulator (one more tensor-core dot with K-dimension r), adds b, stores y.
  backward  `_xa_kernel` with X = dy, "A" = Bᵀ (a strided view): dyB (M, r) fp32;
            `_matmul_lora_kernel` with X = dy, Wᵀ-operand = W: dx = dy W + noise ⊙ (s·dyB A);
            dB = s·dyᵀ xa by torch (a small GEMM); dA = s·dyBᵀ xd by torch without dropout, and by
            `_dA_kernel` with dropout (it rebuilds xd tile by tile: no (M, K) xd ever exists).
  Why not one kernel that accumulates x Aᵀ inside the base GEMM's K-loop? Every N-tile would
  recompute its rows of xa: 2·M·K·BLOCK_R·⌈N/BLOCK_N⌉ FLOPs instead of 2·M·K·r, +12.5% of the base
  GEMM at r = 16 and N = 4096 (+50% at r = 64). Two kernels instead pay one more read of x and an
  (M, r) fp32 round trip, ~4% of the GEMM's bytes at Llama-7B sizes.
  fwd+bwd FLOPs: 4·M·N·K (the frozen base: y and dx) + 6·M·r·(N + K) (LoRA).

Dropout without an M×K mask: each kernel that needs the mask regenerates it from one integer seed
  with Triton's Philox (`tl.randint`) at element offset i·K + j (logical indices, not strides),
  so the forward's xa kernel, the backward's dx epilogue and the dA kernel all see the same mask
  and nothing of size M×K is stored or copied. paft_kernels/lora_torch.py redoes that Philox in torch
  bit for bit (`philox_noise`), so the torch twin (lora_linear.py) and the tests use the very same mask.
  The seed comes from torch's default generator (torch.manual_seed fixes it).

Numerics: tiles are fed to tl.dot in x's dtype (bf16 → tensor cores; fp32 → TF32 tensor cores,
  as torch does with allow_tf32) with fp32 accumulation; fp32 factors of a bf16 model are cast to
  bf16 tile by tile (as the torch path casts the whole factor); xa / dyB stay fp32 in memory and
  s·xa is rounded to x's dtype only as the epilogue's dot operand; y is rounded once, at the store.
  Offsets: row and column indices are int64 before they meet a stride, and the K-loop advances
  64-bit pointers, so M·K and N·K past 2³¹ are fine.

Tiles: an autotuned set per kernel (`GEMM_CONFIGS`, ...: tile sizes, stages, warps, and a persistent
  variant whose grid is one program per SM, each walking tiles tl.num_programs(0) apart), keyed by
  (M rounded up to a power of 2, N, K, r, operand layout, dtypes): the layout (utils.layout_of) keeps
  the forward's pick (Wᵀ, a view) and the backward's (W) apart on square shapes; PICKS records each
  role's. `compile_specs()` lists every compiled variant the dispatcher can launch, for the sm_90
  compile check (python -m benchmarks.aot).
Under TRITON_INTERPRET=1 (set before triton is imported) the kernels run on CPU tensors with small
  fixed tiles (tests pass any config of the set explicitly). The interpreter (numpy) has no bf16
  arithmetic, so there tiles are upcast to fp32 before tl.dot (bf16 values are exact in fp32) and
  its truncating fp32 -> bf16 cast is replaced by round-to-nearest-even as on the GPU (`_cast`).
"""
from __future__ import annotations

import collections
import functools

import torch
from torch import Tensor

from paft_kernels import CompileSpec
from paft_kernels.lora_torch import dropout_threshold, keep_scale
from paft_kernels.utils import compile_spec as _spec, layout_of, record_pick, tl, triton, triton_interpreted

# The whole r dimension is one tile. At r = 128 the (BLOCK_M, r) tiles push most configs past 255
# registers into spills (ptxas, sm_90), so the Triton route stops at 64 and larger ranks take cublas.
MAX_RANK = 64
TRITON_DTYPES = (torch.float32, torch.bfloat16)  # x's dtypes the kernels take

# Launch counters, so that tests and benchmarks can tell which code really ran: LAUNCHES[kernel] per
# Triton launch (lora_linear.ROUTE_CALLS counts the routes).
LAUNCHES: collections.Counter = collections.Counter()
# role -> the config its last launch used (the autotuner's pick on a GPU), per role: "xa" and "fwd" (forward),
# "dyB", "dx" and "dA" (backward); dB, and dA without dropout, are cuBLAS GEMMs by torch (no pick).
# Kept only while RECORD_PICKS is on (benchmarks/kernels.py turns it on): building the record costs every
# launch a few microseconds of Python, which training's steps need not pay.
PICKS: dict = {}
RECORD_PICKS = False


def _empty(shape, dtype, device) -> Tensor:
    """Allocator for the kernels' outputs and buffers; tests swap in a NaN-filled one (poisoning)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- config sets
# Hopper (sm_90, 228 KB shared memory per SM, 64K registers). Each dict is one triton.Config:
# tile sizes, then num_warps / num_stages. 16-bit operands take BLOCK_K = 64 (128 B rows); fp32
# (TF32) halves it so that the same number of stages fits in shared memory.

def _cfg(num_warps, num_stages, **tiles) -> dict:
    return dict(tiles, num_warps=num_warps, num_stages=num_stages)


GEMM_CONFIGS = {
    2: [_cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=False),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=False),
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, PERSISTENT=True)],
    4: [_cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, PERSISTENT=False),
        _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, PERSISTENT=True)],
}
SKINNY_CONFIGS = {  # _xa_kernel: (BLOCK_M, r) accumulator, K-loop
    2: [_cfg(4, 3, BLOCK_M=64, BLOCK_K=128), _cfg(8, 3, BLOCK_M=128, BLOCK_K=64)],
    4: [_cfg(4, 3, BLOCK_M=64, BLOCK_K=64), _cfg(8, 3, BLOCK_M=128, BLOCK_K=32)],
}
DA_CONFIGS = {  # _dA_kernel: (r, BLOCK_K) accumulator, M-loop
    2: [_cfg(4, 3, BLOCK_M=64, BLOCK_K=64), _cfg(8, 3, BLOCK_M=64, BLOCK_K=128)],
    4: [_cfg(4, 3, BLOCK_M=32, BLOCK_K=64), _cfg(8, 3, BLOCK_M=64, BLOCK_K=64)],
}
# With dropout the dx epilogue needs a second (BLOCK_M, BLOCK_N) fp32 tile (noise ⊙ the LoRA product,
# before the add) and the Philox state on top of the accumulator: 128×128 (8 warps), 64×128 (4 warps)
# and the persistent variant all spill there (ptxas sm_90, r = 64: 16, 288 and 160 bytes), so that
# variant has its own, narrower tile.
# (A 128×256 tile, the usual Hopper pick for a plain GEMM, needs 255 registers and spills here: the
# epilogue's xa and Bᵀ tiles come on top of the accumulator. Not in either set.)
GEMM_DROPOUT_CONFIGS = {
    2: [_cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, PERSISTENT=False)],
    4: [_cfg(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, PERSISTENT=False)],
}


def _gemm_configs(elem: int, dropout: bool) -> list[dict]:
    return (GEMM_DROPOUT_CONFIGS if dropout else GEMM_CONFIGS)[elem]


# Small fixed tiles for the interpreter (a CPU run must stay quick; masks on every edge get exercised).
INTERPRETER_CONFIG = {"gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, PERSISTENT=False),
                      "skinny": dict(BLOCK_M=32, BLOCK_K=32), "dA": dict(BLOCK_M=32, BLOCK_K=32)}
DA_SPLIT_MAX = 8  # the dA kernel splits M over at most this many programs per column tile (fp32 partials)


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
    def _noise(seed, rows, cols, width, thresh, kscale):
        """(len(rows), len(cols)) fp32 dropout noise, 0 or kscale, for element offsets row·width + col
        (rows, cols int64). Philox via tl.randint; paft_kernels/lora_torch.philox_noise is its torch twin."""
        r = tl.randint(seed, rows[:, None] * width + cols[None, :])  # uint32
        keep = (r >> 1).to(tl.int32, bitcast=True) >= thresh
        return tl.where(keep, kscale, 0.0)

    @triton.jit
    def _xa_kernel(X, A, XA, M, K, R, M_KEY,
                   stride_xm, stride_xk, stride_ar, stride_ak, stride_om, stride_or,
                   seed, thresh, kscale,
                   HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, LAYOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """XA (M, R) fp32 = dropout(X) Aᵀ, X (M, K), A (R, K) (any strides). One program per BLOCK_M rows."""
        pid = tl.program_id(0)
        offs_m = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BM,) int64: M·stride may pass 2^31 (the index itself fits int32)
        offs_r = tl.arange(0, BLOCK_R)                                # (BR,) all of r in one tile
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        r_mask = offs_r < R  # r padded up to BLOCK_R: the pad columns load 0
        x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk      # (BM, BK) 64-bit pointers
        a_ptrs = A + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak      # (BK, BR): Aᵀ via strides
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
            if HAS_DROPOUT:  # the mask, regenerated: dropout(x) = x · noise rounded to x's dtype
                noise = _noise(seed, offs_m, k0 + offs_k.to(tl.int64), K, thresh, kscale)
                x = _cast(x.to(tl.float32) * noise, X.dtype.element_ty, UPCAST)
            a = tl.load(a_ptrs, mask=r_mask[None, :] & k_mask[:, None], other=0.0)
            a = _cast(a, X.dtype.element_ty, UPCAST)  # fp32 factors of a bf16 model: bf16 operands
            if UPCAST:  # interpreter only: numpy has no bf16 arithmetic
                x = x.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(x, a, acc, input_precision=PRECISION)  # (BM, BR) fp32
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak
        tl.store(XA + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or, acc,
                 mask=m_mask[:, None] & r_mask[None, :])

    @triton.jit
    def _gemm_lora_tile(tile, X, WT, L, RT, BIAS, OUT, M, N, K, R,
                        stride_xm, stride_xk, stride_wk, stride_wn, stride_lm, stride_lr,
                        stride_rr, stride_rn, stride_om, stride_on, scale, seed, thresh, kscale,
                        HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) tile of OUT = X WT + scale · noise ⊙ (L RT) + BIAS."""
        # Grouped order: GROUP_M consecutive M-tiles walk the N-tiles together, so the WT tiles they
        # share are still in L2 (the Triton matmul tutorial's swizzle).
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = tile // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
        pid_n = (tile % num_pid_in_group) // group_size_m

        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BM,) int64
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BN,) int64
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        x_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk   # (BM, BK)
        w_ptrs = WT + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BK, BN)

        # main loop: the base GEMM, fp32 accumulator (BM, BN); 64-bit pointers advance along K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        # epilogue: the low-rank term, (BM, r) @ (r, BN), while the tile is still in registers
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        lo = tl.load(L + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # (BM, BR) fp32
        ro = tl.load(RT + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # (BR, BN)
        # s folded into the small (BM, r) operand before it is rounded to x's dtype: a tensor-core dot
        lo = _cast(lo * scale, X.dtype.element_ty, UPCAST)
        ro = _cast(ro, X.dtype.element_ty, UPCAST)
        if UPCAST:
            lo = lo.to(tl.float32)
            ro = ro.to(tl.float32)
        out_mask = m_mask[:, None] & n_mask[None, :]
        if HAS_DROPOUT:  # backward: the mask scales the LoRA part of dx only (a second (BM, BN) tile)
            noise = _noise(seed, offs_m, offs_n, N, thresh, kscale)
            acc += tl.dot(lo, ro, input_precision=PRECISION) * noise
        else:  # accumulate straight into the base tile
            acc = tl.dot(lo, ro, acc, input_precision=PRECISION)
        if HAS_BIAS:
            bias = tl.load(BIAS + offs_n, mask=n_mask, other=0.0)  # (BN,)
            acc += bias.to(tl.float32)[None, :]
        tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 _cast(acc, OUT.dtype.element_ty, UPCAST), mask=out_mask)

    @triton.jit
    def _matmul_lora_kernel(X, WT, L, RT, BIAS, OUT, M, N, K, R, M_KEY,
                            stride_xm, stride_xk, stride_wk, stride_wn, stride_lm, stride_lr,
                            stride_rr, stride_rn, stride_om, stride_on, scale, seed, thresh, kscale,
                            HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
                            PERSISTENT: tl.constexpr, LAYOUT: tl.constexpr):
        """OUT (M, N) = X WT + scale · noise ⊙ (L RT) + BIAS, noise regenerated at offsets m·N + n.

        X (M, K), WT (K, N) (forward: Wᵀ as a strided view of W; backward: W itself), L (M, R) fp32
        (xa or dyB), RT (R, N) (forward: Bᵀ; backward: A). PERSISTENT: a grid of about one program
        per SM, each taking every num_programs-th tile; else one program per tile.
        """
        if PERSISTENT:
            num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
            for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
                _gemm_lora_tile(tile, X, WT, L, RT, BIAS, OUT, M, N, K, R,
                                stride_xm, stride_xk, stride_wk, stride_wn, stride_lm, stride_lr,
                                stride_rr, stride_rn, stride_om, stride_on, scale, seed, thresh, kscale,
                                HAS_BIAS, HAS_DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                                BLOCK_R, GROUP_M)
        else:
            _gemm_lora_tile(tl.program_id(0), X, WT, L, RT, BIAS, OUT, M, N, K, R,
                            stride_xm, stride_xk, stride_wk, stride_wn, stride_lm, stride_lr,
                            stride_rr, stride_rn, stride_om, stride_on, scale, seed, thresh, kscale,
                            HAS_BIAS, HAS_DROPOUT, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                            BLOCK_R, GROUP_M)

    @triton.jit
    def _dA_kernel(L, X, P, M, K, R, M_KEY,
                   stride_lm, stride_lr, stride_xm, stride_xk, stride_ps, stride_pr, stride_pk,
                   scale, seed, thresh, kscale,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """P[split] (R, K) fp32 = Σ over this split's rows of (scale·L)ᵀ · dropout(X), L (M, R) fp32 (dyB).

        Grid (⌈K / BLOCK_K⌉, splits): program (j, s) owns columns j·BLOCK_K... and the s-th share of
        the row blocks; the host sums the splits (a deterministic reduction, no atomics).
        """
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)
        blocks = tl.cdiv(M, BLOCK_M)
        per = tl.cdiv(blocks, tl.num_programs(1))
        offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)  # (BK,) int64
        offs_r = tl.arange(0, BLOCK_R)
        k_mask = offs_k < K
        r_mask = offs_r < R
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for blk in range(pid_s * per, min(blocks, pid_s * per + per)):
            offs_m = (blk * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_mask = offs_m < M
            lo = tl.load(L + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                         mask=m_mask[:, None] & r_mask[None, :], other=0.0)  # (BM, BR) fp32
            lo = _cast(lo * scale, X.dtype.element_ty, UPCAST)  # s·dyB rounded to x's dtype, as on the other paths
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
            noise = _noise(seed, offs_m, offs_k, K, thresh, kscale)
            xd = _cast(x.to(tl.float32) * noise, X.dtype.element_ty, UPCAST)  # the forward's dropped x
            if UPCAST:
                lo = lo.to(tl.float32)
                xd = xd.to(tl.float32)
            acc = tl.dot(tl.trans(lo), xd, acc, input_precision=PRECISION)  # (BR, BK)
        tl.store(P + pid_s * stride_ps + offs_r[:, None] * stride_pr + offs_k[None, :] * stride_pk, acc,
                 mask=r_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------- launchers

def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: TF32 tensor cores for fp32 operands (an fp32 IEEE dot gets no tensor
    cores and spills at r = 128); 16-bit operands ignore it."""
    return "tf32"


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _m_key(M: int) -> int:
    """The autotuner's key for M: the next power of two, so varying sequence lengths reuse a tuning."""
    return triton.next_power_of_2(max(M, 1))


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs, so the persistent loop takes several tiles each
    return torch.cuda.get_device_properties(device).multi_processor_count


TUNE_KEYS = {"gemm": ["M_KEY", "N", "K", "R", "LAYOUT"], "skinny": ["M_KEY", "K", "R", "LAYOUT"],
             "dA": ["M_KEY", "K", "R"]}  # dA has one role and one layout


@functools.lru_cache(maxsize=None)
def _tuned(kind: str, elem: int, dropout: bool):
    """The autotuned wrapper of one kernel for one operand size (2: bf16, 4: fp32) and dropout flag."""
    fn, configs = {"gemm": (_matmul_lora_kernel, _gemm_configs(elem, dropout)),
                   "skinny": (_xa_kernel, SKINNY_CONFIGS[elem]), "dA": (_dA_kernel, DA_CONFIGS[elem])}[kind]
    cfgs = [triton.Config({k: v for k, v in c.items() if k not in ("num_warps", "num_stages")},
                          num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs]
    return triton.autotune(cfgs, key=TUNE_KEYS[kind])(fn)  # Triton adds the tensors' dtypes to the key


def _launch(kind: str, raw, grid_of, args: list, consts: dict, x: Tensor, dropout: bool, config: dict | None,
            role: str):
    """Run `raw` with an explicit config (tests, the interpreter) or through its autotuner (GPU); with
    RECORD_PICKS on, record the config under `role` (PICKS) with the autotune key it was picked for."""
    if config is None and triton_interpreted():
        config = INTERPRETER_CONFIG[kind]
    if config is not None:
        meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        opts = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
        raw[grid_of(meta)](*args, **consts, **meta, **opts)
        used, tuned_pick = config, False
    else:
        tuned = _tuned(kind, x.element_size(), dropout)
        tuned[lambda META: grid_of(META)](*args, **consts)
        best = tuned.best_config
        used, tuned_pick = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages), True
    if RECORD_PICKS:
        named = dict(zip(raw.arg_names, args), **consts)
        key = {k: named[k] for k in TUNE_KEYS[kind]}
        key["dtypes"] = [str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, Tensor)]
        record_pick(PICKS, role, kind, used, tuned_pick, key)
    LAUNCHES[kind] += 1


def _dropout_args(seed: int | None, p: float) -> tuple[int, int, float]:
    if seed is None:
        return 0, 0, 1.0
    return seed, dropout_threshold(p), keep_scale(p)


def xa_triton(x: Tensor, A: Tensor, seed: int | None = None, p: float = 0.0, out: Tensor | None = None,
              config: dict | None = None, role: str = "xa") -> Tensor:
    """dropout(x) Aᵀ: x (M, K), A (r, K) (any strides) -> (M, r) fp32. Also dy B with A = B.t() (role "dyB")."""
    M, K = x.shape
    r = A.shape[0]
    if out is None:
        out = _empty((M, r), torch.float32, x.device)
    if M == 0:
        return out
    sd, th, ks = _dropout_args(seed, p)
    args = [x, A, out, M, K, r, _m_key(M), x.stride(0), x.stride(1), A.stride(0), A.stride(1),
            out.stride(0), out.stride(1), sd, th, ks]
    consts = dict(HAS_DROPOUT=seed is not None, UPCAST=triton_interpreted(), PRECISION=_precision(x.dtype),
                  BLOCK_R=_block_r(r), LAYOUT=layout_of(x, A))
    _launch("skinny", _xa_kernel, lambda META: (triton.cdiv(M, META["BLOCK_M"]),), args, consts, x,
            seed is not None, config, role)
    return out


def matmul_lora_triton(x: Tensor, wt: Tensor, lo: Tensor, rt: Tensor, scale: float, bias: Tensor | None = None,
                       seed: int | None = None, p: float = 0.0, out: Tensor | None = None,
                       config: dict | None = None, role: str = "fwd") -> Tensor:
    """x wt + scale · noise ⊙ (lo rt) + bias: x (M, K), wt (K, N), lo (M, r), rt (r, N) -> (M, N) in x's dtype.
    With a seed, noise is the dropout mask of an (M, N) input regenerated from it (the dx epilogue)."""
    M, K = x.shape
    N = wt.shape[1]
    r = lo.shape[1]
    if out is None:
        out = _empty((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return out
    bs = bias if bias is not None else out  # a placeholder pointer when absent
    sd, th, ks = _dropout_args(seed, p)
    args = [x, wt, lo, rt, bs, out, M, N, K, r, _m_key(M), x.stride(0), x.stride(1), wt.stride(0), wt.stride(1),
            lo.stride(0), lo.stride(1), rt.stride(0), rt.stride(1), out.stride(0), out.stride(1),
            float(scale), sd, th, ks]
    consts = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=seed is not None, UPCAST=triton_interpreted(),
                  PRECISION=_precision(x.dtype), BLOCK_R=_block_r(r), LAYOUT=layout_of(x, wt, rt))
    sms = _num_sms(x.device)

    def grid(META):
        tiles = triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"])
        return (min(tiles, sms) if META["PERSISTENT"] else tiles,)

    _launch("gemm", _matmul_lora_kernel, grid, args, consts, x, seed is not None, config, role)
    return out


def dA_triton(dyB: Tensor, x: Tensor, scale: float, seed: int, p: float, out_dtype: torch.dtype,
              config: dict | None = None) -> Tensor:
    """s · dyBᵀ dropout(x): dyB (M, r) fp32, x (M, K), the mask regenerated from `seed` -> (r, K) in out_dtype."""
    M, K = x.shape
    r = dyB.shape[1]
    splits = max(1, min(DA_SPLIT_MAX, triton.cdiv(M, 128)))
    part = _empty((splits, r, K), torch.float32, x.device)  # (S, r, K) fp32 partial sums
    sd, th, ks = _dropout_args(seed, p)
    args = [dyB, x, part, M, K, r, _m_key(M), dyB.stride(0), dyB.stride(1), x.stride(0), x.stride(1),
            part.stride(0), part.stride(1), part.stride(2), float(scale), sd, th, ks]
    consts = dict(UPCAST=triton_interpreted(), PRECISION=_precision(x.dtype), BLOCK_R=_block_r(r))
    _launch("dA", _dA_kernel, lambda META: (triton.cdiv(K, META["BLOCK_K"]), splits), args, consts, x, True, config,
            "dA")
    return part.sum(0).to(out_dtype)


# ----------------------------------------------------------------------------- sm_90 compile specs

SPEC_RANKS = (16, 32, 64)  # every BLOCK_R the launchers can pick (r ≤ 16 -> 16, 17..32 -> 32, ...)
_TNAME = {2: "bf16", 4: "fp32"}


def compile_specs() -> list[CompileSpec]:
    """Every Triton variant the dispatcher can launch on a GPU: each autotune config of each kernel ×
    r ∈ SPEC_RANKS × x in bf16 / fp32 (factors fp32, the engine's master copy) × the constexpr
    variants (bias, dropout). Row-major operands, so the unit strides are constants as at launch."""
    if triton is None:
        return []
    specs = []
    for elem, t in _TNAME.items():
        p = "*" + t
        for r in SPEC_RANKS:
            base = dict(UPCAST=False, PRECISION=_precision(torch.float32), BLOCK_R=_block_r(r))
            # forward GEMM (x Wᵀ: W (N, K) read as Wᵀ with strides (1, K)) and backward dx GEMM (dy W)
            for has_bias, has_drop, role in ((False, False, "fwd"), (True, False, "fwd+bias"),
                                             (False, False, "dx"), (False, True, "dx+dropout")):
                for i, cfg in enumerate(_gemm_configs(elem, has_drop)):
                    args = dict(X=p, WT=p, L="*fp32", RT="*fp32", BIAS=p, OUT=p, M="i32", N="i32", K="i32",
                                R="i32", M_KEY="i32", stride_xm="i32", stride_xk=1, stride_wk=1, stride_wn="i32",
                                stride_lm="i32", stride_lr=1, stride_rr=1, stride_rn="i32", stride_om="i32",
                                stride_on=1, scale="fp32", seed="i32", thresh="i32", kscale="fp32")
                    if role.startswith("dx"):  # dy W + s·dyB A: W (N, K) and A (r, K) used as they are
                        args.update(stride_wk="i32", stride_wn=1, stride_rr="i32", stride_rn=1)
                    tiles = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}" + ("p" if cfg["PERSISTENT"] else "")
                    specs.append(_spec(f"lora_gemm[{role},{tiles},w{cfg['num_warps']}s{cfg['num_stages']},r={r},{t}]",
                                       _matmul_lora_kernel, args,
                                       dict(base, HAS_BIAS=has_bias, HAS_DROPOUT=has_drop,
                                            LAYOUT="rrr" if role.startswith("dx") else "rcc"), cfg,
                                       dict(kernel="gemm", config=i, r=r, dtype=t, role=role)))
            # xa = dropout(x) Aᵀ (A (r, K) row-major) and dyB = dy B (Bᵀ: strides (1, r))
            for has_drop, role, a_strides, layout in ((False, "xa", ("i32", 1), "rr"),
                                                      (True, "xa+dropout", ("i32", 1), "rr"),
                                                      (False, "dyB", (1, "i32"), "rc")):
                for i, cfg in enumerate(SKINNY_CONFIGS[elem]):
                    args = dict(X=p, A="*fp32", XA="*fp32", M="i32", K="i32", R="i32", M_KEY="i32",
                                stride_xm="i32", stride_xk=1, stride_ar=a_strides[0], stride_ak=a_strides[1],
                                stride_om="i32", stride_or=1, seed="i32", thresh="i32", kscale="fp32")
                    specs.append(_spec(f"lora_xa[{role},{cfg['BLOCK_M']}x{cfg['BLOCK_K']},w{cfg['num_warps']}"
                                       f"s{cfg['num_stages']},r={r},{t}]", _xa_kernel, args,
                                       dict(base, HAS_DROPOUT=has_drop, LAYOUT=layout), cfg,
                                       dict(kernel="skinny", config=i, r=r, dtype=t, role=role)))
            for i, cfg in enumerate(DA_CONFIGS[elem]):  # dA with dropout
                args = dict(L="*fp32", X=p, P="*fp32", M="i32", K="i32", R="i32", M_KEY="i32", stride_lm="i32",
                            stride_lr=1, stride_xm="i32", stride_xk=1, stride_ps="i32", stride_pr="i32",
                            stride_pk=1, scale="fp32", seed="i32", thresh="i32", kscale="fp32")
                specs.append(_spec(f"lora_dA[dropout,{cfg['BLOCK_M']}x{cfg['BLOCK_K']},w{cfg['num_warps']}"
                                   f"s{cfg['num_stages']},r={r},{t}]", _dA_kernel, args, base, cfg,
                                   dict(kernel="dA", config=i, r=r, dtype=t, role="dA+dropout")))
    return specs
