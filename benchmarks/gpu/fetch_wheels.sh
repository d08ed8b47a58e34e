#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the wheels the GPU benchmark needs and the GPU machine lacks.
#
#     bash benchmarks/gpu/fetch_wheels.sh        # writes .whl/ (git-ignored), about 10 MB
#
# The GPU machine (the nvidia-h200 kind: Python 3.12, torch 2.11 + CUDA 13.0, transformers,
# accelerate, pyarrow, pandas, psutil preinstalled) has no network, so run_gpu.sh installs these
# from .whl/, which travels with the working tree (64 MiB limit for everything that travels):
#
#     trl, datasets (+ dill, multiprocess)   TRL's trainers; datasets is not in the image
#     (peft, transformers, accelerate, safetensors, tokenizers: in the image, not carried)
#     bitsandbytes                            the 4-bit peer; its wheel carries one library per CUDA
#                                             version (43 MB), so only the CUDA 13 ones and the CPU one
#                                             are kept (about 4 MB)
#     liger-kernel                            the Liger peer (Triton kernels; triton is in the image)
#
# datasets 4.7.0 rather than the newest: TRL needs >= 4.7.0, and 4.7.0 asks the least of the image's
# own packages (pyarrow >= 21, huggingface-hub < 2). --no-deps everywhere: each dependency the image
# lacks is named here, one version each (two versions of one package stop the whole install).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}  # the interpreter the project is installed in (make passes its own)

DEST=.whl
PACKAGES=(trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18
          bitsandbytes==0.50.2 liger-kernel==0.8.5)
LIMIT_MIB=${LIMIT_MIB:-48}  # of the 64 MiB that travel with the tree; the rest is the repository

mkdir -p "$DEST"
for spec in "${PACKAGES[@]}"; do  # drop other versions of these packages left by an earlier fetch
    name=${spec%%==*}
    rm -f "$DEST/${name//-/_}"-*.whl "$DEST/$name"-*.whl
done

# The GPU machine's interpreter: CPython 3.12 on x86-64 Linux (manylinux). pip matches the
# manylinux_2_N tag exactly, so the usual N are listed.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${PACKAGES[@]}"

# Slim bitsandbytes: keep libbitsandbytes_cpu.so and the CUDA 13.x builds, drop the others. The
# wheel keeps its name; pip installs the files it holds (RECORD still lists the dropped ones,
# which pip does not check for a wheel it installs).
"$PYTHON" - "$DEST" <<'EOF'
import glob, os, re, sys, zipfile
for path in glob.glob(os.path.join(sys.argv[1], "bitsandbytes-*.whl")):
    keep = lambda n: not re.search(r"libbitsandbytes_(cuda1[0-2]\d|rocm\d+|xpu\d+)\.so$", n)
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if keep(item.filename):
                dst.writestr(item, src.read(item.filename))
    os.replace(tmp, path)
    print(f"slimmed {os.path.basename(path)} to {os.path.getsize(path) / 2**20:.1f} MiB")
EOF

# Keep within LIMIT_MIB: the peers' wheels in the order above; one that does not fit is removed and
# named, with its reason, in .whl/SKIPPED.txt (run_gpu.sh prints it; that peer's rows then fail alone).
: > "$DEST/SKIPPED.txt"
total=0
for spec in "${PACKAGES[@]}"; do
    name=${spec%%==*}
    for whl in "$DEST/${name//-/_}"-*.whl "$DEST/$name"-*.whl; do
        [[ -e "$whl" ]] || continue
        size=$(( $(stat -c %s "$whl") / 1048576 + 1 ))
        if (( total + size > LIMIT_MIB )); then
            echo "$(basename "$whl"): ${size} MiB does not fit (${total} of ${LIMIT_MIB} MiB used)" | tee -a "$DEST/SKIPPED.txt"
            rm -f "$whl"
        else
            total=$((total + size))
        fi
    done
done
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
