"""Frame-count helper nodes: pad a video to the 4k+1 frames SAMA needs, and trim the edit back."""

from comfy_api.latest import io

from ..sama_core.pretext import blank_frames
from .convert import frames_to_4k_plus_1, trim_frames

CATEGORY = "SAMA/frames"
MAX_FRAMES = 100_000  # an upper bound for the widget only; memory is the real limit


class SamaFramesTo4kPlus1(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamaFramesTo4kPlus1",
            display_name="SAMA Frames To 4k+1",
            category=CATEGORY,
            description=(
                "Pads a video (IMAGE batch) to the next frame count of the form 4k+1 (1, 5, 9, ..., 81) by "
                "repeating its last frame, as the Wan VAE and SAMA require. Also returns the original "
                "frame count: connect it to SAMA Trim Frames after the edit to get a video of the "
                "original length."),
            inputs=[
                io.Image.Input("images", tooltip="The video frames, one image per frame."),
            ],
            outputs=[
                io.Image.Output(
                    "padded_images", display_name="images",
                    tooltip="The frames padded to 4k+1 (unchanged when the count already is 4k+1)."),
                io.Int.Output(
                    "original_count", display_name="original_count",
                    tooltip="How many frames came in; feed it to SAMA Trim Frames 'count'."),
            ],
        )

    @classmethod
    def execute(cls, images) -> io.NodeOutput:
        padded, original_count = frames_to_4k_plus_1(images)
        return io.NodeOutput(padded, original_count)


class SamaTrimFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamaTrimFrames",
            display_name="SAMA Trim Frames",
            category=CATEGORY,
            description=(
                "Keeps the first 'count' frames of a video (IMAGE batch). Use it after the edit to remove "
                "the frames SAMA Frames To 4k+1 added."),
            inputs=[
                io.Image.Input("images", tooltip="The frames to trim, e.g. the decoded edited video."),
                io.Int.Input(
                    "count", default=81, min=1, max=MAX_FRAMES,
                    tooltip="How many frames to keep from the start; connect 'original_count' of "
                            "SAMA Frames To 4k+1. Must not exceed the number of frames given."),
            ],
            outputs=[
                io.Image.Output(
                    "trimmed_images", display_name="images", tooltip="The first 'count' frames."),
            ],
        )

    @classmethod
    def execute(cls, images, count) -> io.NodeOutput:
        return io.NodeOutput(trim_frames(images, count))


class SamaBlankFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamaBlankFrames",
            display_name="SAMA Blank Frames",
            category=CATEGORY,
            description=(
                "Blacks out frames start..end-1 (e.g. damaged or unwanted frames). Edit the result with SAMA "
                "Text Encode's task 'cube' and a SAMA model regenerates them from the surrounding motion, as in "
                "its cube-inpainting pre-training. Frame 0 must stay."),
            inputs=[
                io.Image.Input("images", tooltip="The video frames."),
                io.Int.Input("start", default=1, min=1, max=MAX_FRAMES, tooltip="First frame to blank (>= 1)."),
                io.Int.Input("end", default=2, min=2, max=MAX_FRAMES, tooltip="One past the last frame to blank."),
            ],
            outputs=[io.Image.Output("blanked_images", display_name="images", tooltip="Frames with the span black.")],
        )

    @classmethod
    def execute(cls, images, start, end) -> io.NodeOutput:
        return io.NodeOutput(blank_frames(images, start, end))


NODES = [SamaFramesTo4kPlus1, SamaTrimFrames, SamaBlankFrames]
