#!/usr/bin/env bash
# Install tmdcli into the current Python. Torch goes first: a bare `torch` requirement on a machine without torch
# would pull a multi-GB CUDA build. Usage: scripts/setup.sh [--dev]   (PYTHON=python3.11 to pick an interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --quiet --disable-pip-version-check"

if $PY -c "import torch" 2>/dev/null; then
  echo "setup: using installed torch $($PY -c 'import torch; print(torch.__version__)')" >&2
else
  # 2.13.0 is the CPU build these machines hold on disk; on a GPU machine install your CUDA torch first.
  echo "setup: installing torch==2.13.0" >&2
  $PIP "torch==2.13.0"
fi

if [ "${1:-}" = "--dev" ]; then
  $PIP -e ".[dev,plot,lora]"  # lora: peft, so the LoRA tests run instead of skipping
else
  $PIP -e "."
fi
echo "setup: tmd $($PY -m tmdcli --version | cut -d' ' -f2) installed" >&2
