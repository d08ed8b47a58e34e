"""QLoRA (Dettmers et al. 2023): LoRA on a base model whose frozen linear weights are stored in 4 bits.

LoRA trains only A and B, so the frozen weight W never needs a gradient or optimizer state;
it only has to be *read* in forward and backward. QLoRA stores it as NF4 (4-bit NormalFloat,
paft_kernels.nf4) and turns it back into a float matrix just in time:

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ        W = dequant(NF4(W₀)) in the compute dtype
                                                (bf16 on GPU, x's dtype = fp32 on CPU)

Memory of the frozen weights, per weight (blocks of 64 weights share one absmax scale c):

    bf16                      2 bytes
    NF4                       0.5 + 4/64               = 0.5625 bytes   (one fp32 c per block)
    NF4 + double quant        0.5 + 1/64 + 4/(64·256)  ≈ 0.5159 bytes   (c stored as 8-bit codes,
                                                                          one fp32 scale per 256 c)

so a 135M-parameter model's linear layers shrink from ~2 bytes to ~0.52 bytes a weight (3.9×).
The embedding and the LM head are not quantized (QLoRA keeps them too): they are lookups or
the output projection, and a tied head shares its matrix with the embedding.

The saving must also hold during training. Autograd normally keeps what a layer's backward
needs until backward runs; for y = x Wᵀ that would be the dequantized W of every layer at
once, which is the bf16 model again. The base matmul is therefore a custom autograd.Function
that keeps only a reference to the NF4 weight (which the module holds anyway) and
dequantizes W a second time in backward:

    forward:   W = dequant(q);  y = x Wᵀ;  drop W
    backward:  W = dequant(q);  dx = dy W;  drop W          (no dW: the base is frozen,
                                                             so x need not be kept either)

One dequantized matrix exists at a time, for one layer, at the price of a second
dequantization per layer and step (cheap next to the matmuls). One limit of this engine: the
model is loaded in its dtype first and quantized layer by layer afterwards, so the peak while
loading is still the full-precision model; the steady state during training is NF4.

Every linear layer but the head is quantized: the targeted ones become QLoRALinear (NF4 base +
LoRA factors), the rest NF4Linear (NF4 base alone), as QLoRA does: `apply_qlora`
(`apply_adapter` picks it when `lora.quantize_base: nf4`). A trained adapter is a plain peft LoRA adapter; `python -m
engine.export` merges it into a full-precision model (see there for the choice of base).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from paft_kernels.lora_linear import lora_linear
from paft_kernels.nf4 import NF4Tensor, dequantize_nf4
from paft_kernels.nf4_quant import quantize_nf4
from engine.lora import LoRALinear, apply_lora, lora_parameters
from engine.recipe import LoRAConfig

BLOCKSIZE = 64  # weights per absmax scale, as in QLoRA


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmul runs in: autocast's (bf16 on GPU) when it is on, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _NF4Matmul(torch.autograd.Function):
    """y = x Wᵀ with W = dequant(q); backward dequantizes W again for dx = dy W. W gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        dtype = _compute_dtype(x)
        # Keep a reference to the 4-bit weight, not the float one: q belongs to the module and
        # lives as long as it does, so this costs no memory. Nothing goes to save_for_backward.
        ctx.q, ctx.x_dtype = q, x.dtype
        W = dequantize_nf4(q, dtype=dtype)  # (out, in), freed when forward returns
        return F.linear(x.to(dtype), W)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # dy (..., out)
        if not ctx.needs_input_grad[0]:
            return None, None
        W = dequantize_nf4(ctx.q, dtype=dy.dtype)  # (out, in), the same values as in forward
        return (dy @ W).to(ctx.x_dtype), None  # dx = dy W: (..., out) @ (out, in)


class NF4Linear(nn.Module):
    """A frozen nn.Linear with its weight stored as NF4: y = x dequant(q)ᵀ + b.

    The weight is an NF4Tensor attribute, not a Parameter or buffer: it has no gradient, is not
    in state_dict() (runs save adapters, never the base), and `_apply` moves it between devices
    whole. (Registering its tensors as buffers would also move them, but `model.to(bf16)` or
    `.half()` would then cast the fp32 scales, changing W; this way only the device changes.)
    The bias, if any, stays a frozen Parameter in its dtype.
    """

    frozen_linear = True  # engine.lora counts it among the linear layers when it names an adapter's targets

    def __init__(self, linear: nn.Linear, double_quant: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = quantize_nf4(linear.weight.detach(), blocksize=BLOCKSIZE, double_quant=double_quant)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, in) -> (B, T, out)
        y = _NF4Matmul.apply(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse=True):
        # Module.to / .cuda / .cpu call fn on every parameter and buffer. Learn where fn sends
        # tensors from an empty probe on the weight's device, and move the NF4 weight there.
        self.weight = self.weight.to(fn(torch.empty(0, device=self.weight.device)).device)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.weight.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nf4 blocksize={self.weight.blocksize}{dq}")


