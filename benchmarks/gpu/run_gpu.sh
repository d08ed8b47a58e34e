#!/usr/bin/env bash
# Every GPU benchmark as ONE command, for a fresh GPU machine (one H100 or H200) with no network.
#
# The call for the GPU machine, exactly (the device tool's `run`):
#     command:    bash benchmarks/gpu/run_gpu.sh
#     carry:      [".whl"]    .whl/ is git-ignored, so it travels ONLY when named in carry; without it the
#                             peers the image lacks (trl, datasets, bitsandbytes, liger) fail every row
#     timeout_s:  540         the sections' budgets sum to 420 s (BUDGETS below), + the wheel install,
#                             the version report and each section's 5 s kill grace
# Before it, here, where PyPI is reachable:  bash benchmarks/gpu/fetch_wheels.sh   (fills .whl/, ~10 MB)
# After it, here: the files come back from $OUT; `python -m benchmarks.kernels --write-routes
# <them>/kernels_lora.json` builds the route table from the returned JSON (the run also writes it to $OUT).
# A device lease is ~15 min with its start-up, so 420 s leaves one rerun: the last line printed is the
# command for what failed or was skipped (SECTIONS="train_lora_sft:trl,liger nf4" bash ..., and its timeout).
#
# Rehearsal on the CPU: `make gpu-rehearsal` (a virtualenv with the image's versions, the carried wheels
# installed as below, then this script with --dry-run), or `bash benchmarks/gpu/run_gpu.sh --dry-run`.
#
# Sections, in this order, each in its own process under its own `timeout` and deadline (PAFT_BENCH_DEADLINE,
# counted from the section's launch, imports included); each writes its JSON after every point or system,
# so a section killed half-way keeps what it finished:
#     kernels_lora   python -m benchmarks.kernels --only lora_linear   -> $OUT/kernels_lora.json (+ lora_linear_routes.json)
#     kernels_prox   python -m benchmarks.kernels_prox                 -> $OUT/kernels_prox.json
#     nf4            python -m benchmarks.nf4_dequant                  -> $OUT/nf4.json
#     train_*        python -m benchmarks.train_step --config ...      -> $OUT/train_step/<device>.json
#                    LoRA SFT, QLoRA SFT, LoRA DPO at Llama-2-7B shapes (LAYERS of 32 decoder layers), each
#                    system (ours = train.kernels auto, ours_triton, hf, trl, liger) in its own child process
#                    under PAFT_BENCH_SYSTEM_TIMEOUT_S; the kernel sections run first, so the Triton kernels the
#                    train rows launch are already in Triton's on-disk cache (compiled once, not per child).
# SECTIONS entries may name a train section's systems: train_lora_sft:trl,liger runs only those two (and
# merges them into the configuration's row). Files under $OUT (the GPU tool brings back <= 8, <= 2 folders
# deep): run.log, run.json, kernels_lora.json, lora_linear_routes.json, kernels_prox.json, nf4.json,
# train_step/<device>.json. Every JSON records the GPU, driver, torch and triton versions.
#
# Environment: PYTHON (python3), OUT (benchmarks/results/gpu-run), LAYERS (4), DRY_RUN (0), SECTIONS (a subset
# of the names above), SITE (/tmp/site: where the wheels go), INSTALL_WHEELS (1 on a GPU; the dry run: 0,
# make gpu-rehearsal: 1), DRY_FACTOR (3: the dry run's budgets are this many times the GPU's).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
PYTHON=${PYTHON:-python3}  # the interpreter the project is installed in (make passes its own)

DRY=${DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-benchmarks/results/gpu-run}
LAYERS=${LAYERS:-4}
SITE=${SITE:-/tmp/site}
INSTALL_WHEELS=${INSTALL_WHEELS:-$(( DRY ? 0 : 1 ))}
DRY_FACTOR=${DRY_FACTOR:-3}
# Seconds per section on a GPU (the dry run: DRY_FACTOR times that). They sum to 420: a 540 s command, then
# time in a 15-minute lease for one rerun of what failed. tests/test_gpu_run.py checks the sum.
BUDGETS="kernels_lora=100 kernels_prox=30 nf4=25 train_lora_sft=95 train_qlora_sft=85 train_lora_dpo=85"
SYSTEM_TIMEOUT_S=45  # one train_step child on a GPU: start-up, load, 8 steps (the setup child: twice this)
ALL="kernels_lora kernels_prox nf4 train_lora_sft train_qlora_sft train_lora_dpo"
SECTIONS=${SECTIONS:-$ALL}
for entry in $SECTIONS; do  # bad input: one line, exit 2, before anything runs
    [[ " $ALL " == *" ${entry%%:*} "* ]] || { echo "error: unknown section ${entry%%:*} in SECTIONS (known: $ALL)" >&2; exit 2; }
    [[ "$entry" != *:* || "$entry" == train_* ]] || { echo "error: only train sections take systems ($entry)" >&2; exit 2; }
