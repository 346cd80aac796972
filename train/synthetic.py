"""SAMA-Shapes: seeded procedural videos of moving shapes with ground-truth edits.

Why it exists: nobody can download SAMA-14B here, so the embedded tiny model is trained and evaluated
on synthetic clips whose edits are known exactly. Every clip comes from a `Scene` (a JSON-serialisable
description: background, camera pan, and objects with their per-frame centres), so the same motion can be
re-rendered with one thing changed. That gives, per clip:

- the source clip (F, H, W, 3) float32 in [0, 1] and a caption (for raw-video / motion-pretext training),
- five ground-truth edits rendered with the SAME motion: change colour, change shape, remove an object,
  add an object (with its own motion), change background; each with an instruction in varied phrasing
  (objects referred to unambiguously by colour and/or shape) and a per-frame edit mask,
- image edit pairs (one frame of each edit) and per-frame object masks / centre trajectories for eval.

Conventions
- Pixel (row i, column j) covers [j, j+1) x [i, i+1) in continuous coordinates; its centre is
  (j + 0.5, i + 0.5). Object centres (`ShapeObject.centers`) are screen coordinates (x, y), y down.
- Objects are listed back to front (the last one is drawn on top): that list order IS the depth order.
- Compositing is "over" with per-object coverage a in [0, 1]: frame = frame * (1 - a) + colour * a.
  Where a == 0 this is bit-exact identity, so pixels outside an edit mask (the union of the edited
  object's visible pixels before and after) are IDENTICAL between source and edited clip, not just close.
- The camera pan moves the background only (objects' centres are already screen-space); textures are
  evaluated analytically at world coordinates (x + k * pan_x, y + k * pan_y), so pans are sub-pixel
  exact without resampling.

Seed scheme (train and held-out never share a random stream): clip `index` of split `split` under base
`seed` draws from numpy SeedSequence([SPLIT_IDS[split], seed, index, purpose]) where purpose separates the
scene, the caption and each edit kind. Different (split, seed, index) triples are different entropy
inputs, hence independent streams; `Scene.fingerprint()` is written to the ground truth so an evaluation
can assert that no held-out scene occurs in the training set.

Rasterisation: OpenCV's antialiased polygon fill at `supersample`x resolution, then area downsampling
(cv2.INTER_AREA), which gives smooth coverage. Backgrounds are a few lines of numpy (no library draws
analytic, pan-able stripes/checkers/noise). See docs/sama_shapes_data.md for the file formats.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from sama_core.errors import SamaFileNotFoundError, SamaInputError

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when the same seed would render different clips

# Saturated object colours, far (RGB distance >= 0.37) from every background colour below, so a removed
# object's colour cannot hide in the background.
OBJECT_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.97, 0.88, 0.10),
    "green": (0.15, 0.75, 0.20),
    "cyan": (0.05, 0.80, 0.90),
    "blue": (0.10, 0.28, 0.95),
    "purple": (0.58, 0.20, 0.82),
    "pink": (1.00, 0.45, 0.75),
}
# Muted background colours (plain backgrounds use one, textures mix two).
BACKGROUND_COLORS: dict[str, tuple[float, float, float]] = {
    "gray": (0.50, 0.50, 0.50),
    "light gray": (0.80, 0.80, 0.78),
    "dark gray": (0.25, 0.25, 0.27),
    "black": (0.05, 0.05, 0.06),
    "white": (0.96, 0.96, 0.96),
    "beige": (0.82, 0.76, 0.64),
    "brown": (0.42, 0.32, 0.25),
    "slate": (0.36, 0.42, 0.50),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
BACKGROUND_STYLES: tuple[str, ...] = ("plain", "stripes", "checker", "noise")
TEXTURED_STYLES: tuple[str, ...] = ("stripes", "checker", "noise")
EDIT_KINDS: tuple[str, ...] = ("color", "shape", "remove", "add", "background")
SPLIT_IDS: dict[str, int] = {"train": 0, "heldout": 1, "demo": 2}
VIDEO_FORMATS: tuple[str, ...] = ("mp4", "npz", "safetensors")
MANIFEST_NAMES = {
    "video_edits": "video_edits.jsonl",
    "image_edits": "image_edits.jsonl",
    "raw_videos": "raw_videos.jsonl",
    "ground_truth": "ground_truth.jsonl",
}

# Shape geometry, in units of the object's `radius`: a circle of radius r, and polygons whose areas are
# of the same order (square 3.1 r^2, triangle 2.2 r^2, star 2.3 r^2 against the circle's 3.14 r^2).
SQUARE_CIRCUMRADIUS = 1.25
TRIANGLE_CIRCUMRADIUS = 1.3
STAR_OUTER_RADIUS = 1.35
STAR_INNER_RATIO = 0.5
CIRCLE_VERTICES = 48
# The farthest any shape reaches from its centre; paths keep this much (+1 px) inside the frame so that
# every shape, including the one a "change shape" edit swaps in, stays fully visible.
MAX_EXTENT = STAR_OUTER_RADIUS
# Purpose codes of the per-clip random streams (see the seed scheme in the module docstring).
_SCENE_STREAM, _CAPTION_STREAM, _EDIT_STREAM_BASE = 0, 1, 10


# ----------------------------------------------------------------------------------------------------------
# Configuration and scene description


@dataclass
class SynthConfig:
    """What scenes look like. Sizes in pixels are for 64x64 and scale with min(width, height) / 64."""

    width: int = 64
    height: int = 64
    num_frames: int = 17  # 4k+1, the causal VAE's valid lengths
    min_objects: int = 1
    max_objects: int = 3
    # Objects span about 2x2 DiT tokens (16x16 px each: 8x VAE, 2x2 patches) and backgrounds are coarse, which
    # the tiny VAE keeps better (session 6: its held-out ceiling 70% -> 79%; until then radius 5-9 and
    # periods 8-16 px, objects under one token).
    min_radius: float = 8.0
    max_radius: float = 12.0
    min_path: float = 12.0  # length of an object's path over the clip
    max_path: float = 40.0
    curved_prob: float = 0.5
    speed_change_prob: float = 0.4
    spin_prob: float = 0.3
    occlusion_prob: float = 0.4  # chance that an object's path crosses an earlier (deeper) object's
    textured_prob: float = 0.7
    min_period: float = 20.0  # stripes/checker period (noise: wavelength scale), pixels
    max_period: float = 32.0
    pan_prob: float = 0.5  # chance of a camera pan, for textured backgrounds (a plain one shows no pan)
    min_pan: float = 0.4  # pixels per frame
    max_pan: float = 1.2
    supersample: int = 4
    fps: int = 16  # Wan2.1's frame rate
    edits: tuple[str, ...] = EDIT_KINDS

    def __post_init__(self) -> None:
        self.edits = tuple(self.edits)
        self.validate()

    @property
    def scale(self) -> float:
        return min(self.width, self.height) / 64.0

    def validate(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 32 or value % 16:
                raise SamaInputError(
                    f"SynthConfig.{name} must be a multiple of 16 of at least 32 pixels (the model needs "
                    f"sides that are multiples of 16), got {value!r}; use e.g. 64."
                )
        if not isinstance(self.num_frames, int) or self.num_frames < 5 or (self.num_frames - 1) % 4:
            raise SamaInputError(
                f"SynthConfig.num_frames must be of the form 4k+1 and at least 5 (e.g. 9, 17, 33), got "
                f"{self.num_frames!r}."
            )
        # At most 3 objects, so a shape edit always finds a shape that the object's colour does not already
        # have in the scene (an add edit makes a 4th object in the target only).
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise SamaInputError(
                f"SynthConfig needs 1 <= min_objects <= max_objects <= 3, got {self.min_objects} and "
                f"{self.max_objects}."
            )
        if not 0 < self.min_radius <= self.max_radius or not 0 < self.min_path <= self.max_path:
            raise SamaInputError("SynthConfig radii and path lengths must be positive with min <= max.")
        if 2 * (MAX_EXTENT * self.max_radius * self.scale + 1) + self.min_path * self.scale > min(
            self.width, self.height
        ):
            raise SamaInputError(
                f"Objects of radius {self.max_radius} with paths of {self.min_path} px do not fit a "
                f"{self.width}x{self.height} frame; lower max_radius or min_path."
            )
        if not 0 < self.min_period <= self.max_period:
            raise SamaInputError("SynthConfig background periods must be positive with "
                                 "min_period <= max_period.")
        if not 0 <= self.min_pan <= self.max_pan:
            raise SamaInputError("SynthConfig needs 0 <= min_pan <= max_pan (pixels per frame).")
        if self.supersample < 1:
            raise SamaInputError(f"SynthConfig.supersample must be >= 1, got {self.supersample}.")
        unknown = [kind for kind in self.edits if kind not in EDIT_KINDS]
        if unknown:
            raise SamaInputError(f"Unknown edit kinds {unknown}; choose from {', '.join(EDIT_KINDS)}.")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["edits"] = list(self.edits)
        return data


@dataclass
class ShapeObject:
    """One moving shape. `centers` (one (x, y) per frame, screen pixels) is the authoritative motion;
    `motion`, `speed_ratio` and `spin` describe it for captions."""

    shape: str
    color: str
    radius: float
    angle: float  # degrees at frame 0
    spin: float  # degrees per frame
    motion: str  # "linear" or "curved"
    speed_ratio: float  # speed after the change / before; 1.0 = constant speed
    centers: list[list[float]]

    def angle_at(self, frame: int) -> float:
        return self.angle + self.spin * frame

    def describe(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Background:
    style: str  # one of BACKGROUND_STYLES
    colors: list[str]  # names in BACKGROUND_COLORS; plain uses colors[0]
    period: float = 12.0  # stripes/checker period, noise wavelength scale (pixels)
    angle: float = 0.0  # stripes/checker orientation (degrees)
    waves: list[list[float]] = field(default_factory=list)  # noise: [kx, ky, phase, amplitude] rows

    def pattern_noun(self) -> str:
        """e.g. 'plain gray', 'stripes', 'a checkerboard' (for 'change the background to ...')."""
        if self.style == "plain":
            return f"plain {self.colors[0]}"
        return {"stripes": "stripes", "checker": "a checkerboard", "noise": "a mottled pattern"}[self.style]

    def noun_phrase(self) -> str:
        """e.g. 'a plain gray background', 'a striped background'."""
        if self.style == "plain":
            return f"a plain {self.colors[0]} background"
        return {"stripes": "a striped background", "checker": "a checkered background",
                "noise": "a mottled background"}[self.style]

    def adjective(self) -> str:
        if self.style == "plain":
            return f"plain {self.colors[0]}"
        return {"stripes": "striped", "checker": "checkered", "noise": "mottled"}[self.style]


@dataclass
class Scene:
    width: int
    height: int
    num_frames: int
    objects: list[ShapeObject]  # back to front
    background: Background
    pan: list[float]  # camera motion (x, y) in pixels per frame; the background moves by -pan on screen

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        try:
            return cls(
                width=int(data["width"]), height=int(data["height"]), num_frames=int(data["num_frames"]),
                objects=[ShapeObject(**obj) for obj in data["objects"]],
                background=Background(**data["background"]), pan=list(data["pan"]),
            )
        except (KeyError, TypeError) as err:
            raise SamaInputError(
                f"Not a SAMA-Shapes scene description ({err}); pass a dict written by Scene.to_dict()."
            ) from None

    def fingerprint(self) -> str:
        """A short hash of the scene, for checking that held-out scenes never occur in training data."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def replace_object(self, index: int, **changes) -> Scene:
        objects = list(self.objects)
        objects[index] = dataclasses.replace(objects[index], **changes)
        return dataclasses.replace(self, objects=objects)