class QLoRALinear(LoRALinear):
    """LoRALinear whose frozen base is an NF4Linear: y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ, W in NF4.

    A subclass because that is the least code: engine.lora's helpers (lora_parameters,
    lora_state_dict, save_adapter, disable_adapters, checkpoints) find LoRA layers with
    isinstance(m, LoRALinear) and use only r, scaling, dropout, disabled, lora_A, lora_B and
    base_layer(x), which this inherits unchanged, forward included. The factors are built from
    the full-precision layer first (same init, same draws from `generator` as LoRALinear, so a
    seed gives the same A with or without quantization); then the base is replaced by its NF4 copy.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming", generator: torch.Generator | None = None,
                 double_quant: bool = True):
        super().__init__(base_layer, r, alpha, dropout, rslora, init, generator)
        self.base_layer = NF4Linear(base_layer, double_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, in) -> (B, T, out)
        if self.disabled:
            return self.base_layer(x)
        # The fused LoRA linear (paft_kernels/lora_linear.py) with W = dequant(NF4), produced by a
        # function so that backward dequantizes again rather than keeping W (the QLoRA memory saving).
        nf4 = self.base_layer
        dtype = _compute_dtype(x)
        weight = partial(dequantize_nf4, nf4.weight, dtype=dtype)
        bias = None if nf4.bias is None else nf4.bias.to(dtype)
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        return lora_linear(x.to(dtype), weight, bias, self.lora_A.weight, self.lora_B.weight, self.scaling, p,
                           self.training, backend=self.kernels)


def apply_qlora(model: nn.Module, cfg: LoRAConfig, seed: int | None = None) -> list[str]:
    """QLoRA: the targeted layers become QLoRALinear (NF4 base + LoRA factors), every other linear
    layer but the LM head a frozen NF4Linear; the head, even when targeted, stays full precision."""
    names = apply_lora(model, cfg, seed, wrap=partial(QLoRALinear, double_quant=cfg.double_quant))
    quantize_frozen_linears(model, cfg.double_quant)
    return names


def apply_adapter(model: nn.Module, cfg: LoRAConfig, seed: int | None = None) -> list[str]:
    """LoRA, or QLoRA when cfg.quantize_base is set: what a recipe's `lora:` section asks for."""
    return (apply_qlora if cfg.quantize_base else apply_lora)(model, cfg, seed)


def quantize_frozen_linears(model: nn.Module, double_quant: bool = True) -> list[str]:
    """Replace every nn.Linear that is neither the LM head nor part of a LoRA layer by an NF4Linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_lora = {id(sub) for m in model.modules() if isinstance(m, LoRALinear) for sub in m.modules()}
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and m is not head and id(m) not in in_lora]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, NF4Linear(model.get_submodule(name), double_quant))
    return names


def base_memory_report(model: nn.Module) -> str:
    """One line: bytes of the frozen base as stored (NF4 codes, their constants, unquantized rest) vs bf16."""
    nf4 = [m.weight for m in model.modules() if isinstance(m, NF4Linear)]
    n_nf4 = sum(q.numel for q in nf4)
    codes = sum(q.packed.numel() for q in nf4)  # bytes: two 4-bit codes per byte
    constants = sum(q.nbytes() for q in nf4) - codes  # absmax scales (and their own scales)
    trained = {id(p) for p in lora_parameters(model)}
    rest = [p for p in model.parameters() if id(p) not in trained]  # embedding, head, norms, biases
    rest_bytes = sum(p.numel() * p.element_size() for p in rest)
    rest_dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in rest})) or "none"
    stored = codes + constants + rest_bytes
    bf16 = 2 * (n_nf4 + sum(p.numel() for p in rest))
    return (f"qlora: base weights {_size(codes)} as NF4 (+ {_size(constants)} constants) "
            f"+ {_size(rest_bytes)} unquantized ({rest_dtypes} embedding, head, norms) "
            f"= {_size(stored)} vs {_size(bf16)} in bf16 ({stored / bf16:.2f}x)")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e5 else f"{n_bytes / 1e3:.1f} kB"
