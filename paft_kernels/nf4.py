"""NF4 (4-bit NormalFloat) blockwise quantization, with optional double quantization.

The storage format of QLoRA (Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs", arXiv:2305.14314), byte for byte as bitsandbytes stores it, so a
weight quantized here dequantizes in bitsandbytes and the other way round (see to_bnb / from_bnb).

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
    quantize_nf4            plain torch (runs once per weight; no kernel needed).
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

Bit-exactness notes (checked against bitsandbytes 0.50.2 on CPU in tests/test_nf4.py)
    * The 4-bit codes and bytes are identical to bitsandbytes' quantize_4bit on CPU (its torch
      "default" backend): full blocks are scaled by the fp32 reciprocal, w * (1/absmax), the
      last partial block is divided, w / absmax (x / a and x * (1/a) can differ in the last
      bit); all-zero blocks store absmax 0 (full block) or 1e-38 (partial block), as there.
      bitsandbytes' CUDA quantizer (dQuantizeNF4 in csrc/kernels.cu) hard-codes the midpoints
      as float literals with the same strict `x > m` test; the 11 literals we checked are these
      fp32 midpoints exactly, so ties agree. It scales a partial last block by the reciprocal
      too, so there a value one ulp from a midpoint could round differently (not checked on a
      GPU).
    * The 8-bit absmax codes use the same recipe (reciprocal scaling, nearest code by midpoints,
      ties down), which is bitsandbytes' torch fallback. Its C++ CPU quantizer (used on CPU)
      is not exactly nearest: it picks the farther neighbour for values within ~1e-5 of a
      midpoint and is coarser still right next to 0 (measured: ~0.2% of absmax codes on
      randn weights). The scales, offset and format are identical, so each library
      dequantizes the other's output; only those few absmax_q bytes can differ.
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
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from paft_kernels import is_interpreted

try:  # Triton is optional: the torch path below is the reference and runs everywhere.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

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


def _table(name: str, device: torch.device) -> Tensor:
    """NF4_CODE / NF4_MIDPOINTS / DYNAMIC_CODE on `device`, copied there once."""
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
# Quantization (plain torch)
# ----------------------------------------------------------------------------------------------

def _blockwise_absmax_scaled(x: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """x (n,) fp32 -> (absmax (n_blocks,), x scaled into [-1, 1] (n,)), bitsandbytes' arithmetic."""
    n = x.numel()
    rem = n % blocksize
    full = n - rem
    x_full = x[:full].view(-1, blocksize)  # (n_full_blocks, blocksize)
    absmax = x_full.abs().amax(dim=1) if full else x.new_empty(0)  # (n_full_blocks,)
    # Multiply by the fp32 reciprocal (as bitsandbytes and its CUDA kernel do); clamp the
    # divisor so an all-zero block gives codes for 0 instead of NaN, but store absmax = 0.
    scaled = torch.clamp(x_full * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).reshape(-1)
    if rem:
        # bitsandbytes' torch path divides the trailing partial block (and stores the clamped
        # absmax); x / a and x * (1/a) can differ in the last bit, so we copy it exactly.
        am = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.view(1)])
        scaled = torch.cat([scaled, torch.clamp(x[full:] / am, -1, 1)])
    return absmax, scaled


