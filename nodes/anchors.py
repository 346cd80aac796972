"""SAMA Anchor Encode: SigLIP (native CLIP Vision loader) tokens of anchor frames -> SAMA_ANCHORS."""

import math

import torch
from comfy_api.latest import io

from ..sama_core.anchors import choose_anchor_frames, concat_anchors, pool_anchor_tokens
from ..sama_core.errors import SamaInputError

Anchors = io.Custom("SAMA_ANCHORS")


def parse_frame_list(text: str):
    """'0, 40, -1' -> [0, 40, -1]; '' -> None."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return [int(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise SamaInputError(f"frame_indices must be comma-separated integers like '0, 40, 80', got '{text}'") from None


def patch_sequence(output) -> torch.Tensor:
    """The post-LayerNorm patch tokens (N, P*P, D) from a CLIP_VISION_OUTPUT (SigLIP has no class token)."""
    tokens = output["image_embeds"] if output["image_embeds"].ndim == 3 else output["last_hidden_state"]
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise SamaInputError(f"the vision encoder returned {tokens.shape[1]} tokens, not a square patch grid: "
                             "load a SigLIP encoder (sigclip_vision_patch14_384) with Load CLIP Vision")
    return tokens


def _frame_inputs():
    return [
        io.Image.Input("images", tooltip="The anchor frame(s): an edited image, or video frames."),
        io.Int.Input("num_anchors", default=1, min=1, max=16,
                     tooltip="How many evenly spaced frames to use (1 = the first frame)."),
        io.String.Input("frame_indices", default="", optional=True,
                        tooltip="Or explicit frame numbers, e.g. '0, 40, 80' (negative counts from the end); "
                                "overrides num_anchors."),
    ]


def _chosen_frames(images, num_anchors, frame_indices):
    explicit = parse_frame_list(frame_indices)
    return choose_anchor_frames(images.shape[0], n=None if explicit else num_anchors, frames=explicit)


class SamaAnchorEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamaAnchorEncode", display_name="SAMA Anchor Encode", category="SAMA",
            description=(
                "Encodes anchor frames with SigLIP into SAMA's semantic tokens: per anchor, 64 local tokens "
                "(8x8 average pool of the patch grid) + 1 global token (mean) = 65. Give it an EDITED frame "
                "(e.g. the first frame edited in any image editor) and connect the anchors to SAMA Sampler: "
                "the edit then follows that picture."),
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="SigLIP so400m patch14 384 from Load CLIP Vision."),
                *_frame_inputs(),
            ],
            outputs=[Anchors.Output(tooltip="65 tokens per anchor, for SAMA Sampler / SAMA In-Context.")],
        )

    @classmethod
    def execute(cls, clip_vision, images, num_anchors, frame_indices="") -> io.NodeOutput:
        chosen = _chosen_frames(images, num_anchors, frame_indices)
        output = clip_vision.encode_image(images[chosen][..., :3], crop=True)
        tokens = patch_sequence(output).float().cpu()  # (N, P*P, D)
        pooled = pool_anchor_tokens(tokens, grid=math.isqrt(tokens.shape[1]))  # (N, 65, D)
        return io.NodeOutput({"tokens": concat_anchors(pooled), "frames": list(chosen)})


class SamaAnchorEncodeFile(io.ComfyNode):
    """For SigLIP files ComfyUI's Load CLIP Vision cannot read (e.g. the bundled tiny model's small SigLIP)."""

    _cache = {}

    @classmethod
    def define_schema(cls):
        import folder_paths
        return io.Schema(
            node_id="SamaAnchorEncodeFile", display_name="SAMA Anchor Encode (file)", category="SAMA",
            description="Like SAMA Anchor Encode, with the SigLIP encoder loaded from models/clip_vision by SAMA's "
                        "own loader (any width, e.g. the bundled tiny model's).",
            inputs=[
                io.Combo.Input("siglip", options=folder_paths.get_filename_list("clip_vision"),
                               tooltip="A SigLIP vision encoder .safetensors."),
                io.Int.Input("num_heads", default=0, min=0, max=64,
                             tooltip="Attention heads, only for unpublished widths (0 = infer)."),
                *_frame_inputs(),
            ],
            outputs=[Anchors.Output(tooltip="65 tokens per anchor, for SAMA Sampler / SAMA In-Context.")],
        )

    @classmethod
    def execute(cls, siglip, num_heads, images, num_anchors, frame_indices="") -> io.NodeOutput:
        import folder_paths
        from ..sama_core.anchors import AnchorEncoder
        path = folder_paths.get_full_path_or_raise("clip_vision", siglip)
        key = (path, num_heads)
        if key not in cls._cache:
            cls._cache.clear()
            cls._cache[key] = AnchorEncoder.from_file(path, num_attention_heads=num_heads or None)
        chosen = _chosen_frames(images, num_anchors, frame_indices)
        tokens = cls._cache[key].encode(images[..., :3], anchor_frames=chosen)
        return io.NodeOutput({"tokens": tokens.float().cpu(), "frames": list(chosen)})


NODES = [SamaAnchorEncode, SamaAnchorEncodeFile]
