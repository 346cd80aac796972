"""Video and image input/output for SAMA: reading, 4k+1 frame counts, size buckets, resizing, writing.

Frame convention (the same as ComfyUI's IMAGE type): a float32 tensor (F, H, W, 3), RGB, values in [0, 1].
``frames_to_vae_input`` turns it into the (1, 3, F, H, W) tensor in [-1, 1] the Wan VAE takes, and
``vae_output_to_frames`` turns a decoded video back.

Libraries: decoding and encoding go through the ffmpeg binary shipped with imageio-ffmpeg (opencv is the
fallback decoder when ffmpeg cannot open a file); single images through PIL; every resize through
``torch.nn.functional.interpolate`` (bilinear, antialias=True, so downscales are low-pass filtered).

What the released SAMA inference does with a video (SAMA_REFERENCE.md section 4) and where it lives here:
- frames in [-1, 1]                                   -> frames_to_vae_input
- frame count 4k+1: pad by repeating the last frame,  -> pad_to_4k_plus_1 / trim
  trim the output back
- width/height multiples of 16; the closest bucket    -> bucket_sizes / choose_bucket / resolve_size
  (area 480*832, sides multiples of 32, aspect 0.5-2)
- output fps = source fps                             -> VideoInfo.fps, write_video(fps=...)
Additions: crop / letterbox / stretch resizing with an inverse (``restore``), source audio copied into the
output, clear errors for unreadable, truncated, too small or too large inputs.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import uuid
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import SamaFileNotFoundError, SamaInputError

logger = logging.getLogger(__name__)

# The reference buckets: area 480*832, sides multiples of 32, aspect (width / height) in [0.5, 2.0].
REFERENCE_BUCKET_AREA = 480 * 832
BUCKET_MULTIPLE = 32
BUCKET_MIN_ASPECT = 0.5
BUCKET_MAX_ASPECT = 2.0
# The model needs sides that are multiples of 16 (8x VAE downsampling, then 2x2 patches).
SIZE_MULTIPLE = 16
MIN_SIDE = 16
# Frames larger than this are downscaled while decoding (logged): 4096x2304 covers DCI 4K and UHD, so only
# 5K/8K sources are touched; the edit itself runs at ~0.4 MP anyway.
MAX_DECODE_PIXELS = 4096 * 2304
# Wan2.1 generates 16 fps video; used only when a file states no frame rate at all.
FALLBACK_FPS = Fraction(16)
DEFAULT_CRF = 18  # x264 constant-rate factor: visually near-lossless (ffmpeg's default is 23)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_OUTPUT_EXTENSIONS = (".mp4", ".mov", ".mkv", ".m4v", ".avi")  # containers that hold write_video's H.264
RESIZE_MODES = ("crop", "letterbox", "stretch")


# ----------------------------------------------------------------------------------------------------------
# Metadata


@dataclass(frozen=True)
class VideoInfo:
    """What was read, and from what.

    ``width``/``height``/``frame_count`` describe the returned frames; ``source_*`` the file. They differ
    when frames were selected (frame_range/stride/max_frames) or auto-downscaled (max_pixels).
    ``source_frame_count`` is exact when the file was decoded to its end, else ffmpeg's duration * fps
    estimate. ``first_frame``/``stride`` locate the returned frames in the file (``start_time`` is where to
    start the audio).
    """

    path: str
    fps: Fraction | None  # None for a still image
    frame_count: int
    width: int
    height: int
    source_width: int
    source_height: int
    source_frame_count: int
    first_frame: int = 0
    stride: int = 1
    has_audio: bool = False
    audio_codec: str | None = None
    pix_fmt: str | None = None
    duration: float | None = None  # seconds, as the container states it
    is_image: bool = False

    @property
    def start_time(self) -> float:
        """Time of the first returned frame in the source (seconds); 0 for images."""
        return float(self.first_frame / self.fps) if self.fps else 0.0


# ----------------------------------------------------------------------------------------------------------
# Tensor layout helpers


def frames_to_vae_input(frames: torch.Tensor) -> torch.Tensor:
    """(F, H, W, 3) in [0, 1] -> (1, 3, F, H, W) in [-1, 1], the layout and range the Wan VAE encodes."""
    _check_frames(frames, "frames")
    return (frames.permute(3, 0, 1, 2).unsqueeze(0) * 2.0 - 1.0).contiguous()  # (1, 3, F, H, W)


def vae_output_to_frames(video: torch.Tensor) -> torch.Tensor:
    """(1, 3, F, H, W) or (3, F, H, W) in [-1, 1] -> (F, H, W, 3) float32 in [0, 1] (clamped)."""
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise SamaInputError(
                f"vae_output_to_frames takes one video (batch 1), got a batch of {video.shape[0]}; "
                "convert each video separately."
            )
        video = video[0]
    if video.dim() != 4 or video.shape[0] != 3:
        raise SamaInputError(f"Expected a decoded video (1, 3, F, H, W), got shape {tuple(video.shape)}.")
    frames = ((video.float().clamp(-1.0, 1.0) + 1.0) * 0.5).permute(1, 2, 3, 0)  # (F, H, W, 3)
    return frames.contiguous()


def _check_frames(frames: torch.Tensor, name: str) -> None:
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise SamaInputError(f"{name} must be a tensor (F, H, W, 3) of RGB frames in [0, 1], got {shape}.")
    if frames.shape[0] == 0:
        raise SamaInputError(f"{name} has 0 frames; a video needs at least 1 frame.")


# ----------------------------------------------------------------------------------------------------------
# 4k+1 frame counts


def next_4k_plus_1(n: int) -> int:
    """The smallest count of the form 4k+1 that is >= n (the causal VAE's valid lengths)."""
    if n < 1:
        raise SamaInputError(f"A video needs at least 1 frame, got {n}.")
    return 4 * ((n - 1 + 3) // 4) + 1


def pad_to_4k_plus_1(frames: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, int]:
    """Pad ``frames`` along ``dim`` to 4k+1 by repeating the last frame; returns (padded, original count).

    ``dim`` is 0 for (F, H, W, 3) frames and 2 for (B, C, F, H, W) videos. Undo with ``trim``.
    """
    n = frames.shape[dim]
    target = next_4k_plus_1(n)
    if target == n:
        return frames, n
    last = frames.narrow(dim, n - 1, 1)
    repeats = [1] * frames.dim()
    repeats[dim] = target - n
    logger.info("Padded %d frames to %d (4k+1) by repeating the last frame.", n, target)
    return torch.cat([frames, last.repeat(repeats)], dim=dim), n


def trim(frames: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """The first ``n`` frames along ``dim`` (undoes pad_to_4k_plus_1)."""
    if not 1 <= n <= frames.shape[dim]:
        count = frames.shape[dim]
        raise SamaInputError(f"Cannot trim {count} frames to {n}; n must be in 1..{count}.")
    return frames.narrow(dim, 0, n)


# ----------------------------------------------------------------------------------------------------------
# Sizes: reference buckets and explicit sizes


def bucket_sizes(
    target_area: int = REFERENCE_BUCKET_AREA,
    multiple: int = BUCKET_MULTIPLE,
    min_aspect: float = BUCKET_MIN_ASPECT,
    max_aspect: float = BUCKET_MAX_ASPECT,
) -> list[tuple[int, int]]:
    """The bucket set, as (width, height) sorted by aspect ratio (width / height).

    Rule: for every height that is a multiple of ``multiple``, take the width (a multiple of ``multiple``,
    at least one multiple) whose area is closest to ``target_area`` (ties go to the larger width), and keep
    the pair when its aspect is within [min_aspect, max_aspect].
    """
    if target_area < multiple * multiple:
        raise SamaInputError(f"Bucket area {target_area} is smaller than one {multiple}x{multiple} block.")
    buckets = []
    max_height = int(math.sqrt(target_area / min_aspect)) + 2 * multiple
    for height in range(multiple, max_height + 1, multiple):
        # Area is linear in width, so the closest area is the closest width to target_area / height;
        # floor(x + 0.5) sends exact halves up.
        width = max(multiple, multiple * math.floor(target_area / height / multiple + 0.5))
        if min_aspect <= width / height <= max_aspect:
            buckets.append((width, height))
    return sorted(buckets, key=lambda wh: wh[0] / wh[1])


def choose_bucket(
    width: int,
    height: int,
    target_area: int = REFERENCE_BUCKET_AREA,
    buckets: Sequence[tuple[int, int]] | None = None,
) -> tuple[int, int]:
    """The bucket (width, height) whose aspect ratio is closest to the source's.

    Closeness is |log(bucket aspect / source aspect)|, so 2:1 and 1:2 are equally far from 1:1; ties go
    to the bucket whose area is closer to ``target_area``, then to the smaller width.
    """
    if width < 1 or height < 1:
        raise SamaInputError(f"Cannot choose a size bucket for a {width}x{height} source.")
    candidates = list(buckets) if buckets is not None else bucket_sizes(target_area)
    log_aspect = math.log(width / height)
    return min(
        candidates,
        key=lambda wh: (abs(math.log(wh[0] / wh[1]) - log_aspect), abs(wh[0] * wh[1] - target_area), wh[0]),
    )


def _nearest_multiples(value: int, multiple: int) -> str:
    lower = max(multiple, value // multiple * multiple)
    return f"{lower} or {lower + multiple}" if lower < value else f"{lower}"


def resolve_size(
    source_width: int,
    source_height: int,
    width: int | None = None,
    height: int | None = None,
    target_area: int = REFERENCE_BUCKET_AREA,
) -> tuple[int, int]:
    """The (width, height) to edit at.

    Neither given: the reference bucket for the source aspect. Both given: used as they are, but they must
    be multiples of 16 (a clear error names the nearest valid values; we do not silently change a size the
    user typed). One given: the other follows the source aspect, rounded to a multiple of 16 (logged).
    """
    for name, value in (("width", width), ("height", height)):
        if value is None:
            continue
        if value < MIN_SIDE or value % SIZE_MULTIPLE:
            raise SamaInputError(
                f"The {name} {value} is not a multiple of {SIZE_MULTIPLE} of at least {MIN_SIDE} pixels "
                f"(the model needs sides that are multiples of {SIZE_MULTIPLE}); use "
                f"{_nearest_multiples(max(value, MIN_SIDE), SIZE_MULTIPLE)}."
            )
    aspect = source_width / source_height
    if width is None and height is None:
        size = choose_bucket(source_width, source_height, target_area)
        logger.info("Source %dx%d -> bucket %dx%d.", source_width, source_height, *size)
        return size
    if width is None:
        width = max(SIZE_MULTIPLE, SIZE_MULTIPLE * round(height * aspect / SIZE_MULTIPLE))
        logger.info("Width %d follows the source aspect for height %d.", width, height)
    elif height is None:
        height = max(SIZE_MULTIPLE, SIZE_MULTIPLE * round(width / aspect / SIZE_MULTIPLE))
        logger.info("Height %d follows the source aspect for width %d.", height, width)
    return width, height


# ----------------------------------------------------------------------------------------------------------
# Resizing and its inverse


@dataclass(frozen=True)
class ResizePlan:
    """How a source of ``source_size`` was brought to ``target_size``; sizes are (width, height).

    crop:      the source is scaled by ``scale`` to ``scaled_size`` (covering the target) and the
               target-size window at ``offset`` (x, y) is kept.
    letterbox: the source is scaled to ``scaled_size`` (fitting in the target) and pasted at ``offset`` on a
               target-size canvas of the pad value.
    stretch:   the source is resized to the target, aspect ignored (scaled_size == target_size).
    """

    mode: str
    source_size: tuple[int, int]
    target_size: tuple[int, int]
    scaled_size: tuple[int, int]
    offset: tuple[int, int]


def plan_resize(source_size: tuple[int, int], target_size: tuple[int, int], mode: str = "crop") -> ResizePlan:
    if mode not in RESIZE_MODES:
        raise SamaInputError(f"Unknown resize mode {mode!r}; use one of {', '.join(RESIZE_MODES)}.")
    (sw, sh), (tw, th) = source_size, target_size
    if min(sw, sh, tw, th) < 1:
        raise SamaInputError(f"Cannot resize {sw}x{sh} to {tw}x{th}.")
    if mode == "stretch":
        return ResizePlan(mode, (sw, sh), (tw, th), (tw, th), (0, 0))
    if mode == "crop":
        scale = max(tw / sw, th / sh)
        scaled = (max(tw, round(sw * scale)), max(th, round(sh * scale)))
        offset = ((scaled[0] - tw) // 2, (scaled[1] - th) // 2)
    else:  # letterbox
        scale = min(tw / sw, th / sh)
        scaled = (min(tw, max(1, round(sw * scale))), min(th, max(1, round(sh * scale))))
        offset = ((tw - scaled[0]) // 2, (th - scaled[1]) // 2)
    return ResizePlan(mode, (sw, sh), (tw, th), scaled, offset)


def resize_frames(
    frames: torch.Tensor, width: int, height: int, chunk_bytes: int = 256 << 20
) -> torch.Tensor:
    """Resize (F, H, W, 3) frames to (F, height, width, 3): bilinear, antialiased, in frame chunks.

    Chunking bounds the temporary (F, 3, H, W) copies, so long or large videos do not double memory.
    """
    _check_frames(frames, "frames")
    n, h, w, _ = frames.shape
    if (w, h) == (width, height):
        return frames
    per_frame = 4 * 3 * (h * w + height * width)
    chunk = max(1, chunk_bytes // per_frame)
    out = torch.empty((n, height, width, 3), dtype=torch.float32, device=frames.device)
    for i in range(0, n, chunk):
        x = frames[i : i + chunk].permute(0, 3, 1, 2).float()  # (f, 3, H, W)
        y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + chunk] = y.permute(0, 2, 3, 1)  # (f, height, width, 3)
    return out


def apply_resize(frames: torch.Tensor, plan: ResizePlan, pad_value: float = 0.0) -> torch.Tensor:
    """Bring (F, H, W, 3) source frames to the plan's target size."""
    _check_frames(frames, "frames")
    if (frames.shape[2], frames.shape[1]) != plan.source_size:
        raise SamaInputError(
            f"The frames are {frames.shape[2]}x{frames.shape[1]} but the resize plan is for "
            f"{plan.source_size[0]}x{plan.source_size[1]}."
        )
    (tw, th), (x0, y0) = plan.target_size, plan.offset
    scaled = resize_frames(frames, *plan.scaled_size)  # (F, sh', sw', 3)
    if plan.mode == "crop":
        return scaled[:, y0 : y0 + th, x0 : x0 + tw].contiguous()
    if plan.mode == "letterbox":
        canvas = torch.full((frames.shape[0], th, tw, 3), pad_value, device=frames.device)  # (F, th, tw, 3)
        canvas[:, y0 : y0 + plan.scaled_size[1], x0 : x0 + plan.scaled_size[0]] = scaled
        return canvas
    return scaled


def restore(
    frames: torch.Tensor,
    plan: ResizePlan,
    source: torch.Tensor | None = None,
    fill_value: float = 0.0,
) -> torch.Tensor:
    """Bring edited (F, h, w, 3) frames at the plan's target size back to the source size.

    stretch:   resized back.
    letterbox: the pad is removed, then resized back (the full picture returns).
    crop:      the cropped border was never edited, so it cannot be restored: the edited picture is scaled
               back into the region of the source it came from (pixels whose centre falls inside the crop
               window, see crop_region_mask), and the border is taken from ``source`` (the original
               frames, same frame count) when given, else filled with ``fill_value``.
    """
    _check_frames(frames, "edited frames")
    if (frames.shape[2], frames.shape[1]) != plan.target_size:
        raise SamaInputError(
            f"The edited frames are {frames.shape[2]}x{frames.shape[1]} but the resize plan produced "
            f"{plan.target_size[0]}x{plan.target_size[1]}; restore the frames the plan was made for."
        )
    (sw, sh), (tw, th), (x0, y0) = plan.source_size, plan.target_size, plan.offset
    if plan.mode == "stretch":
        return resize_frames(frames, sw, sh)
    if plan.mode == "letterbox":
        inner = frames[:, y0 : y0 + plan.scaled_size[1], x0 : x0 + plan.scaled_size[0]]
        return resize_frames(inner.contiguous(), sw, sh)

    # crop: rebuild the scaled canvas, paste the edit, scale back. The canvas border is the source when we
    # have it, else the edit's edge pixels repeated, so the resampling filter near the crop edge never
    # mixes in the fill colour; pixels whose centre lies outside the crop window then get the source or
    # the fill value.
    n = frames.shape[0]
    scaled_w, scaled_h = plan.scaled_size
    if source is not None:
        _check_frames(source, "source frames")
        if source.shape[0] != n or (source.shape[2], source.shape[1]) != (sw, sh):
            raise SamaInputError(
                f"The source frames for restore are {tuple(source.shape)}, expected ({n}, {sh}, {sw}, 3): "
                "pass the original frames the edit was made from (trimmed to the edited frame count)."
            )
        canvas = resize_frames(source, scaled_w, scaled_h).clone()  # (F, sh', sw', 3)
        canvas[:, y0 : y0 + th, x0 : x0 + tw] = frames
        outside = source.float()
    else:
        pad = (x0, scaled_w - x0 - tw, y0, scaled_h - y0 - th)  # left, right, top, bottom
        canvas = F.pad(frames.float().permute(0, 3, 1, 2), pad, mode="replicate").permute(0, 2, 3, 1)
        outside = torch.full((1, 1, 1, 3), fill_value, dtype=torch.float32, device=frames.device)
    restored = resize_frames(canvas.contiguous(), sw, sh)  # (F, sh, sw, 3)
    inside = crop_region_mask(plan).to(restored.device)  # (sh, sw)
    return torch.where(inside[None, :, :, None], restored, outside)


def crop_region_mask(plan: ResizePlan) -> torch.Tensor:
    """(H, W) bool over the source: True where a pixel's centre falls inside the kept crop window."""
    (sw, sh), (tw, th), (x0, y0) = plan.source_size, plan.target_size, plan.offset
    xs = (torch.arange(sw, dtype=torch.float64) + 0.5) * plan.scaled_size[0] / sw  # (W,) in scaled coords
    ys = (torch.arange(sh, dtype=torch.float64) + 0.5) * plan.scaled_size[1] / sh  # (H,)
    in_x = (xs >= x0) & (xs < x0 + tw)
    in_y = (ys >= y0) & (ys < y0 + th)
    return in_y[:, None] & in_x[None, :]


def fit_frames(
    frames: torch.Tensor,
    width: int | None = None,
    height: int | None = None,
    mode: str = "crop",
    target_area: int = REFERENCE_BUCKET_AREA,
    pad_value: float = 0.0,
) -> tuple[torch.Tensor, ResizePlan]:
    """Resolve the edit size (bucket or explicit) and resize the frames to it; returns (frames, plan)."""
    _check_frames(frames, "frames")
    source = (frames.shape[2], frames.shape[1])
    size = resolve_size(*source, width=width, height=height, target_area=target_area)
    plan = plan_resize(source, size, mode)
    return apply_resize(frames, plan, pad_value=pad_value), plan


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_media(path: str | os.PathLike, **kwargs) -> tuple[torch.Tensor, VideoInfo]:
    """read_image for image extensions, read_video for everything else (including .gif)."""
    if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        image_kwargs = {k: v for k, v in kwargs.items() if k in ("max_pixels", "min_side")}
        return read_image(path, **image_kwargs)
    return read_video(path, **kwargs)


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise SamaFileNotFoundError(f"The {what} file {str(p)!r} does not exist; check the path.")
    if not p.is_file():
        raise SamaInputError(f"The {what} path {str(p)!r} is not a file; give the path of a {what} file.")
    return p


def _check_min_side(width: int, height: int, path: Path, min_side: int) -> None:
    if min(width, height) < min_side:
        raise SamaInputError(
            f"{str(path)!r} is {width}x{height} pixels; SAMA needs at least {min_side} pixels per side. "
            "Upscale the input first (e.g. with an upscaler) if you really want to edit it."
        )


def _decode_scale(width: int, height: int, max_pixels: int | None) -> tuple[int, int] | None:
    """The (width, height) to decode a too-large source at, keeping its aspect; None if it fits."""
    if max_pixels is None or width * height <= max_pixels:
        return None
    factor = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * factor)), max(1, math.floor(height * factor))


def _default_memory_budget() -> int:
    """Half of the machine's RAM (8 GiB when it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 8 << 30


def _fps_from_ffmpeg(value: float) -> Fraction | None:
    """ffmpeg prints frame rates with 2 decimals (30000/1001 -> "29.97"); recover the exact rational.

    Rates within rounding distance of an NTSC rate N*1000/1001 are snapped to it; others are read as the
    decimal they are printed as (12.5 -> 25/2). 0 (unknown) gives None.
    """
    if not value or value <= 0:
        return None
    ntsc_base = round(value * 1.001)
    ntsc = Fraction(ntsc_base * 1000, 1001)
    if abs(value - ntsc_base) > 0.006 and abs(value - float(ntsc)) < 0.006:
        return ntsc
    return Fraction(repr(value)).limit_denominator(1001)


def _pix_fmt_name(pix_fmt: str | None) -> str | None:
    return pix_fmt.split("(")[0].strip() if pix_fmt else None


def _log_pixel_format(path: Path, pix_fmt: str | None) -> None:
    """Say when frames were converted to RGB (ffmpeg converts; alpha is dropped, colour kept)."""
    name = _pix_fmt_name(pix_fmt) or ""
    if re.match(r"^(gray|ya|mono)", name):
        logger.info("%s: grayscale video (%s) converted to RGB.", path, name)
    if re.match(r"^(yuva|gbrap|ya|rgba|bgra|argb|abgr)", name):
        logger.info("%s: video with alpha (%s): alpha dropped, colours kept as stored.", path, name)


def _ffmpeg_error_lines(text: str) -> str:
    """The informative lines of ffmpeg's stderr (not the banner), for error messages."""
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^\[[^\]]*@ 0x[0-9a-f]+\]\s*", "", line.strip())  # drop "[in#0 @ 0x55..] "
        if line and not re.match(r"^(lib\w+\s|ffmpeg version|built with|configuration:|=== stderr)", line):
            if line not in lines:
                lines.append(line)
    return " | ".join(lines[-4:])


def read_video(
    path: str | os.PathLike,
    frame_range: tuple[int, int | None] | None = None,
    stride: int = 1,
    max_frames: int | None = None,
    *,
    max_pixels: int | None = MAX_DECODE_PIXELS,
    memory_budget_bytes: int | None = None,
    allow_partial: bool = False,
    min_side: int = MIN_SIDE,
) -> tuple[torch.Tensor, VideoInfo]:
    """Read a video file into (F, H, W, 3) float32 frames in [0, 1] and its VideoInfo.

    frame_range: (start, stop) source frame indices, stop exclusive (None = to the end); then every
    ``stride``-th frame; then at most ``max_frames`` of those. Grayscale and alpha formats are converted
    to RGB (alpha dropped; logged). Frames above ``max_pixels`` are downscaled while decoding (logged);
    reading more than ``memory_budget_bytes`` of float frames (default: half the RAM) is refused with
    advice instead of running out of memory. A file that decodes to clearly fewer frames than its header
    states is reported as truncated unless ``allow_partial``.
    """
    p = _existing_file(path, "video")
    start, stop = frame_range if frame_range is not None else (0, None)
    if start < 0 or (stop is not None and stop <= start):
        raise SamaInputError(
            f"frame_range {frame_range} is not a valid (start, stop) range of frame indices: start must be "
            ">= 0 and stop (exclusive) greater than start, or None for the end."
        )
    if stride < 1:
        raise SamaInputError(f"stride must be at least 1 (every frame), got {stride}.")
    if max_frames is not None and max_frames < 1:
        raise SamaInputError(f"max_frames must be at least 1 (or None for all), got {max_frames}.")
    selection = dict(start=start, stop=stop, stride=stride, max_frames=max_frames)
    budget = memory_budget_bytes if memory_budget_bytes is not None else _default_memory_budget()

    try:
        decoded = _read_with_ffmpeg(p, selection, max_pixels, budget, min_side)
    except (OSError, RuntimeError) as ffmpeg_error:
        reason = _ffmpeg_error_lines(str(ffmpeg_error))
        logger.info("ffmpeg could not read %s (%s); trying opencv.", p, reason)
        try:
            decoded = _read_with_opencv(p, selection, max_pixels, budget, min_side)
        except _DecoderFailed as cv_error:
            raise SamaInputError(
                f"Could not read the video {str(p)!r}: it is not a video file or it is damaged/truncated. "
                f"ffmpeg said: {_ffmpeg_error_lines(str(ffmpeg_error))}; opencv: {cv_error}. "
                "Re-export or re-download the file."
            ) from None

    frames, info = decoded.frames, decoded.info
    if not frames:
        if info.source_frame_count == 0 and decoded.header_estimate > 0:
            raise SamaInputError(
                f"No frame of {str(p)!r} could be decoded although its header states about "
                f"{decoded.header_estimate}: the file is damaged or truncated. Re-export or re-download it."
            )
        raise SamaInputError(
            f"No frames were read from {str(p)!r}"
            + (f" in frame_range {frame_range}" if frame_range is not None else "")
            + f" (the file has {info.source_frame_count} frames). Check the file and the frame range."
        )
    _check_truncation(p, decoded, allow_partial)
    stacked = torch.from_numpy(np.stack(frames))  # (F, H, W, 3) uint8
    del frames
    video = stacked.float().div_(255.0)  # (F, H, W, 3) in [0, 1]
    info = replace(info, frame_count=video.shape[0])
    logger.info(
        "Read %s: %d frames %dx%d at %s fps%s.", p, info.frame_count, info.width, info.height,
        info.fps, ", with audio" if info.has_audio else "",
    )
    return video, info


class _DecoderFailed(Exception):
    """The fallback decoder could not read the file (turned into a SamaInputError by read_video)."""


@dataclass
class _Decoded:
    frames: list[np.ndarray]  # (H, W, 3) uint8 each
    info: VideoInfo
    reached_end: bool  # decoded to the end of the file (so the frame count is exact)
    header_estimate: int  # frame count the header states (0 if unknown)


class _FrameSelector:
    """Keeps the frames the selection asks for while frames stream by; says when to stop decoding."""

    def __init__(self, path: Path, selection: dict, bytes_per_frame: int, budget: int):
        self.path, self.bytes_per_frame, self.budget = path, bytes_per_frame, budget
        self.start, self.stop = selection["start"], selection["stop"]
        self.stride, self.max_frames = selection["stride"], selection["max_frames"]
        self.frames: list[np.ndarray] = []
        self.index = 0  # source frames seen
        self.reached_end = True

    def offer(self, frame_fn) -> bool:
        """Consider the next source frame (``frame_fn`` makes its array); False means stop decoding."""
        i = self.index
        self.index += 1
        if self.stop is not None and i >= self.stop:
            self.reached_end = False
            return False
        if i >= self.start and (i - self.start) % self.stride == 0:
            if (len(self.frames) + 1) * self.bytes_per_frame > self.budget:
                raise SamaInputError(
                    f"Reading {str(self.path)!r} needs more than {self.budget / 2**30:.1f} GiB for "
                    f"{len(self.frames) + 1}+ frames; read fewer frames (max_frames, stride, frame_range), "
                    "a smaller size (max_pixels), or raise memory_budget_bytes if the machine has the RAM."
                )
            self.frames.append(frame_fn())
            if self.max_frames is not None and len(self.frames) >= self.max_frames:
                self.reached_end = False
                return False
        return True


def _read_with_ffmpeg(
    p: Path, selection: dict, max_pixels: int | None, budget: int, min_side: int
) -> _Decoded:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(p))
    try:
        meta = next(reader)
        # "size" is what ffmpeg outputs: after applying rotation metadata (phone videos), unlike
        # "source_size".
        source_w, source_h = meta["size"]
        _check_min_side(source_w, source_h, p, min_side)
        decode_size = _decode_scale(source_w, source_h, max_pixels)
        if decode_size is not None:
            reader.close()
            logger.info(
                "%s is %dx%d (more than %d pixels per frame): decoding it downscaled to %dx%d.",
                p, source_w, source_h, max_pixels, *decode_size,
            )
            scale = ["-vf", f"scale={decode_size[0]}:{decode_size[1]}:flags=area"]
            reader = imageio_ffmpeg.read_frames(str(p), output_params=scale)
            meta = next(reader)
        width, height = meta["size"]
        _log_pixel_format(p, meta.get("pix_fmt"))
        fps = _fps_from_ffmpeg(meta.get("fps", 0))
        if fps is None:
            logger.warning("%s states no frame rate; assuming %s fps.", p, FALLBACK_FPS)
            fps = FALLBACK_FPS
        duration = meta.get("duration") or None

        selector = _FrameSelector(p, selection, 4 * 3 * width * height, budget)
        for raw in reader:
            # (H, W, 3) uint8 view of ffmpeg's bytes; np.stack copies it later
            frame_fn = lambda raw=raw: np.frombuffer(raw, np.uint8).reshape(height, width, 3)  # noqa: E731
            if not selector.offer(frame_fn):
                break
    finally:
        reader.close()  # stops ffmpeg, also when we stop early or fail
    estimate = round(duration * fps) if duration else 0
    info = VideoInfo(
        path=str(p), fps=fps, frame_count=len(selector.frames), width=width, height=height,
        source_width=source_w, source_height=source_h,
        source_frame_count=selector.index if selector.reached_end else max(estimate, selector.index),
        first_frame=selection["start"], stride=selection["stride"],
        has_audio="audio_codec" in meta, audio_codec=meta.get("audio_codec"),
        pix_fmt=_pix_fmt_name(meta.get("pix_fmt")), duration=duration,
    )
    return _Decoded(selector.frames, info, selector.reached_end, estimate)


def _read_with_opencv(
    p: Path, selection: dict, max_pixels: int | None, budget: int, min_side: int
) -> _Decoded:
    import cv2

    capture = cv2.VideoCapture(str(p))
    try:
        if not capture.isOpened():
            raise _DecoderFailed("opencv could not open it either")
        source_w = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        source_h = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        _check_min_side(source_w, source_h, p, min_side)
        decode_size = _decode_scale(source_w, source_h, max_pixels)
        width, height = decode_size or (source_w, source_h)
        raw_fps = capture.get(cv2.CAP_PROP_FPS)
        fps = Fraction(raw_fps).limit_denominator(1001) if raw_fps > 0 else FALLBACK_FPS
        header_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))

        def to_rgb(bgr):
            # opencv delivers BGR (gray sources are expanded to 3 channels by default)
            if decode_size is not None:
                bgr = cv2.resize(bgr, decode_size, interpolation=cv2.INTER_AREA)
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

        selector = _FrameSelector(p, selection, 4 * 3 * width * height, budget)
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            if not selector.offer(lambda bgr=bgr: to_rgb(bgr)):
                break
    finally:
        capture.release()
    if selector.index == 0:
        raise _DecoderFailed("opencv opened it but decoded no frames")
    logger.info("%s read with opencv (audio presence unknown, assumed none).", p)
    info = VideoInfo(
        path=str(p), fps=fps, frame_count=len(selector.frames), width=width, height=height,
        source_width=source_w, source_height=source_h,
        source_frame_count=selector.index if selector.reached_end else max(header_count, selector.index),
        first_frame=selection["start"], stride=selection["stride"],
        duration=header_count / float(fps) if header_count > 0 else None,
    )
    return _Decoded(selector.frames, info, selector.reached_end, max(header_count, 0))


def _check_truncation(p: Path, decoded: _Decoded, allow_partial: bool) -> None:
    """Refuse files that decode to clearly fewer frames than their header states (cut-off downloads)."""
    if not decoded.reached_end:
        return
    info, expected = decoded.info, decoded.header_estimate
    count = info.source_frame_count
    # duration * fps is an estimate; allow rounding and a little container slack before calling it cut off.
    if expected and count < 0.9 * expected - 2:
        message = (
            f"{str(p)!r} decoded to {count} frames but its header states about {expected} "
            f"({info.duration:.2f} s at {info.fps} fps): the file looks truncated or damaged."
        )
        if not allow_partial:
            raise SamaInputError(message + " Re-export or re-download it, or pass allow_partial=True to use "
                                 "the frames that could be decoded.")
        logger.warning("%s Using the %d decodable frames (allow_partial).", message, count)


def read_image(
    path: str | os.PathLike, *, max_pixels: int | None = MAX_DECODE_PIXELS, min_side: int = MIN_SIDE
) -> tuple[torch.Tensor, VideoInfo]:
    """Read an image as a 1-frame video: (1, H, W, 3) float32 in [0, 1] and its VideoInfo.

    EXIF orientation is applied. Grayscale, palette, CMYK and alpha images are converted to RGB (alpha
    dropped, colours kept, as ComfyUI's LoadImage does); 16-bit and float images keep their precision.
    Images above ``max_pixels`` are downscaled (logged). Animated images: the first frame (logged).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = _existing_file(path, "image")
    try:
        with Image.open(p) as opened:
            if getattr(opened, "n_frames", 1) > 1:
                logger.info("%s has %d frames; using the first (read it as a video for all).",
                            p, opened.n_frames)
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except UnidentifiedImageError:
        raise SamaInputError(
            f"{str(p)!r} is not an image PIL can read; give a PNG, JPEG or WebP file."
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SamaInputError(f"Could not read the image {str(p)!r}: {err}. The file may be truncated or "
                             "damaged; re-export it.") from None

    _check_min_side(image.width, image.height, p, min_side)
    array = _image_to_rgb_array(image, p)  # (H, W, 3) float32 in [0, 1]
    frames = torch.from_numpy(array)[None]  # (1, H, W, 3)
    decode_size = _decode_scale(image.width, image.height, max_pixels)
    if decode_size is not None:
        logger.info("%s is %dx%d (more than %d pixels): downscaled to %dx%d.",
                    p, image.width, image.height, max_pixels, *decode_size)
        frames = resize_frames(frames, *decode_size)
    info = VideoInfo(
        path=str(p), fps=None, frame_count=1, width=frames.shape[2], height=frames.shape[1],
        source_width=image.width, source_height=image.height, source_frame_count=1,
        pix_fmt=image.mode, is_image=True,
    )
    return frames, info


def _image_to_rgb_array(image, path: Path) -> np.ndarray:
    """PIL image of any mode -> (H, W, 3) float32 in [0, 1]."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale (PIL opens 16-bit PNGs as I;16 or I): PIL's convert("RGB") would clip to 8
        # bits, so scale by hand. Mode "I" is 32-bit; values above 255 mean a 16-bit source.
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(values / peak, 0.0, 1.0).astype(np.float32)
        logger.info("%s: %s grayscale image converted to RGB.", path, mode)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        logger.info("%s: float grayscale image converted to RGB (clamped to [0, 1]).", path)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode != "RGB":
        has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La")
        has_alpha = has_alpha or (mode == "P" and "transparency" in image.info)
        logger.info("%s: %s image converted to RGB%s.", path, mode, " (alpha dropped)" if has_alpha else "")
        image = image.convert("RGBA").convert("RGB") if mode == "P" else image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------------------------------------
# Writing


def has_audio_stream(path: str | os.PathLike) -> bool:
    """Whether ffmpeg sees an audio stream in ``path`` (parses `ffmpeg -i` stream lines)."""
    return any(" Audio: " in line for line in _probe_lines(path))


def _probe_lines(path: str | os.PathLike) -> list[str]:
    import imageio_ffmpeg

    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
        capture_output=True, text=True, errors="replace",
    )  # exits non-zero (no output given); the stream list is on stderr either way
    return [line for line in result.stderr.splitlines() if line.lstrip().startswith("Stream ")]