def _quantize_blockwise_8bit(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization of a small fp32 vector (the centred absmax) against `code`.

    The same recipe as the 4-bit path (and bitsandbytes' torch quantize_blockwise): scale by the
    block absmax, then nearest code by midpoints, ties to the lower code. Blocks are 256 long:
    n is tiny (n_blocks of the weight), so this runs once per weight and costs nothing.
    Returns (q uint8 (n,), absmax fp32 (ceil(n/blocksize),)).
    """
    absmax, scaled = _blockwise_absmax_scaled(x, blocksize)  # (n_blocks2,), (n,)
    midpoints = (code[:-1] + code[1:]) / 2  # (255,)
    q = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)  # (n,)
    # A block of exact zeros (every absmax equal, e.g. a tensor of one block) is 0/0 in
    # bitsandbytes' C++ and CUDA quantizers: they store scale 0 and code 0. Do the same (it
    # dequantizes to DYN[0] * 0 + offset = offset, as any code would).
    zero = absmax <= 1e-38  # (n_blocks2,) only an all-zero block has absmax 0 (or 1e-38 if partial)
    if zero.any():
        absmax = torch.where(zero, 0.0, absmax)
        q = torch.where(zero.repeat_interleave(blocksize)[: q.numel()], 0, q).to(torch.uint8)
    return q, absmax


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize w (fp32/bf16/fp16, any shape) to NF4; same bytes as bitsandbytes.quantize_4bit."""
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_nf4 takes fp32/bf16/fp16 weights, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    x = w.detach().reshape(-1).float()  # (n,) fp32: bf16/fp16 inputs convert exactly
    absmax, scaled = _blockwise_absmax_scaled(x, blocksize)  # (n_blocks,), (n,)

    # Nearest code by counting the midpoints strictly below x (ties -> lower code), as bitsandbytes.
    codes = torch.bucketize(scaled, _table("mid", x.device), out_int32=True).to(torch.uint8)  # (n,)
    if codes.numel() % 2:
        # bitsandbytes pads the scaled values with 0.0, so the spare low nibble holds code 7 (= 0.0)
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    packed = (codes[0::2] << 4) | codes[1::2]  # (ceil(n/2),) even element -> high nibble

    q = NF4Tensor(packed=packed, shape=torch.Size(w.shape), dtype=w.dtype, blocksize=blocksize)
    if not double_quant:
        q.absmax = absmax
        return q
    offset = absmax.mean()  # fp32 0-dim, the same reduction bitsandbytes runs
    absmax_q, absmax_scale = _quantize_blockwise_8bit(absmax - offset, _table("dyn", x.device), DQ_BLOCKSIZE)
    q.absmax_q, q.absmax_scale, q.absmax_offset = absmax_q, absmax_scale, float(offset.item())
    return q


# ----------------------------------------------------------------------------------------------
# Dequantization: torch reference
# ----------------------------------------------------------------------------------------------

def dequantize_absmax(q: NF4Tensor) -> Tensor:
    """The fp32 per-block scales (n_blocks,), undoing double quantization if present."""
    if not q.double_quant:
        return q.absmax.float()
    code2 = q.absmax_code if q.absmax_code is not None else _table("dyn", q.device)
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
    vals = torch.index_select(_table("pair", q.device), 0, q.packed.int())  # (ceil(n/2), 2) fp32
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
    )(_nf4_dequant_kernel) if not is_interpreted(_nf4_dequant_kernel) else None


def _launchable_kernel(on_cpu: bool):
    """The kernel object to launch. @triton.jit decides compiled vs interpreted when this module is
    imported (it reads TRITON_INTERPRET then); if the variable was set only afterwards, wrap the
    same Python function in the interpreter now, so import order does not matter for CPU tests."""
    kernel = _nf4_dequant_kernel
    if on_cpu:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(kernel, InterpretedFunction):
            global _INTERPRETED
            if _INTERPRETED is None:
                _INTERPRETED = InterpretedFunction(kernel.fn)
            kernel = _INTERPRETED
    return kernel


_INTERPRETED = None


def _interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dequantize_nf4_triton(q: NF4Tensor, dtype: Optional[torch.dtype] = None, out: Optional[Tensor] = None,
                          blocks_per_prog: Optional[int] = None) -> Tensor:
    """Triton dequantization; `out` (contiguous, q.shape, dtype) is written in place if given."""
    if not HAS_TRITON:
        raise RuntimeError("dequantize_nf4_triton needs triton, which is not installed")
    on_cpu = q.device.type == "cpu"
    if on_cpu and not _interpret_enabled():
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
        absmax_code = q.absmax_code if q.absmax_code is not None else _table("dyn", q.device)
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
    from paft_kernels import CompileSpec
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
    if backend == "auto":
        backend = "triton" if (q.device.type == "cuda" and HAS_TRITON) else "torch"
    if backend == "torch":
        LAUNCHES["torch"] += 1
        return dequantize_nf4_torch(q, dtype)
    if backend == "triton":
        return dequantize_nf4_triton(q, dtype)
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


# ----------------------------------------------------------------------------------------------
# Interop with bitsandbytes (imported here only, so this module works without it)
# ----------------------------------------------------------------------------------------------

def to_bnb(q: NF4Tensor):
    """-> (packed (ceil(n/2), 1) uint8, bitsandbytes QuantState) for bitsandbytes.functional.dequantize_4bit."""
    from bitsandbytes.functional import QuantState

    code = _table("nf4", q.device).clone()
    packed = q.packed.view(-1, 1)  # bitsandbytes' Params4bit shape
    if not q.double_quant:
        state = QuantState(absmax=q.absmax, shape=q.shape, code=code, blocksize=q.blocksize,
                           quant_type="nf4", dtype=q.dtype)
        return packed, state
    code2 = q.absmax_code if q.absmax_code is not None else _table("dyn", q.device)
    state2 = QuantState(absmax=q.absmax_scale, code=code2.clone(), blocksize=q.blocksize2, dtype=torch.float32)
    state = QuantState(absmax=q.absmax_q, shape=q.shape, code=code, blocksize=q.blocksize, quant_type="nf4",
                       dtype=q.dtype, offset=torch.tensor(q.absmax_offset, dtype=torch.float32, device=q.device),
                       state2=state2)
    return packed, state


def from_bnb(packed: Tensor, quant_state) -> NF4Tensor:
    """bitsandbytes (packed, QuantState) from quantize_4bit(quant_type='nf4') -> NF4Tensor (shares storage)."""
    qs = quant_state
    if qs.quant_type != "nf4":
        raise ValueError(f"only NF4 is supported, got quant_type={qs.quant_type!r}")
    if qs.code is not None and not torch.equal(qs.code.float().cpu(), NF4_CODE):
        raise ValueError("quant_state.code is not the standard NF4 table")
    q = NF4Tensor(packed=packed.contiguous().view(torch.uint8).reshape(-1), shape=torch.Size(qs.shape),
                  dtype=qs.dtype, blocksize=qs.blocksize)
    if not qs.nested:
        q.absmax = qs.absmax.float()
        return q
    q.absmax_q = qs.absmax
    q.absmax_scale = qs.state2.absmax.float()
    q.absmax_offset = float(qs.offset)
    q.blocksize2 = qs.state2.blocksize
    if not torch.equal(qs.state2.code.float().cpu(), DYNAMIC_CODE):
        q.absmax_code = qs.state2.code.float()  # e.g. a map from an older bitsandbytes
    return q
