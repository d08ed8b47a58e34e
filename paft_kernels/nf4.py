"""NF4 (4-bit NormalFloat) blockwise quantization, with optional double quantization: the format and
its dequantization (the quantizer and the bitsandbytes bridge are paft_kernels/nf4_quant.py).

The storage format of QLoRA (Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs", arXiv:2305.14314), byte for byte as bitsandbytes stores it, so a
weight quantized here dequantizes in bitsandbytes and the other way round (see nf4_quant.to_bnb /
from_bnb).

Math
----
Flatten the weight w (numel n) and cut it into blocks of B = 64 consecutive elements
(the last block may be partial). Per block b:

    absmax_b = max_i |w_i|                                  (fp32)
    x_i      = clamp(w_i * (1 / absmax_b), -1, 1)           (fp32; in [-1, 1])
    k_i      = argmin_k |x_i - NF4[k]|,  k in 0..15         (4-bit code)
    w~_i     = NF4[k_i] * absmax_b                          (dequantized, fp32, then cast)

NF4 is a 16-entry lookup table, not a float format: the values are quantiles of N(0, 1),
normalised to [-1, 1], with an exact 0 and one more positive than negative value (QLoRA §3,
bitsandbytes `create_normal_map(0.9677083)`). Nearest-code rounding is done the bitsandbytes
way, by comparing x against the 15 midpoints m_k = (NF4[k] + NF4[k+1]) / 2 (fp32):
k = #{m : m < x}, so an x exactly on a midpoint goes to the lower code (torch.bucketize).

Double quantization (QLoRA §3, `compress_statistics=True` in bitsandbytes): the fp32 absmax
vector costs 32/64 = 0.5 bit per weight. It is centred and quantized again, to 8 bits:

    offset   = mean_b absmax_b                               (one fp32 scalar)
    c_b      = absmax_b - offset
    per block of B2 = 256 absmax values:  s_j = max_b |c_b|  (fp32, "absmax_scale")
    q_b      = nearest index into DYN (256 values, the signed "dynamic" 8-bit map of
               Dettmers 2015, bitsandbytes `create_dynamic_map(signed=True)`) of c_b / s_j
    absmax~_b = fl(fl(DYN[q_b] * s_j) + offset)              (two fp32 roundings, no FMA)

which costs 8/64 + 32/(64*256) = 0.127 bit per weight instead of 0.5.

Layout (what NF4Tensor holds, identical to bitsandbytes' `quantize_4bit(..., quant_type='nf4')`)
    packed     uint8 (ceil(n/2),): element 2j in the HIGH nibble of byte j, element 2j+1 in
               the LOW nibble (an odd n pads the last low nibble with code 7, i.e. 0.0). bitsandbytes
               returns the same bytes shaped (ceil(n/2), 1).
    absmax     fp32 (n_blocks,)                         -- without double quantization
    absmax_q   uint8 (n_blocks,), absmax_scale fp32 (ceil(n_blocks/256),),
    absmax_offset float                                 -- with double quantization

Cost per weight (dequantization, the op that runs every forward in QLoRA)
    FLOPs: 1 multiply (code * absmax); table lookups and nibble shifts are integer work.
           Double quantization adds 1 mul + 1 add per 64 weights.
    Bytes: read 0.5 (codes) + 4/64 (absmax) = 0.5625, or 0.5 + 1/64 + 4/16384 = 0.516 with
           double quantization; write 2 (bf16/fp16) or 4 (fp32).
    => ~0.4 FLOP/byte: purely memory bound; the roofline is the copy bandwidth, and the
       kernel's job is to read each byte once and write the output contiguously.
    Quantization (once, at load time): abs, max, mul, clamp, a 4-step binary search per weight.

Implementations
    quantize_nf4            plain torch (runs once per weight; no kernel needed): nf4_quant.py.
    dequantize_nf4_torch    plain torch reference.
    dequantize_nf4_triton   Triton: one program per tile of BLOCKS_PER_PROG quantization blocks;
                            the double-quantized absmax is dequantized inside the same kernel.
                            The whole blocks are one launch whose masks are per block, so the
                            packed bytes load as words/vectors (ld.global.v2.b32 at 4 warps, no
                            single-byte loads: benchmarks.aot checks the PTX); a partial last
                            block is a second, one-program launch with per-element masks. The
                            16 NF4 values are fp32 immediates in a 4-level select tree on the
                            code's bits (registers, no table in memory). num_warps (2/4/8) is
                            autotuned on the GPU per weight size, block size, format and dtype.
    dequantize_nf4          dispatch ("auto": Triton for CUDA tensors, torch for CPU).

Bit-exactness notes on dequantization (the quantizer's are in nf4_quant.py)
    * Dequantization is code * absmax in fp32, then one rounding to the output dtype, as in
      every bitsandbytes backend, so outputs are bit-identical for the same NF4Tensor. The
      Triton kernel is launched with enable_fp_fusion=False so that DYN[q] * s + offset is not
      contracted into an FMA (which would round once where bitsandbytes rounds twice).
    * bitsandbytes 0.50's CPU dequantize_4bit (AVX-512 C++ kernel) walks each row in chunks of
      blocksize and scales a chunk by the absmax of its first element, so it is wrong when
      blocks straddle rows (last dim even and not a multiple of
      the blocksize; an odd last dim falls back to its torch path, which is right), and it
      returns (1, n) for a 1-D shape (bitsandbytes issue #2047). Real weights have in_features
      a multiple of 64, where it is right; our reference indexes blocks over the flat tensor.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from paft_kernels import CompileSpec
from paft_kernels.utils import HAS_TRITON, check_backend, interpret_requested, tl, triton, triton_interpreted

# The 16 NF4 values, sorted, exactly as bitsandbytes hard-codes them (functional.get_4bit_type("nf4")).
# They are create_normal_map(offset=0.9677083): norm.ppf at 8 evenly spaced quantiles in
# [0.5, 0.9677] for the positive side, 7 for the negative side, plus 0, divided by the max.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# The 15 decision boundaries between neighbouring codes, in fp32 as bitsandbytes computes them.
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # (15,)

# Block sizes bitsandbytes accepts for 4-bit quantization (all powers of two, so the Triton
# kernel can tile a block as tl.arange(0, blocksize // 2) bytes).
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
LAUNCHES = {"triton": 0, "torch": 0}  # dequantizations per route (Triton: kernel launches), since import
DQ_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax vector in blocks of 256


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """The 8-bit "dynamic" map (Dettmers 2015, arXiv:1511.04561) used for double quantization.

    Same construction and the same fp32 arithmetic as bitsandbytes.functional.create_dynamic_map,
    so the 256 values are bit-identical: for exponent e = 0..6 (values 10^(e-6) * [0.1, 1)),
    the interval [0.1, 1] is cut into 2^e (signed) equal bins by an fp32 linspace, and the bin
    centres, scaled by 10^(e-6) (fp32 multiply), are the codes; +/- for the signed map; plus
    0 and 1. Sorted ascending: (256,) fp32, DYN[0] = -0.99297, DYN[127] = 0, DYN[255] = 1.
    More codes sit near 0 (relative precision ~ constant), which suits centred absmax values.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n_edges = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        edges = torch.linspace(0.1, 1, n_edges, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)  # python number times fp32 tensor: fp32 multiply
        data += (scale * centres).tolist()
        if signed:
            data += (-scale * centres).tolist()
    if additional_items > 0:  # zero for the default (7 exponent bits of 7 non-sign bits)
        edges = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        data += (scale * centres).tolist()
        if signed:
            data += (-scale * centres).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


