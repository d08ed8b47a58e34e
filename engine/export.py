"""Merge a LoRA or QLoRA adapter into its base model and save a plain Hugging Face model directory.

    python -m engine.export ADAPTER_DIR --out DIR --base original|nf4 [--model NAME] [--dtype D] [--no-double-quant]

Merging folds the update into each adapted weight, W' = W + s · B A, so the result is an
ordinary model (model.safetensors, config.json, tokenizer files) that
`AutoModelForCausalLM.from_pretrained(DIR)` loads with no adapter and no peft. The sum is
taken in fp32 and rounded to bf16 once (adding a small update to a bf16 W in bf16 would lose
most of it).

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
import shutil
import sys
import tempfile

import torch
import torch.nn as nn

from kernels.nf4 import dequantize_nf4, quantize_nf4
from engine.lora import CONFIG_FILE, load_adapter, merge_lora
from engine.models import load_model_and_tokenizer
from engine.qlora import BLOCKSIZE
from engine.recipe import ModelConfig
from engine.safeio import read_json


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


def merged_model(adapter_dir: str, base: str, model_name: str | None = None, dtype: str = "float32",
                 double_quant: bool = True):
    """(fp32 model with the adapter folded into `base` = 'original' | 'nf4', tokenizer)."""
    if base not in ("original", "nf4"):
        raise ValueError(f"--base: expected 'original' or 'nf4', got {base!r}")
    name = model_name or _adapter_base_model(adapter_dir)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=name, dtype=dtype), torch.device("cpu"))
    if base == "nf4":
        nf4_round_trip(model, double_quant)  # quantized in `dtype`, as in training; now fp32
    model.float()  # the rest of the model (embedding, norms, head) to fp32 as well: exact
    load_adapter(model, adapter_dir)
    merge_lora(model)  # W + s · B A in fp32
    return model, tokenizer


def export(adapter_dir: str, out_dir: str, base: str, model_name: str | None = None, dtype: str = "float32",
           double_quant: bool = True, out_dtype: str = "bfloat16") -> str:
    """Merge (see merged_model), round once to out_dtype (bf16 by default; float32 keeps the merge
    exact, as the PAFT pipeline's sequential baseline needs) and save model + config + tokenizer
    into out_dir: written under a temporary name and renamed (file by file into an existing
    out_dir, config.json last), so a reader never finds config.json beside half the weights."""
    model, tokenizer = merged_model(adapter_dir, base, model_name, dtype, double_quant)
    model.to(getattr(torch, out_dtype))
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        model.save_pretrained(tmp)  # safetensors: model.safetensors + config.json + generation_config.json
        tokenizer.save_pretrained(tmp)
        if not os.path.isdir(out_dir):
            os.replace(tmp, out_dir)
        else:
            for f in sorted(os.listdir(tmp), key=lambda f: f == "config.json"):
                os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _adapter_base_model(adapter_dir: str) -> str:
    path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: adapter config not found")
    raw = read_json(path)  # engine.safeio: damaged -> one error naming the file
    name = raw.get("base_model_name_or_path") if isinstance(raw, dict) else None
    if not name:
        raise ValueError(f"{path}: no base_model_name_or_path; pass --model")
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
    parser.add_argument("--out-dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                        help="dtype the merged weights are saved in (default: bfloat16)")
    parser.add_argument("--double-quant", default=True, action=argparse.BooleanOptionalAction,
                        help="--base nf4: the run's lora.double_quant (default: true)")
    args = parser.parse_args(argv)
    try:
        export(args.adapter_dir, args.out, args.base, args.model, args.dtype, args.double_quant, args.out_dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"export: {args.adapter_dir} merged into the {args.base} base, saved in {args.out_dtype} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
