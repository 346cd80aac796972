"""Overlapping temporal windows for videos longer than one model pass.

A long video is edited window by window: every window is denoised with the same seed, prompt and
semantic/anchor stream, and the windows' outputs are blended across their overlaps. Windows are planned
in LATENT frames, because that is where the blend happens (the sampler's outputs are latents and one VAE
decode of the blended latents avoids seams between separately decoded clips). The Wan2.1 VAE is causal
with 4x temporal compression: 1 + 4k pixel frames <-> 1 + k latent frames, i.e.
``latent_frames = (pixel_frames - 1) // 4 + 1`` for a 4k+1 pixel count (see video.pad_to_4k_plus_1).

Plan rule (``plan_windows``):
- a video no longer than one window is one window of its own length;
- otherwise the fewest windows of exactly ``window`` frames whose consecutive overlaps are at least
  ``overlap`` frames, with start frames spread evenly from 0 to ``total - window`` (so every window has the
  full length and the extra overlap the integer grid forces is shared out evenly, not dumped on the last
  window).

Blend weights: every window gets a trapezoid, a linear ramp up across its overlap with the previous window
and down across its overlap with the next one (ramp values (j+1)/(L+1) for an overlap of L frames, so
neither window ever gets weight 0 or 1 inside an overlap); the trapezoids are then divided by their sum at
each frame, so the weights sum to one at every frame even when three windows meet (which even spreading can
produce when ``overlap`` is a large share of ``window``). Where only two windows overlap the ramps already
sum to one and the division changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import SamaInputError

logger = logging.getLogger(__name__)

# The VAE compresses time 4x (causal): 1 + 4k pixel frames -> 1 + k latent frames.
TEMPORAL_COMPRESSION = 4

# Defaults for the pipeline (our choice, not from the reference): one window is the reference's longest
# clip, 81 pixel frames = 21 latent frames; neighbouring windows share 4 latent (16 pixel) frames.
DEFAULT_WINDOW_LATENT_FRAMES = 21
DEFAULT_OVERLAP_LATENT_FRAMES = 4


def latent_frame_count(pixel_frames: int) -> int:
    """Latent frames the causal Wan VAE makes from ``pixel_frames`` (a 4k+1 count gives k+1)."""
    if pixel_frames < 1:
        raise SamaInputError(f"A video needs at least 1 frame, got {pixel_frames}.")
    return (pixel_frames - 1) // TEMPORAL_COMPRESSION + 1


def pixel_frame_count(latent_frames: int) -> int:
    """Pixel frames the causal Wan VAE decodes from ``latent_frames`` (k+1 latent -> 4k+1 pixel)."""
    if latent_frames < 1:
        raise SamaInputError(f"A latent video needs at least 1 frame, got {latent_frames}.")
    return TEMPORAL_COMPRESSION * (latent_frames - 1) + 1


def needs_windows(n_frames: int, limit: int | None) -> bool:
    """True when a video of ``n_frames`` is longer than ``limit`` and must be edited in windows.

    Both counts are in the same unit (latent frames in the pipeline). ``limit=None`` turns windowing off.
    """
    if limit is None:
        return False
    if limit < 1:
        raise SamaInputError(f"The window frame limit must be at least 1 (None: no windows), got {limit}.")
    return n_frames > limit


@dataclass(frozen=True)
class Window:
    """One window: latent frames [start, end) and their blend weights (end - start,) in float64."""

    start: int
    end: int
    weights: torch.Tensor

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def pixel_range(self) -> tuple[int, int]:
        """Pixel frames [start, end) these latent frames decode to.

        Latent frame 0 holds pixel frame 0 alone; latent frame j >= 1 holds pixel frames 4j-3 .. 4j.
        """
        first = 0 if self.start == 0 else TEMPORAL_COMPRESSION * self.start - (TEMPORAL_COMPRESSION - 1)
        return first, pixel_frame_count(self.end)


@dataclass(frozen=True)
class WindowPlan:
    """Windows covering latent frames [0, total)."""

    total: int
    window: int
    overlap: int
    windows: tuple[Window, ...]

    def __len__(self) -> int:
        return len(self.windows)

    def weight_sum(self) -> torch.Tensor:
        """Sum of all windows' weights at every frame, (total,) float64 (ones by construction)."""
        total = torch.zeros(self.total, dtype=torch.float64)
        for w in self.windows:
            total[w.start : w.end] += w.weights
        return total

    def coverage(self) -> torch.Tensor:
        """How many windows contain each frame, (total,) int64."""
        count = torch.zeros(self.total, dtype=torch.int64)
        for w in self.windows:
            count[w.start : w.end] += 1
        return count


