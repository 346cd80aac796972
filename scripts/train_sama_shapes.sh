#!/usr/bin/env bash
# SAMA-Shapes: train the embedded tiny model end to end, install it, then the toy-reproduction ablations.
# Resumable: run it again after an interruption and every stage continues where it stopped
# (docs/sama_shapes.md). On 2 CPU cores: ~2 h for the main run, ~40 min per ablation (they share its caches).
#   scripts/train_sama_shapes.sh              # main run + ablations + convergence curves
#   scripts/train_sama_shapes.sh main         # only the main run (installs the bundle)
#   RUNS=/data/runs scripts/train_sama_shapes.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RUNS=${RUNS:-runs}
export HF_HUB_OFFLINE=1

"$PY" -m train.shapes run --out "$RUNS/shapes" --install
[ "${1:-all}" = "main" ] && exit 0

"$PY" -m train.shapes run --out "$RUNS/shapes_no_sa" --variant no_sa --reuse "$RUNS/shapes"
"$PY" -m train.shapes run --out "$RUNS/shapes_no_ma" --variant no_ma --reuse "$RUNS/shapes"
for run in shapes shapes_no_sa shapes_no_ma; do
  "$PY" -m train.shapes curve --out "$RUNS/$run" --limit 20
done
"$PY" -m train.shapes compare --runs "$RUNS/shapes" "$RUNS/shapes_no_sa" "$RUNS/shapes_no_ma" \
  --out "$RUNS/toy_reproduction"
echo "tables: $RUNS/*/eval/results.md   curves: $RUNS/*/curves/curves.png   all arms: $RUNS/toy_reproduction/results.md"
