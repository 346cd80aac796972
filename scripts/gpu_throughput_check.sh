#!/usr/bin/env bash
# Where a GPU's stage-1 time goes, before a lease is spent on training: a short, prepared measurement.
#
#   OUT=FOLDER bash scripts/gpu_throughput_check.sh BASE_RUN
#
# BASE_RUN holds what scripts/shapes_stage1_gpu.sh needs (vae/final, encoders, init/sama_dit.safetensors);
# `python -m train.shapes unbundle --out BASE_RUN` writes it from the shipped bundle.
# In WORK/throughput (WORK defaults to /tmp) it
#   1. generates CLIPS training clips (400) with WORKERS (8) processes and prepares the stage-1 config
#      (scripts/shapes_stage1_gpu.sh PREPARE_ONLY=1);
#   2. times the feature cache's encoding of SAMPLES samples (256) at 8 and CACHE_BATCH (64) clips per VAE call,
#      decoded by WORKERS (8) processes (bench/cache_build.py);
#   3. builds the whole cache of the clips (scripts/shapes_stage1_gpu.sh CACHE_ONLY=1) and times it;
#   4. times BATCHES (20) training steps at BATCH (64) from the raw clips and from the cache, the loader, the
#      encoders, the move to the device and the DiT step apart (bench/train_step.py).
# Everything it prints goes to OUT/throughput.log as well; the summary at the end is what to report. On 2 CPU
# cores (session 18, batch 64) the encoders took 75% of a step from raw clips (22.8 s of 30.4 s per batch)
# and training from the cache ran 4.1x as many samples per second; a GPU was not measured yet.
set -uo pipefail
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
BASE=${1:?the base run folder (see the header)}
OUT=${OUT:?set OUT to the folder for the log}
WORK=${WORK:-/tmp}
CLIPS=${CLIPS:-400}; SAMPLES=${SAMPLES:-256}; BATCH=${BATCH:-64}; BATCHES=${BATCHES:-20}
CACHE_BATCH=${CACHE_BATCH:-64}; WORKERS=${WORKERS:-8}
RUN=$BASE CHECK_ONLY=1 bash "$ROOT/scripts/shapes_stage1_gpu.sh" || exit 2
mkdir -p "$OUT" "$WORK"
LOG="$OUT/throughput.log"
exec > >(tee "$LOG") 2>&1
run="$WORK/throughput"
rm -rf "$run"; cp -r "$BASE" "$run" || exit 1

step() { echo "== $*"; }
T=$(date +%s)
step "1. $CLIPS clips"
RUN=$run CLIPS=$CLIPS PREPARE_ONLY=1 BATCH=$BATCH WORKERS=$WORKERS bash "$ROOT/scripts/shapes_stage1_gpu.sh" \
  > "$OUT/clips.log" 2>&1 || { echo "clip generation or the config failed: $OUT/clips.log"; exit 1; }
CLIP_S=$(( $(date +%s) - T ))

step "2. cache encoding, $SAMPLES samples"
"$PY" "$ROOT/bench/cache_build.py" --config "$run/stage1_gpu.yaml" --samples "$SAMPLES" \
  --batches "8,$CACHE_BATCH" --workers "$WORKERS" 2>&1 | grep -E "samples,|clips per VAE call" | tee "$OUT/cache_bench.txt"

step "3. the whole cache"
T=$(date +%s)
RUN=$run CACHE="$run/cache" CACHE_ONLY=1 CACHE_BATCH=$CACHE_BATCH BATCH=$BATCH WORKERS=$WORKERS \
  bash "$ROOT/scripts/shapes_stage1_gpu.sh" > "$OUT/cache.log" 2>&1 || { echo "cache failed: $OUT/cache.log"; exit 1; }
CACHE_S=$(( $(date +%s) - T ))
CACHED_SAMPLES=$("$PY" -c "import json, sys; print(len(json.load(open(sys.argv[1]))['samples']))" "$run/cache/cache_index.json")

step "4. training steps, batch $BATCH"
for source in raw cached; do
  if [ "$source" = raw ]; then where=data.cache_dir=null; else where="data.cache_dir=$run/cache"; fi
  "$PY" "$ROOT/bench/train_step.py" --config "$run/stage1_gpu.yaml" --batches "$BATCHES" \
    output_dir="$WORK/throughput_$source" "$where" 2>&1 | grep -E "device|ms/batch|in series" \
    | sed "s/^/$source: /" | tee "$OUT/step_$source.txt"
done

echo "== summary"
echo "clips: $CLIPS in $CLIP_S s (with the config)"
echo "cache: $CACHED_SAMPLES samples in $CACHE_S s"
grep "clips per VAE call" "$OUT/cache_bench.txt"
grep -h "in series" "$OUT/step_raw.txt" "$OUT/step_cached.txt"
