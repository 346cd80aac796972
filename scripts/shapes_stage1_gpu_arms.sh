#!/usr/bin/env bash
# Several stage-1 runs side by side on one GPU, each through scripts/shapes_stage1_gpu.sh on its own clips,
# all stopping by one deadline; what session 13 ran on an H100 (docs/sama_shapes.md has the numbers).
# The tiny DiT leaves an H100 partly idle (43-97% utilisation with two runs), so two runs share it well:
# ~250 samples/s each (session 13), against ~336 for one run alone (session 5).
#
#   OUT=FOLDER bash scripts/shapes_stage1_gpu_arms.sh BASE_RUN END_S NAME:CLIPS[:LAYERS] [...]
#
# BASE_RUN holds what scripts/shapes_stage1_gpu.sh needs (vae/final, encoders, init/sama_dit.safetensors);
# `python -m train.shapes unbundle --out BASE_RUN` writes it from the shipped bundle.
# Each arm NAME gets a copy of it in WORK/NAME (WORK defaults to /tmp), CLIPS training clips (train split,
# seed 0: a smaller arm's clips are the first ones of a larger arm's; generated once per count, before the
# arms start, and shared), and a clock that ends its training END_S seconds after this script started
# (minus a minute for loading). With LAYERS the arm starts from the DiT deepened to that many blocks by
# `python -m train.grow` (the same function, more capacity). It writes OUT/NAME.log and, in fp16 with the
# DiT's config (ready for a bundle's dit.safetensors):
#   OUT/NAME_ema.safetensors   the EMA weights (the stage's export)
#   OUT/NAME_raw.safetensors   the raw weights of the last checkpoint
# Settings: the environment of scripts/shapes_stage1_gpu.sh (BATCH, LR, EMA, EXTRA, ...) applies to every
# arm; WORKERS (8) data-loading processes per arm; GEN_WORKERS (8) clip-generation processes (not more:
# on the H100 machine 2000 clips took 162 s with nproc of them in session 17, 41 s with 8 in session 13);
# RAW=0 skips the NAME_raw files (the device tool brings back at most 8 files, 64 MiB).
# CACHED=1 builds one feature cache per clip count (WORK/cache_CLIPS, scripts/shapes_stage1_gpu.sh CACHE),
# after the clips and before the arms, on the same clock, and every arm of that count trains from it instead
# of encoding its batches' clips itself (OUT/cache_CLIPS.log says how long it took).
set -uo pipefail
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # runs side by side: no oversubscription
BASE=${1:?the base run folder (see the header)}; END_S=${2:?seconds from now by which training ends}; shift 2
OUT=${OUT:?set OUT to the folder for the logs and DiT files}
WORK=${WORK:-/tmp}
[ $# -ge 1 ] || { echo "give at least one NAME:CLIPS" >&2; exit 2; }
RUN=$BASE CHECK_ONLY=1 bash "$ROOT/scripts/shapes_stage1_gpu.sh" || exit 2  # every arm needs those files
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)

for spec in "$@"; do  # the clips, once per count, before any arm starts
  IFS=: read -r name clips layers <<< "$spec"
  [ -f "$WORK/clips_$clips/dataset.json" ] && continue
  "$PY" -m train.synthetic --out "$WORK/clips_$clips" --clips "$clips" --seed 0 --split train --format npz \
    --workers "${GEN_WORKERS:-8}" --overwrite > "$OUT/clips_$clips.log" 2>&1 \
    || { echo "clip generation failed: $OUT/clips_$clips.log" >&2; exit 1; }
  echo "$clips clips in $(( $(date +%s) - T0 )) s"
done

run_folder() {  # DEST CLIPS: a copy of BASE training on the clips of that count
  rm -rf "$1"; cp -r "$BASE" "$1"; mkdir -p "$1/data"; ln -s "$WORK/clips_$2" "$1/data/train"
}

if [ "${CACHED:-0}" = 1 ]; then  # the feature caches, once per count, before any arm starts
  for spec in "$@"; do
    IFS=: read -r name clips layers <<< "$spec"
    [ -f "$WORK/cache_$clips/cache_index.json" ] && continue
    builder="$WORK/cache_base_$clips"
    run_folder "$builder" "$clips"
    RUN=$builder CLIPS=$clips WORKERS=${WORKERS:-8} CACHE="$WORK/cache_$clips" CACHE_ONLY=1 \
      bash "$ROOT/scripts/shapes_stage1_gpu.sh" > "$OUT/cache_$clips.log" 2>&1 \
      || { echo "the feature cache failed: $OUT/cache_$clips.log" >&2; exit 1; }
    echo "cache of $clips clips in $(( $(date +%s) - T0 )) s"
  done
fi

arm() {  # NAME CLIPS [LAYERS]
  local name=$1 clips=$2 layers=${3:-} run="$WORK/$1" log="$OUT/$1.log" mins
  run_folder "$run" "$clips"
  if [ -n "$layers" ]; then
    mv "$run/init/sama_dit.safetensors" "$run/init/trained.safetensors"
    "$PY" -m train.grow --dit "$run/init/trained.safetensors" --layers "$layers" \
      --out "$run/init/sama_dit.safetensors" > "$log" 2>&1 || { echo "$name: train.grow failed" >> "$log"; return 1; }
  fi
  mins=$("$PY" -c "import sys, time; print(round(max(0.2, (float(sys.argv[1]) - time.time() - 60) / 60), 2))" \
    $(( T0 + END_S )))
  echo "$name: $clips clips${layers:+, $layers blocks}${CACHED:+ (CACHED=$CACHED)}; training for $mins min from $(( $(date +%s) - T0 )) s" >> "$log"
  local cache=""; [ "${CACHED:-0}" = 1 ] && cache="$WORK/cache_$clips"
  RUN=$run CLIPS=$clips WORKERS=${WORKERS:-8} MINUTES=$mins CACHE=$cache \
    bash "$ROOT/scripts/shapes_stage1_gpu.sh" >> "$log" 2>&1 \
    || { echo "$name: training failed" >> "$log"; return 1; }
  "$PY" - "$run/stage1" "$OUT/$name" "${RAW:-1}" >> "$log" 2>&1 <<'EOF'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sama_core.loading import load_dit, save_dit
from train.checkpoint import list_checkpoints

stage, prefix = Path(sys.argv[1]), sys.argv[2]
dit = load_dit(stage / "final" / "sama_dit.safetensors", dtype=torch.float32)  # the export: EMA + config
save_dit(dit.to(torch.float16), f"{prefix}_ema.safetensors")
if sys.argv[3] == "0":  # RAW=0
    print(f"wrote {prefix}_ema.safetensors (fp16)")
    sys.exit(0)
step, last = list_checkpoints(stage)[-1]
dit.float().load_state_dict(load_file(str(last / "model.safetensors")))
save_dit(dit.to(torch.float16), f"{prefix}_raw.safetensors")
print(f"wrote {prefix}_ema.safetensors and {prefix}_raw.safetensors (step {step}, fp16)")
EOF
  echo "$name: done in $(( $(date +%s) - T0 )) s" >> "$log"
}

pids=()
for spec in "$@"; do
  IFS=: read -r name clips layers <<< "$spec"
  arm "$name" "$clips" "$layers" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for spec in "$@"; do grep -E "^(${spec%%:*}: |wrote )|train.loop: step" "$OUT/${spec%%:*}.log" | tail -n 4; done
exit $status
