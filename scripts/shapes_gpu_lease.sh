#!/usr/bin/env bash
# SAMA-Shapes from scratch on a short GPU lease (`python -m train.shapes run --budget gpu`), in calls of at
# most ~10 minutes whose results travel as a packed run folder (at most 15 MB per part file):
#
#   on the GPU:  bash scripts/shapes_gpu_lease.sh base   RUN PARTS_OUT            # data, VAE, encoders, stage 0
#   on the GPU:  bash scripts/shapes_gpu_lease.sh stage1 RUN PARTS_OUT PARTS_IN   # stage 1
#   here (CPU):  bash scripts/shapes_gpu_lease.sh finish RUN PARTS_IN             # export + held-out eval
#
# A pack holds the run folder without its clips, caches and checkpoints (tar keeps the stamps' times); the
# next call regenerates the clips (the same seed gives the same data digest, so nothing after the data stage
# runs again) and continues. Stages stop on the clock (see BUDGETS["gpu"] in train/shapes.py).
set -euo pipefail
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-gpu}  # tiny_gpu: the same flow at toy size (what tests/test_shapes_pipeline.py runs)
what=${1:?base, stage1 or finish}
RUN=${2:?the run folder}

unpack() {  # PARTS_IN -> RUN
  mkdir -p "$RUN"
  cat "$1"/run.tgz.part-* | tar xzf - -C "$RUN"
}
pack() {  # RUN -> PARTS_OUT/run.tgz.part-aa, -ab, ...
  mkdir -p "$1"
  tar czf - -C "$RUN" --exclude=./data --exclude=./cache --exclude='checkpoint-*' --exclude='.tmp-*' . \
    | split -b 15m - "$1/run.tgz.part-"
  ls -l "$1"
}

case "$what" in
  base)
    "$PY" -m train.shapes run --out "$RUN" --budget "$BUDGET" --until stage0
    pack "${3:?PARTS_OUT}" ;;
  stage1)
    unpack "${4:?PARTS_IN}"
    "$PY" -m train.shapes run --out "$RUN" --budget "$BUDGET" --until stage1
    pack "${3:?PARTS_OUT}" ;;
  finish)
    unpack "${3:?PARTS_IN}"
    "$PY" -m train.shapes run --out "$RUN" --budget "$BUDGET" ;;
  *)
    echo "unknown step '$what': base, stage1 or finish" >&2; exit 2 ;;
esac
