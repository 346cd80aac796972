"""Keep unchanged: the source's own pixels wherever the decoded edit left the picture alone
(sama_core/region.py: `changed_weight`, the same rule as `python -m sama_core edit --keep-unchanged`)."""

import torch
from comfy_api.latest import io

from ..sama_core.errors import SamaInputError
from ..sama_core.region import KEEP_UNCHANGED_DEFAULT, changed_weight, composite
from ..sama_core.video import pad_to_4k_plus_1, trim
from .convert import check_image_batch

CATEGORY = "SAMA"


def round_trip(vae, source: torch.Tensor) -> torch.Tensor:
    """(F, H, W, 3) source frames through a ComfyUI VAE and back: what 'unchanged' looks like decoded. The Wan
    VAE takes 4k+1 frames, so the clip is padded for the trip and trimmed after it."""
    padded, count = pad_to_4k_plus_1(source[..., :3], dim=0)
    decoded = vae.decode(vae.encode(padded))
    if decoded.dim() == 5:  # (B, F, H, W, C) from a video VAE, as VAE Decode flattens it
        decoded = decoded.reshape(-1, *decoded.shape[-3:])
    return trim(decoded, count, dim=0)


def keep_unchanged(edited: torch.Tensor, source: torch.Tensor, vae, threshold: float):
    """-> (the frames (F, H, W, 3): the edit where it changed the picture, the source elsewhere; the weight
    (F, H, W) in [0, 1] that blended them, 1 = the edit's pixel: all ones when the threshold is 0 (off))."""
    check_image_batch(edited, "edited")
    check_image_batch(source, "source")
    if tuple(edited.shape[:3]) != tuple(source.shape[:3]):
        raise SamaInputError(
            f"'edited' is {edited.shape[0]} frames at {edited.shape[2]}x{edited.shape[1]} but 'source' is "
            f"{source.shape[0]} frames at {source.shape[2]}x{source.shape[1]}: connect the frames the edit was made "
            "from (the images that went into SAMA Sampler's source_images) and the decoded edit before any "
            "trim or resize, or both after the same ones")
    if threshold == 0:
        return edited, torch.ones(edited.shape[:3], device=edited.device)
    with torch.no_grad():
        reconstruction = round_trip(vae, source).to(edited.device, torch.float32)
    edited3, source3 = edited[..., :3].float(), source[..., :3].float().to(edited.device)
    weight = changed_weight(edited3, reconstruction, threshold)  # (F, H, W)
    return composite(edited3, source3, weight).clamp(0, 1), weight


class SamaKeepUnchanged(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamaKeepUnchanged",
            display_name="SAMA Keep Unchanged",
            category=CATEGORY,
            description=(
                "Gives back the source's own pixels wherever the edit left the picture alone. The decoded edit "
                "is compared with the source's round trip through the same VAE, so the VAE's blur does not count "
                "as a change: below threshold/2 (largest channel, 0-1 scale) a pixel is the source's, from "
                "threshold on it is the edit's, blended in between. For local edits (recolour, remove, add); "
                "set 0 (off) for a global change such as a style or the lighting. The headless pipeline's "
                "--keep-unchanged; SAMA-Shapes uses 0.2 by default."),
            inputs=[
                io.Image.Input("edited", tooltip="The decoded edit (VAE Decode of SAMA Sampler's latent)."),
                io.Image.Input("source", tooltip="The frames the edit was made from, at the edit's size and "
                                                 "frame count (what went into SAMA Sampler's source_images)."),
                io.Vae.Input("vae", tooltip="The VAE that encoded the source and decoded the edit."),
                io.Float.Input("threshold", default=KEEP_UNCHANGED_DEFAULT, min=0.0, max=1.0, step=0.01,
                               tooltip="A change this large counts as the edit; half of it or less counts as "
                                       "unchanged. 0 = off (the edit as decoded)."),
            ],
            outputs=[io.Image.Output("images", display_name="images",
                                     tooltip="The edit, with the source's pixels where nothing changed."),
                     io.Mask.Output("changed", display_name="changed",
                                    tooltip="Where the output is the edit's (1) rather than the source's (0), "
                                            "blended in between: preview it (Convert Mask to Image) to see what "
                                            "the edit changed, or grow / paint it and composite yourself.")],
        )

    @classmethod
    def execute(cls, edited, source, vae, threshold) -> io.NodeOutput:
        return io.NodeOutput(*keep_unchanged(edited, source, vae, threshold))


NODES = [SamaKeepUnchanged]