def _to_uint8_frames(frames) -> Iterable[np.ndarray]:
    """Yield (H, W, 3) uint8 frames from a (F, H, W, 3) tensor/array or an iterable of (H, W, 3) frames."""
    for frame in frames:
        if isinstance(frame, torch.Tensor):
            frame = frame.detach().cpu()
            if frame.dtype != torch.uint8:
                frame = (frame.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
            frame = frame.numpy()
        else:
            frame = np.asarray(frame)
            if frame.dtype != np.uint8:
                frame = np.round(np.clip(frame.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
        if frame.ndim != 3 or frame.shape[-1] != 3:
            raise SamaInputError(f"Each frame to write must be (H, W, 3) RGB, got {frame.shape}.")
        yield frame


def _pad_even(frame: np.ndarray) -> np.ndarray:
    """yuv420p needs even sides: repeat the last row/column where a side is odd."""
    h, w, _ = frame.shape
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _as_fps(fps) -> Fraction:
    try:
        value = fps if isinstance(fps, Fraction) else Fraction(str(fps)).limit_denominator(1001)
    except (ValueError, TypeError, ZeroDivisionError):
        value = None
    if value is None or value <= 0:
        raise SamaInputError(
            f"fps must be a positive number (e.g. 16, 24 or Fraction(30000, 1001)), got {fps!r}."
        )
    return value


def _temp_path_next_to(path: Path, tag: str) -> Path:
    # Same folder, so the final os.replace is an atomic rename on the same filesystem.
    return path.with_name(f".{path.stem}.{tag}-{uuid.uuid4().hex[:8]}.partial{path.suffix or '.mp4'}")


def check_output_path(path: str | os.PathLike, frames: int | None = None) -> Path:
    """An output name the writers can honour, or a clear error before any work is done: a video container that
    holds H.264 (write_video), or an image file for a one-frame result. frames: the result's frame count, when
    known (an image file would keep one of them)."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        if frames is not None and frames > 1:
            raise SamaInputError(f"{str(out)!r} is an image file but the result has {frames} frames: write a video "
                                 f"(e.g. {out.with_suffix('.mp4').name}), or take one frame (--max-frames 1)")
        return out
    if suffix not in VIDEO_OUTPUT_EXTENSIONS:
        raise SamaInputError(f"cannot write {str(out)!r}: the output must be a video file ending in "
                             f"{', '.join(VIDEO_OUTPUT_EXTENSIONS)} (H.264), or an image file for a one-frame "
                             f"result; e.g. {(out.stem or 'edit').rstrip('.')}.mp4")
    return out


def write_video(
    path: str | os.PathLike,
    frames,
    fps,
    audio_from: str | os.PathLike | None = None,
    crf: int = DEFAULT_CRF,
    *,
    audio_start: float = 0.0,
    preset: str = "medium",
) -> Path:
    """Write frames as an H.264 (yuv420p) mp4 at ``fps``; copy the audio of ``audio_from`` when it has one.

    ``frames``: a (F, H, W, 3) tensor/array (float in [0, 1] or uint8), or an iterable of (H, W, 3) frames
    (so a caller can stream). Odd widths/heights get one repeated row/column (yuv420p needs even sides;
    logged). ``audio_start`` (seconds) skips into the audio, for edits of a later part of the source
    (VideoInfo.start_time); the audio is cut to the video's length. Audio is stream-copied, or re-encoded
    to AAC when mp4 cannot hold its codec. The file is written under a temporary name in the same folder
    and renamed at the end, so an interrupted run never leaves a half-written ``path``.
    """
    import imageio_ffmpeg

    out = Path(path)
    if out.suffix.lower() in IMAGE_EXTENSIONS:
        raise SamaInputError(f"write_video writes videos, not {str(out)!r}: give a name ending in "
                             f"{', '.join(VIDEO_OUTPUT_EXTENSIONS)}")
    check_output_path(out)
    if out.parent and not out.parent.exists():
        raise SamaFileNotFoundError(f"The output folder {str(out.parent)!r} does not exist; create it first.")
    fps = _as_fps(fps)
    if not 0 <= crf <= 51:
        raise SamaInputError(f"crf must be in 0..51 (lower = better; 18 is near-lossless), got {crf}.")
    if audio_from is not None:
        _existing_file(audio_from, "audio source")

    video_tmp = _temp_path_next_to(out, "video")
    muxed_tmp = _temp_path_next_to(out, "muxed")
    writer = None
    try:
        count = 0
        for frame in _to_uint8_frames(frames):
            if writer is None:
                height, width = frame.shape[:2]
                if width % 2 or height % 2:
                    logger.info("Frames are %dx%d; padded to %dx%d by repeating the last row/column "
                                "(H.264 yuv420p needs even sides).", width, height, width + width % 2,
                                height + height % 2)
                writer = imageio_ffmpeg.write_frames(
                    str(video_tmp), (width + width % 2, height + height % 2), fps=fps, codec="libx264",
                    pix_fmt_in="rgb24", pix_fmt_out="yuv420p", quality=None, macro_block_size=1,
                    ffmpeg_log_level="error", output_params=["-crf", str(crf), "-preset", preset],
                )
                writer.send(None)  # start ffmpeg
            elif frame.shape[:2] != (height, width):
                raise SamaInputError(f"Frame {count} is {frame.shape[1]}x{frame.shape[0]}, the first was "
                                     f"{width}x{height}; all frames of a video must share one size.")
            writer.send(np.ascontiguousarray(_pad_even(frame)))
            count += 1
        if writer is None:
            raise SamaInputError(f"No frames to write to {str(out)!r}; a video needs at least 1 frame.")
        writer.close()
        writer = None
        if not video_tmp.exists() or video_tmp.stat().st_size == 0:
            raise SamaInputError(f"ffmpeg failed to encode {str(out)!r} (no output was produced).")

        final = video_tmp
        if audio_from is not None:
            if has_audio_stream(audio_from):
                if _mux_audio(video_tmp, Path(audio_from), muxed_tmp, audio_start):
                    final = muxed_tmp
            else:
                logger.info("%s has no audio stream; %s is written without audio.", audio_from, out)
        os.replace(final, out)
        logger.info("Wrote %s: %d frames at %s fps.", out, count, fps)
        return out
    finally:
        if writer is not None:
            writer.close()
        for leftover in (video_tmp, muxed_tmp):
            leftover.unlink(missing_ok=True)


def _mux_audio(video: Path, audio_source: Path, out: Path, audio_start: float) -> bool:
    """Put the first audio stream of ``audio_source`` next to ``video``'s stream (copied, not re-encoded)."""
    import imageio_ffmpeg

    def run(audio_codec: list[str]) -> subprocess.CompletedProcess:
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-i", str(video),
            "-ss", f"{max(audio_start, 0.0):.6f}", "-i", str(audio_source),
            "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", *audio_codec,
            "-shortest", "-movflags", "+faststart", str(out),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, errors="replace")

    result = run(["-c:a", "copy"])
    if result.returncode != 0:
        # e.g. PCM audio from a .mov/.avi cannot go into mp4 as is
        logger.info("Audio of %s cannot be copied into mp4 (%s); re-encoding it to AAC.",
                    audio_source, result.stderr.strip()[-200:])
        result = run(["-c:a", "aac", "-b:a", "192k"])
    if result.returncode != 0:
        logger.warning("Could not add the audio of %s (%s); the video is written without audio.",
                       audio_source, result.stderr.strip()[-300:])
        out.unlink(missing_ok=True)
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# Comparison


def side_by_side(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float = 1.0,
    interpolation: str = "nearest",
    gap: int = 0,
    gap_value: float = 1.0,
) -> torch.Tensor:
    """(F, H, W, 3) frames of ``a | b`` (e.g. source | edited) for viewing, scaled by ``scale``.

    ``b`` is resized to ``a``'s height (aspect kept) when the heights differ; ``gap`` pixels of
    ``gap_value`` separate the two. ``interpolation`` is "nearest" (crisp pixels) or "bilinear".
    """
    _check_frames(a, "left frames")
    _check_frames(b, "right frames")
    if a.shape[0] != b.shape[0]:
        raise SamaInputError(f"side_by_side needs the same frame count on both sides, got {a.shape[0]} and "
                             f"{b.shape[0]}; trim the longer one.")
    if interpolation not in ("nearest", "bilinear"):
        raise SamaInputError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}.")
    if scale <= 0:
        raise SamaInputError(f"scale must be positive, got {scale}.")
    height = a.shape[1]
    if b.shape[1] != height:
        b = resize_frames(b, max(1, round(b.shape[2] * height / b.shape[1])), height)
    parts = [a.float(), b.float().to(a.device)]
    if gap > 0:
        parts.insert(1, torch.full((a.shape[0], height, gap, 3), gap_value, device=a.device))
    joined = torch.cat(parts, dim=2)  # (F, H, Wa + gap + Wb, 3)
    if scale == 1.0:
        return joined
    out_h, out_w = max(1, round(joined.shape[1] * scale)), max(1, round(joined.shape[2] * scale))
    x = joined.permute(0, 3, 1, 2)  # (F, 3, H, W)
    if interpolation == "nearest":
        y = F.interpolate(x, size=(out_h, out_w), mode="nearest-exact")
    else:
        y = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
    return y.permute(0, 2, 3, 1).contiguous()  # (F, out_h, out_w, 3)
