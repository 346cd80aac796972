"""The SAMA DiT as a native ComfyUI model (a BaseModel inside a ModelPatcher).

Built with `comfy.ops` (through sama_core's `operations=` argument), so ComfyUI manages device
placement, low-VRAM partial loading, weight dtypes (fp8 storage) and native LoRA patches; the key
names are Wan's, so Wan LoRAs and ComfyUI's model nodes apply unchanged.

Two ways to sample it:
- the SAMA Sampler node runs sama_core's exact reference loop on `diffusion_model.sama_forward`;
- native samplers (KSampler, SamplerCustomAdvanced, ...) go through `SamaComfyDiT.forward`, which
  reads the in-context source and the packed semantic frames that the SAMA In-Context node put in
  the conditioning and the latent (see nodes/packing.py).
"""

from __future__ import annotations

import logging

import torch

import comfy.conds
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

from ..sama_core.config import SAMA_KEY_PREFIXES, SamaConfig
from ..sama_core.errors import SamaModelFileError
from ..sama_core.loading import read_weights, resolve_config
from ..sama_core.model import SamaDiT
from ..sama_core.sampler import anchor_velocity
from .packing import pack_velocity, unpack

log = logging.getLogger(__name__)

SAMA_SHIFT = 5.0


class SamaComfyDiT(SamaDiT):
    """SamaDiT with ComfyUI's calling convention: forward(x, timestep, context, **extra_conds)."""

    def __init__(self, image_model=None, model_type=None, device=None, dtype=None, operations=None,
                 attention_backend: str = "auto", **config):
        super().__init__(SamaConfig.from_dict(config), operations=operations,
                         attention_backend=attention_backend, device=device, dtype=dtype)
        self.dtype = dtype  # ComfyUI's BaseModel.get_dtype() reads this

    def sama_forward(self, *args, **kwargs):
        """sama_core's own forward (target, timestep, context, source=, semantic_tokens=)."""
        return SamaDiT.forward(self, *args, **kwargs)

    def forward(self, x, timestep, context, sama_source=None, sama_layout=None, sama_anchor=None,
                sama_anchor_sigma=None, control=None, transformer_options=None, **kwargs):
        if sama_layout is None:  # a plain latent: no packed semantic frames
            return self.sama_forward(x, timestep, context, source=sama_source).video
        video_frames, num_tokens = sama_layout
        video, tokens = unpack(x, video_frames, num_tokens, self.config.siglip_dim)
        out = self.sama_forward(video, timestep, context, source=sama_source, semantic_tokens=tokens)
        sigma = timestep.float() / 1000.0  # (B,) ComfyUI passes sigma * 1000 for flow models
        token_v = out.semantic
        if sama_anchor is not None:
            injecting = (sigma > sama_anchor_sigma).view(-1, 1, 1)
            token_v = torch.where(injecting, anchor_velocity(tokens, sama_anchor.to(tokens), sigma.view(-1, 1, 1)
                                                             .to(tokens)), token_v)
        return pack_velocity(x, out.video, token_v, sigma)


class SamaBaseModel(comfy.model_base.BaseModel):
    def __init__(self, model_config, device=None):
        super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=SamaComfyDiT)

    def extra_conds(self, **kwargs):
        out = super().extra_conds(**kwargs)
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:
            out["c_crossattn"] = comfy.conds.CONDRegular(cross_attn)
        source = kwargs.get("sama_source")
        if source is not None:  # raw VAE latents -> the DiT's normalised space
            out["sama_source"] = comfy.conds.CONDRegular(self.process_latent_in(source))
        if kwargs.get("sama_layout") is not None:
            out["sama_layout"] = comfy.conds.CONDConstant(tuple(kwargs["sama_layout"]))
        if kwargs.get("sama_anchor") is not None:
            out["sama_anchor"] = comfy.conds.CONDRegular(kwargs["sama_anchor"])
            out["sama_anchor_sigma"] = comfy.conds.CONDConstant(float(kwargs["sama_anchor_sigma"]))
        return out


class SamaModelConfig(comfy.supported_models.WAN21_T2V):
    sampling_settings = {"shift": SAMA_SHIFT}

    def get_model(self, state_dict, prefix="", device=None):
        return SamaBaseModel(self, device=device)


WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn,
                 "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def load_sama_patcher(paths, weight_dtype: str = "default", attention_backend: str = "auto",
                      allow_plain_wan: bool = False):
    """Files (one merged file, or base shards + the SAMA file) -> a ModelPatcher around SamaBaseModel."""
    weights = read_weights(paths)
    config = resolve_config(weights, None)
    if not config.has_sama and not allow_plain_wan:
        raise SamaModelFileError("this is a Wan2.1 base model without the SAMA parts: choose the SAMA file as "
                                 "'sama_weights' on top of it (or a merged SAMA checkpoint)")
    sd = weights.state_dict
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    supported = list(SamaModelConfig.supported_inference_dtypes)
    unet_dtype = WEIGHT_DTYPES[weight_dtype]
    if unet_dtype is None:
        params = sum(v.numel() for v in sd.values())
        file_dtype = next(iter(sd.values())).dtype
        unet_dtype = comfy.model_management.unet_dtype(model_params=params, supported_dtypes=supported,
                                                       weight_dtype=file_dtype)
    manual_cast = comfy.model_management.unet_manual_cast(unet_dtype, load_device, supported)

    unet_config = {"image_model": "wan2.1", "model_type": "t2v", "attention_backend": attention_backend,
                   **config.to_dict()}
    model_config = SamaModelConfig(unet_config)
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    if weight_dtype == "fp8_e4m3fn_fast":
        model_config.optimizations["fp8"] = True
    model = model_config.get_model({}, "")
    model = model.to(offload_device)
    model.load_model_weights(sd, "")
    log.info("SAMA: loaded %s DiT (%s), weights %s, compute %s", "SAMA" if config.has_sama else "plain Wan2.1",
             "; ".join(weights.formats), unet_dtype, manual_cast or unet_dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def sama_diffusion_model(model_patcher) -> SamaComfyDiT:
    """The DiT inside a MODEL, with a clear error when the MODEL is not a SAMA model."""
    inner = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    if not isinstance(inner, SamaComfyDiT):
        raise SamaModelFileError("this MODEL is not a SAMA model: load it with 'Load SAMA Model' "
                                 f"(got {type(inner).__name__})")
    return inner


class DirectSama:
    """sama_core's calling convention on the DiT inside a MODEL (what sama_core.sampler.sample calls)."""

    def __init__(self, dit: SamaComfyDiT):
        self.dit, self.config = dit, dit.config

    def __call__(self, *args, **kwargs):
        return self.dit.sama_forward(*args, **kwargs)


def compute_dtype(model_patcher) -> torch.dtype:
    base = model_patcher.model
    return base.manual_cast_dtype or base.get_dtype()


__all__ = ["SamaComfyDiT", "SamaBaseModel", "SamaModelConfig", "load_sama_patcher", "sama_diffusion_model",
           "compute_dtype", "DirectSama", "WEIGHT_DTYPES", "SAMA_KEY_PREFIXES"]
