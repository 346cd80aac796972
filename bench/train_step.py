"""Where a training step's time goes: the data loader, the encoders (raw clips only), the move to
the device and the DiT step.

    python bench/train_step.py --config runs/shapes_gpu/stage1_gpu.yaml [--batches 20]

Times the four parts of train.loop's step separately, each over the same number of batches after one
warm-up batch, on the config's data, batch size and device (CUDA when there is one), and prints the share
of each. The DiT's updates are thrown away: no checkpoint or export is written (only the data index that
training from raw clips writes anyway).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import load_config  # noqa: E402
from train.features import batch_to  # noqa: E402
from train.loop import build_training_data, make_accelerator, make_loader, optimizer_step  # noqa: E402
from train.modeling import build_dit  # noqa: E402


def synced() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = p.parse_args(argv)
    cfg = load_config(Path(args.config), args.overrides)
    accelerator = make_accelerator(cfg)
    data = build_training_data(cfg, accelerator)
    model = build_dit(cfg).model
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.optim.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [q for q in model.parameters() if q.requires_grad]
    batches = iter(make_loader(cfg, data, accelerator, start_batch=0))
    n = args.batches

    def timed_features(raws):
        """(features on the device, seconds in the encoders, seconds moving to the device). A cache's
        batches skip the encoders, so their encoder time is exactly 0, not a clock's jitter."""
        encoded, encode_sec = raws, 0.0
        if data.encoders is not None:
            start = synced()
            encoded = [data.encoders.encode_batch(r) for r in raws]
            encode_sec = synced() - start
        start = synced()
        on_device = [batch_to(f, accelerator.device) for f in encoded]
        return on_device, encode_sec, synced() - start

    next(batches)  # workers start
    start = synced()
    raws = [next(batches) for _ in range(n + 1)]
    loader = (synced() - start) / (n + 1)
    timed_features(raws[:1])  # warm-up
    features, encode, transfer = timed_features(raws[1:])
    encode, transfer = encode / n, transfer / n
    patch = accelerator.unwrap_model(model).config.patch_size
    optimizer_step(accelerator, model, optimizer, [features[0]], cfg, lambda f: f, trainable, patch)
    start = synced()
    for f in features:
        optimizer_step(accelerator, model, optimizer, [f], cfg, lambda f: f, trainable, patch)
    step = (synced() - start) / n
    total = loader + encode + transfer + step
    size = cfg.train.batch_size
    print(f"device {accelerator.device}, batch {size}, {n} batches, {cfg.data.num_workers} loader workers")
    parts = (("loader (one process's wait)", loader), ("encoders", encode), ("to device", transfer),
             ("DiT step", step))
    for name, sec in parts:
        alone = f"({size / sec:8.0f} samples/s alone)" if sec > 0 else "(not run: features from the cache)"
        print(f"  {name:28s} {sec * 1000:8.1f} ms/batch  {100 * sec / total:5.1f}%  {alone}")
    print(f"  all four in series: {size / total:.0f} samples/s "
          "(the loader's workers overlap it in training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