DYNAMIC_CODE = create_dynamic_map(signed=True)  # (256,) fp32
# byte -> its two values in element order: row b = (NF4[b >> 4], NF4[b & 15]).
NF4_BYTE_TABLE = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=-1)  # (256, 2)

_TABLE_CACHE: dict[tuple[str, torch.device], Tensor] = {}


def code_table(name: str, device: torch.device) -> Tensor:
    """NF4_CODE / NF4_MIDPOINTS / DYNAMIC_CODE / NF4_BYTE_TABLE ("nf4", "mid", "dyn", "pair") on `device`,
    copied there once (the quantizer in nf4_quant.py uses them too)."""
    key = (name, torch.device(device))
    if key not in _TABLE_CACHE:
        src = {"nf4": NF4_CODE, "mid": NF4_MIDPOINTS, "dyn": DYNAMIC_CODE, "pair": NF4_BYTE_TABLE}[name]
        _TABLE_CACHE[key] = src.to(device)
    return _TABLE_CACHE[key]


@dataclass
class NF4Tensor:
    """A weight stored as NF4 codes plus per-block scales (plain container, not a tensor subclass).

    packed        uint8 (ceil(numel/2),): two 4-bit codes per byte, in row-major order of the
                  original tensor; element 2j is the HIGH nibble of byte j, element 2j+1 the LOW.
    shape, dtype  of the original weight (dequantization returns this by default).
    blocksize     quantization block (64): elements [b*64, (b+1)*64) share absmax[b].
    absmax        fp32 (n_blocks,), n_blocks = ceil(numel/blocksize); None if double-quantized.
    absmax_q      uint8 (n_blocks,): index into the 8-bit dynamic map, for double quantization.
    absmax_scale  fp32 (ceil(n_blocks/blocksize2),): the absmax of each block of 256 centred absmax.
    absmax_offset float: the mean of absmax, subtracted before the 8-bit quantization.
    blocksize2    256, the block of the second quantization.
    absmax_code   None = DYNAMIC_CODE; otherwise the (256,) fp32 map absmax_q indexes (kept only
                  when a bitsandbytes state carried a different map).

    dequantized absmax[b] = DYNAMIC_CODE[absmax_q[b]] * absmax_scale[b // 256] + absmax_offset.
    """

    packed: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax: Optional[Tensor] = None
    absmax_q: Optional[Tensor] = None
    absmax_scale: Optional[Tensor] = None
    absmax_offset: Optional[float] = None
    blocksize2: int = DQ_BLOCKSIZE
    absmax_code: Optional[Tensor] = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def numel(self) -> int:
        """Number of weights (an int property, unlike torch.Tensor.numel())."""
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def nbytes(self) -> int:
        """Bytes as stored: packed codes + per-tensor constants.

        Without double quantization: ceil(n/2) + 4 * n_blocks            (~0.5625 byte/weight)
        With:      ceil(n/2) + n_blocks + 4 * n_blocks2 + 4 (offset)     (~0.5157 byte/weight)
        The shared 16-entry NF4 table and 256-entry dynamic map are not counted (bitsandbytes
        also puts them in each state dict: + 64 and + 1024 bytes).
        """
        n = self.packed.numel() * self.packed.element_size()
        if self.double_quant:
            n += self.absmax_q.numel() * self.absmax_q.element_size()
            n += self.absmax_scale.numel() * self.absmax_scale.element_size()
            n += 4  # absmax_offset, an fp32 scalar
        else:
            n += self.absmax.numel() * self.absmax.element_size()
        return n

    def to(self, device) -> "NF4Tensor":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self, packed=move(self.packed), absmax=move(self.absmax), absmax_q=move(self.absmax_q),
            absmax_scale=move(self.absmax_scale), absmax_code=move(self.absmax_code),
        )