# ----------------------------------------------------------------------------------------------------------
# Rendering


def shape_outline(shape: str, cx: float, cy: float, radius: float, angle_deg: float) -> np.ndarray:
    """The polygon (V, 2) of a shape centred at (cx, cy); angle 0 points a vertex up. Every outline is
    point- or rotation-symmetric about (cx, cy), so its area centroid is the centre."""
    if shape == "circle":
        count, radii, start = CIRCLE_VERTICES, np.full(CIRCLE_VERTICES, radius), 0.0
    elif shape == "square":
        count, radii, start = 4, np.full(4, SQUARE_CIRCUMRADIUS * radius), -45.0
    elif shape == "triangle":
        count, radii, start = 3, np.full(3, TRIANGLE_CIRCUMRADIUS * radius), -90.0
    elif shape == "star":
        outer = STAR_OUTER_RADIUS * radius
        count, radii, start = 10, np.tile([outer, outer * STAR_INNER_RATIO], 5), -90.0
    else:
        raise SamaInputError(f"Unknown shape {shape!r}; use one of {', '.join(SHAPES)}.")
    theta = np.deg2rad(start + angle_deg + np.arange(count) * 360.0 / count)
    return np.stack([cx + radii * np.cos(theta), cy + radii * np.sin(theta)], axis=-1)  # (V, 2)


