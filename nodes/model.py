"""Load SAMA Model: the DiT as a native MODEL (ModelPatcher built with comfy.ops)."""

import folder_paths
from comfy_api.latest import io

from ..sama_core.attention import BACKENDS
from .comfy_model import WEIGHT_DTYPES, load_sama_patcher

NONE = "none"


class SamaLoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = folder_paths.get_filename_list("diffusion_models")
        return io.Schema(
            node_id="SamaLoadModel",
            display_name="Load SAMA Model",
            category="SAMA",
            description=(
                "Loads the SAMA video-editing DiT from models/diffusion_models as a native MODEL, so ComfyUI "
                "manages its memory and native LoRA / torch-compile nodes apply. Accepts a merged SAMA file, or "
                "the Wan2.1-T2V base (single file or the first shard / index of a sharded checkpoint) with the "
                "SAMA-14B file layered on top. Official, ComfyUI-repackaged (fp16/bf16/fp8/scaled fp8) and "
                "diffusers layouts load. The sampling shift is set to SAMA's 5.0."),
            inputs=[
                io.Combo.Input("dit_name", options=files,
                               tooltip="The DiT: a merged SAMA checkpoint, or the Wan2.1-T2V base."),
                io.Combo.Input("sama_weights", options=[NONE] + files, default=NONE,
                               tooltip="The SAMA-14B file to layer on top of a Wan2.1 base ('none' when "
                                       "dit_name is already a SAMA checkpoint)."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Storage dtype of the weights. fp8 halves memory (computed in "
                                       "bf16/fp16); 'fast' also uses fp8 matmuls on GPUs that have them."),
                io.Combo.Input("attention", options=list(BACKENDS), default="auto",
                               tooltip="Attention kernel. 'auto' is PyTorch's choice (safe everywhere); "
                                       "sdpa_cudnn is fastest exact on Hopper; flash_attn/sage need their "
                                       "packages (sage is approximate)."),
            ],
            outputs=[io.Model.Output(tooltip="The SAMA DiT. Sample it with SAMA Sampler, or with native "
                                             "samplers after SAMA In-Context.")],
        )

    @classmethod
    def execute(cls, dit_name, sama_weights, weight_dtype, attention) -> io.NodeOutput:
        paths = [folder_paths.get_full_path_or_raise("diffusion_models", dit_name)]
        if sama_weights != NONE:
            paths.append(folder_paths.get_full_path_or_raise("diffusion_models", sama_weights))
        return io.NodeOutput(load_sama_patcher(paths, weight_dtype=weight_dtype, attention_backend=attention))


NODES = [SamaLoadModel]
