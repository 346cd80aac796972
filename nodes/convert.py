"""Conversions between ComfyUI's native graph types and sama_core, with no ComfyUI import.

The node classes stay thin: they call these functions, which take and return plain tensors and raise
`SamaInputError` with a message that names the node input and says what to connect instead. Keeping
them free of ComfyUI lets them be unit-tested without a ComfyUI install.

ComfyUI IMAGE: a float tensor (frames, height, width, channels) in [0, 1]; for a video, one row per
frame (the same layout sama_core.video uses for frames).
"""

from __future__ import annotations

import torch

from ..sama_core.errors import SamaInputError
from ..sama_core.video import pad_to_4k_plus_1, trim


def check_image_batch(images, input_name: str = "images") -> None:
    """Raise a SamaInputError unless `images` is a non-empty ComfyUI IMAGE batch (F, H, W, C)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise SamaInputError(
            f"'{input_name}' must be an IMAGE batch (frames, height, width, channels), got {got}; "
            "connect the images output of a Load Video / Get Video Components / Load Image node.")
    if images.shape[0] == 0:
        raise SamaInputError(
            f"'{input_name}' has no frames; connect a video or image batch with at least 1 frame.")


def frames_to_4k_plus_1(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Pad an IMAGE batch to the next 4k+1 frame count (1, 5, 9, ...) by repeating its last frame.

    The Wan VAE compresses time causally (1 + 4k frames -> 1 + k latents), so SAMA edits 4k+1 frames.
    Returns (padded images (F', H, W, C), original frame count F) so the edit can be trimmed back.
    """
    check_image_batch(images)
    return pad_to_4k_plus_1(images, dim=0)  # (F', H, W, C), F


def trim_frames(images: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` frames of an IMAGE batch (undoes `frames_to_4k_plus_1`)."""
    check_image_batch(images)
    available = images.shape[0]
    if not 1 <= count <= available:
        raise SamaInputError(
            f"'count' is {count} but 'images' has {available} frames; count must be in 1..{available}. "
            "Connect the 'original_count' output of the SAMA Frames To 4k+1 node that padded this video.")
    return trim(images, count, dim=0)  # (count, H, W, C)

