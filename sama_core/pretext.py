"""Motion-alignment pretexts of SAMA (SAMA_REFERENCE.md section 6).

Motion Alignment teaches the model motion from raw, unpaired video: the SOURCE clip is perturbed,
the target stays the clean original, and a task token naming the restoration is prepended to the
caption. Because a model trained this way can undo the perturbations, the same functions also serve
previews (what the model was shown) and restoration tools (fill frames, restore speed, unshuffle).

Every pretext is a pure function of a frame stack and an explicit `torch.Generator`:

    cube_inpaint(frames, generator, fill=-1.0)   one contiguous block of round(0.3 F) frames blanked
    speed_perturb(frames, generator, speed=2.0)  2x acceleration by frame resampling, 4k+1 frames out
    tube_shuffle(frames, generator, grid=(2, 2, 2))  tubes of equal shape randomly permuted
    apply_pretext(name, frames, generator, **options)  the dispatcher over the three (and "none")

Frames are (F, C, H, W) by default or (F, H, W, C) with `channels_last=True`, any dtype, any value
range; the output keeps the input's layout, dtype and device. Each function returns a
`PretextResult(frames, info)` named tuple; `info` (a `PretextInfo`) carries what a preview or a loss
needs: the blanked-pixel mask, the frame index map, the tube permutation and its inverse.

Random draws are made on the generator's device (so a CPU generator works for CUDA frames), in the
order documented on each function; the same generator state always gives the same result.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Mapping, NamedTuple

import torch

from .errors import SamaInputError

logger = logging.getLogger(__name__)

NO_PRETEXT = "none"
CUBE = "cube"
SPEED = "speed"
TUBE = "tube"
PRETEXT_NAMES: tuple[str, ...] = (NO_PRETEXT, CUBE, SPEED, TUBE)
PERTURBING_PRETEXTS: tuple[str, ...] = (CUBE, SPEED, TUBE)

# The instruction each perturbed source is trained with, prepended to the caption. The cube wording is
# the paper's; speed and tube follow the same "[Imperative sentence.]" form. "none" (plain generation
# from the caption, no source video) has no task token.
TASK_TOKENS: dict[str, str] = {
    CUBE: "[Complete the missing regions in the video.]",
    SPEED: "[Restore the video to its normal speed.]",
    TUBE: "[Restore the shuffled regions of the video to their original order.]",
}

# Text-to-video training mix of the paper: no-pretext : cube : speed : tube = 1 : 2 : 3 : 4.
T2V_PRETEXT_MIX: dict[str, float] = {NO_PRETEXT: 1.0, CUBE: 2.0, SPEED: 3.0, TUBE: 4.0}

# Black in the two value ranges frames come in: VAE inputs are in [-1, 1], ComfyUI IMAGEs in [0, 1].
BLACK_SIGNED = -1.0
BLACK_UNIT = 0.0

DEFAULT_CUBE_RATIO = 0.3
DEFAULT_SPEED = 2.0
DEFAULT_TUBE_GRID = (2, 2, 2)


class TubeBox(NamedTuple):
    """Where one tube lies in an (F, C, H, W) stack: `frames[box.t, :, box.h, box.w]`."""

    t: slice
    h: slice
    w: slice


@dataclass(frozen=True)
class PretextInfo:
    """What a pretext did to a clip. Fields that do not apply to a pretext are None / empty."""

    name: str
    channels_last: bool
    input_shape: tuple[int, ...]
    # cube: True where a pixel was blanked; (F, H, W) bool on the frames' device.
    mask: torch.Tensor | None = None
    # cube: the contiguous block of blanked frame indices (never contains frame 0).
    blanked_frames: range | None = None
    # speed: output frame i is input frame index_map[i]; (F_out,) int64 on the frames' device.
    index_map: torch.Tensor | None = None
    # speed: output frames that come from resampling; the rest repeat the last of them.
    num_resampled_frames: int | None = None
    # tube: output tube j holds input tube permutation[j]; input tube i sits at output tube
    # inverse_permutation[i]. Tubes are numbered row-major over the (t, h, w) grid. (n_tubes,) int64, CPU.
    permutation: torch.Tensor | None = None
    inverse_permutation: torch.Tensor | None = None
    tube_grid: tuple[int, int, int] | None = None
    tube_boxes: tuple[TubeBox, ...] = ()


class PretextResult(NamedTuple):
    """The perturbed frames (same layout, dtype and device as the input) and what was done to them."""

    frames: torch.Tensor
    info: PretextInfo


# ----------------------------------------------------------------------------------------------------
# Input checks and small helpers
# ----------------------------------------------------------------------------------------------------

def _layout_name(channels_last: bool) -> str:
    return "(F, H, W, C)" if channels_last else "(F, C, H, W)"


def _check_frames(frames, channels_last: bool, what: str) -> torch.Tensor:
    """The (F, C, H, W) view of `frames` (a view: writes through it reach `frames`)."""
    layout = _layout_name(channels_last)
    if not isinstance(frames, torch.Tensor):
        raise SamaInputError(
            f"{what}: frames must be a torch.Tensor {layout}, got {type(frames).__name__}; "
            f"convert with torch.as_tensor first")
    if frames.ndim != 4:
        raise SamaInputError(
            f"{what}: frames must be 4-D {layout}, got shape {tuple(frames.shape)}; "
            f"pass one clip at a time (loop over a batch) and set channels_last to match the layout")
    if frames.numel() == 0:
        raise SamaInputError(f"{what}: frames {layout} has an empty dimension: shape {tuple(frames.shape)}")
    return frames.permute(0, 3, 1, 2) if channels_last else frames


def _to_layout(fchw: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return fchw.permute(0, 2, 3, 1).contiguous() if channels_last else fchw.contiguous()


def _check_generator(generator, what: str) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise SamaInputError(
            f"{what}: generator must be a torch.Generator (e.g. torch.Generator().manual_seed(seed)), "
            f"got {type(generator).__name__}")
    return generator


def _exact(value: float) -> Fraction:
    """The decimal a user typed (0.3, 1.5), as an exact fraction: repr() is the shortest string that
    round-trips the float, so 0.3 becomes 3/10 rather than the binary 0.29999999999999998890."""
    return Fraction(repr(float(value)))


def round_half_up(value: Fraction | float) -> int:
    """Round to nearest, halves up (Python's round() would send 4.5 to 4). Exact on decimal inputs."""
    exact = value if isinstance(value, Fraction) else _exact(value)
    return math.floor(exact + Fraction(1, 2))


def _randint(low: int, high_inclusive: int, generator: torch.Generator) -> int:
    """One uniform integer in [low, high_inclusive], drawn from `generator` on its own device."""
    return int(torch.randint(low, high_inclusive + 1, (1,), generator=generator, device=generator.device))


def _check_ratio(value, name: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise SamaInputError(f"{what}: {name} must be a number in (0, 1], got {value!r}")
    return float(value)


def largest_4k_plus_1(num_frames: int) -> int:
    """The longest 4k+1 length that fits in num_frames (Wan's VAE takes 4k+1 frames)."""
    return 4 * ((num_frames - 1) // 4) + 1


# ----------------------------------------------------------------------------------------------------
# Cube inpainting
# ----------------------------------------------------------------------------------------------------

def cube_frame_count(num_frames: int, ratio: float = DEFAULT_CUBE_RATIO) -> int:
    """Frames one cube blanks: round(ratio * F), halves up, at least 1 and at most F - 1 (frame 0 is
    never blanked). F=10 -> 3, F=5 -> 2 (1.5 rounds up), F=81 -> 24, F=2 -> 1."""
    count = round_half_up(_exact(ratio) * num_frames)
    return min(max(count, 1), num_frames - 1)


def cube_inpaint(
    frames: torch.Tensor,
    generator: torch.Generator,
    *,
    fill: float,
    ratio: float = DEFAULT_CUBE_RATIO,
    spatial_ratio: float | tuple[float, float] = 1.0,
    channels_last: bool = False,
) -> PretextResult:
    """Blank one contiguous temporal block of `cube_frame_count(F, ratio)` frames, never frame 0.

    fill: the value of black in the frames' range, no default on purpose: BLACK_SIGNED (-1.0) for
        frames in [-1, 1] (VAE inputs), BLACK_UNIT (0.0) for frames in [0, 1] (ComfyUI IMAGE).
    ratio: fraction of the frames in the block (0.3 in the paper).
    spatial_ratio: fraction of (H, W) the cube covers, one number for both or (h, w). 1.0 (the paper)
        blanks whole frames; smaller cubes are placed uniformly at random inside the frame, their
        side round(ratio * size) halves up, at least 1 pixel.

    Draw order: the block's first frame (uniform in [1, F - count]), then the cube's top row, then its
    left column (both drawn even for full-frame cubes, where they can only be 0).
    F = 1 raises SamaInputError: the only frame is frame 0, which is never blanked.
    """
    what = "cube inpainting"
    fchw = _check_frames(frames, channels_last, what)
    _check_generator(generator, what)
    num_frames, _, height, width = fchw.shape
    if num_frames < 2:
        raise SamaInputError(
            f"{what}: the clip has {num_frames} frame; at least 2 are needed because frame 0 is never "
            f"blanked. Use a longer clip or another pretext")
    ratio = _check_ratio(ratio, "ratio", what)
    if isinstance(spatial_ratio, (tuple, list)):
        if len(spatial_ratio) != 2:
            raise SamaInputError(f"{what}: spatial_ratio must be one number or (h, w), got {spatial_ratio!r}")
        ratio_h, ratio_w = spatial_ratio
    else:
        ratio_h = ratio_w = spatial_ratio
    ratio_h = _check_ratio(ratio_h, "spatial_ratio", what)
    ratio_w = _check_ratio(ratio_w, "spatial_ratio", what)
    fill = _check_fill(fill, frames.dtype, what)

    count = cube_frame_count(num_frames, ratio)
    cube_h = max(1, round_half_up(_exact(ratio_h) * height))
    cube_w = max(1, round_half_up(_exact(ratio_w) * width))
    first = _randint(1, num_frames - count, generator)
    top = _randint(0, height - cube_h, generator)
    left = _randint(0, width - cube_w, generator)
    t, h, w = slice(first, first + count), slice(top, top + cube_h), slice(left, left + cube_w)

    out = frames.clone()
    out_fchw = out.permute(0, 3, 1, 2) if channels_last else out  # a view of `out`
    out_fchw[t, :, h, w] = fill
    mask = torch.zeros(num_frames, height, width, dtype=torch.bool, device=frames.device)  # (F, H, W)
    mask[t, h, w] = True
    info = PretextInfo(name=CUBE, channels_last=channels_last, input_shape=tuple(frames.shape),
                       mask=mask, blanked_frames=range(first, first + count))
    return PretextResult(out, info)


def _check_fill(fill, dtype: torch.dtype, what: str) -> float | int:
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not math.isfinite(fill):
        raise SamaInputError(
            f"{what}: fill must be a finite number (black in the frames' range: {BLACK_SIGNED} for "
            f"frames in [-1, 1], {BLACK_UNIT} for frames in [0, 1]), got {fill!r}")
    if not dtype.is_floating_point:
        low, high = (0, 1) if dtype == torch.bool else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
        if fill != int(fill) or not (low <= fill <= high):
            raise SamaInputError(f"{what}: fill {fill!r} is not a {dtype} value; use 0 for uint8 frames")
        return int(fill)
    return float(fill)


# ----------------------------------------------------------------------------------------------------
# Speed perturbation
# ----------------------------------------------------------------------------------------------------

def speed_index_map(num_frames: int, speed: float = DEFAULT_SPEED,
                    num_output_frames: int | None = None) -> tuple[torch.Tensor, int]:
    """(index_map (F_out,) int64, number of resampled frames) of a `speed`x retiming.

    Output frame i shows input frame floor(i * speed) (sample-and-hold: the frame on screen at time
    i * speed, as a player retimes; input frame j is on screen during [j, j + 1)) while that is a frame,
    i.e. for the first ceil(F / speed) outputs; later output frames repeat the last resampled one. The product is exact on the decimal speed (1.1 * 10 is 11, not 11.000000000000002).
    F_out defaults to the longest 4k+1 length <= F, i.e. the clip's own length when it is 4k+1, so
    the perturbed source lines up with the clean target.
    """
    exact_speed = _exact(speed)
    if num_output_frames is None:
        num_output_frames = largest_4k_plus_1(num_frames)
    num_resampled = min(math.ceil(num_frames / exact_speed), num_output_frames)
    held = [min(i, num_resampled - 1) for i in range(num_output_frames)]
    index_map = torch.tensor([math.floor(i * exact_speed) for i in held], dtype=torch.int64)
    return index_map, num_resampled


def speed_perturb(
    frames: torch.Tensor,
    generator: torch.Generator,
    *,
    speed: float = DEFAULT_SPEED,
    num_output_frames: int | None = None,
    channels_last: bool = False,
) -> PretextResult:
    """Play the clip `speed` times faster by frame resampling (see `speed_index_map`), 4k+1 frames out.

    speed: > 0; 2.0 in the paper; any float (1.5 keeps frames 0, 1, 3, 4, 6, ...). Below 1 is a slow
        down that repeats frames.
    num_output_frames: a 4k+1 length; default the longest 4k+1 <= F. When the sped-up clip is shorter,
        its last frame is repeated; when longer, it is cut.

    Deterministic: the generator is accepted for a uniform signature and draws nothing.
    """
    what = "speed perturbation"
    fchw = _check_frames(frames, channels_last, what)
    _check_generator(generator, what)
    num_frames = fchw.shape[0]
    if num_frames < 2:
        raise SamaInputError(f"{what}: the clip has {num_frames} frame; at least 2 are needed to change speed")
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not (
            math.isfinite(speed) and speed > 0):
        raise SamaInputError(f"{what}: speed must be a finite number > 0 (2.0 = twice as fast), got {speed!r}")
    if num_output_frames is not None and (
            isinstance(num_output_frames, bool) or not isinstance(num_output_frames, int)
            or num_output_frames < 1 or (num_output_frames - 1) % 4):
        raise SamaInputError(
            f"{what}: num_output_frames must be a 4k+1 integer (1, 5, 9, ..., 81), got {num_output_frames!r}")

    index_map, num_resampled = speed_index_map(num_frames, speed, num_output_frames)
    index_map = index_map.to(frames.device)
    out = frames.index_select(0, index_map)  # frames' layout, (F_out, ...)
    info = PretextInfo(name=SPEED, channels_last=channels_last, input_shape=tuple(frames.shape),
                       index_map=index_map, num_resampled_frames=num_resampled)
    return PretextResult(out, info)


# ----------------------------------------------------------------------------------------------------
# Tube shuffle
# ----------------------------------------------------------------------------------------------------

def _check_grid(grid, what: str) -> tuple[int, int, int]:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 3
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)):
        raise SamaInputError(f"{what}: grid must be three positive integers (gt, gh, gw), got {grid!r}")
    grid = tuple(int(g) for g in grid)
    if math.prod(grid) < 2:
        raise SamaInputError(f"{what}: grid {grid} makes a single tube; nothing to shuffle. Use e.g. (2, 2, 2)")
    return grid


def tube_layout(shape_fhw: tuple[int, int, int], grid: tuple[int, int, int] = DEFAULT_TUBE_GRID
                ) -> tuple[tuple[int, int, int], tuple[TubeBox, ...]]:
    """(tube shape (t, h, w), the boxes of all tubes numbered row-major over the (t, h, w) grid).

    All tubes have the same shape: each dimension is cut to its largest multiple of the grid count and
    the remainder stays in place. Along time the remainder is taken at the START (frame 0 first): frame
    0 is special in Wan's causal VAE (encoded alone; the cube pretext never touches it either), and for
    a 4k+1 clip with an even time split the shuffled part is then exactly the 4k frames after it. Along
    height and width the remainder is the bottom rows and the right columns.
    """
    size = tuple(n // g for n, g in zip(shape_fhw, grid))
    t_offset = shape_fhw[0] - grid[0] * size[0]
    boxes = []
    for it in range(grid[0]):
        for ih in range(grid[1]):
            for iw in range(grid[2]):
                t0 = t_offset + it * size[0]
                boxes.append(TubeBox(slice(t0, t0 + size[0]),
                                     slice(ih * size[1], (ih + 1) * size[1]),
                                     slice(iw * size[2], (iw + 1) * size[2])))
    return size, tuple(boxes)


def _permute_tubes(fchw: torch.Tensor, info: PretextInfo, order: torch.Tensor) -> torch.Tensor:
    """(F, C, H, W) copy of `fchw` whose tube slot j holds tube order[j] of `fchw`."""
    gt, gh, gw = info.tube_grid
    first, last = info.tube_boxes[0], info.tube_boxes[-1]
    t, h, w = slice(first.t.start, last.t.stop), slice(0, last.h.stop), slice(0, last.w.stop)
    tt, th, tw = first.t.stop - first.t.start, first.h.stop, first.w.stop
    channels = fchw.shape[1]
    region = fchw[t, :, h, w].reshape(gt, tt, channels, gh, th, gw, tw)
    tubes = region.permute(0, 3, 5, 1, 2, 4, 6).reshape(gt * gh * gw, tt, channels, th, tw)  # (n, tt, C, th, tw)
    tubes = tubes.index_select(0, order.to(fchw.device))
    region = tubes.reshape(gt, gh, gw, tt, channels, th, tw).permute(0, 3, 4, 1, 5, 2, 6)
    out = fchw.clone()
    out[t, :, h, w] = region.reshape(gt * tt, channels, gh * th, gw * tw)
    return out


def tube_shuffle(
    frames: torch.Tensor,
    generator: torch.Generator,
    *,
    grid: tuple[int, int, int] = DEFAULT_TUBE_GRID,
    allow_identity: bool = False,
    channels_last: bool = False,
) -> PretextResult:
    """Split (F, H, W) into grid = (gt, gh, gw) equal tubes and randomly permute them.

    Only tubes of equal shape are permuted: each dimension is cut to a multiple of its grid count and
    the remainder stays in place (see `tube_layout`). `unshuffle_tubes(out, info)` restores the input
    bit-exactly.

    allow_identity: False (default) redraws a permutation that would leave every tube in place, so the
    source is always perturbed (uniform over the non-identity permutations).
    Draw order: torch.randperm(n_tubes) on the generator, repeated only when it was the identity.
    """
    what = "tube shuffle"
    fchw = _check_frames(frames, channels_last, what)
    _check_generator(generator, what)
    grid = _check_grid(grid, what)
    num_frames, _, height, width = fchw.shape
    for dim_name, size, count in zip(("F", "H", "W"), (num_frames, height, width), grid):
        if size < count:
            raise SamaInputError(
                f"{what}: {dim_name}={size} cannot be split into {count} tubes; "
                f"use a grid count <= {size} for {dim_name} or a larger clip")

    _, boxes = tube_layout((num_frames, height, width), grid)
    num_tubes = len(boxes)
    identity = torch.arange(num_tubes)
    while True:
        permutation = torch.randperm(num_tubes, generator=generator, device=generator.device).cpu()
        if allow_identity or not torch.equal(permutation, identity):
            break
    inverse = torch.argsort(permutation)
    info = PretextInfo(name=TUBE, channels_last=channels_last, input_shape=tuple(frames.shape),
                       permutation=permutation, inverse_permutation=inverse, tube_grid=grid, tube_boxes=boxes)
    return PretextResult(_to_layout(_permute_tubes(fchw, info, permutation), channels_last), info)


def unshuffle_tubes(shuffled: torch.Tensor, info: PretextInfo) -> torch.Tensor:
    """Undo `tube_shuffle`: bit-exact inverse (pure indexing), same layout as `shuffled`."""
    what = "unshuffle tubes"
    if info.name != TUBE:
        raise SamaInputError(f"{what}: info comes from the {info.name!r} pretext, not {TUBE!r}")
    fchw = _check_frames(shuffled, info.channels_last, what)
    if tuple(shuffled.shape) != info.input_shape:
        raise SamaInputError(
            f"{what}: frames have shape {tuple(shuffled.shape)} but were shuffled with shape "
            f"{info.input_shape}; pass the tube_shuffle output unchanged in size and layout")
    return _to_layout(_permute_tubes(fchw, info, info.inverse_permutation), info.channels_last)


# ----------------------------------------------------------------------------------------------------
# Task tokens, the training mix, the dispatcher
# ----------------------------------------------------------------------------------------------------

def _check_name(name, what: str) -> str:
    if name not in PRETEXT_NAMES:
        raise SamaInputError(f"{what}: unknown pretext {name!r}; choose one of {', '.join(PRETEXT_NAMES)}")
    return name


def task_token(name: str) -> str:
    """The task token of a pretext ("" for "none", which is plain generation)."""
    return TASK_TOKENS.get(_check_name(name, "task token"), "")


def with_task_token(name: str, instruction: str) -> str:
    """Prepend the pretext's task token to an instruction or caption, separated by one space.

    "none" returns the instruction unchanged; an instruction that already starts with the token is
    returned unchanged (so applying it twice is harmless)."""
    if not isinstance(instruction, str):
        raise SamaInputError(f"task token: instruction must be a string, got {type(instruction).__name__}")
    token = task_token(name)
    instruction = instruction.strip()
    if not token or instruction.startswith(token):
        return instruction
    return f"{token} {instruction}" if instruction else token


def _mix_probabilities(weights: Mapping[str, float] | None) -> tuple[list[str], torch.Tensor]:
    weights = T2V_PRETEXT_MIX if weights is None else weights
    if not isinstance(weights, Mapping) or not weights:
        raise SamaInputError(f"pretext mix: weights must be a non-empty mapping name -> weight, got {weights!r}")
    names = [_check_name(name, "pretext mix") for name in weights]
    values = []
    for name in names:
        weight = weights[name]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                math.isfinite(weight) and weight >= 0):
            raise SamaInputError(f"pretext mix: weight of {name!r} must be a finite number >= 0, got {weight!r}")
        values.append(float(weight))
    total = sum(values)
    if total <= 0:
        raise SamaInputError(f"pretext mix: weights {dict(weights)} sum to 0; give at least one a positive weight")
    return names, torch.tensor(values, dtype=torch.float64) / total


def sample_pretexts(num_samples: int, generator: torch.Generator,
                    weights: Mapping[str, float] | None = None) -> list[str]:
    """`num_samples` pretext names drawn independently with probabilities proportional to `weights`
    (default the paper's T2V mix none : cube : speed : tube = 1 : 2 : 3 : 4)."""
    _check_generator(generator, "pretext mix")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise SamaInputError(f"pretext mix: num_samples must be a positive integer, got {num_samples!r}")
    names, probabilities = _mix_probabilities(weights)
    draws = torch.multinomial(probabilities.to(generator.device), num_samples, replacement=True,
                              generator=generator)
    return [names[i] for i in draws.tolist()]


class PretextMixSampler:
    """A seeded stream of pretext names for a data loader: `sampler()` -> "tube", "cube", ...

    Owns its generator, so one sampler per worker with its own seed gives a reproducible stream."""

    def __init__(self, seed: int, weights: Mapping[str, float] | None = None):
        self.names, self.probabilities = _mix_probabilities(weights)
        self.weights = dict(zip(self.names, self.probabilities.tolist()))
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> str:
        return sample_pretexts(1, self.generator, self.weights)[0]

    def sample(self, num_samples: int) -> list[str]:
        return sample_pretexts(num_samples, self.generator, self.weights)


_PRETEXT_FUNCTIONS: dict[str, Callable[..., PretextResult]] = {
    CUBE: cube_inpaint,
    SPEED: speed_perturb,
    TUBE: tube_shuffle,
}


def pretext_options(name: str) -> tuple[str, ...]:
    """The keyword options `apply_pretext(name, ...)` accepts."""
    if _check_name(name, "pretext options") == NO_PRETEXT:
        return ("channels_last",)
    parameters = inspect.signature(_PRETEXT_FUNCTIONS[name]).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def apply_pretext(name: str, frames: torch.Tensor, generator: torch.Generator, **options) -> PretextResult:
    """Run the pretext `name` ("none", "cube", "speed", "tube") with its keyword options.

    "none" returns the frames themselves (not a copy) with an info naming no perturbation.
    Cube inpainting needs `fill` (black: -1.0 for frames in [-1, 1], 0.0 for frames in [0, 1]).
    """
    what = "apply pretext"
    _check_name(name, what)
    unknown = sorted(set(options) - set(pretext_options(name)))
    if unknown:
        raise SamaInputError(
            f"{what}: option(s) {', '.join(unknown)} do not apply to the {name!r} pretext; "
            f"it takes {', '.join(pretext_options(name))}")
    if name == CUBE and "fill" not in options:
        raise SamaInputError(
            f"{what}: cube inpainting needs fill=, the value of black in the frames' range: "
            f"{BLACK_SIGNED} for frames in [-1, 1], {BLACK_UNIT} for frames in [0, 1]")
    if name == NO_PRETEXT:
        channels_last = bool(options.get("channels_last", False))
        _check_frames(frames, channels_last, what)
        _check_generator(generator, what)
        return PretextResult(frames, PretextInfo(name=NO_PRETEXT, channels_last=channels_last,
                                                 input_shape=tuple(frames.shape)))
    return _PRETEXT_FUNCTIONS[name](frames, generator, **options)


def blank_frames(frames: torch.Tensor, start: int, end: int | None, fill: float = BLACK_UNIT) -> torch.Tensor:
    """Black out frames [start, end) of (F, ...) frames: the input of SAMA's cube-inpainting restoration
    (a model trained on the cube pretext regenerates them). Frame 0 always stays, as in training."""
    end = frames.shape[0] if end is None else end
    if not 0 <= start < end <= frames.shape[0]:
        raise SamaInputError(f"frames to blank {start}:{end} are outside the clip's 0:{frames.shape[0]}")
    if start == 0:
        raise SamaInputError("frame 0 cannot be blanked: SAMA's inpainting pretext always keeps the first frame")
    out = frames.clone()
    out[start:end] = fill
    return out
