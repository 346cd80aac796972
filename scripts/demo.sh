#!/usr/bin/env bash
# Fresh machine -> a real SAMA edit on the CPU with the bundled tiny model (no downloads of model weights).
# Installs torch only when it is missing (the CPU build; ComfyUI users already have theirs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet torch==2.13.0
fi
constraints=$(mktemp)
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" >"$constraints"
"$PY" -m pip install --quiet -c "$constraints" -r requirements.txt
exec "$PY" -m sama_core demo "$@"
