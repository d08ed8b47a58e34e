"""NF4 quantization (plain torch: it runs once per weight, at load time) and the bridge to bitsandbytes.

The format, its math and its dequantization are paft_kernels/nf4.py. Per block b of B consecutive
elements of the flattened weight w:

    absmax_b = max_i |w_i|                                  (fp32)
    x_i      = clamp(w_i * (1 / absmax_b), -1, 1)           (fp32; in [-1, 1])
    k_i      = #{m : m < x_i},  m the 15 NF4 midpoints      (4-bit code: the nearest, ties to the lower)

and with double quantization the centred absmax vector likewise to 8 bits, against the dynamic map,
in blocks of B2 = 256.

Bit-exactness notes on quantization (checked against bitsandbytes 0.50.2 on CPU in tests/test_nf4.py)
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

to_bnb / from_bnb turn an NF4Tensor into bitsandbytes' (packed, QuantState) and back, sharing
storage; bitsandbytes is imported there only, so everything else works without it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from paft_kernels.nf4 import DQ_BLOCKSIZE, DYNAMIC_CODE, NF4_CODE, VALID_BLOCKSIZES, NF4Tensor, code_table


def compile_specs() -> list:
    """No Triton kernels in this module (paft_kernels/nf4.py lists the dequantization kernel's specs)."""
    return []


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
    codes = torch.bucketize(scaled, code_table("mid", x.device), out_int32=True).to(torch.uint8)  # (n,)
    if codes.numel() % 2:
        # bitsandbytes pads the scaled values with 0.0, so the spare low nibble holds code 7 (= 0.0)
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    packed = (codes[0::2] << 4) | codes[1::2]  # (ceil(n/2),) even element -> high nibble

    q = NF4Tensor(packed=packed, shape=torch.Size(w.shape), dtype=w.dtype, blocksize=blocksize)
    if not double_quant:
        q.absmax = absmax
        return q
    offset = absmax.mean()  # fp32 0-dim, the same reduction bitsandbytes runs
    absmax_q, absmax_scale = _quantize_blockwise_8bit(absmax - offset, code_table("dyn", x.device), DQ_BLOCKSIZE)
    q.absmax_q, q.absmax_scale, q.absmax_offset = absmax_q, absmax_scale, float(offset.item())
    return q


# ----------------------------------------------------------------------------------------------
# Interop with bitsandbytes (imported here only, so this module works without it)
# ----------------------------------------------------------------------------------------------

def to_bnb(q: NF4Tensor):
    """-> (packed (ceil(n/2), 1) uint8, bitsandbytes QuantState) for bitsandbytes.functional.dequantize_4bit."""
    from bitsandbytes.functional import QuantState

    code = code_table("nf4", q.device).clone()
    packed = q.packed.view(-1, 1)  # bitsandbytes' Params4bit shape
    if not q.double_quant:
        state = QuantState(absmax=q.absmax, shape=q.shape, code=code, blocksize=q.blocksize,
                           quant_type="nf4", dtype=q.dtype)
        return packed, state
    code2 = q.absmax_code if q.absmax_code is not None else code_table("dyn", q.device)
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
