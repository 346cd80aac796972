"""The Wan2.1 video VAE, through diffusers' `AutoencoderKLWan`, plus SAMA's latent conventions.

What this module adds on top of diffusers (SAMA_REFERENCE.md section 4):
  * loading from every file layout the Wan2.1 VAE ships in, offline:
      - the original / ComfyUI single file (`Wan2.1_VAE.pth`, `wan_2.1_vae.safetensors`): keys renamed with
        diffusers' own `convert_wan_vae_to_diffusers`, the config built here from the tensor shapes
        (no hub config is fetched);
      - a diffusers folder (`config.json` + weights, or a pipeline folder with a `vae/` subfolder);
  * the per-channel latent normalisation with the Wan2.1 mean/std constants;
  * input checks (1 + 4k frames, sides multiples of 8) with actionable errors;
  * tiling (spatial tiles, diffusers' tiled path) and slicing (one video of the batch at a time).

Two latent conventions exist and both are exposed:
  * normalised latents, `(mu - mean) / std` per channel: what the Wan/SAMA DiT denoises
    (`encode(..., normalized=True)`, the default);
  * raw latents `mu`: ComfyUI's LATENT convention (`encode(..., normalized=False)`); ComfyUI applies the
    mean/std inside its model wrapper instead.

Encoding returns the posterior mean (no sampling), as ComfyUI and the Wan reference do.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .checkpoints import identify_checkpoint, read_state_dict
from .errors import SamaFileNotFoundError, SamaInputError, SamaModelFileError

log = logging.getLogger(__name__)

# Wan2.1 VAE latent statistics, one value per latent channel (Wan2.1 `wan/modules/vae.py`, identical to the
# defaults of diffusers' AutoencoderKLWan config `latents_mean` / `latents_std`; a test checks both agree).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
LATENT_CHANNELS = 16
SPATIAL_COMPRESSION = 8
TEMPORAL_COMPRESSION = 4
DIT_SIDE_MULTIPLE = 16  # the DiT patchifies 2x2 latents: pixel sides must be multiples of 8 * 2

# The only layout diffusers' converter maps correctly (it hard-codes block indices).
_SUPPORTED_NUM_RES_BLOCKS = 2
_SUPPORTED_DIM_MULT = [1, 2, 4, 4]

# Frames outside this range are not [-1, 1] video (e.g. [0, 255]); a little overshoot from resampling is fine.
_FRAME_RANGE_TOLERANCE = 0.05

# ----------------------------------------------------------------------------------------- normalisation

def _stat(values, like: torch.Tensor) -> torch.Tensor:
    stat = torch.tensor(values, dtype=torch.float32, device=like.device)
    return stat.view(1, -1, 1, 1, 1)  # (1, C, 1, 1, 1)


def normalize_latents(latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents (B, 16, T, h, w) -> the normalised latents the DiT works on: (z - mean) / std.

    Computed in float32 and returned in the input dtype.
    """
    _check_latents(latents, LATENT_CHANNELS)
    z = (latents.float() - _stat(WAN21_LATENTS_MEAN, latents)) / _stat(WAN21_LATENTS_STD, latents)
    return z.to(latents.dtype)