# OpenCV's fill also paints the pixels its edges pass through, which fattens every shape by ~0.6 of a
# (supersampled) pixel along its outline (measured: +4% area at radius 8); polygons are inset by that much
# first, so coverage sums to the true area (within 2% for radii >= 5 px).
FILL_BIAS = 0.6


def inset_polygon(polygon: np.ndarray, distance: float) -> np.ndarray:
    """Move every edge of a simple polygon (V, 2) inwards by `distance` (mitred vertices; works for the
    concave vertices of a star too)."""
    edges = np.roll(polygon, -1, axis=0) - polygon  # (V, 2), edge i runs from vertex i to i+1
    edges /= np.linalg.norm(edges, axis=1, keepdims=True)
    following = np.roll(polygon, -1, axis=0)
    signed_area = 0.5 * np.sum(polygon[:, 0] * following[:, 1] - following[:, 0] * polygon[:, 1])
    # inward normal: the edge direction turned towards the interior (depends on the winding)
    normals = np.stack([-edges[:, 1], edges[:, 0]], axis=1) * (1.0 if signed_area > 0 else -1.0)
    before, after = np.roll(normals, 1, axis=0), normals  # normals of the edges meeting at each vertex
    miter = (before + after) / (1.0 + np.sum(before * after, axis=1, keepdims=True))
    return polygon + distance * miter


def rasterize(polygon: np.ndarray, width: int, height: int, supersample: int = 4) -> np.ndarray:
    """Antialiased coverage (H, W) float32 in [0, 1] of a polygon given in continuous pixel coordinates."""
    canvas = np.zeros((height * supersample, width * supersample), np.uint8)
    # cv2 puts integer coordinate u at the centre of pixel u, i.e. continuous u + 0.5; 4 fractional bits.
    hires = inset_polygon(polygon * supersample, FILL_BIAS)
    points = np.round((hires - 0.5) * 16.0).astype(np.int32)
    cv2.fillPoly(canvas, [points], 255, cv2.LINE_AA, 4)
    if supersample > 1:
        canvas = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
    return canvas.astype(np.float32) / 255.0


def render_background(background: Background, width: int, height: int, num_frames: int,
                      pan: Sequence[float]) -> np.ndarray:
    """(F, H, W, 3) float32 background frames, the texture sampled at world = screen + frame * pan."""
    frames = np.arange(num_frames, dtype=np.float64)[:, None, None]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    wx = xs[None] + frames * pan[0]  # (F, H, W)
    wy = ys[None] + frames * pan[1]
    first = np.asarray(BACKGROUND_COLORS[background.colors[0]], np.float64)
    if background.style == "plain":
        return np.broadcast_to(first, (num_frames, height, width, 3)).astype(np.float32)
    second = np.asarray(BACKGROUND_COLORS[background.colors[1]], np.float64)
    # A sharpened sine: slope 1 per pixel at its zero crossings, so edges are ~1 px wide (antialiased).
    sharpness = background.period / (2 * math.pi)
    theta = math.radians(background.angle)
    u = (wx * math.cos(theta) + wy * math.sin(theta)) / background.period
    v = (-wx * math.sin(theta) + wy * math.cos(theta)) / background.period
    if background.style == "stripes":
        mix = 0.5 + sharpness * np.sin(2 * math.pi * u)
    elif background.style == "checker":
        mix = 0.5 + 2 * sharpness * np.sin(2 * math.pi * u) * np.sin(2 * math.pi * v)
    elif background.style == "noise":
        total = np.zeros_like(wx)
        amplitude_sum = 0.0
        for kx, ky, phase, amplitude in background.waves:
            total += amplitude * np.cos(kx * wx + ky * wy + phase)
            amplitude_sum += amplitude
        mix = 0.5 + 0.5 * total / max(amplitude_sum, 1e-6)
    else:
        raise SamaInputError(f"Unknown background style {background.style!r}; use one of "
                             f"{', '.join(BACKGROUND_STYLES)}.")
    mix = np.clip(mix, 0.0, 1.0)[..., None]
    return (first * (1.0 - mix) + second * mix).astype(np.float32)


@dataclass
class RenderedClip:
    """A rendered scene. `coverage[i]` is object i's own antialiased mask (ignoring occlusion);
    `visible[i]` is its weight in the final pixels (coverage times the transparency of everything in
    front); `background_weight` is the background's. visible.sum(0) + background_weight == 1."""

    frames: torch.Tensor  # (F, H, W, 3) float32 in [0, 1]
    coverage: torch.Tensor  # (N, F, H, W) float32
    visible: torch.Tensor  # (N, F, H, W) float32
    background_weight: torch.Tensor  # (F, H, W) float32

    def object_masks(self) -> torch.Tensor:
        """(N, F, H, W) bool: the pixels each object contributes to."""
        # numpy for the element-wise work here and below: torch's intra-op thread pool costs ~10 ms per
        # tiny op when the cores are busy, which dominated generation time.
        return torch.from_numpy(self.visible.numpy() > 0)


def render_scene(scene: Scene, supersample: int = 4) -> RenderedClip:
    """Render a scene: background, then objects back to front, composited with their coverage."""
    count, num_frames, height, width = len(scene.objects), scene.num_frames, scene.height, scene.width
    frames = render_background(scene.background, width, height, num_frames, scene.pan)  # (F, H, W, 3)
    coverage = np.zeros((count, num_frames, height, width), np.float32)
    for i, obj in enumerate(scene.objects):
        for k in range(num_frames):
            cx, cy = obj.centers[k]
            polygon = shape_outline(obj.shape, cx, cy, obj.radius, obj.angle_at(k))
            coverage[i, k] = rasterize(polygon, width, height, supersample)
    # (F, H, W) transparency of everything in front of the object being visited (front to back)
    transparency = np.ones((num_frames, height, width), np.float32)
    visible = np.zeros_like(coverage)
    for i in reversed(range(count)):  # front to back
        visible[i] = coverage[i] * transparency
        transparency = transparency * (1.0 - coverage[i])
    for i, obj in enumerate(scene.objects):  # back to front; a == 0 leaves a pixel bit-identical
        alpha = coverage[i][..., None]
        frames = frames * (1.0 - alpha) + np.asarray(OBJECT_COLORS[obj.color], np.float32) * alpha
    return RenderedClip(
        frames=torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32)),
        coverage=torch.from_numpy(coverage), visible=torch.from_numpy(visible),
        background_weight=torch.from_numpy(transparency),
    )


