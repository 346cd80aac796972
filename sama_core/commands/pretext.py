"""`pretext-preview`: an image grid of what a motion-alignment pretext does to a clip.

    python -m sama_core pretext-preview --synthetic --pretext tube --seed 0 --out tube.png
    python -m sama_core pretext-preview --video clip.mp4 --pretext cube --seed 3 --out cube.png

Rows: the original frames, the perturbed frames (what the model is given as source during motion
alignment), and a third row that shows what was done: the blanked pixels (cube), which input frame
each output frame shows (speed), or which input tube each region comes from (tube). Columns are a few
output frames spread evenly over the clip. The clip is downscaled to the preview size first, so a
long or large video previews quickly.
"""

from __future__ import annotations

import argparse
import colorsys
import pathlib
import sys

import torch
import torch.nn.functional as F

from ..errors import SamaError, SamaInputError
from ..pretext import (BLACK_UNIT, CUBE, PERTURBING_PRETEXTS, SPEED, TASK_TOKENS, PretextInfo,
                       apply_pretext)

COMMAND = "pretext-preview"
LABEL_WIDTH = 84  # pixels left of the grid for the row names
GAP = 4  # pixels between tiles


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        COMMAND, help="write an image grid previewing a motion-alignment pretext (cube, speed, tube)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--video", type=pathlib.Path, help="a video file to preview the pretext on")
    source.add_argument("--synthetic", action="store_true", help="use a generated moving-square clip")
    parser.add_argument("--pretext", required=True, choices=PERTURBING_PRETEXTS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the pretext's random draws")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="the PNG file to write")
    parser.add_argument("--columns", type=int, default=6, help="frames shown per row (default 6)")
    parser.add_argument("--size", type=int, default=160, help="long side of each tile in pixels (default 160)")
    parser.add_argument("--max-frames", type=int, default=81,
                        help="use at most this many frames from the start of the video (default 81)")
    parser.add_argument("--synthetic-frames", type=int, default=33, help="length of the synthetic clip")
    parser.add_argument("--ratio", type=float, default=0.3, help="cube: fraction of frames blanked")
    parser.add_argument("--spatial-ratio", type=float, default=1.0, help="cube: fraction of H and W covered")
    parser.add_argument("--speed", type=float, default=2.0, help="speed: speed-up factor")
    parser.add_argument("--grid", type=_parse_grid, default=(2, 2, 2), help="tube: grid as T,H,W (default 2,2,2)")
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand on its own, as `python -m sama_core` does (a SamaError -> one line, exit 2):
    `main(["pretext-preview", "--synthetic", ...])`."""
    parser = argparse.ArgumentParser(prog="python -m sama_core")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SamaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    """Write the preview grid. Bad inputs raise SamaError (the CLI entry prints them as one line)."""
    if args.columns < 1 or args.size < 8 or args.max_frames < 2 or args.synthetic_frames < 2:
        raise SamaInputError("--columns must be >= 1, --size >= 8, --max-frames and --synthetic-frames >= 2")
    if args.out.suffix.lower() != ".png":
        raise SamaInputError(f"--out {args.out}: the preview is a PNG; give a path ending in .png")
    if args.synthetic:
        frames = synthetic_clip(args.synthetic_frames, args.size, args.size)
    else:
        frames = load_video_frames(args.video, args.max_frames, args.size)
    result = apply_pretext(args.pretext, frames, torch.Generator().manual_seed(args.seed), **_pretext_options(args))
    grid = preview_grid(frames, result.frames, result.info, args.columns)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out, format="PNG")
    print(f"{args.pretext} preview ({TASK_TOKENS[args.pretext]}) written to {args.out}")
    return 0


def _parse_grid(text: str) -> tuple[int, int, int]:
    try:
        grid = tuple(int(part) for part in text.split(","))
    except ValueError:
        grid = ()
    if len(grid) != 3:
        raise argparse.ArgumentTypeError(f"expected three integers T,H,W like 2,2,2, got {text!r}")
    return grid


def _pretext_options(args: argparse.Namespace) -> dict:
    if args.pretext == CUBE:
        return {"fill": BLACK_UNIT, "ratio": args.ratio, "spatial_ratio": args.spatial_ratio}
    if args.pretext == SPEED:
        return {"speed": args.speed}
    return {"grid": args.grid}


# ----------------------------------------------------------------------------------------------------
# Clips
# ----------------------------------------------------------------------------------------------------

def synthetic_clip(num_frames: int, height: int, width: int) -> torch.Tensor:
    """(F, 3, H, W) float in [0, 1]: a square moving left to right and down over a colour gradient,
    its colour changing with time, so order, speed and position are all visible."""
    ys = torch.linspace(0, 1, height).view(height, 1).expand(height, width)
    xs = torch.linspace(0, 1, width).view(1, width).expand(height, width)
    background = torch.stack([0.2 + 0.5 * xs, 0.2 + 0.5 * ys, 0.5 * (1 - xs)], dim=0)  # (3, H, W)
    side = max(2, min(height, width) // 4)
    frames = background.unsqueeze(0).repeat(num_frames, 1, 1, 1)  # (F, 3, H, W)
    for t in range(num_frames):
        progress = t / max(1, num_frames - 1)
        top = round(progress * (height - side) * 0.6)
        left = round(progress * (width - side))
        hue = torch.tensor(colorsys.hsv_to_rgb(progress * 0.8, 1.0, 1.0)).view(3, 1, 1)
        frames[t, :, top:top + side, left:left + side] = hue
    return frames


def load_video_frames(path: pathlib.Path, max_frames: int, size: int) -> torch.Tensor:
    """(F, 3, h, w) float in [0, 1], at most max_frames, long side downscaled to `size`."""
    try:
        from ..video import read_video  # imported here: the preview works without the video module
    except ImportError as error:
        raise SamaInputError(
            f"--video needs sama_core.video.read_video, which could not be imported ({error}); "
            f"use --synthetic") from error
    frames, _ = read_video(path, max_frames=max_frames)  # (F, H, W, 3) float in [0, 1]
    frames = torch.as_tensor(frames)[:max_frames]
    if frames.ndim != 4 or 3 not in (frames.shape[1], frames.shape[-1]):
        raise SamaInputError(f"--video {path}: expected (F, H, W, 3) or (F, 3, H, W) frames, got {tuple(frames.shape)}")
    if frames.shape[1] != 3:  # (F, H, W, 3) -> (F, 3, H, W)
        frames = frames.permute(0, 3, 1, 2)
    frames = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    scale = size / max(frames.shape[-2:])
    if scale < 1:
        new_size = (max(1, round(frames.shape[-2] * scale)), max(1, round(frames.shape[-1] * scale)))
        frames = F.interpolate(frames, size=new_size, mode="bilinear", antialias=True, align_corners=False)
    return frames.clamp(0, 1)


# ----------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------

def preview_columns(num_frames: int, columns: int) -> list[int]:
    """Up to `columns` distinct frame indices spread evenly from the first to the last frame."""
    if num_frames <= columns:
        return list(range(num_frames))
    return sorted({round(i * (num_frames - 1) / (columns - 1)) for i in range(columns)}) if columns > 1 else [0]


def _tube_source_map(info: PretextInfo, num_frames: int, height: int, width: int) -> torch.Tensor:
    """(F, 3, H, W): each pixel coloured by the input tube it shows; grey where nothing moved."""
    colours = torch.tensor([colorsys.hsv_to_rgb(i / len(info.tube_boxes), 0.7, 0.95)
                            for i in range(len(info.tube_boxes))], dtype=torch.float32)  # (n, 3)
    out = torch.full((num_frames, 3, height, width), 0.35)
    for slot, box in enumerate(info.tube_boxes):
        out[box.t, :, box.h, box.w] = colours[int(info.permutation[slot])].view(1, 3, 1, 1)
    return out


def _speed_timeline(info: PretextInfo, height: int, width: int) -> torch.Tensor:
    """(F_out, 3, H, W): a timeline of the input clip per output frame, with a bar at the input frame
    it shows (white: resampled, orange: padding that repeats the last resampled frame)."""
    num_input = info.input_shape[0]
    out = torch.full((len(info.index_map), 3, height, width), 0.12)
    out[:, :, height // 2 - 1:height // 2 + 1, :] = 0.4  # the input clip, frame 0 at the left
    bar = max(2, width // 40)
    for i, source in enumerate(info.index_map.tolist()):
        x = round(source / max(1, num_input - 1) * (width - bar))
        colour = (1.0, 1.0, 1.0) if i < info.num_resampled_frames else (1.0, 0.55, 0.1)
        out[i, :, height // 4:3 * height // 4, x:x + bar] = torch.tensor(colour).view(3, 1, 1)
    return out


def third_row(info: PretextInfo, perturbed: torch.Tensor) -> tuple[str, torch.Tensor, list[str]]:
    """(row name, (F_out, 3, H, W) images in [0, 1], per-frame captions) showing what was done."""
    num_frames, _, height, width = perturbed.shape
    if info.name == CUBE:
        return "mask", info.mask.float().unsqueeze(1).expand(-1, 3, -1, -1).cpu(), [""] * num_frames
    if info.name == SPEED:
        padded = (torch.arange(num_frames) >= info.num_resampled_frames).tolist()
        captions = [f"src {j}" + (" (pad)" if p else "") for j, p in zip(info.index_map.tolist(), padded)]
        return "source", _speed_timeline(info, height, width), captions
    return "tube src", _tube_source_map(info, num_frames, height, width), [""] * num_frames


def preview_grid(original: torch.Tensor, perturbed: torch.Tensor, info: PretextInfo, columns: int):
    """A PIL image: rows original / perturbed / what-was-done, for frames spread over the output."""
    from PIL import Image, ImageDraw, ImageFont  # pillow comes with imageio

    name, overlay, captions = third_row(info, perturbed)
    frame_ids = preview_columns(perturbed.shape[0], columns)
    rows = [("original", original.cpu()), ("perturbed", perturbed.cpu()), (name, overlay)]
    tile_h, tile_w = original.shape[-2:]
    caption_h = 14
    canvas = Image.new("RGB", (LABEL_WIDTH + len(frame_ids) * (tile_w + GAP),
                               len(rows) * (tile_h + caption_h + GAP)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, (row_name, images) in enumerate(rows):
        y = r * (tile_h + caption_h + GAP)
        draw.text((4, y + caption_h + tile_h // 2 - 6), row_name, fill=(230, 230, 230), font=font)
        for c, t in enumerate(frame_ids):
            x = LABEL_WIDTH + c * (tile_w + GAP)
            tile = (images[t].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
            canvas.paste(Image.fromarray(tile.numpy(), "RGB"), (x, y + caption_h))
            caption = f"t={t}" if r == 0 else (captions[t] if r == 2 else "")
            draw.text((x + 2, y + 1), caption, fill=(230, 230, 230), font=font)
    return canvas


if __name__ == "__main__":
    sys.exit(main())
