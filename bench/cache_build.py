"""How fast the feature cache encodes, by clips per VAE call (train/cache.py encode_limits).

    python bench/cache_build.py --config runs/s10/stage1.yaml [--samples 64] [--batches 1,2,8] [--workers 0]

Writes one cache shard of the config's first --samples distinct samples once per batch size (into a temporary
folder; the config's cache is not touched), in one process, and prints the seconds per sample, the ratio to
the first batch size, and the largest difference of any cached tensor from the first batch size's shard
(batching changes only the order of the VAE's floating-point sums). The data index is built in the temporary
folder too. The first shard is written once more untimed beforehand, so that every timed run finds the
decoder and the encoders warm. A batch size scales the chunk limits with it, as `data.cache_encode_batch`
does; --workers decodes the samples in that many loader processes (`data.num_workers`). The encoders run on
CUDA when there is one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train.cache as cache  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import RawMediaDataset, load_or_build_index, pretext_names_in  # noqa: E402
from train.features import DTYPES, FeatureEncoders  # noqa: E402


def parse_batches(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--batches {text!r}: give clip counts >= 1 separated by commas, e.g. 1,2,8")
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--samples", type=int, default=64, help="distinct samples to encode (default 64)")
    p.add_argument("--batches", default="1,2,8", help="clips per VAE call to compare (default 1,2,8)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: this one)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = p.parse_args(argv)
    sizes = parse_batches(args.batches)
    if args.workers < 0:
        raise SystemExit(f"--workers {args.workers}: give 0 (decode in this process) or more")
    if args.samples < 1:
        raise SystemExit(f"--samples {args.samples}: give at least 1")
    cfg = load_config(Path(args.config), args.overrides)
    with tempfile.TemporaryDirectory(prefix="sama-cache-bench-") as tmp:
        tmp = Path(tmp)
        index = load_or_build_index(cfg, tmp / "data_index.json")
        indices = cache._unique_rows(index)[: args.samples]
        dataset = RawMediaDataset(index, cfg.data)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        encoders = FeatureEncoders.from_config(cfg, device=device)
        pretexts = pretext_names_in(cfg.data.pretext_mix)
        store = DTYPES[cfg.data.cache_dtype]

        def write(size: int, path: Path) -> float:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            cache.write_shard(dataset, encoders, 0, indices, path, cfg.seed, pretexts, store,
                              cache.encode_limits(size), args.workers)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

        seconds, shards = {}, {}
        write(sizes[0], tmp / "warm.safetensors")
        for size in sizes:
            seconds[size] = write(size, tmp / f"batch{size}.safetensors")
            shards[size] = load_file(str(tmp / f"batch{size}.safetensors"))
    base, first = sizes[0], shards[sizes[0]]
    print(f"{len(indices)} samples, {torch.get_num_threads()} threads, device {device}, "
          f"{args.workers} decoding workers")
    for size in sizes:
        diff = max((float((shards[size][k] - first[k]).abs().max()) for k in first), default=0.0)
        print(f"  {size:3d} clips per VAE call: {seconds[size] / len(indices) * 1000:8.1f} ms/sample  "
              f"x{seconds[base] / seconds[size]:5.2f} against {base}  max |difference| {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