# ----------------------------------------------------------------------------------------------------------
# Sampling scenes


def _round(value: float) -> float:
    # Rounded so scene JSON stays short; rendering always uses the rounded value, so a scene re-rendered
    # from its JSON is pixel-identical.
    return round(float(value), 3)


def _progress(rng: np.random.Generator, num_frames: int, speed_change: bool) -> tuple[np.ndarray, float]:
    """Fraction of the path covered at each frame (F,), from 0 to 1, and the speed ratio after/before."""
    t = np.linspace(0.0, 1.0, num_frames)
    if not speed_change:
        return t, 1.0
    change_at = rng.uniform(0.3, 0.7)
    ratio = math.exp(rng.choice([-1.0, 1.0]) * rng.uniform(math.log(1.8), math.log(3.0)))
    distance = np.where(t < change_at, t, change_at + ratio * (t - change_at))
    return distance / distance[-1], ratio


def _path_offsets(rng: np.random.Generator, progress: np.ndarray, curved: bool, length: float) -> np.ndarray:
    """(F, 2) positions relative to the start: a straight line or a quadratic Bezier curve."""
    direction = rng.uniform(0.0, 2 * math.pi)
    end = length * np.array([math.cos(direction), math.sin(direction)])
    s = progress[:, None]
    if not curved:
        return s * end
    bend = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.7) * length
    control = 0.5 * end + bend * np.array([-math.sin(direction), math.cos(direction)])
    return 2 * s * (1 - s) * control + s * s * end


