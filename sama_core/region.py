"""Edit regions: a user's mask says where the edit may change the video; everything else follows the source.

The sampler keeps the latents outside the region on the source's own flow path at every step
(x = m * x + (1 - m) * ((1 - sigma) * source + sigma * noise), with the run's initial noise), so the model
sees a consistent video and the outside ends exactly at the source latents; after decoding, the pixels
outside the mask are taken from the source frames. This is blended latent diffusion (Avrahami et al., 2023)
applied to SAMA's in-context sampler; diffusers has it only inside its own image pipelines, hence these few
lines.

Masks are pixel masks in [0, 1] (1 = may change): (H, W) for every frame or (F, H, W) per frame.

Keep unchanged (`changed_weight`, `python -m sama_core edit --keep-unchanged T`): with no mask, the region can
also be read off the edit itself. Where the decoded edit differs from the source's own VAE round trip by less
than T/2 (the largest of the three channels, on the 0-1 scale) the pixels are the source's; from T on they are
the edit's; in between they are blended. So what the edit left alone gets the source's exact pixels instead of
the VAE's reconstruction of them. It measures change against the round trip, not the source, so the VAE's own
blur does not count as an edit, and a change the VAE cannot show (a small faint object removed) is not seen.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import SamaInputError
from .scheduler import add_noise

log = logging.getLogger(__name__)

VAE_TIME_STRIDE = 4  # Wan VAE: latent frame 0 <- frame 0, latent frame t <- frames 4t-3 .. 4t


def check_pixel_mask(mask: torch.Tensor, frames: int, height: int, width: int, name: str = "mask") -> torch.Tensor:
    """(H, W) / (1, H, W) / (F, H, W) in [0, 1] -> (F, H, W) float32, or a clear error naming the fix."""
    if not torch.is_tensor(mask) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise SamaInputError(f"{name} must be (H, W) or (frames, H, W), got {shape}")
    mask = mask.float()
    if mask.ndim == 2:
        mask = mask[None]
    if tuple(mask.shape[1:]) != (height, width):
        raise SamaInputError(f"{name} is {mask.shape[2]}x{mask.shape[1]} but the video is {width}x{height}: "
                             "give a mask of the video's size")
    if mask.shape[0] == 1:
        mask = mask.expand(frames, height, width)
    elif mask.shape[0] != frames:
        raise SamaInputError(f"{name} has {mask.shape[0]} frames but the video has {frames}: give one mask "
                             "image for all frames or a mask video of the same length")
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise SamaInputError(f"{name} values must lie in [0, 1] (1 = may change)")
    if mask.max() == 0:
        raise SamaInputError(f"{name} is empty: nothing may change. Paint the region to edit in white")
    return mask


ASPECT_TOLERANCE = 0.01  # a mask whose width / height is within 1% of the video's is the same picture


def scale_mask(mask: torch.Tensor, height: int, width: int, name: str = "mask") -> torch.Tensor:
    """(..., h, w) in [0, 1] -> (..., height, width): a mask painted at another resolution of the same picture
    (aspect ratio within 1% of the video's) is scaled (bilinear, antialiased when shrinking); a mask of
    another shape is refused, since stretching it would move the region. ComfyUI's nodes stretch any mask,
    as ComfyUI's own mask consumers do (nodes/sampler.py); files given to the CLI are checked here."""
    h, w = mask.shape[-2:]
    if (h, w) == (height, width):
        return mask
    if abs((w / h) / (width / height) - 1) > ASPECT_TOLERANCE:
        raise SamaInputError(f"{name} is {w}x{h} but the video is {width}x{height}, another shape: give a mask "
                             "of the video's size (a mask of its aspect ratio at another size is scaled)")
    log.info("%s: %dx%d scaled to the video's %dx%d", name, w, h, width, height)
    return resize_mask(mask, height, width, antialias=True)


def resize_mask(mask: torch.Tensor, height: int, width: int, antialias: bool = False) -> torch.Tensor:
    """(..., h, w) -> (..., height, width) float in [0, 1], bilinear, whatever the aspect ratio (the checks are
    the caller's: scale_mask for files, the nodes stretch as ComfyUI does)."""
    flat = mask.float().reshape(-1, 1, *mask.shape[-2:])
    resized = F.interpolate(flat, size=(height, width), mode="bilinear", antialias=antialias).clamp(0, 1)
    return resized.reshape(*mask.shape[:-2], height, width)


def latent_grid(mask: torch.Tensor, latent_size, what: str = "the mask") -> torch.Tensor:
    """A pixel mask (..., F, H, W) -> the latent grid (..., T, h, w) of latents of size (T, h, w): a latent cell
    is the largest value over the pixels it encodes (the Wan VAE encodes frame 0 alone, then 4 frames per
    latent frame, and H/h x W/w pixels per cell), so a small object still marks the one cell that holds it.
    The one mapping from pixels to latent cells: the sampler's edit regions and train/'s keep masks use it."""
    t, h, w = (int(n) for n in latent_size)
    frames, height, width = mask.shape[-3:]
    if frames != VAE_TIME_STRIDE * (t - 1) + 1 or height % h or width % w:
        raise SamaInputError(f"{what} ({frames} frames at {height}x{width}) does not map onto latents of {t} frames "
                             f"at {h}x{w}: it must have {VAE_TIME_STRIDE * (t - 1) + 1} frames (pad it like the "
                             "video) at a multiple of the latent size")
    lead = mask.shape[:-3]
    m = mask.reshape(-1, frames, height, width).float()
    rest = m[:, 1:].reshape(m.shape[0], t - 1, VAE_TIME_STRIDE, height, width).amax(2)
    grouped = torch.cat([m[:, :1], rest], 1)  # (N, T, H, W)
    return F.max_pool2d(grouped, (height // h, width // w)).reshape(*lead, t, h, w)


def latent_region(mask: torch.Tensor, latent_shape, grow: int = 0) -> torch.Tensor:
    """Pixel mask (F, H, W), F = 4k+1 -> the sampler's region (1, 1, T, h, w) in [0, 1] for latents of
    `latent_shape` (B, C, T, h, w): a latent cell may change when any pixel it encodes may, so the region
    never cuts an edit short; `grow` widens it by that many latent cells."""
    region = latent_grid(mask, latent_shape[-3:])  # (T, h, w)
    if grow > 0:
        region = F.max_pool2d(region[:, None], 2 * grow + 1, stride=1, padding=grow)[:, 0]
    return region[None, None]


def check_region(region: Optional[torch.Tensor], target_shape, source: Optional[torch.Tensor]) -> None:
    if region is None:
        return
    if source is None:
        raise SamaInputError("an edit region needs a source video: the outside follows the source")
    b, _, t, h, w = target_shape
    if region.ndim != 5 or region.shape[1] != 1 or tuple(region.shape[2:]) != (t, h, w) or region.shape[0] not in (1, b):
        raise SamaInputError(f"the edit region must be (1 or {b}, 1, {t}, {h}, {w}) on the latent grid, got "
                             f"{tuple(region.shape)}; build it with sama_core.region.latent_region")


def keep_outside(x: torch.Tensor, source: torch.Tensor, noise: torch.Tensor, sigma, region: torch.Tensor):
    """Latents x at noise level sigma with everything outside the region put back on the source's path."""
    return region * x + (1 - region) * add_noise(source, noise, sigma)


KEEP_UNCHANGED_DEFAULT = 0.2  # chosen on validation edits (docs/sama_shapes.md, session 20)


def check_keep_unchanged(threshold) -> float:
    """The keep-unchanged threshold as a float in [0, 1] (0 = off), or a clear error naming the fix."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 <= value <= 1:  # also refuses NaN
        raise SamaInputError(f"the keep-unchanged threshold {threshold!r} must lie in [0, 1] (0 = off): e.g. "
                             f"{KEEP_UNCHANGED_DEFAULT} keeps what the edit changed by less than "
                             f"{KEEP_UNCHANGED_DEFAULT / 2:g} (on the 0-1 pixel scale) exactly as in the source")
    return value


def changed_weight(edited: torch.Tensor, reconstruction: torch.Tensor, threshold: float) -> torch.Tensor:
    """Frames (F, H, W, 3) of the edit and of the source's VAE round trip -> (F, H, W) in [0, 1]: 0 where they
    differ by at most threshold / 2 in every channel, 1 from threshold on, linear in between (a soft edge, so
    a half-made change is not cut back to the source). A per-pixel rule, hence written here."""
    threshold = check_keep_unchanged(threshold)
    if threshold == 0:
        raise SamaInputError("a keep-unchanged threshold of 0 means off: there is no weight to compute")
    if edited.shape != reconstruction.shape:
        raise SamaInputError(f"the edit {tuple(edited.shape)} and the source's round trip "
                             f"{tuple(reconstruction.shape)} must have the same shape")
    change = (edited.float() - reconstruction.float()).abs().amax(-1)  # (F, H, W)
    return ((change - threshold / 2) / (threshold / 2)).clamp(0, 1)


def composite(edited: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Frames (F, H, W, 3): the edit inside the mask (F, H, W), the source outside it, soft masks blended."""
    m = mask[..., None].to(edited)
    return m * edited + (1 - m) * source.to(edited)
