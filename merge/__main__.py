"""Merge models and LoRA adapters, streaming tensor by tensor.

    python -m merge CONFIG.yaml --out DIR [--as-adapter] [--seed N] [--overwrite] [--allow-lossy]

CONFIG.yaml is a mergekit config (the keys mergekit users know):

    merge_method: ties            # one of the methods below
    base_model: smollm2-135m-instruct   # an HF dir, builtin:tiny-llama, smollm2-135m-instruct, a .gguf
    models:
      - model: out/run-a/adapter  # a full HF checkpoint dir or a peft LoRA adapter dir
        parameters: {weight: 1.0, density: 0.5}
      - model: out/run-b/adapter  # (mergekit's BASE+ADAPTER spelling is read too)
        parameters: {weight: 0.5, density: 0.5}
    parameters: {lambda: 1.0, normalize: true}   # method-level defaults; a model's own override
    dtype: bfloat16               # bfloat16 | float16 | float32 (default: the base's dtypes)

Methods and their parameters, with mergekit's defaults (merge/registry.py, one entry a method):
{methods}

A value is a number, a gradient [v0, v1, ...] interpolated over the layers (t = layer/(L−1);
tensors outside the layers get v0), or a list of {filter: SUBSTRING, value: ...}, the first
whose filter occurs in the tensor name winning: mergekit's rules (merge/config.py). `int8_mask`
is accepted and ignored (our masks are booleans already).

Each weight is read from every model, merged in fp32 and rounded once to the output dtype,
then written; an adapter's τ = s·B A is formed for that weight only (merge/deltas.py,
merge/plan.py). The output is an HF model directory (safetensors shards of ≤ 2 GB, config.json,
generation config and tokenizer files from the base) that AutoModelForCausalLM.from_pretrained
loads.

--as-adapter (linear and task_arithmetic over adapters only) writes one exact LoRA adapter
instead: every merged weight is θ₀ + Σᵢ cᵢ sᵢ Bᵢ Aᵢ with cᵢ the adapter's coefficient
(λ·wᵢ, /Σw when normalized), and

    Σᵢ cᵢ sᵢ Bᵢ Aᵢ = [c₁s₁B₁ | … | cₙsₙBₙ] [A₁; …; Aₙ]

so A is stacked along the rank, B side by side with cᵢsᵢ folded in, r = Σ rᵢ and
lora_alpha = r (scale 1). A module an adapter does not touch gets a zero block.

Output is written into a temporary directory beside --out and renamed into place at the
end: a failed merge leaves no directory that looks complete. An existing --out is refused
unless --overwrite, and --overwrite replaces only a folder that holds nothing but a model
folder's files (weights, config, tokenizer: never `--out .` in a project). An --out inside one
of the merge's inputs is refused; a symlinked --out stays a link, and the folder it points to
is the one replaced. One merge at a time holds --out (a second one exits 2 naming the first);
the temporaries a killed merge left beside it are removed at the next start. Ctrl-C or SIGTERM
stop it with one line and exit 130 / 143, --out as it was. A bfloat16/float16 output is checked against the fp32 merge (the share of
the update the rounding loses, engine/rounding.py): past 1 % it is refused unless --allow-lossy
(merge/write.py). Bad input is one `error: ...` line on stderr naming the model and the tensor,
and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# OpenMP worker threads spin while they wait for work by default. On a machine shared with
# other jobs a spinning thread burns the core another job (or our other thread) needs, and
# we measured the same merge going from 3 s to 15-60 s. The merge is memory-bound with a
# serial selection step, so passive waiting costs little. libgomp reads this when torch loads
# it: it must be set before the first `import torch` (a value you set yourself wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from engine.commands import run_command  # noqa: E402
from engine.outputs import OutputError  # noqa: E402
from engine.rounding import LOSSY_BOUND  # noqa: E402
from merge.config import MergeError  # noqa: E402
from merge.registry import methods_help  # noqa: E402
from merge.write import run  # noqa: E402

__doc__ = __doc__.replace("{methods}", methods_help())  # the list of methods comes from the registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="mergekit-style YAML")
    parser.add_argument("--out", required=True, help="output directory (must not exist, or be empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (once the new merge is complete)")
    parser.add_argument("--allow-lossy", action="store_true",
                        help=f"save a 16-bit dtype even when it loses more than {100 * LOSSY_BOUND:g}%% of the update")
    parser.add_argument("--as-adapter", action="store_true",
                        help="write one exact LoRA adapter (linear / task_arithmetic over adapters)")
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's per-tensor masks (default 0)")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def merge():
        with torch.no_grad():  # scoped: main() is also called in-process (tests), never leak grad mode
            return run(args.config, args.out, args.as_adapter, args.seed, args.overwrite, args.allow_lossy)
    status, plan = run_command(merge, f"the merge stopped; {args.out} is as it was", refused=(MergeError, OutputError))
    if status:
        return status
    for loss in plan.rounding:
        print(f"merge: {loss.summary()}", file=sys.stderr)
    what = "adapter" if args.as_adapter else f"{len(plan.names)} tensors"
    print(f"merge: {plan.cfg.method} of {len(plan.models)} model(s) -> {args.out} ({what}, "
          f"{time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