def _sample_object(rng: np.random.Generator, config: SynthConfig, taken: set[tuple[str, str]],
                   cross: ShapeObject | None = None) -> ShapeObject:
    """A new object whose (colour, shape) is not in `taken`; its path crosses `cross`'s when given."""
    free = [(c, s) for c in OBJECT_COLORS for s in SHAPES if (c, s) not in taken]
    color, shape = free[rng.integers(len(free))]
    scale = config.scale
    radius = rng.uniform(config.min_radius, config.max_radius) * scale
    margin = MAX_EXTENT * radius + 1.0
    low = np.array([margin, margin])
    high = np.array([config.width - margin, config.height - margin])
    curved = bool(rng.random() < config.curved_prob)
    progress, speed_ratio = _progress(rng, config.num_frames, bool(rng.random() < config.speed_change_prob))
    length = rng.uniform(config.min_path, config.max_path) * scale
    centers = None
    for attempt in range(20):
        offsets = _path_offsets(rng, progress, curved, length)  # (F, 2)
        start_low, start_high = low - offsets.min(0), high - offsets.max(0)
        if np.any(start_low > start_high):
            length = max(length * 0.8, 1.0)  # too long for the frame in this direction: shorten
            continue
        if cross is not None and attempt < 10:
            # Put the start where the path passes the other object's centre at a middle frame.
            k = int(rng.integers(config.num_frames // 4, 3 * config.num_frames // 4 + 1))
            start = np.asarray(cross.centers[k]) - offsets[k]
            if np.any(start < start_low) or np.any(start > start_high):
                continue
        else:
            start = rng.uniform(start_low, start_high)
        centers = start + offsets
        break
    if centers is None:  # 20 rejections are practically impossible; a still object is a valid fallback
        centers = np.tile(rng.uniform(low, high), (config.num_frames, 1))
    spin = 0.0
    if rng.random() < config.spin_prob:
        spin = rng.choice([-1.0, 1.0]) * rng.uniform(3.0, 12.0)
    return ShapeObject(
        shape=shape, color=color, radius=_round(radius), angle=_round(rng.uniform(0.0, 360.0)),
        spin=_round(spin), motion="curved" if curved else "linear", speed_ratio=_round(speed_ratio),
        centers=[[_round(x), _round(y)] for x, y in centers],
    )


def _sample_background(rng: np.random.Generator, config: SynthConfig, style: str | None = None) -> Background:
    if style is None:
        style = "plain" if rng.random() >= config.textured_prob else TEXTURED_STYLES[rng.integers(3)]
    names = list(BACKGROUND_COLORS)
    if style == "plain":
        return Background(style="plain", colors=[names[rng.integers(len(names))]])
    luminance = {n: float(np.dot(BACKGROUND_COLORS[n], (0.299, 0.587, 0.114))) for n in names}
    pairs = [(a, b) for a in names for b in names if abs(luminance[a] - luminance[b]) >= 0.2]
    first, second = pairs[rng.integers(len(pairs))]
    period = _round(rng.uniform(config.min_period, config.max_period) * config.scale)
    waves = []
    if style == "noise":
        for _ in range(5):
            wavelength = rng.uniform(1.5, 4.0) * period
            direction = rng.uniform(0.0, 2 * math.pi)
            k = 2 * math.pi / wavelength
            waves.append([_round(k * math.cos(direction)), _round(k * math.sin(direction)),
                          _round(rng.uniform(0.0, 2 * math.pi)), _round(rng.uniform(0.3, 1.0))])
    return Background(style=style, colors=[first, second], period=period,
                      angle=_round(rng.uniform(0.0, 180.0)), waves=waves)


def sample_scene(rng: np.random.Generator, config: SynthConfig | None = None) -> Scene:
    """A random scene: 1-3 objects with distinct (colour, shape), a background, maybe a camera pan."""
    config = config or SynthConfig()
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    objects: list[ShapeObject] = []
    for _ in range(count):
        cross = None
        if objects and rng.random() < config.occlusion_prob:
            cross = objects[rng.integers(len(objects))]
        objects.append(_sample_object(rng, config, {(o.color, o.shape) for o in objects}, cross))
    background = _sample_background(rng, config)
    pan = [0.0, 0.0]
    if background.style != "plain" and rng.random() < config.pan_prob:
        speed = rng.uniform(config.min_pan, config.max_pan) * config.scale
        direction = rng.uniform(0.0, 2 * math.pi)
        pan = [_round(speed * math.cos(direction)), _round(speed * math.sin(direction))]
    return Scene(width=config.width, height=config.height, num_frames=config.num_frames, objects=objects,
                 background=background, pan=pan)


# ----------------------------------------------------------------------------------------------------------
# Language: references, directions, captions, instructions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def direction_phrase(dx: float, dy: float) -> str:
    """Screen direction of a displacement (y down): 'right', 'up', 'up and to the left', ..."""
    angle = math.degrees(math.atan2(-dy, dx)) % 360.0  # counter-clockwise from +x, y up
    names = ["right", "up and to the right", "up", "up and to the left", "left", "down and to the left",
             "down", "down and to the right"]
    return names[int(((angle + 22.5) % 360.0) // 45.0)]


def object_direction(obj: ShapeObject) -> str:
    (x0, y0), (x1, y1) = obj.centers[0], obj.centers[-1]
    return direction_phrase(x1 - x0, y1 - y0)


def reference_options(scene: Scene, index: int) -> list[dict]:
    """The ways to name object `index` that no other object in the scene also fits.

    A reference is {"color": name or None, "shape": name or None}; colour + shape is always unique
    because scenes never repeat a (colour, shape) pair."""
    target = scene.objects[index]
    others = [o for i, o in enumerate(scene.objects) if i != index]
    options = [{"color": target.color, "shape": target.shape}]
    if all(o.shape != target.shape for o in others):
        options.append({"color": None, "shape": target.shape})
    if all(o.color != target.color for o in others):
        options.append({"color": target.color, "shape": None})
    return options


def reference_matches(reference: dict, obj: ShapeObject) -> bool:
    return (reference["color"] in (None, obj.color)) and (reference["shape"] in (None, obj.shape))


def reference_phrase(reference: dict, noun: str = "shape") -> str:
    """'the red circle', 'the circle', or 'the red shape' (noun used when the shape is not named)."""
    words = [w for w in (reference["color"], reference["shape"] or noun) if w]
    return "the " + " ".join(words)


def _choose(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _motion_details(obj: ShapeObject, rng: np.random.Generator) -> str:
    words = [f"moving {object_direction(obj)}"]
    if obj.motion == "curved":
        words.append(_choose(rng, ["along a curve", "in an arc"]))
    if obj.speed_ratio > 1.3:
        words.append("and speeding up")
    elif obj.speed_ratio < 1 / 1.3:
        words.append("and slowing down")
    if abs(obj.spin) > 0 and obj.shape != "circle":
        words.append("while spinning")
    return " ".join(words)


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def caption_scene(scene: Scene, rng: np.random.Generator) -> str:
    """A caption such as 'a red circle and a blue square moving on a striped background'."""
    background = scene.background.noun_phrase()
    camera = ""
    if scene.background.style != "plain" and math.hypot(*scene.pan) > 0:
        camera = _choose(rng, [", the camera pans ", " while the camera pans "]) + direction_phrase(
            scene.pan[0], scene.pan[1])
    if not scene.objects:
        return f"{background} with no shapes{camera}"
    order = list(rng.permutation(len(scene.objects)))
    plain = [f"{_article(scene.objects[i].color)} {scene.objects[i].describe()}" for i in order]
    detailed = [f"{p} {_motion_details(scene.objects[i], rng)}" for p, i in zip(plain, order)]
    template = int(rng.integers(3))
    if template == 0:
        return f"{_join(plain)} moving on {background}{camera}"
    if template == 1:
        return f"{_join(detailed)} on {background}{camera}"
    return f"{background} with {_join(detailed)}{camera}"


COLOR_TEMPLATES = (
    "make {ref} {new}", "change the colour of {ref} to {new}", "change the color of {ref} to {new}",
    "turn {ref} {new}", "paint {ref} {new}", "recolor {ref} {new}",
)
SHAPE_TEMPLATES = (
    "turn {ref} into {a_new}", "change {ref} into {a_new}", "replace {ref} with {a_color_new}",
    "make {ref} {a_new}", "change the shape of {ref} to {a_new}",
)
REMOVE_TEMPLATES = (
    "remove {ref}", "delete {ref}", "erase {ref} from the video", "take out {ref}", "get rid of {ref}",
)
ADD_TEMPLATES = (
    "add {a_obj}", "add {a_obj} moving {direction}", "insert {a_obj} that moves {direction}",
    "put {a_obj} in the video",
)
ADD_IMAGE_TEMPLATES = ("add {a_obj}", "insert {a_obj}", "put {a_obj} in the picture")
BACKGROUND_TEMPLATES = (
    "change the background to {pattern}", "replace the background with {pattern}",
    "make the background {adj}", "swap the background for {noun}", "put the shapes on {noun}",
)


# ----------------------------------------------------------------------------------------------------------
# Edits


@dataclass
class Edit:
    """One ground-truth edit of a scene. `object_index` is the edited object's index in `source` for
    colour/shape/remove, in `target` for add (it is added in front), None for background."""

    kind: str
    instruction: str  # for the video edit (may mention motion)
    image_instruction: str  # the same edit for a still frame (no motion words)
    source: Scene
    target: Scene
    object_index: int | None
    reference: dict | None  # {"color", "shape"} used to name the edited object in the instruction
    change: dict  # e.g. {"from": "red", "to": "blue"}

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source")
        data["target"] = self.target.to_dict()
        return data


def make_edit(scene: Scene, kind: str, rng: np.random.Generator, config: SynthConfig | None = None) -> Edit:
    """A random edit of `kind` of `scene`, with the target scene keeping every other object's motion."""
    config = config or SynthConfig(width=scene.width, height=scene.height, num_frames=scene.num_frames)
    if kind == "background":
        return _background_edit(scene, rng, config)
    if kind == "add":
        return _add_edit(scene, rng, config)
    if kind not in EDIT_KINDS:
        raise SamaInputError(f"Unknown edit kind {kind!r}; use one of {', '.join(EDIT_KINDS)}.")
    if not scene.objects:
        raise SamaInputError(f"A {kind!r} edit needs an object in the scene; this scene has none.")
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    reference = _choose(rng, reference_options(scene, index))
    ref = reference_phrase(reference, noun=_choose(rng, ["shape", "object", "one"]))
    taken = {(o.color, o.shape) for o in scene.objects}
    candidates = {"color": [c for c in OBJECT_COLORS if (c, obj.shape) not in taken],
                  "shape": [s for s in SHAPES if (obj.color, s) not in taken]}
    if not candidates.get(kind, [None]):
        raise SamaInputError(f"No {kind} is free for the {obj.describe()}: every alternative already exists "
                             "in the scene. Use scenes of at most 3 objects.")
    if kind == "color":
        new = _choose(rng, candidates["color"])
        text = _choose(rng, COLOR_TEMPLATES).format(ref=ref, new=new)
        target = scene.replace_object(index, color=new)
        return Edit(kind, text, text, scene, target, index, reference, {"from": obj.color, "to": new})
    if kind == "shape":
        new = _choose(rng, candidates["shape"])
        text = _choose(rng, SHAPE_TEMPLATES).format(
            ref=ref, a_new=f"{_article(new)} {new}", a_color_new=f"{_article(obj.color)} {obj.color} {new}")
        target = scene.replace_object(index, shape=new)
        return Edit(kind, text, text, scene, target, index, reference, {"from": obj.shape, "to": new})
    # remove
    text = _choose(rng, REMOVE_TEMPLATES).format(ref=ref)
    image_text = text.replace("from the video", "from the picture")
    target = dataclasses.replace(scene, objects=[o for i, o in enumerate(scene.objects) if i != index])
    return Edit(kind, text, image_text, scene, target, index, reference, {"from": obj.describe(), "to": None})


def _add_edit(scene: Scene, rng: np.random.Generator, config: SynthConfig) -> Edit:
    taken = {(o.color, o.shape) for o in scene.objects}
    cross = scene.objects[rng.integers(len(scene.objects))] if (
        scene.objects and rng.random() < config.occlusion_prob) else None
    new = _sample_object(rng, config, taken, cross)
    a_obj = f"{_article(new.color)} {new.describe()}"
    text = _choose(rng, ADD_TEMPLATES).format(a_obj=a_obj, direction=object_direction(new))
    image_text = _choose(rng, ADD_IMAGE_TEMPLATES).format(a_obj=a_obj)
    target = dataclasses.replace(scene, objects=[*scene.objects, new])  # in front of everything
    reference = {"color": new.color, "shape": new.shape}
    return Edit("add", text, image_text, scene, target, len(scene.objects), reference,
                {"from": None, "to": new.describe()})


def _background_edit(scene: Scene, rng: np.random.Generator, config: SynthConfig) -> Edit:
    old = scene.background
    for _ in range(50):
        new = _sample_background(rng, config, style=_choose(rng, BACKGROUND_STYLES))
        if new.noun_phrase() != old.noun_phrase():
            break
    text = _choose(rng, BACKGROUND_TEMPLATES).format(noun=new.noun_phrase(), adj=new.adjective(),
                                                      pattern=new.pattern_noun())
    target = dataclasses.replace(scene, background=new)
    return Edit("background", text, text, scene, target, None, None,
                {"from": old.noun_phrase(), "to": new.noun_phrase()})


def edit_mask(edit: Edit, source: RenderedClip, target: RenderedClip) -> torch.Tensor:
    """(F, H, W) bool: every pixel the edit may change (outside it, source == target exactly).

    Object edits: the edited object's visible pixels before OR after. Background edits: the pixels where
    the background shows at all, before or after."""
    if edit.kind == "background":
        mask = (source.background_weight.numpy() > 0) | (target.background_weight.numpy() > 0)
    elif edit.kind == "add":
        mask = target.visible[edit.object_index].numpy() > 0
    elif edit.kind == "remove":
        mask = source.visible[edit.object_index].numpy() > 0
    else:
        i = edit.object_index
        mask = (source.visible[i].numpy() > 0) | (target.visible[i].numpy() > 0)
    return torch.from_numpy(mask)


# ----------------------------------------------------------------------------------------------------------
# Whole clips


def keep_mask(edit: "EditSample") -> torch.Tensor:
    """(F, H, W) bool: the pixels of the target's objects that the edit leaves alone (the objects the
    instruction does not name, where the edit does not touch them): the manifests' "keep_mask"."""
    objects = edit.target.object_masks().numpy().any(0)  # (F, H, W)
    return torch.from_numpy(objects & ~edit.mask.numpy())


def clip_generator(seed: int, index: int, split: str, purpose: int) -> np.random.Generator:
    """The random stream for one purpose of one clip (see the seed scheme in the module docstring)."""
    if split not in SPLIT_IDS:
        raise SamaInputError(f"Unknown split {split!r}; use one of {', '.join(SPLIT_IDS)}.")
    if seed < 0 or index < 0:
        raise SamaInputError(f"seed and clip index must be >= 0, got seed={seed}, index={index}.")
    return np.random.default_rng(np.random.SeedSequence([GENERATOR_VERSION, SPLIT_IDS[split], seed, index,
                                                         purpose]))


@dataclass
class EditSample:
    edit: Edit
    target: RenderedClip
    mask: torch.Tensor  # (F, H, W) bool, see edit_mask
    image_frame: int  # the frame used for the image edit pair


@dataclass
class ClipSample:
    clip_id: str
    split: str
    seed: int
    index: int
    scene: Scene
    caption: str
    source: RenderedClip
    edits: list[EditSample]

    def image_pair(self, edit: EditSample) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(source frame (H, W, 3), edited frame (H, W, 3), instruction) of one edit."""
        k = edit.image_frame
        return self.source.frames[k], edit.target.frames[k], edit.edit.image_instruction


def _pick_image_frame(mask: torch.Tensor, rng: np.random.Generator) -> int:
    """A frame where the edit is clearly visible: one whose mask area is at least half the largest."""
    area = mask.numpy().reshape(mask.shape[0], -1).sum(1)  # (F,)
    candidates = np.flatnonzero(area >= 0.5 * area.max()).tolist()
    return int(_choose(rng, candidates))


def generate_clip(seed: int, index: int, split: str = "train",
                  config: SynthConfig | None = None) -> ClipSample:
    """Clip `index` of a split: its scene, caption, source render and every configured edit."""
    config = config or SynthConfig()
    scene = sample_scene(clip_generator(seed, index, split, _SCENE_STREAM), config)
    caption = caption_scene(scene, clip_generator(seed, index, split, _CAPTION_STREAM))
    source = render_scene(scene, config.supersample)
    edits = []
    for kind in config.edits:
        rng = clip_generator(seed, index, split, _EDIT_STREAM_BASE + EDIT_KINDS.index(kind))
        edit = make_edit(scene, kind, rng, config)
        target = render_scene(edit.target, config.supersample)
        mask = edit_mask(edit, source, target)
        edits.append(EditSample(edit, target, mask, _pick_image_frame(mask, rng)))
    clip_id = f"{split}_s{seed}_{index:06d}"
    return ClipSample(clip_id, split, seed, index, scene, caption, source, edits)


# ----------------------------------------------------------------------------------------------------------
# Files


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    return np.round(np.clip(frames.numpy(), 0.0, 1.0) * 255.0).astype(np.uint8)


def save_clip(path: Path, frames: torch.Tensor, fps: int = 16, crf: int | None = None) -> Path:
    """Write (F, H, W, 3) frames as .mp4 (H.264 yuv420p, lossy), .npz or .safetensors (lossless uint8
    under the key "frames"), by the path's suffix."""
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        from sama_core.video import DEFAULT_CRF, write_video

        return write_video(path, frames, fps, crf=DEFAULT_CRF if crf is None else crf)
    if suffix == ".npz":
        np.savez_compressed(path, frames=_to_uint8(frames))
        return path
    if suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({"frames": _to_uint8(frames)}, str(path))
        return path
    raise SamaInputError(f"Cannot write a clip as {path.name!r}; use a .mp4, .npz or .safetensors path.")


def load_clip(path: str | os.PathLike) -> torch.Tensor:
    """Read a clip written by save_clip (or any video sama_core reads) as (F, H, W, 3) float32 in [0, 1]."""
    p = Path(path)
    if not p.is_file():
        raise SamaFileNotFoundError(f"The clip {str(p)!r} does not exist; check the manifest's folder.")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        with np.load(p, allow_pickle=False) as data:
            if "frames" not in data:
                raise SamaInputError(f"{str(p)!r} has no 'frames' array; write clips with save_clip.")
            frames = data["frames"]
    elif suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(p))
        if "frames" not in tensors:
            raise SamaInputError(f"{str(p)!r} has no 'frames' tensor; write clips with save_clip.")
        frames = tensors["frames"]
    else:
        from sama_core.video import read_video

        return read_video(p)[0]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise SamaInputError(
            f"{str(p)!r} holds {frames.dtype} {frames.shape}, not uint8 (F, H, W, 3) frames; write clips "
            "with save_clip."
        )
    return torch.from_numpy(frames).float().div_(255.0)


def _save_png(path: Path, frame: torch.Tensor) -> None:
    from PIL import Image

    Image.fromarray(_to_uint8(frame)).save(path)


@dataclass
class _WriteJob:
    out_dir: str
    seed: int
    index: int
    split: str
    config: SynthConfig
    video_format: str
    crf: int | None
    image_pairs: bool


def _write_clip(job: _WriteJob) -> dict[str, list[dict]]:
    """Render and write one clip with its edits; returns its manifest rows (paths relative to out_dir)."""
    root = Path(job.out_dir)
    sample = generate_clip(job.seed, job.index, job.split, job.config)
    cid, ext = sample.clip_id, job.video_format
    source_path = f"videos/{cid}_source.{ext}"
    save_clip(root / source_path, sample.source.frames, job.config.fps, job.crf)
    masks_path = f"masks/{cid}.npz"
    arrays = {"source_objects": sample.source.object_masks().numpy()}  # (N, F, H, W) bool
    rows: dict[str, list[dict]] = {name: [] for name in MANIFEST_NAMES}
    # Size hints: train/data.py uses width/height/num_frames when a row has them instead of probing
    # every file with ffmpeg.
    size = {"width": job.config.width, "height": job.config.height}
    video_size = {**size, "num_frames": job.config.num_frames}
    rows["raw_videos"].append({"video": source_path, "caption": sample.caption, "id": cid, **video_size})
    for es in sample.edits:
        kind = es.edit.kind
        target_path = f"videos/{cid}_{kind}.{ext}"
        save_clip(root / target_path, es.target.frames, job.config.fps, job.crf)
        arrays[f"{kind}_edit_mask"] = es.mask.numpy()  # (F, H, W) bool
        arrays[f"{kind}_target_objects"] = es.target.object_masks().numpy()  # (N', F, H, W) bool
        edit_id = f"{cid}_{kind}"
        # The keep mask as a lossless frame array whatever the video format (a mask must not bleed).
        keep = keep_mask(es)[..., None].expand(-1, -1, -1, 3).float()  # (F, H, W, 3) in {0, 1}
        keep_path = f"masks/{edit_id}_keep.npz"
        save_clip(root / keep_path, keep)
        rows["video_edits"].append({"source_video": source_path, "target_video": target_path,
                                    "instruction": es.edit.instruction, "id": edit_id, "keep_mask": keep_path,
                                    **video_size})
        image_row = None
        if job.image_pairs:
            src_png, tgt_png = f"images/{edit_id}_source.png", f"images/{edit_id}_target.png"
            source_frame, target_frame, image_instruction = sample.image_pair(es)
            _save_png(root / src_png, source_frame)
            _save_png(root / tgt_png, target_frame)
            keep_png = f"masks/{edit_id}_keep.png"
            _save_png(root / keep_png, keep[es.image_frame])
            image_row = {"source_image": src_png, "target_image": tgt_png, "instruction": image_instruction,
                         "id": edit_id, "keep_mask": keep_png, **size}
            rows["image_edits"].append(image_row)
        rows["ground_truth"].append({
            "id": edit_id, "clip": cid, "split": job.split, "seed": job.seed, "index": job.index,
            "kind": kind, "instruction": es.edit.instruction, "image_instruction": es.edit.image_instruction,
            "source_video": source_path, "target_video": target_path,
            "source_image": image_row["source_image"] if image_row else None,
            "target_image": image_row["target_image"] if image_row else None, "image_frame": es.image_frame,
            "mask_file": masks_path, "edit_mask_key": f"{kind}_edit_mask",
            "source_objects_key": "source_objects", "target_objects_key": f"{kind}_target_objects",
            "object_index": es.edit.object_index, "reference": es.edit.reference, "change": es.edit.change,
            "caption": sample.caption, "scene_fingerprint": sample.scene.fingerprint(),
            "scene": sample.scene.to_dict(), "target_scene": es.edit.target.to_dict(),
        })
    np.savez_compressed(root / masks_path, **arrays)
    return rows


@dataclass
class DatasetSummary:
    out_dir: str
    split: str
    seed: int
    num_clips: int
    video_format: str
    counts: dict[str, int]
    seconds: float
    manifests: dict[str, str]


def write_dataset(
    out_dir: str | os.PathLike,
    num_clips: int,
    seed: int,
    split: str = "train",
    config: SynthConfig | None = None,
    *,
    video_format: str = "mp4",
    crf: int | None = None,
    workers: int = 1,
    image_pairs: bool = True,
    overwrite: bool = False,
) -> DatasetSummary:
    """Generate `num_clips` clips (indices 0..num_clips-1 of `split` under `seed`) into `out_dir`.

    Writes videos/, images/ (PNG edit pairs), masks/ (one .npz per clip) and the JSONL manifests
    video_edits / image_edits / raw_videos / ground_truth (paths relative to `out_dir`, where the
    manifests are), plus dataset.json (config, seed scheme, counts). `video_format` "mp4" goes through
    sama_core.video.write_video (H.264 yuv420p: lossy, chroma at half resolution); "npz" and
    "safetensors" keep exact uint8 pixels (read them with load_clip). `workers` > 1 renders clips in
    parallel processes; the output is identical for any worker count.
    """
    config = config or SynthConfig()
    if split not in SPLIT_IDS:
        raise SamaInputError(f"Unknown split {split!r}; use one of {', '.join(SPLIT_IDS)}.")
    if video_format not in VIDEO_FORMATS:
        raise SamaInputError(f"Unknown video_format {video_format!r}; use one of {', '.join(VIDEO_FORMATS)}.")
    if num_clips < 1:
        raise SamaInputError(f"num_clips must be at least 1, got {num_clips}.")
    if seed < 0:
        raise SamaInputError(f"seed must be >= 0, got {seed}.")
    root = Path(out_dir)
    existing = [name for name in MANIFEST_NAMES.values() if (root / name).exists()]
    if existing and not overwrite:
        raise SamaInputError(f"{str(root)!r} already holds a dataset ({', '.join(existing)}); choose another "
                             "folder or pass overwrite=True (--overwrite).")
    for sub in ("videos", "images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    jobs = (_WriteJob(str(root), seed, i, split, config, video_format, crf, image_pairs)
            for i in range(num_clips))
    # Rows are streamed to temporary manifests (memory stays flat for any num_clips) and renamed at the
    # end, so an interrupted run never leaves manifests that look complete.
    partial = {key: root / f".{name}.partial" for key, name in MANIFEST_NAMES.items()}
    counts = dict.fromkeys(MANIFEST_NAMES, 0)
    try:
        with contextlib.ExitStack() as stack:
            handles = {key: stack.enter_context(open(path, "w")) for key, path in partial.items()}
            if workers > 1:
                pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
                results = pool.map(_write_clip, jobs, chunksize=4)  # in clip order, for any worker count
            else:
                results = map(_write_clip, jobs)
            for done, rows in enumerate(results, 1):
                for key, key_rows in rows.items():
                    for row in key_rows:
                        handles[key].write(json.dumps(row, separators=(",", ":")) + "\n")
                    counts[key] += len(key_rows)
                if done % 100 == 0:
                    logger.info("%d / %d clips written.", done, num_clips)
    except BaseException:
        for path in partial.values():
            path.unlink(missing_ok=True)
        raise
    manifests = {}
    for key, name in MANIFEST_NAMES.items():
        os.replace(partial[key], root / name)
        manifests[key] = name
    seconds = time.perf_counter() - start
    info = {
        "generator": "SAMA-Shapes", "generator_version": GENERATOR_VERSION, "split": split, "seed": seed,
        "num_clips": num_clips, "video_format": video_format, "crf": crf, "config": config.to_dict(),
        "seed_scheme": "clip i draws from numpy SeedSequence([generator_version, split_id, seed, i, "
                       f"purpose]); split ids {SPLIT_IDS}",
        "manifests": manifests, "counts": counts, "seconds": round(seconds, 2),
    }
    (root / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("Wrote %d SAMA-Shapes clips (%s, seed %d) to %s in %.1f s.", num_clips, split, seed, root,
                seconds)
    return DatasetSummary(str(root), split, seed, num_clips, video_format, counts, seconds, manifests)


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL manifest with every *_video / *_image / video / mask_file path made absolute."""
    p = Path(path)
    if not p.is_file():
        raise SamaFileNotFoundError(f"The manifest {str(p)!r} does not exist.")
    rows = []
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for key, value in row.items():
            is_path = key in ("video", "mask_file") or key.endswith(("_video", "_image"))
            if is_path and isinstance(value, str):
                row[key] = str((p.parent / value).resolve())
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.synthetic",
        description="Generate SAMA-Shapes: synthetic moving-shape clips with ground-truth edits, captions, "
                    "image edit pairs, masks and JSONL manifests.",
    )
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--clips", type=int, required=True, help="number of clips (each with all edits)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--split", default="train", choices=list(SPLIT_IDS),
                        help="train or heldout: different random streams for the same seed")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17, help="frames per clip, 4k+1 (default 17)")
    parser.add_argument("--format", default="mp4", choices=list(VIDEO_FORMATS),
                        help="mp4 (H.264, lossy) or npz/safetensors (exact uint8 pixels)")
    parser.add_argument("--crf", type=int, default=None, help="x264 CRF for mp4 (default sama_core's 18)")
    parser.add_argument("--edits", default=",".join(EDIT_KINDS),
                        help=f"comma-separated edit kinds (default all: {','.join(EDIT_KINDS)})")
    parser.add_argument("--no-images", action="store_true", help="skip the PNG image edit pairs")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = SynthConfig(width=args.width, height=args.height, num_frames=args.frames,
                             edits=tuple(e.strip() for e in args.edits.split(",") if e.strip()))
        summary = write_dataset(args.out, args.clips, args.seed, args.split, config,
                                video_format=args.format, crf=args.crf, workers=args.workers,
                                image_pairs=not args.no_images, overwrite=args.overwrite)
    except (SamaInputError, SamaFileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Wrote {summary.num_clips} clips ({summary.split}, seed {summary.seed}, {summary.video_format}) "
          f"to {summary.out_dir} in {summary.seconds:.1f} s")
    for key, name in summary.manifests.items():
        print(f"  {name}: {summary.counts[key]} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
