"""Load SAMA Model: the DiT as a native MODEL (ModelPatcher built with comfy.ops)."""

import folder_paths
import torch
from comfy_api.latest import io

from ..sama_core.attention import BACKENDS
from ..sama_core.errors import SamaModelFileError
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
                "the Wan2.1-T2V base (a single file, or any one shard of a sharded checkpoint: the other shards "
                "next to it are loaded too) with the "
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


def load_wan_vae_any_width(path):
    """A native ComfyUI VAE object for a Wan2.1 VAE of any width. ComfyUI 0.3.64's own loader builds the
    Wan2.1 VAE at the released width (96) only; smaller ones (the bundled tiny model's) get the same
    ComfyUI VAE class around a ComfyUI WanVAE of their own width, with a decoder of its own width where the
    file's differs from its encoder's (train/vae_train.py's `model.decoder_base_dim`)."""
    import comfy.ldm.wan.vae
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    decoder_width, encoder_width = sd.get("decoder.head.0.gamma"), sd.get("encoder.conv1.weight")
    if decoder_width is None or encoder_width is None or "decoder.middle.0.residual.0.gamma" not in sd:
        raise SamaModelFileError(f"{path} is not a Wan2.1 VAE in the original/ComfyUI layout")
    decoder_width, encoder_width = decoder_width.shape[0], encoder_width.shape[0]
    if decoder_width == encoder_width == 96:
        return comfy.sd.VAE(sd=sd)
    # A one-tensor state dict that selects ComfyUI's Wan2.1 VAE setup (shape of the width-96 model's tensor),
    # whose module is then swapped for one of this file's width.
    vae = comfy.sd.VAE(sd={"decoder.middle.0.residual.0.gamma": torch.ones(384, 1, 1, 1)})
    layout = dict(z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], dropout=0.0)
    model = comfy.ldm.wan.vae.WanVAE(dim=encoder_width, temperal_downsample=[False, True, True], **layout)
    if decoder_width != encoder_width:
        model.decoder = comfy.ldm.wan.vae.Decoder3d(decoder_width, temperal_upsample=[True, True, False], **layout)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise SamaModelFileError(f"{path}: not a Wan2.1 VAE layout ({len(missing)} missing, {len(unexpected)} "
                                 "unexpected tensors)")
    vae.first_stage_model = model.eval().to(vae.vae_dtype)
    vae.patcher = comfy.model_patcher.ModelPatcher(vae.first_stage_model, load_device=vae.device,
                                                   offload_device=comfy.model_management.vae_offload_device())
    return vae


class SamaLoadVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamaLoadVAE", display_name="SAMA Load VAE (any width)", category="SAMA",
            description="Loads a Wan2.1 VAE from models/vae as a native VAE, also at widths ComfyUI's Load VAE "
                        "does not build (e.g. the bundled tiny demo model's). For the released Wan2.1 VAE this is "
                        "the same as Load VAE.",
            inputs=[io.Combo.Input("vae_name", options=folder_paths.get_filename_list("vae"),
                                   tooltip="A Wan2.1 VAE file (original / ComfyUI layout).")],
            outputs=[io.Vae.Output(tooltip="The VAE, for SAMA Sampler / In-Context and VAE Decode.")],
        )

    @classmethod
    def execute(cls, vae_name) -> io.NodeOutput:
        return io.NodeOutput(load_wan_vae_any_width(folder_paths.get_full_path_or_raise("vae", vae_name)))


NODES = [SamaLoadModel, SamaLoadVAE]
