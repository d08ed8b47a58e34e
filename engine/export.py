"""Merge a LoRA or QLoRA adapter into its base model and save a plain Hugging Face model directory.

    python -m engine.export ADAPTER_DIR --out DIR --base original|nf4 [--model NAME] [--dtype D]
                            [--out-dtype auto|float32|bfloat16|float16] [--allow-lossy] [--overwrite]
                            [--no-double-quant]

Merging folds the update into each adapted weight, W' = W + s · B A, so the result is an
ordinary model (model.safetensors, config.json, tokenizer files) that
`AutoModelForCausalLM.from_pretrained(DIR)` loads with no adapter and no peft. The sum is
taken in fp32 and rounded once to the output dtype.

Which output dtype? Rounding W + δ (δ = s·B A) to bf16 drops every part of δ smaller than half
a bf16 ulp of W, and a LoRA update is often that small: on the quickstart's adapters bf16
loses most of the update (engine/rounding.py defines the measure, docs/RELIABILITY.md has the
numbers). So the default, --out-dtype auto, is float32, or the base's own stored dtype when
it is a 16-bit one AND it keeps the update to within 1 % of ||δ||. Whatever the dtype, the
share of ||δ|| the rounding loses is measured and printed; an explicit 16-bit --out-dtype
that loses more than 1 % is refused (exit 2) unless --allow-lossy.

An existing --out is refused unless --overwrite, and --overwrite replaces only a folder that holds
nothing but a model folder's files (as `python -m merge` does: engine/model_out.py). An --out inside
the adapter or the base model is refused; a symlinked --out stays a link (its target is replaced).
One export at a time holds --out (a second one exits 2 naming the first), and the `.<out>.export-*`
folder a killed export left is removed at the next start. A merged weight that is not finite is
refused, naming it. Ctrl-C / SIGTERM: one line, exit 130 / 143; a full disk or a read-only
filesystem: one line naming the file, exit 2.

Which W? A QLoRA adapter (lora.quantize_base: nf4) was trained against the NF4 base
W_nf4 = dequant(quant(W)), not against W, and the two merges give different models:

    --base original   W' = W     + s · B A    the original weights plus the update. The
                                              quantization error (W_nf4 - W) is gone, but B A was
                                              fitted to a base that had it: this is not exactly
                                              the model that was trained (usually close or
                                              better; evaluate it). The only right choice for
                                              an adapter trained without quantization.
    --base nf4        W' = W_nf4 + s · B A    exactly the model that was trained (up to the final
                                              bf16 rounding): every linear layer but the LM head
                                              is quantized and dequantized again, the adapted
                                              ones then get the update. The quantization error
                                              stays in the merged weights, in bf16 at full size.

NF4 quantization is deterministic, so --base nf4 rebuilds the training base exactly, given
the settings training used: blocks of 64, double quantization as lora.double_quant
(--no-double-quant if it was false), and the weights in the dtype they were quantized from,
the run's model.dtype (--dtype; 'auto' meant bfloat16 on CUDA, float32 on CPU): a weight
rounded to bf16 first can get a different 4-bit code. (Across CPU and GPU, double
quantization's mean of the scales may differ in the last bit; within one kind it does not.)

The base model is `--model`, else the adapter's base_model_name_or_path, resolved as a recipe's
model.name is (engine.models: builtin:tiny-llama, smollm2-135m-instruct, a .gguf, a directory
or a hub id). The work runs on the CPU, in fp32.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn

from paft_kernels.nf4 import dequantize_nf4
from paft_kernels.nf4_quant import quantize_nf4
from engine.adapter_config import read_adapter_config
from engine.commands import run_command
from engine.lora import CONFIG_FILE, _lora_modules, load_adapter, merge_lora
from engine.model_out import claim_model_out, is_model_file
from engine.models import load_model_and_tokenizer
from engine.qlora import BLOCKSIZE
from engine.recipe import ModelConfig
from engine.rounding import LOSSY_BOUND, RoundingLoss
from engine.writes import atomic_dir, temporary_dir_prefix, write_error

COMMAND = "python -m engine.export"
TEMPORARIES = ("export", "old")  # what an export builds beside --out: .<out>.<kind>-XXXXXXXX


@torch.no_grad()
def nf4_round_trip(model: nn.Module, double_quant: bool = True) -> list[str]:
    """W <- dequant(quant(W)) in fp32 for every nn.Linear but the LM head: the base QLoRA trains on."""
    head = model.get_output_embeddings()
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m is not head:
            q = quantize_nf4(m.weight, blocksize=BLOCKSIZE, double_quant=double_quant)  # from W's own dtype
            m.weight = nn.Parameter(dequantize_nf4(q, dtype=torch.float32), requires_grad=False)
            names.append(name)
    return names


def rounding_losses(model: nn.Module, dtypes: list[torch.dtype]) -> dict[torch.dtype, RoundingLoss]:
    """For each dtype, how much of every LoRA layer's update δ = s·B A survives round(W + δ)
    (engine/rounding.py), one layer at a time; call before merge_lora, on the fp32 model."""
    losses = {d: RoundingLoss(d) for d in dtypes}
    with torch.no_grad():
        for name, m in _lora_modules(model):
            W = m.base_layer.weight.float()  # (out, in), as the base stores it (fp32 holds bf16 exactly)
            merged = W + (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scaling  # (out, r) @ (r, in)
            for loss in losses.values():
                loss.add(name + ".weight", merged, W)
    return losses


def stored_dtype(name: str) -> torch.dtype | None:
    """The dtype a base model's weights are stored in (its config's dtype), None if unknown.
    GGUF files are converted to fp32 (engine.models) and the builtin model is fp32."""
    from engine.models import resolve_gguf
    if name.startswith("builtin:") or resolve_gguf(name) is not None:
        return torch.float32
    try:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(name)
    except Exception:  # a hub id offline, an odd directory: fall back to fp32, which keeps everything
        return None
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def merged_model(adapter_dir: str, base: str, model_name: str | None = None, dtype: str = "float32",
                 double_quant: bool = True, out_dtype: str | None = None):
    """(fp32 model with the adapter folded into `base` = 'original' | 'nf4', tokenizer).
    With `out_dtype` ('auto' or a dtype name) also (the dtype to save in, its RoundingLoss):
    see choose_dtype."""
    if base not in ("original", "nf4"):
        raise ValueError(f"--base: expected 'original' or 'nf4', got {base!r}")
    name = model_name or _adapter_base_model(adapter_dir)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=name, dtype=dtype), torch.device("cpu"))
    if base == "nf4":
        nf4_round_trip(model, double_quant)  # quantized in `dtype`, as in training; now fp32
    model.float()  # the rest of the model (embedding, norms, head) to fp32 as well: exact
    load_adapter(model, adapter_dir)
    chosen = None if out_dtype is None else choose_dtype(model, out_dtype, name)
    merge_lora(model)  # W + s · B A in fp32
    return (model, tokenizer) if chosen is None else (model, tokenizer, *chosen)


def choose_dtype(model: nn.Module, out_dtype: str, name: str) -> tuple[torch.dtype, RoundingLoss]:
    """'auto': the base's own 16-bit dtype if it keeps the update within LOSSY_BOUND, else fp32.
    A named dtype is taken as asked; its loss is returned for the caller to judge."""
    if out_dtype != "auto":
        d = getattr(torch, out_dtype)
        return d, rounding_losses(model, [d])[d]
    own = stored_dtype(name)
    if own in (torch.bfloat16, torch.float16):
        loss = rounding_losses(model, [own])[own]
        if loss.lost <= LOSSY_BOUND:
            return own, loss
        print(f"export: the base's own {str(own).removeprefix('torch.')} would lose too much "
              f"({loss.summary()}); saving float32", file=sys.stderr)
    return torch.float32, rounding_losses(model, [torch.float32])[torch.float32]


class LossyExport(ValueError):
    """The chosen 16-bit dtype would lose more than LOSSY_BOUND of the update (exit 2)."""


def export(adapter_dir: str, out_dir: str, base: str, model_name: str | None = None, dtype: str = "float32",
           double_quant: bool = True, out_dtype: str = "auto", overwrite: bool = False,
           allow_lossy: bool = False) -> RoundingLoss:
    """Merge (see merged_model), round once to out_dtype ('auto': see choose_dtype; float32 keeps
    the merge exact, as the PAFT pipeline's sequential baseline needs) and save model + config +
    tokenizer as out_dir: built in `.<out>.export-XXXXXXXX` beside it and renamed into place whole
    (engine.writes.atomic_dir), so a reader never finds config.json beside half the weights, nor
    an old shard beside new ones. Returns the rounding loss of the saved dtype. out_dir is held
    for the whole export and checked before any work (engine.model_out.claim_model_out): an
    existing one is refused unless `overwrite` (and unless it is a model folder), an out_dir
    inside the adapter or the base refused. A lossy 16-bit dtype is refused unless `allow_lossy`,
    and a weight that is not finite always, before anything is written."""
    name = model_name or _adapter_base_model(adapter_dir)
    with claim_model_out(out_dir, COMMAND, overwrite, [adapter_dir, name], TEMPORARIES) as dest:
        model, tokenizer, chosen, loss = merged_model(adapter_dir, base, name, dtype, double_quant, out_dtype)
        if loss.lost > LOSSY_BOUND:
            what = f"--out-dtype {str(chosen).removeprefix('torch.')}: {loss.summary()}; the export would not be the trained model"
            if not allow_lossy:
                raise LossyExport(f"{what} (use --out-dtype float32 or auto, or pass --allow-lossy)")
            print(f"warning: {what} (--allow-lossy)", file=sys.stderr)
        model.to(chosen)
        check_finite(model)
        with atomic_dir(dest, replace=overwrite, prefix=temporary_dir_prefix(dest, "export"), own=is_model_file) as tmp:
            save_model(model, tokenizer, tmp)
    return loss


def check_finite(model: nn.Module) -> None:
    """ValueError naming the first weight that is not finite (a NaN adapter or base, or a value
    past a 16-bit dtype's range): saved, it would be reported as a model that "loses 0%"."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"tensor {name}: not finite (nan or inf) in the merged model "
                             f"({str(t.dtype).removeprefix('torch.')}); nothing was written")


def save_model(model: nn.Module, tokenizer, folder: str) -> None:
    """save_pretrained of model (safetensors, config.json, generation_config.json) and tokenizer,
    with a failed write (safetensors' own error on a full disk) as an OSError naming the folder."""
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - write_error passes anything that is not about the disk on
        err = write_error(e, folder)
        if err is e:
            raise
        raise err from None


def _adapter_base_model(adapter_dir: str) -> str:
    name = read_adapter_config(adapter_dir)["base_model_name_or_path"]  # checked: a string or None
    if not name:
        raise ValueError(f"{os.path.join(adapter_dir, CONFIG_FILE)}: no base_model_name_or_path; pass --model")
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter_dir", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--base", required=True, choices=("original", "nf4"),
                        help="merge into the original weights, or into their NF4 round trip (what QLoRA trained on)")
    parser.add_argument("--model", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype the base is loaded in; for --base nf4 the run's model.dtype (default: float32)")
    parser.add_argument("--out-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype the merged weights are saved in (default auto: float32, or the base's own "
                             "16-bit dtype when it keeps the update within 1%%)")
    parser.add_argument("--allow-lossy", action="store_true",
                        help="save a 16-bit --out-dtype even when it loses more than 1%% of the update")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out that holds only a model folder's files")
    parser.add_argument("--double-quant", default=True, action=argparse.BooleanOptionalAction,
                        help="--base nf4: the run's lora.double_quant (default: true)")
    args = parser.parse_args(argv)
    status, loss = run_command(lambda: export(args.adapter_dir, args.out, args.base, args.model, args.dtype,
                                              args.double_quant, args.out_dtype, args.overwrite, args.allow_lossy),
                               f"the export stopped; {args.out} is as it was")
    if status:
        return status
    print(f"export: {args.adapter_dir} merged into the {args.base} base, saved to {args.out}: {loss.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