# ----------------------------------------------------------------------------------------------
# Dequantization: torch reference
# ----------------------------------------------------------------------------------------------

def dequantize_absmax(q: NF4Tensor) -> Tensor:
    """The fp32 per-block scales (n_blocks,), undoing double quantization if present."""
    if not q.double_quant:
        return q.absmax.float()
    code2 = q.absmax_code if q.absmax_code is not None else code_table("dyn", q.device)
    scale = q.absmax_scale.repeat_interleave(q.blocksize2)[: q.n_blocks]  # (n_blocks,)
    absmax = code2[q.absmax_q.long()] * scale  # one fp32 rounding ...
    return absmax + q.absmax_offset  # ... and a second one: exactly bitsandbytes' two ops


def dequantize_nf4_torch(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Reference: look up both nibbles of each byte, multiply by the block's absmax in fp32, cast.

    The lookup goes through a 256-entry table, byte -> (NF4[byte >> 4], NF4[byte & 15]), so one
    gather yields two outputs already in element order (high nibble first); on CPU this is ~2x
    faster than unpacking the nibbles into an int64 index tensor.
    """
    dtype = dtype or q.dtype
    n, bs = q.numel, q.blocksize
    vals = torch.index_select(code_table("pair", q.device), 0, q.packed.int())  # (ceil(n/2), 2) fp32
    vals = vals.view(-1)[:n]  # (n,) drops the padding nibble of an odd n
    absmax = dequantize_absmax(q)  # (n_blocks,)
    full = n - n % bs
    vals[:full].view(-1, bs).mul_(absmax[: full // bs].view(-1, 1))  # (n_full_blocks, bs) * (n_full_blocks, 1)
    if full < n:
        vals[full:].mul_(absmax[-1])  # the partial last block
    return vals.to(dtype).view(q.shape)


# ----------------------------------------------------------------------------------------------
# Dequantization: Triton
# ----------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _nf4_dequant_kernel(
        packed_ptr,  # uint8 (ceil(n/2),)
        absmax_ptr,  # fp32 (n_blocks,), or uint8 (n_blocks,) codes when DOUBLE_QUANT
        absmax_scale_ptr,  # fp32 (n_blocks2,), read only when DOUBLE_QUANT
        absmax_code_ptr,  # fp32 (256,) dynamic map, read only when DOUBLE_QUANT
        absmax_offset,  # fp32 scalar, used only when DOUBLE_QUANT
        out_ptr,  # (n,) output dtype
        numel,
        first_block,  # this launch's first quantization block (the tail launch starts past the full ones)
        n_blocks,  # blocks this launch covers, from first_block on
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        BLOCKS_PER_PROG: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        OUT_BF16: tl.constexpr,
        TAIL: tl.constexpr,  # the partial last block: masks per element; otherwise per block only
    ):
        # A program owns BLOCKS_PER_PROG whole quantization blocks: a 2-D tile whose rows are
        # blocks and whose columns are the block's bytes, so the scale is one load per row,
        # broadcast along the row, instead of one gather per element.
        pid = tl.program_id(0).to(tl.int64)  # int64: row * BLOCKSIZE overflows int32 past 2^31 weights
        local = pid * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)  # (R,) block index in this launch
        rows = first_block + local  # (R,) block ids
        row_mask = local < n_blocks

        if DOUBLE_QUANT:
            # Undo the second quantization here, not in a separate pass: it is 1 byte per 64
            # weights, and absmax_scale / the 256-entry map stay in cache across programs.
            qa = tl.load(absmax_ptr + rows, mask=row_mask, other=0).to(tl.int32)  # (R,)
            scale2 = tl.load(absmax_scale_ptr + rows // BLOCKSIZE2, mask=row_mask, other=0.0)  # (R,)
            absmax = tl.load(absmax_code_ptr + qa) * scale2  # (R,) launched with enable_fp_fusion=False:
            absmax = absmax + absmax_offset  # two roundings, like bitsandbytes' two torch ops
        else:
            absmax = tl.load(absmax_ptr + rows, mask=row_mask, other=0.0)  # (R,)

        HALF: tl.constexpr = BLOCKSIZE // 2  # bytes per block
        byte_offs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (R, HALF)
        out_offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # (R, BLOCKSIZE)
        if TAIL:  # one partial block: the last byte may hold a padding nibble, the outputs stop at numel
            b = tl.load(packed_ptr + byte_offs, mask=byte_offs < (numel + 1) // 2, other=0)  # (R, HALF) uint8
            out_mask = out_offs < numel
        else:
            # Whole blocks: the mask is constant along each row of HALF contiguous bytes (and of
            # BLOCKSIZE outputs), so the compiler keeps the 16-byte vector loads and stores
            # (ld.global.v4.b32); a byte-level mask would split them into single-byte loads.
            b = tl.load(packed_ptr + byte_offs, mask=row_mask[:, None], other=0)  # (R, HALF) uint8
            out_mask = row_mask[:, None]
        # Codes in element order: byte j holds element 2j in the high nibble, 2j+1 in the low one.
        # (tl.join + tl.reshape is tl.interleave spelled with builtins only: see _launchable_kernel.)
        code = tl.reshape(tl.join((b >> 4).to(tl.int32), (b & 0xF).to(tl.int32)), (BLOCKS_PER_PROG, BLOCKSIZE))
        # The 16-entry NF4 table in registers: a 4-level select tree on the code's bits, with the
        # values as fp32 immediates (exactly NF4_CODE; no memory access at all). 15 selects per
        # element; the kernel moves ~2.6 bytes per element, so this integer work hides under memory.
        b0 = (code & 1) != 0
        b1 = (code & 2) != 0
        b2 = (code & 4) != 0
        # index c = 8·b3 + 4·b2 + 2·b1 + b0; q0..q3 are the four quarters c = 0-3, 4-7, 8-11, 12-15
        q0 = tl.where(b1, tl.where(b0, -0.39491748809814453, -0.5250730514526367),
                      tl.where(b0, -0.6961928009986877, -1.0))
        q1 = tl.where(b1, tl.where(b0, 0.0, -0.09105003625154495),
                      tl.where(b0, -0.18477343022823334, -0.28444138169288635))
        q2 = tl.where(b1, tl.where(b0, 0.33791524171829224, 0.24611230194568634),
                      tl.where(b0, 0.16093020141124725, 0.07958029955625534))
        q3 = tl.where(b1, tl.where(b0, 1.0, 0.7229568362236023),
                      tl.where(b0, 0.5626170039176941, 0.44070982933044434))
        lo = tl.where(b2, q1, q0)
        hi = tl.where(b2, q3, q2)
        v = tl.where((code & 8) != 0, hi, lo) * absmax[:, None]  # (R, BLOCKSIZE) fp32
        if OUT_BF16:
            # fp32 -> bf16 round-to-nearest-even spelled out on the bits (add 0x7FFF plus the
            # lowest kept bit, drop 16 bits): what the GPU's cvt.rn does and what torch and
            # bitsandbytes do, but also correct under TRITON_INTERPRET, whose plain bf16 cast
            # truncates. A few integer ops per element are free in a memory-bound kernel.
            bits = v.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            v_out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            v_out = v.to(out_ptr.dtype.element_ty)  # fp32: no-op; fp16: round to nearest even
        tl.store(out_ptr + out_offs, v_out, mask=out_mask)

    # num_warps is tuned per (weight size, block size, double quant, output dtype) on the GPU
    # itself (the first call of each key times the three); the configs are the compile specs.
    WARPS = (2, 4, 8)
    _nf4_dequant_tuned = triton.autotune(
        configs=[triton.Config({}, num_warps=w) for w in WARPS],
        key=["n_blocks", "BLOCKSIZE", "DOUBLE_QUANT", "OUT_BF16"],
    )(_nf4_dequant_kernel) if not triton_interpreted() else None


def _launchable_kernel(on_cpu: bool):
    """The kernel object to launch. @triton.jit decides compiled vs interpreted when this module is
    imported (it reads TRITON_INTERPRET then); if the variable was set only afterwards, wrap the
    same Python function in the interpreter now, so import order does not matter for CPU tests."""
    kernel = _nf4_dequant_kernel
    if on_cpu:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(kernel, InterpretedFunction):  # this kernel object, whatever the environment says now
            global _INTERPRETED
            if _INTERPRETED is None:
                _INTERPRETED = InterpretedFunction(kernel.fn)
            kernel = _INTERPRETED
    return kernel


_INTERPRETED = None


def dequantize_nf4_triton(q: NF4Tensor, dtype: Optional[torch.dtype] = None, out: Optional[Tensor] = None,
                          blocks_per_prog: Optional[int] = None) -> Tensor:
    """Triton dequantization; `out` (contiguous, q.shape, dtype) is written in place if given."""
    if not HAS_TRITON:
        raise RuntimeError("dequantize_nf4_triton needs triton, which is not installed")
    on_cpu = q.device.type == "cpu"
    if on_cpu and not interpret_requested():
        raise RuntimeError(
            "the Triton NF4 kernel got CPU tensors: Triton runs on CPU only in its interpreter; "
            "set TRITON_INTERPRET=1, or use backend='torch' (the default for CPU tensors)")
    dtype = dtype or q.dtype
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != dtype or not out.is_contiguous() or out.device != q.device:
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(q.shape)} on {q.device}")
    n_blocks = q.n_blocks
    # ~2048 outputs per program: enough bytes in flight per SM without spilling registers.
    bpp = blocks_per_prog or max(1, 2048 // q.blocksize)
    if q.double_quant:
        absmax, absmax_scale, offset = q.absmax_q, q.absmax_scale, float(q.absmax_offset)
        absmax_code = q.absmax_code if q.absmax_code is not None else code_table("dyn", q.device)
    else:  # the unused pointers get any valid tensor; the constexpr branch never reads them
        absmax, absmax_scale, absmax_code, offset = q.absmax, q.absmax, q.absmax, 0.0
    consts = dict(BLOCKSIZE=q.blocksize, BLOCKSIZE2=q.blocksize2, BLOCKS_PER_PROG=bpp,
                  DOUBLE_QUANT=q.double_quant, OUT_BF16=dtype == torch.bfloat16)
    args = (q.packed, absmax, absmax_scale, absmax_code, offset, out, q.numel)
    n_full = q.numel // q.blocksize  # whole blocks: the vectorised launch; a partial last one: the tail launch
    if n_full:
        if on_cpu or _nf4_dequant_tuned is None:
            _launchable_kernel(on_cpu)[(triton.cdiv(n_full, bpp),)](
                *args, 0, n_full, **consts, TAIL=False, num_warps=4, enable_fp_fusion=False)
        else:
            _nf4_dequant_tuned[(triton.cdiv(n_full, bpp),)](*args, 0, n_full, **consts, TAIL=False,
                                                            enable_fp_fusion=False)
        LAUNCHES["triton"] += 1
    if n_full < n_blocks:
        consts["BLOCKS_PER_PROG"] = 1
        _launchable_kernel(on_cpu)[(1,)](*args, n_full, 1, **consts, TAIL=True, num_warps=4, enable_fp_fusion=False)
        LAUNCHES["triton"] += 1
    return out


def compile_specs():
    """Every config dequantize_nf4_triton launches on a GPU. QLoRA's block size 64: both absmax
    formats × the three output dtypes × the autotuned warps, and the tail launch (4 warps); the
    other block sizes bitsandbytes allows: bf16 output, double quantization, 4 warps."""
    if not HAS_TRITON:
        return []
    specs = []

    def spec(bs, dq, tname, warps, tail):
        sig = {"packed_ptr": "*u8", "absmax_ptr": "*u8" if dq else "*fp32", "absmax_scale_ptr": "*fp32",
               "absmax_code_ptr": "*fp32", "absmax_offset": "fp32", "out_ptr": "*" + tname, "numel": "i32",
               "first_block": "i32", "n_blocks": "i32"}
        bpp = 1 if tail else max(1, 2048 // bs)
        return CompileSpec(
            name=f"nf4_dequant[bs={bs},{'dq' if dq else 'fp32-absmax'},{tname},{'tail' if tail else f'R={bpp}'}]",
            fn=_nf4_dequant_kernel, signature=sig,
            constexprs=dict(BLOCKSIZE=bs, BLOCKSIZE2=DQ_BLOCKSIZE, BLOCKS_PER_PROG=bpp, DOUBLE_QUANT=dq,
                            OUT_BF16=tname == "bf16", TAIL=tail),
            num_warps=warps, num_stages=3, tags=dict(blocksize=bs, dtype=tname, enable_fp_fusion=False))

    for dq in (False, True):
        for tname in ("bf16", "fp16", "fp32"):
            specs += [spec(64, dq, tname, w, False) for w in WARPS]
            specs.append(spec(64, dq, tname, 4, True))
    specs += [spec(bs, True, "bf16", 4, False) for bs in VALID_BLOCKSIZES if bs != 64]
    return specs


def dequantize_nf4(q: NF4Tensor, dtype: Optional[torch.dtype] = None, backend: str = "auto") -> Tensor:
    """Dequantize to `dtype` (default: the original dtype). backend: "auto" | "triton" | "torch".

    "auto" runs the Triton kernel for CUDA tensors (when triton is installed) and the torch
    reference otherwise; "triton" on CPU tensors needs TRITON_INTERPRET=1 (the interpreter).
    """
    check_backend(backend)
    if backend == "auto":
        backend = "triton" if (q.device.type == "cuda" and HAS_TRITON) else "torch"
    if backend == "torch":
        LAUNCHES["torch"] += 1
        return dequantize_nf4_torch(q, dtype)
    return dequantize_nf4_triton(q, dtype)
