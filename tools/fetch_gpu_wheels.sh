#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels that tools/gpu_check.py installs on a GPU machine without
# network: the packages that machine's image lacks and the app uses (README, "GPU check"). They go to
# tools/gpu_wheels/ (git-ignored), which the GPU run carries along with the repository.
#
#   bash tools/fetch_gpu_wheels.sh [DIR]
#
# PYTHON_VERSIONS: the GPU machine's Python (the only compiled wheel here, pydantic-core, depends on it);
# BNB_KEEP: the bitsandbytes libraries kept (the GPU image's torch is built for CUDA 13.0, so bitsandbytes
# loads libbitsandbytes_cuda130.so; the wheel also carries 12 other CUDA, ROCm and XPU builds, 120 MB
# unpacked, which are dropped so that everything fits the 64 MiB a GPU run may carry).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-tools/gpu_wheels}"
PYTHON_VERSIONS="${PYTHON_VERSIONS:-3.12 3.11}"
BNB_KEEP="${BNB_KEEP:-cpu cuda130 cuda132}"
# diffusers: SDXL (imports importlib_metadata); spaces: the ZeroGPU decorator (imports pydantic, not gradio);
# bitsandbytes: load_in_4bit / load_in_8bit; transformers: the image's 5.17 is older than the engine needs
# (5.24: the KV cache is handed over as `cache=`), and 5.24 works with the image's huggingface_hub 1.33 (5.25
# wants 2.4). Pinned, so that a later run fetches the same files.
PACKAGES="diffusers==0.42.1 spaces==0.51.3 bitsandbytes==0.50.2 transformers==5.24.0 pydantic==2.13.4
annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0 importlib-metadata==8.7.0 zipp==4.1.2"
PLATFORMS="--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64
--platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64"
PY="${PYTHON:-python3}"

mkdir -p "$DIR"
rm -f "$DIR"/*.whl
for v in $PYTHON_VERSIONS; do
  # --no-deps: every file is named here (their own needs are on the GPU image already, or listed above)
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --implementation cp \
    --python-version "$v" $PLATFORMS -d "$DIR" $PACKAGES
  # pydantic-core is pinned exactly by pydantic: take the version it names
  core=$(unzip -p "$DIR"/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --implementation cp \
    --python-version "$v" $PLATFORMS -d "$DIR" "pydantic-core==$core"
done

# bitsandbytes without the libraries this GPU image cannot use; its RECORD is rewritten to match
"$PY" - "$DIR" "$BNB_KEEP" <<'EOF'
import sys, zipfile
from pathlib import Path
folder, keep = Path(sys.argv[1]), sys.argv[2].split()
for wheel in folder.glob("bitsandbytes-*.whl"):
    def dropped(name):
        lib = Path(name).name
        return lib.startswith("libbitsandbytes_") and lib.endswith(".so") and \
            lib[len("libbitsandbytes_"):-len(".so")] not in keep
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if dropped(info.filename):
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not dropped(line.split(",")[0])).encode()
            out.writestr(info, data)
    tmp.replace(wheel)
    print(f"{wheel.name}: kept libbitsandbytes_{{{','.join(keep)}}}.so")
EOF

total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
ls -l "$DIR"
echo "wheels: $((total / 1024)) KiB in $DIR; with the tracked files a GPU run carries" \
  "$(((total + tree) / 1048576)) MiB (limit 64)"
if [ $((total + tree)) -gt $((64 * 1048576)) ]; then
  echo "too large for one GPU run: fewer PYTHON_VERSIONS or BNB_KEEP" >&2
  exit 1
fi