def window_starts(total: int, window: int, overlap: int) -> list[int]:
    """Start frames of the fewest full-length windows with overlaps >= ``overlap``, spread evenly."""
    if total <= window:
        return [0]
    stride = window - overlap
    # Fewest windows n with (n - 1) * stride + window >= total.
    n = 1 + -(-(total - window) // stride)
    span = total - window
    # Even spread; the spacing (span / (n-1)) is <= stride, so every overlap is >= the requested one.
    return [round(i * span / (n - 1)) for i in range(n)]


def _trapezoid(start: int, end: int, prev_end: int | None, next_start: int | None) -> torch.Tensor:
    """Raw weight of one window: linear ramps over its overlaps with its neighbours, 1 elsewhere."""
    t = torch.arange(start, end, dtype=torch.float64)  # (L,)
    weight = torch.ones_like(t)
    if prev_end is not None and prev_end > start:
        ramp_len = prev_end - start
        weight = torch.minimum(weight, (t - start + 1) / (ramp_len + 1))
    if next_start is not None and next_start < end:
        ramp_len = end - next_start
        weight = torch.minimum(weight, (end - t) / (ramp_len + 1))
    return weight


def plan_windows(total: int, window: int, overlap: int) -> WindowPlan:
    """Plan windows over ``total`` latent frames (see the module docstring for the rule)."""
    if total < 1:
        raise SamaInputError(f"Cannot plan windows over {total} frames; the video needs at least 1 frame.")
    if window < 1:
        raise SamaInputError(f"The window length must be at least 1 frame, got {window}.")
    if not 0 <= overlap < window:
        raise SamaInputError(
            f"The window overlap must be at least 0 and smaller than the window length ({window}), "
            f"got {overlap}. Use e.g. overlap = window // 4."
        )
    starts = window_starts(total, window, overlap)
    length = min(window, total)
    bounds = [(s, s + length) for s in starts]
    raw = []
    for i, (start, end) in enumerate(bounds):
        prev_end = bounds[i - 1][1] if i > 0 else None
        next_start = bounds[i + 1][0] if i + 1 < len(bounds) else None
        raw.append(_trapezoid(start, end, prev_end, next_start))

    norm = torch.zeros(total, dtype=torch.float64)  # (total,)
    for (start, end), weight in zip(bounds, raw):
        norm[start:end] += weight
    windows = tuple(
        Window(start, end, weight / norm[start:end]) for (start, end), weight in zip(bounds, raw)
    )
    if len(windows) > 1:
        logger.info(
            "Long video: %d latent frames edited in %d windows of %d (overlap >= %d): %s",
            total, len(windows), length, overlap, [(w.start, w.end) for w in windows],
        )
    return WindowPlan(total=total, window=window, overlap=overlap, windows=windows)


class WindowBlender:
    """Accumulates window outputs into the full-length result, one window at a time.

    Holding only the running sum keeps memory at one full-length tensor however many windows there are.
    Sums are kept in float32 at least (float64 inputs stay float64) and cast back by ``result``.
    """

    def __init__(self, plan: WindowPlan, dim: int = 2):
        self.plan = plan
        self.dim = dim
        self._sum: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None
        self._added: set[int] = set()

    def add(self, index: int, output: torch.Tensor) -> None:
        """Add the output of window ``index``; its size along ``dim`` must be the window's length."""
        if not 0 <= index < len(self.plan):
            raise SamaInputError(f"Window index {index} is outside the plan's {len(self.plan)} windows.")
        if index in self._added:
            raise SamaInputError(f"Window {index} was already added to the blend.")
        window = self.plan.windows[index]
        dim = self.dim % output.dim()
        if output.shape[dim] != window.length:
            raise SamaInputError(
                f"Window {index} covers frames {window.start}..{window.end - 1} ({window.length} frames) "
                f"but its output has {output.shape[dim]} frames along dim {self.dim} "
                f"(shape {tuple(output.shape)})."
            )
        acc_dtype = torch.promote_types(output.dtype, torch.float32)
        if self._sum is None:
            shape = list(output.shape)
            shape[dim] = self.plan.total
            self._sum = torch.zeros(shape, dtype=acc_dtype, device=output.device)
            self._dtype = output.dtype
        else:
            expected = list(self._sum.shape)
            expected[dim] = window.length
            if list(output.shape) != expected:
                raise SamaInputError(
                    f"Window {index} output has shape {tuple(output.shape)}, expected {tuple(expected)} "
                    "(all windows must share every dimension except the frame one)."
                )
        view = [1] * output.dim()
        view[dim] = window.length
        weight = window.weights.to(device=output.device, dtype=acc_dtype).view(view)
        self._sum.narrow(dim, window.start, window.length).add_(output.to(acc_dtype) * weight)
        self._added.add(index)

    def result(self) -> torch.Tensor:
        missing = sorted(set(range(len(self.plan))) - self._added)
        if missing:
            raise SamaInputError(f"Cannot finish the blend: windows {missing} were never added.")
        return self._sum.to(self._dtype)


def blend(window_outputs: Sequence[torch.Tensor], plan: WindowPlan, dim: int = 2) -> torch.Tensor:
    """Blend one output per window (in plan order) into the full-length tensor along ``dim``.

    With latents (B, C, T, H, W) the frame dim is 2 (the default).
    """
    if len(window_outputs) != len(plan):
        raise SamaInputError(
            f"The plan has {len(plan)} windows but {len(window_outputs)} outputs were given."
        )
    blender = WindowBlender(plan, dim=dim)
    for index, output in enumerate(window_outputs):
        blender.add(index, output)
    return blender.result()
