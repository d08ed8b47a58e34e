#!/usr/bin/env bash
# Every GPU benchmark as ONE command, for a fresh GPU machine with no network, in <= TOTAL_S (540) seconds.
#
#     bash benchmarks/gpu/fetch_wheels.sh        # first, where PyPI is reachable: fills .whl/
#     bash benchmarks/gpu/run_gpu.sh             # on the GPU machine, with .whl/ carried along
#     bash benchmarks/gpu/run_gpu.sh --dry-run   # (or DRY_RUN=1) every section on tiny shapes on the CPU
#
# Sections run in this order, each in its own process under its own `timeout`, so one failure or hang
# loses only its own row (recorded in $OUT/run.json with its exit status and seconds):
#     kernels_lora   python -m benchmarks.kernels --only lora_linear   -> $OUT/kernels_lora.json
#     kernels_prox   python -m benchmarks.kernels_prox                 -> $OUT/kernels_prox.json
#     nf4            python -m benchmarks.nf4_dequant                  -> $OUT/nf4.json
#     train_*        python -m benchmarks.train_step --config ...      -> $OUT/train_step/<device>.json
#                    LoRA SFT, QLoRA SFT, LoRA DPO at Llama-2-7B shapes (LAYERS of 32 decoder layers);
#                    train_step runs each system (ours, hf, trl, liger) in its own child process, each
#                    under PAFT_BENCH_SYSTEM_TIMEOUT_S.
# A section starts only with at least 20 s of its budget left; it gets min(its budget, what is left).
# Wheels are installed one by one (a wheel that fails to install loses only the peer that needs it).
# Files under $OUT (few, shallow: the GPU tool brings back <= 8 files <= 2 folders deep): run.log,
# run.json, kernels_lora.json, kernels_prox.json, nf4.json, train_step/<device>.json.
# Every JSON records the GPU, driver, torch and triton versions; run.json records them once more.
#
# Environment: PYTHON (python3), OUT (benchmarks/results/gpu-run), TOTAL_S (540; dry run 1500), LAYERS (4), DRY_RUN (0),
#              SECTIONS (space-separated subset of the names above, in this order).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
PYTHON=${PYTHON:-python3}  # the interpreter the project is installed in (make passes its own)

DRY=${DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-benchmarks/results/gpu-run}
TOTAL_S=${TOTAL_S:-$(( DRY ? 1500 : 540 ))}  # the dry run is on a slow shared CPU: more room
LAYERS=${LAYERS:-4}
ALL="kernels_lora kernels_prox nf4 train_lora_sft train_qlora_sft train_lora_dpo"
SECTIONS=${SECTIONS:-$ALL}
mkdir -p "$OUT/train_step"
LOG="$OUT/run.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
start=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PAFT_CACHE=${PAFT_CACHE:-/tmp/paft-cache}  # the random-init models are written here once
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if (( DRY )); then
    echo "dry run: tiny shapes on the CPU; no number here is a GPU measurement"
    export CUDA_VISIBLE_DEVICES=""
