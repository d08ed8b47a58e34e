#!/usr/bin/env bash
# The GPU half of benchmarks/train_step.py, as one command for a GPU machine with no network.
#
#     bash benchmarks/gpu/fetch_wheels.sh    # first, where PyPI is reachable: fills .whl/
#     bash benchmarks/gpu/run_gpu.sh         # on the GPU machine, with .whl/ carried along
#
# It installs the wheels into /tmp/site, prints the versions it will measure with, then runs
# the GPU configurations in the order below (the targets of issue 8 first) while the time
# budget lasts: a configuration starts only if less than BUDGET_S seconds have passed, so a
# run ends within roughly BUDGET_S + 100 s and whatever finished is kept. The random-init 7B
# shapes run with LAYERS decoder layers (default 8 of 32) to fit. Results go to
# $OUT/<device>.json (OUT defaults to benchmarks/results) with the markdown table and the chart.
#
# Environment: OUT, LAYERS (8), BUDGET_S (420), CONFIGS (space-separated names; default below).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

RESULTS=${OUT:-benchmarks/results}
LAYERS=${LAYERS:-8}
BUDGET_S=${BUDGET_S:-420}
DEFAULT_CONFIGS="gpu-llama2-7b-qlora-sft-1024 gpu-llama2-7b-lora-dpo-1024
    gpu-mistral-7b-qlora-sft-2048 gpu-mistral-7b-lora-dpo-2048
    gpu-llama2-7b-lora-sft-1024 gpu-llama2-7b-qlora-dpo-1024
    gpu-mistral-7b-lora-sft-2048 gpu-llama2-7b-qlora-sft-2048
    gpu-mistral-7b-qlora-sft-1024 gpu-mistral-7b-lora-dpo-1024
    gpu-llama2-7b-lora-sft-2048 gpu-llama2-7b-lora-dpo-2048
    gpu-mistral-7b-lora-sft-1024 gpu-mistral-7b-qlora-dpo-1024
    gpu-llama2-7b-qlora-dpo-2048 gpu-mistral-7b-qlora-dpo-2048"
read -r -d "" -a CONFIG_LIST <<< "${CONFIGS:-$DEFAULT_CONFIGS}" || true  # words over several lines

if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: no wheels in .whl/; run benchmarks/gpu/fetch_wheels.sh where PyPI is reachable first" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing .whl/ into /tmp/site failed" >&2; exit 2; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PAFT_CACHE=${PAFT_CACHE:-/tmp/paft-cache}  # the random-init models are written here once
mkdir -p "$RESULTS"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'EOF' || { echo "error: the Python stack does not import" >&2; exit 2; }
from importlib import metadata
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
for pkg in ("transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "liger-kernel", "triton", "pyarrow"):
    print(pkg, metadata.version(pkg))
import bitsandbytes, datasets, liger_kernel.transformers, peft, trl  # noqa: F401 - fail here, not per config
EOF

start=$SECONDS
status=0
for cfg in "${CONFIG_LIST[@]}"; do
    elapsed=$((SECONDS - start))
    if (( elapsed > BUDGET_S )); then
        echo "skipped $cfg: ${elapsed}s of the ${BUDGET_S}s budget used"
        continue
    fi
    echo "=== $cfg (at ${elapsed}s)"
    python3 -m benchmarks.train_step --config "$cfg" --layers "$LAYERS" --out "$RESULTS" || status=1
done
python3 -m benchmarks.report --results "$RESULTS" > /dev/null || status=1
echo "done in $((SECONDS - start))s; results in $RESULTS"
exit $status
