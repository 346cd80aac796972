"""SAMA Pretext Preview: see the motion-alignment perturbations SAMA trains on (and restores)."""

import torch
from comfy_api.latest import io

from ..sama_core.pretext import BLACK_UNIT, CUBE, SPEED, TUBE, apply_pretext, task_token


class SamaPretextPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamaPretextPreview", display_name="SAMA Pretext Preview", category="SAMA",
            description=(
                "Applies one of SAMA's motion-alignment pretexts to a video: cube inpainting (30% of the frames "
                "blanked, never the first), 2x speed (resampled, padded to 4k+1 frames) or tube shuffle (2x2x2 "
                "space-time tubes permuted). Returns the perturbed frames, a mask of what changed and the task "
                "instruction SAMA uses to restore it: feed both into a SAMA edit (with 'use_prefix' off) to "
                "repair frames or retime a clip."),
            inputs=[
                io.Image.Input("images", tooltip="The video frames."),
                io.Combo.Input("pretext", options=[CUBE, SPEED, TUBE], default=CUBE,
                               tooltip="cube = blank a block of frames, speed = 2x faster, tube = shuffle tubes."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Where the cube falls / which tube permutation."),
                io.Float.Input("speed", default=2.0, min=1.0, max=8.0, step=0.25, optional=True,
                               tooltip="Speed factor of the speed pretext."),
            ],
            outputs=[
                io.Image.Output("perturbed", display_name="perturbed", tooltip="The perturbed frames."),
                io.Mask.Output("mask", display_name="mask", tooltip="1 where a pixel differs from the input."),
                io.String.Output("task_instruction", display_name="task_instruction",
                                 tooltip="SAMA's task token for restoring this perturbation."),
            ],
        )

    @classmethod
    def execute(cls, images, pretext, seed, speed=2.0) -> io.NodeOutput:
        generator = torch.Generator().manual_seed(seed)
        options = {"fill": BLACK_UNIT} if pretext == CUBE else {"speed": speed} if pretext == SPEED else {}
        result = apply_pretext(pretext, images, generator, channels_last=True, **options)
        if result.info.mask is not None:
            mask = result.info.mask.float()
        elif result.frames.shape == images.shape:
            mask = (result.frames != images).any(dim=-1).float()
        else:  # speed: every frame after the first is a different moment of the clip
            mask = torch.ones(result.frames.shape[:3])
            mask[0] = 0.0
        return io.NodeOutput(result.frames, mask, task_token(pretext))


NODES = [SamaPretextPreview]
