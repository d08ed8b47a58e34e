"""NF4 quantization (paft_kernels/nf4.py) against bitsandbytes, and the Triton kernel against
the torch reference.

bitsandbytes facts these tests pin down (0.50.2, CPU):
  * quantize_4bit(nf4) on CPU runs bitsandbytes' torch "default" op: our bytes must be identical.
  * its CPU dequantize_4bit (AVX-512 C++) scales per row in chunks of `blocksize`, which is
    wrong when a block straddles two rows (last dim even and not a multiple of the blocksize),
    and returns (1, n) for 1-D shapes. Cross-library comparisons therefore use shapes where it
    is right (last dim a multiple of 64, or odd: that goes to its torch fallback, or 1-D,
    compared flat).
  * its C++ 8-bit quantizer (the double-quantized absmax) is not exactly nearest-code near
    midpoints: absmax_q may differ in a few bytes, never the scales, the offset or the format.

Triton under the interpreter: @triton.jit reads TRITON_INTERPRET when a kernel is decorated,
and triton.language's own @jit helpers (tl.interleave, ...) are decided at `import triton`
(which `import bitsandbytes` already does). Setting the variable at the top of this module is
therefore not reliable inside a pytest session, and would also push other test modules' kernels
into the interpreter on a GPU machine. So the kernel tests run in a subprocess started with
TRITON_INTERPRET=1; one in-process test checks that nf4's dispatch still works when the variable
is set only after import (its kernel uses builtins only and is wrapped lazily).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from paft_kernels import nf4
from paft_kernels.nf4 import (
    DYNAMIC_CODE,
    NF4_CODE,
    NF4Tensor,
    dequantize_nf4,
    dequantize_nf4_torch,
)
from paft_kernels.nf4_quant import from_bnb, quantize_nf4, to_bnb
from paft_kernels.utils import HAS_TRITON

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Shapes where bitsandbytes' own CPU dequantization is correct (see the module docstring);
# numel is not a multiple of 64 for all but two of them.
BNB_SAFE_SHAPES = [(64,), (1000,), (7, 33), (33, 17), (5, 4097), (16, 192), (130, 64), (1, 1), (3,)]


def bnb_F():
    import bitsandbytes.functional as F  # in the test extras (setup.py): a missing install fails, never skips

    return F


def bnb_dequant(F, packed, state, out_dtype):
    state.dtype = out_dtype
    return F.dequantize_4bit(packed, state, quant_type="nf4").reshape(state.shape)


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def test_code_tables_are_bitsandbytes_tables():
    F = bnb_F()
    assert torch.equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, F.create_dynamic_map(signed=True))
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[15] == 1
    assert DYNAMIC_CODE.numel() == 256 and torch.all(DYNAMIC_CODE[1:] > DYNAMIC_CODE[:-1])


# ------------------------------------------------------------------------------------------------
# Quantization: identical bytes and scales
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64,), (1000,), (7, 33), (3, 100), (128, 96), (5, 4097), (2, 3, 64)])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_packed_bytes_and_absmax_identical_to_bnb(shape, dtype, blocksize):
    F = bnb_F()
    w = torch.randn(shape, dtype=dtype)
    q = quantize_nf4(w, blocksize=blocksize)
    packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == ((w.numel() + 1) // 2,)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)
    assert q.shape == w.shape and q.dtype == dtype and q.n_blocks == -(-w.numel() // blocksize)


def test_nibble_order_even_element_in_high_nibble():
    # Codes by hand: w = NF4 values themselves (absmax 1), so element i gets code i.
    w = NF4_CODE.clone()  # (16,)
    q = quantize_nf4(w)
    assert q.packed.tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    # Odd numel: the spare low nibble holds code 7 (0.0), as bitsandbytes pads with 0.0.
    assert quantize_nf4(NF4_CODE[:3]).packed.tolist() == [0x01, 0x27]


def test_ties_and_exact_values_round_like_bnb():
    F = bnb_F()
    mid = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # (15,) fp32
    below = torch.nextafter(mid, torch.tensor(-2.0))
    above = torch.nextafter(mid, torch.tensor(2.0))
    # A leading 1.0 makes absmax 1, so the scaled values are these exact fp32 numbers.
    body = torch.cat([NF4_CODE, mid, below, above, -NF4_CODE, torch.zeros(3)])
    w = torch.cat([torch.ones(1), body, torch.zeros(64 - (1 + body.numel()) % 64)])  # whole blocks
    q = quantize_nf4(w)
    packed, _ = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(q.packed, packed.view(-1))
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], -1).reshape(-1)[: w.numel()].long()
    assert torch.equal(codes[1:17], torch.arange(16))  # exact code values map to themselves
    assert torch.equal(codes[17:32], torch.arange(15))  # on a midpoint: the lower code


def test_zero_blocks_like_bnb():
    F = bnb_F()
    w = torch.zeros(200)
    w[64:128] = torch.randn(64)  # blocks 0 and 2 all zero, block 3 partial and zero
    q = quantize_nf4(w)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
    assert q.absmax[0] == 0 and q.absmax[3] == pytest.approx(1e-38)  # full block 0; partial block clamped
    assert torch.equal(dequantize_nf4_torch(q)[[*range(64), *range(128, 200)]], torch.zeros(136))


# ------------------------------------------------------------------------------------------------
# Round trip: same error, same codes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1000,), (33, 17), (256, 256), (5, 4097), (64, 192)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_roundtrip_error_equals_bnb(shape, double_quant):
    F = bnb_F()
    torch.manual_seed(hash(shape) % 1000)
    w = torch.randn(shape)
    ours = dequantize_nf4_torch(quantize_nf4(w, double_quant=double_quant))
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    theirs = bnb_dequant(F, packed, state, torch.float32)
    err_ours, err_theirs = (ours - w).abs().mean().item(), (theirs - w).abs().mean().item()
    if not double_quant:
        assert abs(err_ours - err_theirs) < 1e-7
        assert torch.equal(ours, theirs)  # same codes, same scales, same arithmetic
    else:
        # Same 4-bit codes, but bitsandbytes' C++ CPU absmax quantizer rounds a few absmax_q to
        # the farther of two neighbouring 8-bit codes (test_double_quant_state_matches_bnb); one
        # such block moves the mean error by ~1e-6. Not a format difference: see the bit-exact
        # cross-library test.
        assert abs(err_ours - err_theirs) < 1e-4 * err_theirs
    # A sanity level for NF4 on N(0,1) weights (blockwise absmax ~2.4): ~0.1 mean abs error.
    assert 0.05 < err_ours < 0.15


# ------------------------------------------------------------------------------------------------
# Cross-library dequantization, bit for bit
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", BNB_SAFE_SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_cross_library_dequantization_bit_exact(shape, double_quant, in_dtype):
    F = bnb_F()
    w = torch.randn(shape, dtype=in_dtype) * 0.02
    for out_dtype in DTYPES:
        # ours -> bitsandbytes
        q = quantize_nf4(w, double_quant=double_quant)
        packed, state = to_bnb(q)
        assert torch.equal(bnb_dequant(F, packed, state, out_dtype), dequantize_nf4_torch(q, out_dtype))
        # bitsandbytes -> ours
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        q2 = from_bnb(packed, state)
        assert q2.double_quant == double_quant and q2.dtype == in_dtype
        assert torch.equal(dequantize_nf4_torch(q2, out_dtype), bnb_dequant(F, packed, state, out_dtype))


def test_from_bnb_accepts_a_nonstandard_absmax_map():
    # An older bitsandbytes on CPU stored the dynamic map with code[0] forced to -1.0.
    F = bnb_F()
    w = torch.randn(64 * 300)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    state.state2.code = state.state2.code.clone()
    state.state2.code[0] = -1.0
    state.absmax[0] = 0  # make sure the changed entry is used
    q = from_bnb(packed, state)
    assert q.absmax_code is not None
    assert torch.equal(dequantize_nf4_torch(q), bnb_dequant(F, packed, state, torch.float32))


def test_double_quant_state_matches_bnb():
    F = bnb_F()
    w = torch.randn(1024, 512)  # 8192 blocks -> 32 blocks of 256 absmax values
    q = quantize_nf4(w, double_quant=True)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.packed, packed.view(-1))
    assert q.absmax_offset == state.offset.item()  # the same fp32 mean
    assert torch.equal(q.absmax_scale, state.state2.absmax)
    assert q.blocksize2 == state.state2.blocksize == 256
    # absmax_q: ours is the nearest code (ties down); bitsandbytes' C++ CPU search is off near
    # some midpoints. Where they differ, ours must be at least as close to the centred absmax.
    absmax = quantize_nf4(w).absmax
    centred = absmax - state.offset
    x = centred / q.absmax_scale.repeat_interleave(256)[: centred.numel()]
    diff = q.absmax_q != state.absmax
    assert diff.float().mean() < 0.01
    ours_err = (x - DYNAMIC_CODE[q.absmax_q.long()]).abs()
    theirs_err = (x - DYNAMIC_CODE[state.absmax.long()]).abs()
    assert torch.all(ours_err[diff] <= theirs_err[diff])
    # Double quantization costs little: dequantized absmax within ~1% of the fp32 one.
    assert ((nf4.dequantize_absmax(q) - absmax).abs() / absmax).max() < 0.01


def test_bnb_dequant_agrees_on_flat_view_of_row_straddling_shape():
    # (7, 32): blocks of 64 straddle rows. bitsandbytes' CPU kernel is wrong on this 2-D shape
    # (see module docstring); on the same bytes viewed 1-D it is right, and so are we on both.
    F = bnb_F()
    w = torch.randn(7, 32)
    q = quantize_nf4(w)
    flat = NF4Tensor(packed=q.packed, shape=torch.Size([224]), dtype=q.dtype, absmax=q.absmax)
    packed, state = to_bnb(flat)
    assert torch.equal(dequantize_nf4_torch(q).reshape(-1), bnb_dequant(F, packed, state, torch.float32))


# ------------------------------------------------------------------------------------------------
# Container
# ------------------------------------------------------------------------------------------------

def test_nbytes_formula():
    w = torch.randn(1024, 2048)  # 32768 blocks, 128 blocks of 256 absmax values
    n = w.numel()
    q = quantize_nf4(w)
    assert q.nbytes() == n // 2 + 4 * (n // 64)
    assert q.nbytes() / n == pytest.approx(0.5 + 4 / 64)  # 4.5 bits per weight
    qd = quantize_nf4(w, double_quant=True)
    assert qd.nbytes() == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert qd.nbytes() / n == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-5)  # ~4.127 bits
    # Odd sizes: the partial block and the half-used last byte count as whole ones.
    q3 = quantize_nf4(torch.randn(7, 33))
    assert q3.nbytes() == 116 + 4 * 4


def test_to_device_and_dispatch_on_cpu(monkeypatch):
    w = torch.randn(3, 100)
    for dq in (False, True):
        q = quantize_nf4(w, double_quant=dq)
        q2 = q.to("cpu")
        assert isinstance(q2, NF4Tensor) and q2.device.type == "cpu" and q2.double_quant == dq
        ref = dequantize_nf4_torch(q)
        assert torch.equal(dequantize_nf4(q2), ref)  # auto -> torch on CPU
        assert torch.equal(dequantize_nf4(q2, backend="torch"), ref)
        assert ref.dtype == torch.float32 and dequantize_nf4(q, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="backend"):
        dequantize_nf4(q, backend="cuda")
    if HAS_TRITON:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            dequantize_nf4(q, backend="triton")


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError):
        quantize_nf4(torch.arange(64))


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, **env}, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_module_imports_without_bitsandbytes():
    # Without bitsandbytes: quantizing and dequantizing still work, and only the bitsandbytes
    # bridge fails, with an ImportError (the script prints the outcome; the test asserts on it).
    res = _run_python("""
        import sys
        sys.modules["bitsandbytes"] = None  # any `import bitsandbytes` now fails
        import torch
        from paft_kernels import nf4, nf4_quant
        x = torch.randn(100)
        q = nf4_quant.quantize_nf4(x, double_quant=True)
        y = nf4.dequantize_nf4(q)
        assert y.shape == (100,) and (y - x).abs().max() < 0.2 * x.abs().max(), "NF4 round trip is off"
        try:
            nf4_quant.to_bnb(q)
        except ImportError as e:
            print("to_bnb: ImportError", "bitsandbytes" in str(e))
        else:
            print("to_bnb: ran without bitsandbytes")
    """)
    assert res.stdout.strip().splitlines()[-1] == "to_bnb: ImportError True", res.stdout + res.stderr


# ------------------------------------------------------------------------------------------------
# Triton kernel == torch reference (interpreter, in a subprocess started with TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------------

def test_triton_matches_torch_reference_interpreted():
    pytest.importorskip("triton")
    res = _run_python("""
        import torch
        from paft_kernels import nf4, nf4_quant
        from triton.runtime.interpreter import InterpretedFunction
        assert isinstance(nf4._nf4_dequant_kernel, InterpretedFunction)
        import random
        seed = random.SystemRandom().randrange(2 ** 31)  # fresh inputs each run; printed on failure
        torch.manual_seed(seed)
        cases = 0
        # numel not a multiple of 64 or 256*64; 16389 and 3*5557 give n_blocks > 256, so more
        # than one absmax_scale block; blocksize 128 and tiles of 1, 4 and 32 blocks.
        for shape, bs, bpp in [((7, 33), 64, 4), ((130,), 64, 1), ((1,), 64, 32), ((16389,), 64, 32),
                               ((3, 5557), 64, 8), ((5, 300), 128, 2), ((64, 64), 64, None)]:
            for dq in (False, True):
                w = torch.randn(shape) * 0.05
                q = nf4_quant.quantize_nf4(w, blocksize=bs, double_quant=dq)
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    out = torch.full(shape, float("nan"), dtype=dtype)  # poisoned: unwritten -> NaN
                    before = nf4.LAUNCHES["triton"]
                    got = nf4.dequantize_nf4_triton(q, dtype, out=out, blocks_per_prog=bpp)
                    ref = nf4.dequantize_nf4_torch(q, dtype)
                    assert got is out and not torch.isnan(got).any(), (seed, shape, dq, dtype)
                    assert torch.equal(got, ref), (seed, shape, dq, dtype, (got.float() - ref.float()).abs().max())
                    # whole blocks in one launch, a partial last block in a second one
                    n = q.numel
                    expect = int(n >= bs) + int(n % bs != 0)
                    assert nf4.LAUNCHES["triton"] - before == expect, (shape, bs, nf4.LAUNCHES["triton"] - before)
                    cases += 1
        # dispatch: backend="triton" on CPU runs the interpreter; "auto" stays on torch for CPU
        q = nf4_quant.quantize_nf4(torch.randn(3, 100), double_quant=True)
        assert torch.equal(nf4.dequantize_nf4(q, torch.bfloat16, backend="triton"),
                           nf4.dequantize_nf4(q, torch.bfloat16, backend="auto"))
        print("cases", cases)
    """, TRITON_INTERPRET="1")
    assert "cases 42" in res.stdout


def test_triton_interpreter_enabled_after_import(monkeypatch):
    # The variable set only now (nf4 and triton already imported without it): the dispatch wraps
    # the kernel's Python function in the interpreter itself.
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = quantize_nf4(torch.randn(5, 77), double_quant=True)
    out = torch.full((5, 77), float("nan"), dtype=torch.bfloat16)
    got = nf4.dequantize_nf4_triton(q, torch.bfloat16, out=out)
    assert torch.equal(got, dequantize_nf4_torch(q, torch.bfloat16))
