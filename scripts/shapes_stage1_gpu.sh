#!/usr/bin/env bash
# Continue SAMA-Shapes stage 1 on one GPU for a fixed number of minutes, from raw clips (the encoders run
# next to the DiT every step) or, with CACHE, from a feature cache built here first.
#
#   RUN=runs/shapes_gpu MINUTES=6 bash scripts/shapes_stage1_gpu.sh
#
# RUN must hold the frozen parts of a finished run and the DiT to start from:
#   RUN/vae/final/{vae.safetensors,latent_stats.json,...}   (copied from runs/shapes/vae/final)
#   RUN/encoders/                                           (copied from runs/shapes/encoders)
#   RUN/init/sama_dit.safetensors                            (stage 0's export, or a stage-1 checkpoint's EMA
#                                                            DiT written by train.shapes.checkpoint_dit)
# `python -m train.shapes unbundle --out RUN` writes all three from a bundle (default: the shipped one), so the
# bundled model can be continued without the run that made it.
# The training clips are generated here (train.synthetic, seed 0, split train: the same clips as
# `train.shapes run`, CLIPS of them). The run stops after MINUTES (train.max_minutes) with a checkpoint and
# RUN/stage1/final/sama_dit.safetensors; running the script again continues it (--resume latest).
# PREPARE_ONLY=1 stops after the clips and the config (e.g. to run bench/train_step.py on them first);
# CHECK_ONLY=1 stops after checking that RUN holds the files above (exit 2 naming the first missing one).
# CACHE=DIR trains from a feature cache in DIR (`python -m train cache`: every sample's VAE latents, text rows
# and anchor tokens, computed once, CACHE_BATCH clips per VAE call, default 64, decoded by WORKERS processes),
# built here when DIR holds no complete cache; a complete one is used as it is (arms share one). On 2 CPU
# cores the encoders were 75% of a batch-64 step from raw clips (session 18, bench/train_step.py). CACHE_ONLY=1
# stops after building it.
# EMA sets ema.decay (0.999). EXTRA holds more config overrides, space-separated, applied last, e.g.
#   EXTRA="train.keep_region_weight=25 optim.decay_from_step=1200 optim.final_lr=1e-4"
# Several runs side by side on one GPU: scripts/shapes_stage1_gpu_arms.sh. Sessions 5 and 13 ran this on an
# H100 (docs/sama_shapes.md has the numbers).
set -euo pipefail
PY=${PYTHON:-python3}
RUN=${RUN:?set RUN to the run folder (see the header of this script)}
MINUTES=${MINUTES:-6}
CLIPS=${CLIPS:-2000}
BATCH=${BATCH:-64}
LR=${LR:-5e-4}
EMA=${EMA:-0.999}
WORKERS=${WORKERS:-$(nproc)}
CACHE=${CACHE:-}
CACHE_BATCH=${CACHE_BATCH:-64}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

for need in vae/final/vae.safetensors encoders/text_encoder.safetensors init/sama_dit.safetensors; do
  [ -f "$RUN/$need" ] || { echo "missing $RUN/$need (see the header of $0)" >&2; exit 2; }
done
[ "${CHECK_ONLY:-0}" = 1 ] && exit 0

if [ ! -f "$RUN/data/train/dataset.json" ]; then
  echo "== generating $CLIPS training clips ($WORKERS processes)"
  "$PY" -m train.synthetic --out "$RUN/data/train" --clips "$CLIPS" --seed 0 --split train --format npz \
    --workers "$WORKERS" --overwrite
fi

# The stage-1 template (train/configs/shapes_stage1.yaml: edit-region weighting, prompt dropout, ...) with a
# GPU-sized batch, raw clips or CACHE and the clock as the limit, resolved into RUN/stage1_gpu.yaml.
if [ -n "$CACHE" ]; then
  mkdir -p "$CACHE"; CACHE=$(cd "$CACHE" && pwd)
  DATA_SOURCE="data.cache_dir=$CACHE data.cache_encode_batch=$CACHE_BATCH"
else
  DATA_SOURCE="data.cache_dir=null"
fi
cp "$ROOT/train/configs/shapes_stage1.yaml" "$RUN/stage1_gpu.yaml"
"$PY" -c 'import sys; from train.config import load_config, save_config
save_config(load_config(sys.argv[1], sys.argv[2:]), sys.argv[1])' "$RUN/stage1_gpu.yaml" \
  model.init_from=init/sama_dit.safetensors $DATA_SOURCE \
  data.num_workers=$(( WORKERS > 12 ? 12 : WORKERS )) data.probe_workers="$WORKERS" \
  train.batch_size="$BATCH" train.max_steps=1000000 train.max_minutes="$MINUTES" \
  optim.lr="$LR" optim.warmup_steps=200 ema.decay="$EMA" checkpoint.keep=2 validation.every=0 log.every=100 \
  ${EXTRA:-}

[ "${PREPARE_ONLY:-0}" = 1 ] && { echo "== prepared $RUN/stage1_gpu.yaml"; exit 0; }

if [ -n "$CACHE" ] && [ ! -f "$CACHE/cache_index.json" ]; then
  echo "== feature cache of the clips -> $CACHE ($CACHE_BATCH clips per VAE call)"
  T_CACHE=$(date +%s)
  "$PY" -m train cache --config "$RUN/stage1_gpu.yaml"
  echo "== cache built in $(( $(date +%s) - T_CACHE )) s"
fi
[ "${CACHE_ONLY:-0}" = 1 ] && { echo "== cache ready in $CACHE"; exit 0; }

echo "== stage 1 for $MINUTES min (batch $BATCH, lr $LR, EMA $EMA${CACHE:+, from the cache $CACHE}${EXTRA:+, $EXTRA})"
"$PY" -m train stage1 --config "$RUN/stage1_gpu.yaml" --resume latest
echo "== exported $RUN/stage1/final/sama_dit.safetensors"