else
    # wheels for what the image lacks (fetch_wheels.sh), one at a time, into /tmp/site
    for whl in .whl/*.whl; do
        [[ -e "$whl" ]] || { echo "note: no wheels in .whl/ (peers missing from the image will fail their rows)"; break; }
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$whl" \
            || echo "warning: could not install $whl"
    done
    [[ -f .whl/SKIPPED.txt ]] && { echo "wheels left out by fetch_wheels.sh:"; cat .whl/SKIPPED.txt; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

STATUS="$OUT/.sections.jsonl"
: > "$STATUS"
budget_of() {  # seconds each section may take on a GPU (the dry run: three times that)
    local s
    case $1 in kernels_lora) s=170 ;; kernels_prox) s=50 ;; nf4) s=40 ;; *) s=100 ;; esac
    echo $(( DRY ? 3 * s : s ))
}
run_section() {  # name, then the command
    local name=$1; shift
    local left=$((TOTAL_S - (SECONDS - start) - 5))
    local cap; cap=$(budget_of "$name")
    (( cap > left )) && cap=$left
    if (( cap < 20 )); then
        echo "=== $name: skipped, ${left}s of ${TOTAL_S}s left"
        echo "{\"section\": \"$name\", \"status\": \"skipped: time budget\", \"seconds\": 0}" >> "$STATUS"
        return
    fi
    echo "=== $name (at $((SECONDS - start))s, up to ${cap}s): $*"
    local t0=$SECONDS
    timeout -k 5 "$cap" "$@"
    local rc=$?
    local st="ok"
    (( rc == 124 || rc == 137 )) && st="failed: timed out after ${cap}s"
    (( rc != 0 && rc != 124 && rc != 137 )) && st="failed: exit status $rc"
    echo "=== $name: $st in $((SECONDS - t0))s"
    echo "{\"section\": \"$name\", \"status\": \"$st\", \"exit\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$STATUS"
}

DRYFLAG=()
(( DRY )) && DRYFLAG=(--dry-run)
train() {  # section name, config; the dry run takes the tiny CPU configs with real child processes
    local name=$1 cfg=$2 tiny=$3 systems=$4
    if (( DRY )); then
        run_section "$name" "$PYTHON" -m benchmarks.train_step --config "$tiny" --systems "$systems" --steps 1 \
            --warmup 0 --out "$OUT/train_step"
    else
        PAFT_BENCH_SYSTEM_TIMEOUT_S=${PAFT_BENCH_SYSTEM_TIMEOUT_S:-30} \
            run_section "$name" "$PYTHON" -m benchmarks.train_step --config "$cfg" --layers "$LAYERS" \
            --out "$OUT/train_step"
    fi
}

for section in $SECTIONS; do
    case $section in
        kernels_lora)
            if (( DRY )); then  # the triton route too, by the interpreter
                TRITON_INTERPRET=1 run_section kernels_lora "$PYTHON" -m benchmarks.kernels --only lora_linear \
                    --dry-run --out "$OUT/kernels_lora.json"
            else
                run_section kernels_lora "$PYTHON" -m benchmarks.kernels --only lora_linear --budget-s 140 \
                    --out "$OUT/kernels_lora.json"
            fi ;;
        kernels_prox) run_section kernels_prox "$PYTHON" -m benchmarks.kernels_prox --out "$OUT/kernels_prox.json" "${DRYFLAG[@]}" ;;
        nf4) run_section nf4 "$PYTHON" -m benchmarks.nf4_dequant --out "$OUT/nf4.json" "${DRYFLAG[@]}" ;;
        train_lora_sft) train train_lora_sft gpu-llama2-7b-lora-sft-1024 cpu-tiny-lora-sft ours,hf ;;
        train_qlora_sft) train train_qlora_sft gpu-llama2-7b-qlora-sft-1024 cpu-tiny-qlora-sft ours ;;  # hf: bnb 4-bit needs the GPU
        train_lora_dpo) train train_lora_dpo gpu-llama2-7b-lora-dpo-1024 cpu-tiny-lora-dpo ours,trl ;;
        *) echo "error: unknown section $section (known: $ALL)"; exit 2 ;;
    esac
done

# run.json: the environment once, and every section's status (written atomically)
"$PYTHON" - "$STATUS" "$OUT/run.json" "$DRY" "$((SECONDS - start))" <<'EOF'
import json, os, sys
from benchmarks.kernels import environment
status, path, dry, wall = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
sections = [json.loads(line) for line in open(status) if line.strip()]
doc = {"benchmark": "run_gpu", "dry_run": dry, "wall_s": wall, "environment": environment(), "sections": sections}
with open(path + ".tmp", "w") as f:
    json.dump(doc, f, indent=1)
os.replace(path + ".tmp", path)
EOF
rm -f "$STATUS"
failed=$(grep -c '"failed' "$OUT/run.json" || true)
echo "done in $((SECONDS - start))s; ${failed} section(s) failed; results in $OUT"
exit 0