def denormalize_latents(latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, 16, T, h, w) -> raw VAE latents z * std + mean (the inverse)."""
    _check_latents(latents, LATENT_CHANNELS)
    z = latents.float() * _stat(WAN21_LATENTS_STD, latents) + _stat(WAN21_LATENTS_MEAN, latents)
    return z.to(latents.dtype)


# ------------------------------------------------------------------------------------------- input checks

def latent_num_frames(num_frames: int) -> int:
    """1 + 4k video frames -> 1 + k latent frames (the VAE is causal: the first frame is encoded alone)."""
    check_num_frames(num_frames)
    return 1 + (num_frames - 1) // TEMPORAL_COMPRESSION


def check_num_frames(num_frames: int) -> None:
    if num_frames < 1:
        raise SamaInputError(f"the video has {num_frames} frames; the Wan VAE needs at least 1 frame.")
    if (num_frames - 1) % TEMPORAL_COMPRESSION:
        shorter = 1 + (num_frames - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION
        raise SamaInputError(
            f"the video has {num_frames} frames, but the Wan VAE needs 1 + 4k frames (1, 5, 9, ..., 81): "
            f"it encodes the first frame alone, then compresses time 4x. Pad by repeating the last frame up "
            f"to {shorter + TEMPORAL_COMPRESSION} frames (and trim the output back), or trim to {shorter} "
            f"frames.")


def check_frame_size(height: int, width: int) -> None:
    if height % SPATIAL_COMPRESSION or width % SPATIAL_COMPRESSION or height < 8 or width < 8:
        raise SamaInputError(
            f"the frames are {height}x{width} (HxW), but the Wan VAE needs both sides to be positive "
            f"multiples of {SPATIAL_COMPRESSION} (and of {DIT_SIDE_MULTIPLE} for the SAMA DiT): resize or "
            f"crop them, e.g. to {_round_to(height, DIT_SIDE_MULTIPLE)}x"
            f"{_round_to(width, DIT_SIDE_MULTIPLE)}.")


def _round_to(x: int, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def _check_frames(frames: torch.Tensor) -> None:
    if not isinstance(frames, torch.Tensor) or frames.ndim != 5 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise SamaInputError(
            f"VAE encode expects frames shaped (B, 3, F, H, W), got {shape}. For ComfyUI IMAGE frames "
            f"(F, H, W, 3) in [0, 1] use `images.permute(3, 0, 1, 2)[None] * 2 - 1`.")
    if not frames.is_floating_point():
        raise SamaInputError(
            f"VAE encode expects float frames in [-1, 1], got dtype {frames.dtype}: convert uint8 frames "
            f"with `frames.float() / 127.5 - 1`.")
    check_num_frames(frames.shape[2])
    check_frame_size(frames.shape[3], frames.shape[4])
    lo, hi = frames.amin().item(), frames.amax().item()
    if not (lo >= -1 - _FRAME_RANGE_TOLERANCE and hi <= 1 + _FRAME_RANGE_TOLERANCE):
        raise SamaInputError(
            f"VAE encode expects frames in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]: convert [0, 1] "
            f"images with `x * 2 - 1` and [0, 255] frames with `x / 127.5 - 1`.")


def _check_latents(latents: torch.Tensor, channels: int) -> None:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[1] != channels:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise SamaInputError(
            f"expected Wan latents shaped (B, {channels}, T, H/8, W/8), got {shape}. A ComfyUI LATENT holds "
            f"them under 'samples'; add a batch dimension with `latents[None]` if it is missing.")
    if not latents.is_floating_point():
        raise SamaInputError(f"latents must be a float tensor, got dtype {latents.dtype}")


# ------------------------------------------------------------------------------------------------ tiling

@dataclass
class VAETiling:
    """Spatial tiling of encode and decode (diffusers' tiled path), sizes in pixels.

    Frames larger than a tile are processed in overlapping tiles of `tile_*` pixels placed every
    `stride_*` pixels and blended linearly over the overlap. Tiles are encoded/decoded independently, so
    the result differs slightly from the untiled one; frames no larger than a tile are not tiled at all.
    Defaults are diffusers' (256 px tiles, 192 px stride).
    """

    tile_height: int = 256
    tile_width: int = 256
    stride_height: int = 192
    stride_width: int = 192

    def validate(self) -> None:
        for name in ("tile_height", "tile_width", "stride_height", "stride_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % SPATIAL_COMPRESSION:
                raise SamaInputError(
                    f"VAE tiling {name}={value!r}: tile sizes and strides must be positive multiples of "
                    f"{SPATIAL_COMPRESSION} pixels (one latent pixel is 8x8 frame pixels).")
        if self.stride_height > self.tile_height or self.stride_width > self.tile_width:
            raise SamaInputError(
                f"VAE tiling stride ({self.stride_height}x{self.stride_width}) is larger than the tile "
                f"({self.tile_height}x{self.tile_width}): tiles would leave gaps; use a stride <= the tile "
                f"size.")


# ------------------------------------------------------------------------------------------ file checking

# This loader's advice for other kinds of file (checkpoints.identify_checkpoint names them).
_ADVICE_FOR_KIND = {"sama_dit": "load it as the SAMA model, not as the VAE",
                    "sd_vae": "SAMA needs the Wan2.1 video VAE"}
_ADVICE_FOR_FAMILY = {"a diffusion model": "load it as the model, not as the VAE",
                      "a text encoder": "load it as the text encoder",
                      "an image encoder": "load it as the anchor encoder / CLIP vision"}


def _describe_other_model(keys: list[str]) -> str:
    """What a file given as the VAE looks like instead, with where it belongs."""
    kind = identify_checkpoint(keys)
    if kind is None:
        return "an unrecognised model (none of the Wan VAE key names)"
    if kind.name.startswith("wan_vae"):  # Wan VAE names, but not the whole encoder and decoder
        return f"{kind.what} with tensors missing (an incomplete or partial file)"
    advice = _ADVICE_FOR_KIND.get(kind.name) or _ADVICE_FOR_FAMILY.get(kind.family)
    return f"{kind.what}; {advice}" if advice else kind.what


def _refuse_if_not_wan21_vae_keys(keys: list[str], path: Path) -> None:
    """Refuse, on key names alone (so a 28 GB DiT given as the VAE is refused unread), anything but the
    original / ComfyUI single-file Wan VAE layout."""
    names = set(keys)
    if "decoder.head.0.gamma" in names and "encoder.conv1.weight" in names:
        return  # original / ComfyUI layout
    if "decoder.conv_out.weight" in names and "encoder.conv_in.weight" in names:
        raise SamaModelFileError(
            f"{path} holds diffusers-layout Wan VAE weights without their config: load the diffusers folder "
            f"(the one with config.json) instead, or use the original/ComfyUI single file "
            f"(wan_2.1_vae.safetensors).")
    raise SamaModelFileError(
        f"{path} was given as the Wan2.1 VAE, but it looks like {_describe_other_model(keys)}. Expected "
        f"Wan2.1_VAE.pth or ComfyUI's wan_2.1_vae.safetensors, or a diffusers AutoencoderKLWan folder.")


# ---------------------------------------------------------------------- original layout -> diffusers model

def _block_kinds(sd: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    """Kinds of the blocks of a flat nn.Sequential in the original layout, in index order:
    'res' (residual block), 'attn', 'resample2d' or 'resample3d' (time_conv present)."""
    indices = sorted({int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})
    kinds = []
    for i in indices:
        p = f"{prefix}{i}."
        if p + "residual.0.gamma" in sd:
            kinds.append("res")
        elif p + "to_qkv.weight" in sd:
            kinds.append("attn")
        elif p + "time_conv.weight" in sd:
            kinds.append("resample3d")
        else:
            kinds.append("resample2d")
    return kinds


def _split_levels(kinds: list[str]) -> tuple[list[list[str]], list[str]]:
    """Block kinds -> (blocks per resolution level, resample kinds between levels)."""
    levels, resamples, current = [], [], []
    for kind in kinds:
        if kind.startswith("resample"):
            levels.append(current)
            resamples.append(kind)
            current = []
        else:
            current.append(kind)
    levels.append(current)
    return levels, resamples


def infer_original_layout_config(sd: Mapping[str, torch.Tensor], path: str | Path = "the file") -> dict:
    """AutoencoderKLWan config kwargs for an original/ComfyUI-layout Wan VAE state dict, from its shapes.

    Refuses layouts that diffusers' converter would map wrongly (it hard-codes the block indices of
    num_res_blocks=2, dim_mult=[1, 2, 4, 4]) and the Wan2.2 VAE.
    """
    enc_in = sd["encoder.conv1.weight"]  # (base_dim, in_channels, 3, 3, 3)
    z_dim = sd["conv2.weight"].shape[0] if "conv2.weight" in sd else sd["decoder.conv1.weight"].shape[1]
    nested_blocks = any(k.startswith("decoder.upsamples.0.upsamples.") for k in sd)
    if enc_in.shape[1] != 3 or z_dim == 48 or nested_blocks:
        raise SamaModelFileError(
            f"{path} looks like the Wan2.2 VAE (patchified input, {z_dim} latent channels); SAMA is built on "
            f"Wan2.1 and needs the Wan2.1 VAE (16 latent channels, e.g. wan_2.1_vae.safetensors).")
    if z_dim != LATENT_CHANNELS:
        raise SamaModelFileError(
            f"{path} is a Wan-style VAE with {z_dim} latent channels; the Wan2.1 VAE has {LATENT_CHANNELS} "
            f"and SAMA's latent statistics are defined for those. Use wan_2.1_vae.safetensors.")
    base_dim = enc_in.shape[0]
    decoder_base_dim = sd["decoder.head.0.gamma"].shape[0]  # the decoder ends at width base_dim * dim_mult[0]

    enc_levels, enc_resamples = _split_levels(_block_kinds(sd, "encoder.downsamples."))
    dec_levels, dec_resamples = _split_levels(_block_kinds(sd, "decoder.upsamples."))
    num_res_blocks = sorted({len(level) for level in enc_levels})
    dim_mult = []
    index = 0
    for level in enc_levels:  # width of each level = output channels of its last residual block
        index += len(level)
        dim_mult.append(sd[f"encoder.downsamples.{index - 1}.residual.6.weight"].shape[0] // base_dim)
        index += 1  # the resample block after the level
    has_attention = any("attn" in level for level in enc_levels + dec_levels)
    decoder_ok = (len(dec_levels) == len(_SUPPORTED_DIM_MULT)
                  and all(len(level) == _SUPPORTED_NUM_RES_BLOCKS + 1 for level in dec_levels))
    if (num_res_blocks != [_SUPPORTED_NUM_RES_BLOCKS] or dim_mult != _SUPPORTED_DIM_MULT or has_attention
            or not decoder_ok):
        raise SamaModelFileError(
            f"{path} is a Wan-style VAE with num_res_blocks={num_res_blocks}, dim_mult={dim_mult}"
            f"{', attention in the down/up blocks' if has_attention else ''}; only the Wan2.1 layout "
            f"(2 residual blocks per level, dim_mult [1, 2, 4, 4], no attention outside the middle) can be "
            f"converted correctly. Use the Wan2.1 VAE (wan_2.1_vae.safetensors), or a diffusers "
            f"AutoencoderKLWan folder for other layouts.")
    temperal_downsample = [kind == "resample3d" for kind in enc_resamples]
    if [kind == "resample3d" for kind in dec_resamples] != temperal_downsample[::-1]:
        raise SamaModelFileError(
            f"{path}: the decoder's temporal upsampling does not mirror the encoder's temporal downsampling; "
            f"this is not a Wan2.1 VAE.")
    return dict(base_dim=base_dim,
                decoder_base_dim=None if decoder_base_dim == base_dim else decoder_base_dim, z_dim=z_dim,
                dim_mult=list(_SUPPORTED_DIM_MULT), num_res_blocks=_SUPPORTED_NUM_RES_BLOCKS, attn_scales=[],
                temperal_downsample=temperal_downsample,
                latents_mean=list(WAN21_LATENTS_MEAN), latents_std=list(WAN21_LATENTS_STD))


def _build_from_original_layout(sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    try:
        config = infer_original_layout_config(sd, path)
    except KeyError as e:
        raise SamaModelFileError(f"{path} is an incomplete Wan VAE file (tensor {e} is missing): download it "
                                 "again") from None
    # Cast here rather than with model.to(dtype): one copy at most, and no diffusers dtype-cast warning.
    converted = {k: v.to(dtype) for k, v in convert_wan_vae_to_diffusers(sd).items()}
    with init_empty_weights():  # parameters on the meta device: the file's tensors are assigned, not copied
        model = AutoencoderKLWan(**config)
    result = model.load_state_dict(converted, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise SamaModelFileError(
            f"{path} does not match the Wan2.1 VAE architecture inferred from it "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}); the file may be "
            f"incomplete or a different VAE.")
    return model


def _diffusers_folder(path: Path) -> Path | None:
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return folder
    return None


def _load_diffusers_folder(folder: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    config = json.loads((folder / "config.json").read_text())
    class_name = config.get("_class_name")
    if class_name != "AutoencoderKLWan":
        what = class_name or config.get("model_type") or config.get("architectures") or "unknown"
        raise SamaModelFileError(
            f"{folder} holds a {what} model, not a Wan VAE (diffusers AutoencoderKLWan). Give the VAE folder "
            f"(with config.json of class AutoencoderKLWan) or wan_2.1_vae.safetensors.")
    wan22 = config.get("patch_size") or config.get("is_residual")
    if config.get("z_dim", LATENT_CHANNELS) != LATENT_CHANNELS or wan22:
        raise SamaModelFileError(
            f"{folder} holds a {'Wan2.2 ' if wan22 else ''}VAE with z_dim={config.get('z_dim')}; SAMA needs "
            f"the Wan2.1 VAE with {LATENT_CHANNELS} latent channels.")
    for key, ours in (("latents_mean", WAN21_LATENTS_MEAN), ("latents_std", WAN21_LATENTS_STD)):
        theirs = config.get(key)
        if theirs is not None and max(abs(a - b) for a, b in zip(theirs, ours)) > 1e-4:
            log.warning("%s: config %s differs from the Wan2.1 constants; sama_core normalises with the "
                        "Wan2.1 values", folder, key)
    try:
        return AutoencoderKLWan.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise SamaModelFileError(f"could not load the diffusers Wan VAE folder {folder}: {e}") from e


def load_wan_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
    """A diffusers `AutoencoderKLWan` (eval mode, frozen) from an original/ComfyUI single file or a diffusers
    folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SamaFileNotFoundError(
            f"Wan VAE not found at {path}: give wan_2.1_vae.safetensors (ComfyUI models/vae), "
            f"Wan2.1_VAE.pth, or a diffusers AutoencoderKLWan folder.")
    if path.is_dir():
        folder = _diffusers_folder(path)
        if folder is None:
            raise SamaModelFileError(
                f"{path} is a folder without config.json (nor vae/config.json): give the VAE file itself "
                f"(wan_2.1_vae.safetensors) or a diffusers AutoencoderKLWan folder.")
        model = _load_diffusers_folder(folder, dtype)
    else:
        # The key names are checked before any tensor is read: a wrong (maybe huge) file is refused unread.
        check = functools.partial(_refuse_if_not_wan21_vae_keys, path=path)
        state_dict, _ = read_state_dict(path, check_keys=check)
        model = _build_from_original_layout(state_dict, path, dtype)
    return model.to(device=device).eval().requires_grad_(False)



