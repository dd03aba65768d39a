#!/usr/bin/env bash
# Make (or reuse) a virtual environment with lmms-eval (PyPI `lmms-eval`), separate from the project's env:
# lmms-eval pins its own transformers / torch / datasets stack, which need not match ours.
#
#   tools/setup_lmms_eval.sh [VENV_DIR] [--full]     # default VENV_DIR: $LMMS_VENV or /work/venv-lmms
#   PY=$(tools/setup_lmms_eval.sh /tmp/venv-lmms)    # stdout is only the venv's python path; logs go to stderr
#
# Idempotent: a venv whose lmms_eval already imports at the wanted version is left as it is.
#
# Two sizes:
#   default  what lmms-eval's `openai` model (any OpenAI-compatible server, here mgm-serve) needs to run local
#            tasks and the paper's tasks in mini_gemini/eval/lmms_tasks: lmms-eval without its dependencies, then
#            the ones those imports reach (a CPU torch for `accelerate`, about 1-3 min on 2 cores). CI uses this.
#   --full   `pip install lmms-eval` with all its dependencies (video, audio, metrics extras of tasks beyond the
#            paper's; a large download) for running other lmms-eval tasks too.
# Environment knobs:
#   PYTHON             interpreter for the venv (default: python3.11, else python3)
#   LMMS_EVAL_VERSION  default 0.7.3 (the version this project's tasks were checked with)
#   TORCH_SPEC         default torch==2.13.0+cpu where /opt/wheels has it, else torch (default build)
#   TORCH_INDEX        extra index for the torch wheel, e.g. https://download.pytorch.org/whl/cpu
set -euo pipefail

VENV="${LMMS_VENV:-/work/venv-lmms}"
FULL=0
for arg in "$@"; do
  case "$arg" in
    --full) FULL=1 ;;
    *) VENV="$arg" ;;
  esac
done
LMMS_EVAL_VERSION="${LMMS_EVAL_VERSION:-0.7.3}"
log() { echo "[setup_lmms_eval] $*" >&2; }
source "$(dirname "$0")/side_venv.sh"
PYTHON="$(side_venv_python)"
side_venv_pip_sources
if [ -d /opt/wheels ]; then
  TORCH_SPEC="${TORCH_SPEC:-$(ls /opt/wheels 2>/dev/null | grep -q '^torch-2.13.0+cpu' && echo 'torch==2.13.0+cpu' || echo torch)}"
fi
TORCH_SPEC="${TORCH_SPEC:-torch}"

side_venv_reuse "$VENV" "lmms-eval $LMMS_EVAL_VERSION" "$LMMS_EVAL_VERSION" <<'EOF'
import sys
from importlib.metadata import version
assert version("lmms_eval") == sys.argv[1]
import lmms_eval.evaluator  # noqa: F401  (torch, datasets, accelerate, filelock's internals)
import openai  # noqa: F401
EOF

side_venv_create "$VENV"

if [ "$FULL" = 1 ]; then
  log "installing lmms-eval==$LMMS_EVAL_VERSION with all its dependencies"
  "${PIP[@]}" install -q "${PIP_EXTRA[@]}" "lmms-eval==$LMMS_EVAL_VERSION" "filelock<4" >&2
else
  log "installing $TORCH_SPEC"
  "${PIP[@]}" install -q "${PIP_EXTRA[@]}" "$TORCH_SPEC" >&2
  log "installing lmms-eval==$LMMS_EVAL_VERSION (no deps) and what its openai model and tasks import"
  "${PIP[@]}" install -q --no-deps "lmms-eval==$LMMS_EVAL_VERSION" >&2
  # filelock 4 dropped the module lmms-eval 0.7.3 patches (filelock._api); openpyxl: MMBench's submission file
  "${PIP[@]}" install -q "${PIP_EXTRA[@]}" -c <(echo "$TORCH_SPEC") \
    numpy pillow pyyaml jinja2 loguru tqdm python-dotenv tenacity "filelock<4" openai accelerate datasets evaluate \
    transformers pytablewriter sacrebleu openpyxl >&2 || { log "pip install of the requirements failed"; exit 1; }
fi

"$VENV/bin/python" -c "import lmms_eval.evaluator, openai, torch; from importlib.metadata import version; print('lmms-eval', version('lmms_eval'), 'openai', openai.__version__, 'torch', torch.__version__)" >&2
log "done in $(( $(date +%s) - start ))s"
echo "$VENV/bin/python"