done
mkdir -p "$OUT/train_step" || exit 2
LOG="$OUT/run.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
finish() {  # the last lines reach run.log: close our end of the pipe, then wait for tee to drain it
    exec >&- 2>&-
    for _ in $(seq 50); do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.1; done
}
trap finish EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PAFT_CACHE=${PAFT_CACHE:-/tmp/paft-cache}  # the random-init models are written here once
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# 1. The versions this image has, before anything else is done to it (peft, pyarrow and fsspec are the
#    image's own; bitsandbytes comes from .whl/, so here it should be missing).
echo "== image versions ($("$PYTHON" -V 2>&1), $PYTHON)"
"$PYTHON" -m pip show peft pyarrow fsspec bitsandbytes 2>&1 | grep -E "^(Name|Version|WARNING)" || true

(( DRY )) && { echo "dry run: tiny shapes on the CPU; no number here is a GPU measurement"; export CUDA_VISIBLE_DEVICES=""; }
# 2. Wheels for what the image lacks (fetch_wheels.sh), one at a time into $SITE: one that fails to install
#    loses only the peer that needs it.
if (( INSTALL_WHEELS )); then
    found=0
    for whl in .whl/*.whl; do
        [[ -e "$whl" ]] || continue
        found=1
        if msg=$("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                 --target "$SITE" "$whl" 2>&1); then
            echo "installed $(basename "$whl")"
        else
            echo "warning: could not install $whl: $(grep -v "^WARNING: Location" <<< "$msg" | tail -3)"
        fi
    done
    (( found )) || echo "warning: no wheels in .whl/: was .whl named in the device tool's carry?" \
                        "(trl, datasets, bitsandbytes and liger rows will fail)"
    [[ -s .whl/SKIPPED.txt ]] && { echo "wheels left out by fetch_wheels.sh:"; cat .whl/SKIPPED.txt; }
    export PYTHONPATH="$PYTHONPATH:$SITE"
else
    echo "wheels: not installed (INSTALL_WHEELS=0); the interpreter's own packages are used"
fi
(( DRY )) || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 3. The environment in effect (the carried wheels included), recorded once for run.json.
ENV_JSON=$(mktemp) STATUS=$(mktemp)
"$PYTHON" - "$ENV_JSON" <<'EOF' || echo "warning: could not record the environment"
import json, sys
from importlib import metadata
from benchmarks.kernels import environment
env = environment()
for pkg in ("accelerate", "trl", "datasets", "bitsandbytes", "liger-kernel", "pyarrow", "fsspec", "huggingface_hub"):
    try:
        env[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
        env[pkg] = None
print("== in effect: " + ", ".join(f"{k} {v}" for k, v in env.items() if v not in (None, False)))
json.dump(env, open(sys.argv[1], "w"))
EOF

budget_of() {  # seconds a section may take: its BUDGETS entry (the dry run: DRY_FACTOR times that)
    local kv
    for kv in $BUDGETS; do [[ ${kv%%=*} == "$1" ]] && { echo $(( DRY ? DRY_FACTOR * ${kv#*=} : ${kv#*=} )); return; }; done
    echo 0
}
total=0; for kv in $BUDGETS; do total=$((total + ${kv#*=})); done
(( total <= 420 )) || { echo "error: the section budgets sum to ${total} s, more than 420"; exit 2; }
TOTAL_S=$(( DRY ? DRY_FACTOR * total : total ))
start=$SECONDS

write_run_json() {
    "$PYTHON" benchmarks/gpu/status.py "$STATUS" "$ENV_JSON" "$OUT" "$DRY" "$((SECONDS - start))"
}
record() {  # name, status, exit status, seconds, extra JSON fields: one line of $STATUS
    echo "{\"section\": \"$1\", \"status\": \"$2\", \"exit\": $3, \"seconds\": $4, \"budget\": $(budget_of "$1")$5}" >> "$STATUS"
}
run_section() {  # name, extra JSON fields ("" or ', "config": ...'), then the command
    local name=$1 extra=$2; shift 2
    local left=$((TOTAL_S - (SECONDS - start)))
    local cap; cap=$(budget_of "$name")
    (( cap > left )) && cap=$left
    if (( cap < 15 )); then
        echo "=== $name: skipped, ${left}s of ${TOTAL_S}s left"
        record "$name" "skipped: time budget" 0 0 "$extra"
        return
    fi
    echo "=== $name (at $((SECONDS - start))s, up to ${cap}s): $*"
    local t0=$SECONDS
    # The deadline is the section's, counted from now: the scripts stop starting work 3 s before it.
    PAFT_BENCH_DEADLINE=$(( $(date +%s) + cap - 3 )) timeout -k 5 "$cap" "$@"
    local rc=$?
    local st="ok"
    (( rc == 124 || rc == 137 )) && st="failed: timed out after ${cap}s"
    (( rc != 0 && rc != 124 && rc != 137 )) && st="failed: exit status $rc"
    echo "=== $name: $st in $((SECONDS - t0))s"
    record "$name" "$st" "$rc" $((SECONDS - t0)) "$extra"
    write_run_json > /dev/null  # after every section: a killed script still leaves run.json
}

DRYFLAG=()
(( DRY )) && DRYFLAG=(--dry-run)
INTERP=()  # the dry run runs the Triton kernels by the interpreter (CPU tensors)
(( DRY )) && INTERP=(env TRITON_INTERPRET=1)
train() {  # section name, GPU config, its dry-run stand-in (the tiny CPU model), systems (the GPU config's)
    local name=$1 cfg=$2 tiny=$3 systems=$4
    [[ -n "${only[$name]:-}" ]] && systems=${only[$name]}
    local use=$cfg; (( DRY )) && use=$tiny
    local extra=", \"config\": \"$use\", \"systems\": \"$systems\""
    local cap=$(( DRY ? DRY_FACTOR * SYSTEM_TIMEOUT_S : SYSTEM_TIMEOUT_S ))
    if (( DRY )); then
        PAFT_BENCH_SYSTEM_TIMEOUT_S=$cap run_section "$name" "$extra" "$PYTHON" -m benchmarks.train_step \
            --config "$tiny" --systems "$systems" --steps 1 --warmup 0 --out "$OUT/train_step"
    else
        PAFT_BENCH_SYSTEM_TIMEOUT_S=$cap run_section "$name" "$extra" "$PYTHON" -m benchmarks.train_step \
            --config "$cfg" --systems "$systems" --layers "$LAYERS" --out "$OUT/train_step"
    fi
}

declare -A only=()
order=""
for entry in $SECTIONS; do
    order="$order ${entry%%:*}"
    [[ "$entry" == *:* ]] && only[${entry%%:*}]=${entry#*:}
done
for section in $order; do
    case $section in
        kernels_lora)
            if (( DRY )); then
                run_section kernels_lora "" "${INTERP[@]}" "$PYTHON" -m benchmarks.kernels --only lora_linear \
                    --dry-run --budget-s "$(( $(budget_of kernels_lora) - 10 ))" --out "$OUT/kernels_lora.json"
            else
                run_section kernels_lora "" "$PYTHON" -m benchmarks.kernels --only lora_linear \
                    --budget-s "$(( $(budget_of kernels_lora) - 10 ))" --out "$OUT/kernels_lora.json" \
                    --write-routes --routes-out "$OUT/lora_linear_routes.json"
            fi ;;
        kernels_prox) run_section kernels_prox "" "${INTERP[@]}" "$PYTHON" -m benchmarks.kernels_prox \
                          --out "$OUT/kernels_prox.json" "${DRYFLAG[@]}" ;;
        nf4) run_section nf4 "" "${INTERP[@]}" "$PYTHON" -m benchmarks.nf4_dequant --out "$OUT/nf4.json" "${DRYFLAG[@]}" ;;
        train_lora_sft) train train_lora_sft gpu-llama2-7b-lora-sft-1024 cpu-tiny-lora-sft ours,ours_triton,hf,trl,liger ;;
        train_qlora_sft) train train_qlora_sft gpu-llama2-7b-qlora-sft-1024 cpu-tiny-qlora-sft ours,ours_triton,hf,trl,liger ;;
        train_lora_dpo) train train_lora_dpo gpu-llama2-7b-lora-dpo-1024 cpu-tiny-lora-dpo ours,ours_triton,trl,liger ;;
    esac
done

rerun=$(write_run_json | tail -1)
failed=$(grep -c '"failed\|"skipped' "$STATUS" || true)
echo "done in $((SECONDS - start))s of ${TOTAL_S}s; ${failed} section(s) failed or skipped; results in $OUT"
if [[ "$rerun" == SECTIONS=* ]]; then
    echo "rerun what did not finish:"
    echo "    $rerun"
else
    echo "nothing to rerun"
fi
rm -f "$STATUS" "$ENV_JSON"
exit 0