# ----------------------------------------------------------------------------------------------- writing
# Names of Wan2.1's own VAE module tree (wan/modules/vae.py), for writing the original layout.
_RES = ["residual.0.gamma", "residual.2.weight", "residual.2.bias", "residual.3.gamma", "residual.6.weight",
       "residual.6.bias"]
_ATTN = ["norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias"]
_CONV = ["weight", "bias"]


def original_layout_key_names(base_dim, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                              temperal_downsample=(False, True, True)):
    """Parameter names of Wan2.1's original VAE module tree (encoder/decoder as flat Sequentials)."""
    keys = [f"encoder.conv1.{n}" for n in _CONV]
    dims = [base_dim * m for m in (1, *dim_mult)]
    index = 0
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            keys += [f"encoder.downsamples.{index}.{n}" for n in _RES]
            if in_dim != out_dim:
                keys += [f"encoder.downsamples.{index}.shortcut.{n}" for n in _CONV]
            in_dim, index = out_dim, index + 1
        if level != len(dim_mult) - 1:
            keys += [f"encoder.downsamples.{index}.resample.1.{n}" for n in _CONV]
            if temperal_downsample[level]:
                keys += [f"encoder.downsamples.{index}.time_conv.{n}" for n in _CONV]
            index += 1
    for part in ("encoder", "decoder"):
        keys += [f"{part}.middle.0.{n}" for n in _RES] + [f"{part}.middle.1.{n}" for n in _ATTN]
        keys += [f"{part}.middle.2.{n}" for n in _RES]
        keys += [f"{part}.head.0.gamma"] + [f"{part}.head.2.{n}" for n in _CONV]
    keys += [f"conv1.{n}" for n in _CONV] + [f"conv2.{n}" for n in _CONV] + [f"decoder.conv1.{n}" for n in _CONV]
    dims = [base_dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
    temperal_upsample = temperal_downsample[::-1]
    index = 0
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if level > 0:
            in_dim //= 2  # the upsampler before this level halves the channels
        for _ in range(num_res_blocks + 1):
            keys += [f"decoder.upsamples.{index}.{n}" for n in _RES]
            if in_dim != out_dim:
                keys += [f"decoder.upsamples.{index}.shortcut.{n}" for n in _CONV]
            in_dim, index = out_dim, index + 1
        if level != len(dim_mult) - 1:
            keys += [f"decoder.upsamples.{index}.resample.1.{n}" for n in _CONV]
            if temperal_upsample[level]:
                keys += [f"decoder.upsamples.{index}.time_conv.{n}" for n in _CONV]
            index += 1
    return keys


def to_original_layout(diffusers_sd, base_dim):
    """A diffusers AutoencoderKLWan state dict -> Wan's original / ComfyUI key layout.

    diffusers ships only the forward converter (original -> diffusers); applying it to the original
    *names* gives the name mapping, whose inverse is this function."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    names = original_layout_key_names(base_dim)
    diffusers_to_original = convert_wan_vae_to_diffusers({k: k for k in names})  # {diffusers name: original}
    if set(diffusers_to_original) != set(diffusers_sd):
        raise SamaModelFileError("this VAE's layout has no original-layout equivalent (only num_res_blocks=2, "
                                 "dim_mult [1,2,4,4] convert)")
    return {orig: diffusers_sd[name].detach().clone() for name, orig in diffusers_to_original.items()}


def save_original_layout(model, path) -> None:
    """Save a diffusers AutoencoderKLWan as a single safetensors in the original / ComfyUI layout, which
    our loader and ComfyUI's native VAE loader both read."""
    from safetensors.torch import save_file
    base_dim = model.config.base_dim
    save_file({k: v.contiguous() for k, v in to_original_layout(model.state_dict(), base_dim).items()}, str(path))


# ----------------------------------------------------------------------------------------------- wrapper

class WanVAE:
    """Wan2.1 VAE: frames (B, 3, F, H, W) in [-1, 1] <-> latents (B, 16, 1 + (F - 1) // 4, H / 8, W / 8).

    `normalized=True` (default) gives/takes the DiT's normalised latents; `normalized=False` the raw
    latents of ComfyUI's LATENT type. Outputs are float32; compute runs in the VAE's dtype.
    """

    def __init__(self, model, tiling: VAETiling | bool | None = None, slicing: bool = False):
        self.model = model  # diffusers AutoencoderKLWan
        self.z_dim = model.config.z_dim
        self.set_tiling(tiling)
        self.set_slicing(slicing)

    @classmethod
    def from_file(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", tiling: VAETiling | bool | None = None,
                  slicing: bool = False) -> "WanVAE":
        return cls(load_wan_vae(path, dtype=dtype, device=device), tiling=tiling, slicing=slicing)

    # -- options

    def set_tiling(self, tiling: VAETiling | bool | None) -> None:
        """None/False: no tiling; True: diffusers' default tiles; a VAETiling: those tiles."""
        if tiling is None or tiling is False:
            self.tiling = None
            self.model.disable_tiling()
            return
        self.tiling = VAETiling() if tiling is True else tiling
        if not isinstance(self.tiling, VAETiling):
            raise SamaInputError(f"tiling must be None, a bool or a VAETiling, got {type(tiling).__name__}")
        self.tiling.validate()
        self.model.enable_tiling(
            tile_sample_min_height=self.tiling.tile_height, tile_sample_min_width=self.tiling.tile_width,
            tile_sample_stride_height=self.tiling.stride_height,
            tile_sample_stride_width=self.tiling.stride_width)

    def set_slicing(self, slicing: bool) -> None:
        """Process the videos of a batch one at a time (less memory for batches > 1, same result)."""
        self.slicing = bool(slicing)
        self.model.use_slicing = self.slicing

    # -- placement

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "WanVAE":
        self.model.to(device=device, dtype=dtype)
        return self

    # -- latents

    @staticmethod
    def normalize(latents: torch.Tensor) -> torch.Tensor:
        return normalize_latents(latents)

    @staticmethod
    def denormalize(latents: torch.Tensor) -> torch.Tensor:
        return denormalize_latents(latents)

    @staticmethod
    def latent_shape(batch: int, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        check_frame_size(height, width)
        return (batch, LATENT_CHANNELS, latent_num_frames(num_frames),
                height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """Frames (B, 3, F, H, W) in [-1, 1], F = 1 + 4k -> latents (B, 16, 1 + k, H/8, W/8), float32."""
        _check_frames(frames)
        x = frames.to(device=self.device, dtype=self.dtype)
        mu = self.model.encode(x).latent_dist.mean.float()  # (B, 16, T, h, w) posterior mean
        return normalize_latents(mu) if normalized else mu

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """Latents (B, 16, T, h, w) -> frames (B, 3, 1 + 4(T - 1), 8h, 8w) in [-1, 1] (clamped), float32."""
        _check_latents(latents, self.z_dim)
        z = denormalize_latents(latents.float()) if normalized else latents.float()
        frames = self.model.decode(z.to(device=self.device, dtype=self.dtype)).sample  # (B, 3, F, H, W)
        return frames.float().clamp_(-1.0, 1.0)
