#!/usr/bin/env bash
# Set up .venv with chipo installed (editable). Usage: bash scripts/setup.sh [--test]
#   --test  also installs the test tools and TRL (the cross-check peer).
# PyTorch: with an NVIDIA GPU present, pip's default (CUDA) build; without one, the CPU build torch==2.13.0
# (a bare `torch` requirement on a GPU-less machine would otherwise pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
step() { echo "setup: $* ($(date +%T))"; }
[ -x .venv/bin/python ] || { step "creating .venv"; "$PYTHON" -m venv .venv; }
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    step "installing PyTorch (CUDA build, a few GB: minutes)"
    "${PIP[@]}" "torch>=2.4"
  else
    step "installing PyTorch (CPU build)"
    "${PIP[@]}" "torch==2.13.0"
  fi
fi
extras=""
[ "${1:-}" = "--test" ] && extras="[test,trl]"
step "installing chipo${extras} and its dependencies (transformers, datasets, accelerate, peft, ...)"
"${PIP[@]}" -e ".${extras}"
step "done"
