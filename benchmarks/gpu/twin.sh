#!/usr/bin/env bash
# `make gpu-rehearsal`: a CPU twin of the GPU image, then run_gpu.sh on it in dry-run mode.
#
#     bash benchmarks/gpu/twin.sh          # TWIN=/tmp/paft-gpu-twin  OUT=/tmp/paft-gpu-rehearsal
#
# 1. A virtualenv outside the clone (TWIN; nothing to git-ignore) with the GPU image's versions, as
#    the device tool's KINDS.md lists them for its "cuda" image: Python 3.12, torch 2.11.0, triton 3.6.0,
#    transformers 5.17.0, accelerate 1.15.0, huggingface_hub 1.33.0, safetensors 0.8.0, tokenizers 0.23.2.
#    torch 2.11.0 is PyPI's Linux wheel, the CUDA 13.0 build the image has (it runs on a CPU; its CUDA
#    libraries come along as dependencies, ~3 GB), so the twin imports the very torch the GPU machine does.
#    The image's other packages (peft, pyarrow, fsspec, pandas, ...) are there in versions nobody has read
#    yet: here pip's newest that fit; run_gpu.sh prints the image's own as its first lines.
# 2. The wheels benchmarks/gpu/fetch_wheels.sh carries (.whl/, fetched if missing), installed by
#    run_gpu.sh itself exactly as on the GPU machine: one by one, --no-deps, into SITE, put on PYTHONPATH.
# 3. run_gpu.sh --dry-run: every section, every system of the GPU configurations' lists, tiny shapes, the
#    per-system time limits, the Triton kernels by the interpreter. Its log: OUT/run.log; its status: OUT/run.json.
# Where python3.12 is not found, the closest Python 3 is used, and the script says so on its first line.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
TWIN=${TWIN:-/tmp/paft-gpu-twin}
OUT=${OUT:-/tmp/paft-gpu-rehearsal}
# numpy < 2.4: Triton 3.6's interpreter calls int() on a one-element array, which numpy 2.4 turned from a
# deprecation warning into a TypeError; the dry run interprets the kernels. (The image itself has numpy
# 2.5.2, per KINDS.md; the GPU run compiles its kernels and never interprets them.)
PINS=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0
      safetensors==0.8.0 tokenizers==0.23.2 sentencepiece==0.2.2 "numpy<2.4"
      peft pyarrow fsspec pandas psutil pyyaml tqdm matplotlib xxhash requests httpx jinja2)

find_python() {  # the image's Python 3.12, else the closest one here (said on the first line)
    local p
    for p in python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python \
             "$(command -v uv > /dev/null 2>&1 && uv python find 3.12 2>/dev/null)"; do
        # runs, and is 3.12 (a pyenv shim on PATH can name a version it then refuses to run)
        [[ -n "$p" ]] && "$p" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' > /dev/null 2>&1 \
            && { "$p" -c 'import sys; print(sys.executable)'; return; }
    done
    command -v python3
}
BASE=$(find_python)
version=$("$BASE" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ "$version" == 3.12 ]]; then
    echo "twin: $("$BASE" -V) from $BASE (the image has Python 3.12.3)"
else
    echo "twin: NOTE no python3.12 here; using $("$BASE" -V) from $BASE, the closest (the image has 3.12.3)"
fi

stamp="$TWIN/.pins"
if [[ ! -x "$TWIN/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$version ${PINS[*]}" ]]; then
    echo "twin: building $TWIN (torch 2.11.0 with its CUDA libraries: a few GB, once)"
    rm -rf "$TWIN"
    "$BASE" -m venv "$TWIN" || { echo "error: could not create the virtualenv $TWIN"; exit 2; }
    "$TWIN/bin/python" -m pip install -q "${PINS[@]}" 2>&1 | grep -v "^WARNING: Location" \
        || true
    "$TWIN/bin/python" -c "import torch, triton, transformers" \
        || { echo "error: the twin's packages did not install (see above)"; exit 2; }
    echo "$version ${PINS[*]}" > "$stamp"
fi
echo "twin: $("$TWIN/bin/python" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|transformers|accelerate|numpy|peft|huggingface.hub|pyarrow|fsspec) ' | tr -s ' ' | tr '\n' ';')"

if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo "twin: .whl/ is empty; fetching the carried wheels (needs PyPI)"
    PYTHON="$TWIN/bin/python" bash benchmarks/gpu/fetch_wheels.sh || { echo "error: fetch_wheels.sh failed"; exit 2; }
fi

rm -rf "$TWIN/site" "$OUT"  # a fresh machine: nothing installed, nothing cached, nothing written
cache=$(mktemp -d)
t0=$SECONDS
OUT="$OUT" PYTHON="$TWIN/bin/python" INSTALL_WHEELS=1 SITE="$TWIN/site" PAFT_CACHE="$cache" \
    bash benchmarks/gpu/run_gpu.sh --dry-run
rm -rf "$cache"
echo "twin: rehearsal wall time $((SECONDS - t0)) s; log $OUT/run.log, status $OUT/run.json"
"$TWIN/bin/python" - "$OUT/run.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
for s in doc["sections"]:
    line = f"  {s['section']:16s} {s['status']} ({s['seconds']} s of {s['budget']})"
    for name, st in s.get("systems_status", {}).items():
        line += f"\n      {name:12s} {st[:150]}"
    print(line)
sys.exit(1 if doc["rerun"] else 0)
EOF
