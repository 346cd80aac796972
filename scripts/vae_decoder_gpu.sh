#!/usr/bin/env bash
# Train SAMA-Shapes VAE decoders behind the bundle's frozen encoder, several side by side on one GPU (a tiny
# VAE leaves a GPU mostly idle: each process is bound by kernel launches, not by the chip). The encoder is
# not touched, so the latents the bundled DiT was trained on stay valid: a better decoder is a drop-in.
#
#   bash scripts/vae_decoder_gpu.sh WORK PARTS_OUT NAME:DECODER_WIDTH:LR [NAME:DECODER_WIDTH:LR ...]
#     e.g. dec12:12:1e-4 (fine-tune the bundle's width-12 decoder)  dec24:24:3e-4 (a fresh, wider decoder)
#   env: INIT (the VAE file; default the bundle's), CLIPS (training clips, 4000), HELDOUT (held-out clips for
#        the exports' PSNR, 100), MINUTES (6 per decoder), BATCH (32), WORKERS (16 data-generation processes)
#
# Writes WORK/NAME/final (vae.safetensors, latent_stats.json, ...) and WORK/NAME.log, and packs the finals and
# logs into PARTS_OUT/decoders.tgz.part-aa, -ab, ... (15 MB each). Unpack: cat PARTS/decoders.tgz.part-* | tar xz
#
# Size the call (measured on an H200, session 9, three decoders side by side): data 4000 + 100 clips in 51 s;
# each trainer ~1.25 steps/s at batch 32 (~40 clips/s; the GPU mostly idle); then the exports run on the CPU,
# ~1.5 min for widths 12 and 16 and over 2 min for 24 when three run at once. A 580 s call with MINUTES=6.5 was
# killed before the width-24 export and the packing: give the exports and packing 3 minutes beyond
# 1 + MINUTES, or train fewer decoders at once.
set -euo pipefail
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # several trainers side by side: no oversubscription
WORK=${1:?work folder}; PARTS=${2:?folder for the packed results}; shift 2
[ $# -ge 1 ] || { echo "give at least one NAME:DECODER_WIDTH:LR" >&2; exit 2; }
INIT=$(realpath "${INIT:-$ROOT/sama_core/assets/sama-shapes/vae.safetensors}")
CLIPS=${CLIPS:-4000} HELDOUT=${HELDOUT:-100} MINUTES=${MINUTES:-6} BATCH=${BATCH:-32} WORKERS=${WORKERS:-16}
mkdir -p "$WORK" "$PARTS"

# The bundle's generator settings (train split seed 0: its first 1000 clips are the DiT's training clips).
t0=$(date +%s)
"$PY" -m train.synthetic --out "$WORK/data/train" --clips "$CLIPS" --seed 0 --split train --format npz \
  --no-images --workers "$WORKERS" --overwrite > "$WORK/data.log" 2>&1
"$PY" -m train.synthetic --out "$WORK/data/heldout" --clips "$HELDOUT" --seed 0 --split heldout --format npz \
  --no-images --workers "$WORKERS" --overwrite >> "$WORK/data.log" 2>&1
echo "data: $CLIPS + $HELDOUT clips in $(( $(date +%s) - t0 )) s"

pids=()
for spec in "$@"; do
  IFS=: read -r name width lr <<< "$spec"
  "$PY" -m train.vae_train --config "$ROOT/train/configs/shapes_vae_decoder.yaml" output_dir="$WORK/$name" \
    init_from="$INIT" model.decoder_base_dim="$width" optim.lr="$lr" max_minutes="$MINUTES" \
    batch_size="$BATCH" "data.datasets=[$WORK/data/train]" data.eval_dataset="$WORK/data/heldout" \
    > "$WORK/$name.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for spec in "$@"; do
  name=${spec%%:*}
  echo "== $name: $(grep -c '' "$WORK/$name/logs/metrics.jsonl" 2>/dev/null || echo 0) log rows"
  tail -n 3 "$WORK/$name.log"
done
names=(); for spec in "$@"; do names+=("${spec%%:*}/final" "${spec%%:*}/logs" "${spec%%:*}.log"); done
tar czf - -C "$WORK" --ignore-failed-read "${names[@]}" data.log | split -b 15m - "$PARTS/decoders.tgz.part-"
ls -l "$PARTS"
exit $status
