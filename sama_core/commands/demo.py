"""`demo`: a complete edit on the CPU with the bundled tiny model, no downloads."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from .edit import add_keep_unchanged_arg

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TRAINED_BUNDLE = ASSETS / "sama-shapes"
SAMPLE_CLIP = ASSETS / "sample.mp4"
DEFAULT_PROMPT = "make the red circle blue"


def register(sub):
    p = sub.add_parser("demo", help="edit a bundled sample clip with the bundled tiny model (CPU, offline)")
    p.add_argument("--out", default="output/demo", help="output folder (default output/demo)")
    p.add_argument("--prompt", default=None, help=f"instruction (default: the bundle's, or '{DEFAULT_PROMPT}')")
    p.add_argument("--video", default=None, help="another clip to edit instead of the bundled sample")
    p.add_argument("--bundle", default=None, help="another model bundle folder")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the bundle's)")
    p.add_argument("--seed", type=int, default=0)
    add_keep_unchanged_arg(p, "keep-unchanged threshold as in `edit` (default: the bundle's, SAMA-Shapes 0.2; 0: the "
                              "edit as decoded)")
    p.set_defaults(func=run)


def synthetic_clip(frames: int = 17, size: int = 64) -> torch.Tensor:
    """A red circle moving left to right over a blue-green gradient, (F, H, W, 3) in [0, 1]."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    background = torch.stack([0.1 + 0 * xx, 0.3 + 0.4 * yy / size, 0.6 + 0.3 * xx / size], dim=-1)
    clip = []
    for t in range(frames):
        cx, cy = 12 + (size - 24) * t / (frames - 1), size / 2 + 8 * math.sin(2 * math.pi * t / frames)
        inside = ((xx - cx) ** 2 + (yy - cy) ** 2 <= 9 ** 2).unsqueeze(-1)
        clip.append(torch.where(inside, torch.tensor([0.9, 0.1, 0.1]), background))
    return torch.stack(clip)


def resolve_bundle(requested, out: Path) -> tuple[Path, bool]:
    """(bundle folder, trained?) — the shipped SAMA-Shapes bundle, else a tiny random one built once."""
    if requested:
        return Path(requested), True
    if (TRAINED_BUNDLE / "bundle.json").exists():
        return TRAINED_BUNDLE, True
    from ..bundle import write_tiny_random_bundle
    folder = out / "tiny-random-bundle"
    if not (folder / "bundle.json").exists():
        write_tiny_random_bundle(folder)
    return folder, False


def bundle_clip(bundle: Path, card: dict):
    """The bundle's own sample clip (card "demo_video"), the clip its demo prompt was written for."""
    name = card.get("demo_video")
    return bundle / name if name and (bundle / name).is_file() else None


def run(args) -> int:
    from ..pipeline import EditSettings, SamaPipeline, read_bundle_spec
    from ..video import side_by_side, write_video
    from .edit import check_keep_unchanged_arg, progress_bar
    check_keep_unchanged_arg(args)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle, trained = resolve_bundle(args.bundle, out)
    if not trained:
        print("note: the trained SAMA-Shapes model is not bundled yet; this demo runs the full pipeline with "
              "tiny RANDOM weights, so the output will not look like the requested edit.")
    pipe = SamaPipeline.from_bundle(bundle, device="cpu", dtype="fp32")
    card = read_bundle_spec(bundle / "bundle.json").get("card", {})
    prompt = args.prompt or card.get("demo_prompt", DEFAULT_PROMPT)
    source = args.video or bundle_clip(bundle, card) or (SAMPLE_CLIP if SAMPLE_CLIP.exists() else None)
    if source is None:
        source = out / "source.mp4"
        write_video(source, synthetic_clip(), 8)
    options = pipe.sampler_options(steps=args.steps, seed=args.seed)
    settings = EditSettings(keep_unchanged=args.keep_unchanged)
    result = pipe.edit_file(source, prompt, out / "edit.mp4", settings, options, compare=True,
                            callback=progress_bar())
    from ..video import read_media
    frames, _ = read_media(source)
    grid = side_by_side(frames[::4], result.frames[::4], scale=4)  # every 4th frame, source | edit
    from PIL import Image
    row = torch.cat(list(grid), dim=1)  # frames side by side horizontally
    Image.fromarray((row.clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(out / "compare.png")
    print(f"source video: {source}\ninstruction: {prompt}")
    print(f"edited video: {result.output}\nside by side: {result.comparison}\nframes: {out / 'compare.png'}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
