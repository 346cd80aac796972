"""Sampling speed/quality trade-offs against the exact reference loop, measured in one run.

    python bench/sampling.py [--steps 50] [--size 32] [--frames 9]

Runs the released default (Euler, 50 steps, CFG 5) on a random medium-size SAMA DiT, then each opt-in
speed option, and prints wall time, model evaluations, the speed-up ratio, the relative L2 difference and
the PSNR (peak = the exact latents' range) of the final latents against the exact path. (Random weights make trajectories chaotic: the differences are an
upper bound of what a trained model shows; rerun with real weights to report quality.)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sama_core.config import SamaConfig  # noqa: E402
from sama_core.model import SamaDiT  # noqa: E402
from sama_core.sampler import SamplerOptions, sample  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=32, help="latent side (pixels / 8)")
    p.add_argument("--frames", type=int, default=3, help="latent frames")
    p.add_argument("--repeats", type=int, default=1, help="time each option this many times, keep the fastest")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = SamaConfig(dim=256, ffn_dim=768, num_heads=2, num_layers=4, text_dim=64, freq_dim=64)
    model = SamaDiT(cfg).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.mul_(0.5)
    g = torch.Generator().manual_seed(1)
    source = torch.randn(1, 16, args.frames, args.size, args.size, generator=g)
    cond, uncond = torch.randn(1, 20, 64, generator=g), torch.randn(1, 5, 64, generator=g)

    def run(options=None, **opts):
        best = float("inf")
        for _ in range(args.repeats):  # the fastest of N: other load on the machine only ever adds time
            start = time.perf_counter()
            res = sample(model, cond, uncond, source=source, options=options or SamplerOptions(seed=3, **opts))
            best = min(best, time.perf_counter() - start)
        return res, best

    exact, t_exact = run(steps=args.steps)
    print(f"device cpu, threads {torch.get_num_threads()}, tokens/pass {2 * args.frames * (args.size // 2) ** 2 + 65}")
    # "speed-up" is measured wall time; "eval ratio" (model evaluations saved) does not depend on machine load.
    print(f"{'option':38s} {'time s':>8s} {'evals':>6s} {'speed-up':>9s} {'eval ratio':>10s} {'rel. L2 diff':>13s} "
          f"{'PSNR dB':>8s}")
    print(f"{'exact: euler ' + str(args.steps) + ' steps, cfg 5':38s} {t_exact:8.2f} {args.steps:6d} {1.0:9.2f} "
          f"{1.0:10.2f} {0.0:13.4f} {'inf':>8s}")
    variants = {
        "batched cfg": dict(steps=args.steps, batch_cfg=True),
        "unipc 30 steps": dict(steps=30, solver="unipc"),
        "unipc 20 steps": dict(steps=20, solver="unipc"),
        "step cache 0.05": dict(steps=args.steps, cache_threshold=0.05),
        "step cache 0.15": dict(steps=args.steps, cache_threshold=0.15),
        "unipc 30 + step cache 0.05": dict(steps=30, solver="unipc", cache_threshold=0.05),
        "fast preset (unipc 20 + cache 0.05 + batched cfg)": None,
    }
    peak = float(exact.latents.max() - exact.latents.min())
    for name, opts in variants.items():
        res, t = run(**opts) if opts is not None else run(SamplerOptions.fast(seed=3))
        diff = float((res.latents - exact.latents).norm() / exact.latents.norm())
        mse = float((res.latents - exact.latents).square().mean())
        psnr = 10 * math.log10(peak ** 2 / mse) if mse > 0 else float("inf")
        evals = res.stats["model_calls"]
        print(f"{name:38s} {t:8.2f} {evals:6d} {t_exact / t:9.2f} {args.steps / evals:10.2f} {diff:13.4f} {psnr:8.1f}")


if __name__ == "__main__":
    main()
