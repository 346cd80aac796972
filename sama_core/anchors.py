"""Semantic anchors: SigLIP features of anchor frames pooled to 65 tokens per anchor (SAMA_REFERENCE.md s.5).

SAMA's semantic-anchoring target for a video is, per anchor frame, 64 local + 1 global SigLIP token of width
1152 (so400m patch14 384: a 27x27 patch grid). The paper does not release the pooling, so these are our
choices, documented here and tested:

  * features: the encoder's `last_hidden_state`, i.e. the patch tokens after SigLIP's final
    `post_layernorm` (the same tensor the released first-frame encoder returns, and ComfyUI's
    CLIP_VISION_OUTPUT `last_hidden_state` for SigLIP). `hidden_layer=k` takes `hidden_states[k]`
    instead (raw layer output, no post-layernorm; 0 = embeddings, -2 = penultimate layer);
  * local tokens: an 8x8 adaptive average pool of the P x P patch grid (torch's adaptive_avg_pool2d:
    output bin i covers input rows floor(i*P/8) .. ceil((i+1)*P/8) - 1, so 27 -> 8 bins overlap by one row
    where 27/8 is fractional), flattened row-major;
  * global token: the mean of all P*P patch tokens;
  * order per anchor: [64 local (row-major), global]; N anchors are concatenated anchor by anchor
    -> (1, 65 * N, width). The order does not matter to the model: semantic tokens get zero RoPE
    frequencies (SAMA_REFERENCE.md section 3.3).

Anchor frames: N uniformly spaced frames including the first and the last (N = 1: the first frame, as the
released code), or user-given indices.

Preprocessing: resize to the encoder's square input with torch's antialiased bicubic interpolation on
float frames, clamp to [0, 1], normalise with SigLIP's mean = std = 0.5. The HF SiglipImageProcessor (what
the released code used) also squashes to a square, but resizes with PIL bicubic on 8-bit images, so values
differ by about one 8-bit level. `crop=True` instead resizes the short side and centre-crops, like
ComfyUI's CLIPVisionEncode with crop "center" (which additionally quantises to 8 bit).

Loading: a transformers folder (SiglipVisionModel or a full SiglipModel), or one safetensors file in
ComfyUI's layout (`sigclip_vision_patch14_384.safetensors`: keys `vision_model.X`, no attention-pool head) or
transformers' own single-file layout (keys `X`). Transformers 5.x has no `vision_model.` submodule in
SiglipVisionModel, so the prefix is stripped here. The config of a single file is inferred from its tensors.
LayerNorm eps: SigLIP's own 1e-6 (what the released HF-based code used); ComfyUI runs the same weights with
torch's default 1e-5, which changes outputs by ~2e-5 — pass `layer_norm_eps=1e-5` to match ComfyUI exactly.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .checkpoints import identify_checkpoint, read_state_dict
from .errors import SamaFileNotFoundError, SamaInputError, SamaModelFileError

log = logging.getLogger(__name__)

SIGLIP_WIDTH = 1152  # so400m; SAMA's siglip_feat_mlp expects this width
LOCAL_GRID = 8  # 8 x 8 = 64 local tokens per anchor
TOKENS_PER_ANCHOR = LOCAL_GRID * LOCAL_GRID + 1  # + 1 global token = 65
SIGLIP_IMAGE_MEAN = (0.5, 0.5, 0.5)
SIGLIP_IMAGE_STD = (0.5, 0.5, 0.5)
SIGLIP_LAYER_NORM_EPS = 1e-6
COMFYUI_LAYER_NORM_EPS = 1e-5

# Head counts cannot be read from weights; these are the published SigLIP widths (so400m: 1152 -> 16 heads).
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1152: 16, 1536: 16}


# ----------------------------------------------------------------------------------------- anchor frames

def choose_anchor_frames(num_frames: int, n: int | None = None,
                         frames: Sequence[int] | None = None) -> list[int]:
    """Indices of the anchor frames of a num_frames-long video.

    frames given: those indices (negative ones count from the end), validated. Otherwise n (default 1)
    uniformly spaced frames including the first and the last: round(i * (num_frames - 1) / (n - 1)) with
    halves rounded up; n = 1 gives [0], the first frame (as the released code).
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise SamaInputError(f"num_frames must be a positive integer, got {num_frames!r}")
    if frames is not None:
        return _validated_frame_indices(num_frames, n, frames)
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SamaInputError(f"the number of anchor frames must be a positive integer, got {n!r}")
    if n > num_frames:
        raise SamaInputError(
            f"cannot choose {n} distinct anchor frames from a {num_frames}-frame video: use at most "
            f"{num_frames} anchors.")
    if n == 1:
        return [0]
    spacing = (num_frames - 1) / (n - 1)  # >= 1 when n <= num_frames, so the indices are distinct
    return [int(math.floor(i * spacing + 0.5)) for i in range(n)]


def _validated_frame_indices(num_frames: int, n: int | None, frames: Sequence[int]) -> list[int]:
    indices = []
    for value in frames:
        is_integral = isinstance(value, int) or (isinstance(value, torch.Tensor) and value.numel() == 1
                                                 and not value.is_floating_point())
        if isinstance(value, bool) or not is_integral:
            raise SamaInputError(f"anchor frame indices must be integers, got {value!r} in {list(frames)!r}")
        index = int(value)
        if not -num_frames <= index < num_frames:
            raise SamaInputError(
                f"anchor frame {index} is outside the {num_frames}-frame video: use 0..{num_frames - 1} "
                f"(or -1 for the last frame).")
        indices.append(index % num_frames)
    if not indices:
        raise SamaInputError("the list of anchor frames is empty: give at least one frame index, or none "
                             "to use the first frame.")
    if len(set(indices)) != len(indices):
        raise SamaInputError(f"anchor frames {list(frames)!r} repeat a frame: give distinct frames.")
    if n is not None and n != len(indices):
        raise SamaInputError(f"{n} anchors were asked for but {len(indices)} anchor frames were given: "
                             f"give one or the other.")
    return indices


# ------------------------------------------------------------------------------------------------ pooling

def pool_anchor_tokens(patch_tokens: torch.Tensor, grid: int | tuple[int, int] | None = None,
                       local_grid: int = LOCAL_GRID) -> torch.Tensor:
    """Patch tokens (B, P*P, D) -> (B, local_grid**2 + 1, D): [local (row-major), global] per image.

    Works for any width D and grid P (ComfyUI's SigLIP CLIP_VISION_OUTPUT.last_hidden_state is
    (B, 729, 1152): grid 27). grid=None infers a square grid; give (rows, cols) for a non-square one.
    Pooled in float32, returned in the input dtype.
    """
    if not isinstance(patch_tokens, torch.Tensor) or patch_tokens.ndim != 3:
        shape = (tuple(patch_tokens.shape) if isinstance(patch_tokens, torch.Tensor)
                 else type(patch_tokens).__name__)
        raise SamaInputError(f"patch tokens must be shaped (B, P*P, D), got {shape}")
    batch, length, width = patch_tokens.shape
    rows, cols = _patch_grid(length, grid)
    if rows < local_grid or cols < local_grid:
        log.warning("patch grid %dx%d is smaller than the %dx%d local pool: bins repeat patches",
                    rows, cols, local_grid, local_grid)
    x = patch_tokens.float().transpose(1, 2).reshape(batch, width, rows, cols)  # (B, D, P, P)
    local = F.adaptive_avg_pool2d(x, local_grid).flatten(2).transpose(1, 2)  # (B, 64, D), row-major bins
    global_token = patch_tokens.float().mean(dim=1, keepdim=True)  # (B, 1, D)
    return torch.cat([local, global_token], dim=1).to(patch_tokens.dtype)  # (B, 65, D)


def _patch_grid(length: int, grid: int | tuple[int, int] | None) -> tuple[int, int]:
    if grid is None:
        side = math.isqrt(length)
        if side * side != length:
            raise SamaInputError(
                f"{length} patch tokens do not form a square grid: pass grid=(rows, cols). (A CLIP model "
                f"with a class token gives P*P + 1 tokens; SAMA's anchors use SigLIP, which has none.)")
        return side, side
    rows, cols = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if rows * cols != length:
        raise SamaInputError(f"grid {rows}x{cols} does not match {length} patch tokens")
    return rows, cols


def concat_anchors(per_anchor_tokens: torch.Tensor) -> torch.Tensor:
    """(N, 65, D) pooled tokens of N anchors -> (1, 65 * N, D), anchor after anchor."""
    n, tokens, width = per_anchor_tokens.shape
    return per_anchor_tokens.reshape(1, n * tokens, width)


# ------------------------------------------------------------------------------------------ preprocessing

def frames_to_nchw(frames: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Frames in any of the project's layouts -> (N, 3, H, W) float32 in [0, 1].

    Accepted: (N, H, W, C) with C = 3 or 4 (ComfyUI IMAGE; alpha dropped), (N, 3, H, W), or a video
    (1, 3, F, H, W) as given to the VAE. Float frames are mapped from value_range (e.g. (-1, 1) for VAE-style
    video) to [0, 1]; uint8 frames are divided by 255.
    """
    if not isinstance(frames, torch.Tensor):
        raise SamaInputError(f"frames must be a torch tensor, got {type(frames).__name__}")
    if frames.ndim == 5:
        if frames.shape[0] != 1 or frames.shape[1] != 3:
            raise SamaInputError(
                f"a video for anchors must be shaped (1, 3, F, H, W), got {tuple(frames.shape)}")
        x = frames[0].transpose(0, 1)  # (F, 3, H, W)
    elif frames.ndim == 4 and frames.shape[-1] in (3, 4):
        x = frames[..., :3].permute(0, 3, 1, 2)  # (N, 3, H, W)
    elif frames.ndim == 4 and frames.shape[1] == 3:
        x = frames
    else:
        raise SamaInputError(
            f"frames must be (N, H, W, 3) like a ComfyUI IMAGE, (N, 3, H, W), or a video (1, 3, F, H, W); "
            f"got {tuple(frames.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise SamaInputError(f"frames must be float or uint8, got {x.dtype}")
    low, high = value_range
    return (x.float() - low) / (high - low)


def preprocess_for_siglip(images: torch.Tensor, image_size: int, crop: bool = False,
                          interpolation: str = "bicubic") -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, S, S) SigLIP pixel values in [-1, 1] (see the module docstring)."""
    if interpolation not in ("bicubic", "bilinear"):
        raise SamaInputError(f"interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
    height, width = images.shape[-2:]
    if crop:  # short side to S, then the centre S x S
        scale = image_size / min(height, width)
        size = (max(image_size, round(height * scale)), max(image_size, round(width * scale)))
    else:  # squash to S x S, like the HF SiglipImageProcessor
        size = (image_size, image_size)
    if size != (height, width):
        images = F.interpolate(images, size=size, mode=interpolation, antialias=True, align_corners=False)
    top, left = (images.shape[-2] - image_size) // 2, (images.shape[-1] - image_size) // 2
    images = images[..., top:top + image_size, left:left + image_size].clamp(0.0, 1.0)
    mean = torch.tensor(SIGLIP_IMAGE_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(SIGLIP_IMAGE_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


# ------------------------------------------------------------------------------------------------ loading

def _describe_other_model(keys: list[str]) -> str:
    """What a file given as the SigLIP encoder looks like instead."""
    kind = identify_checkpoint(keys)
    if kind is None:
        return "an unrecognised model"
    if kind.name == "vision":  # a vision tower's names, but not SigLIP's patch embedding
        return "an incomplete or unknown vision encoder (no embeddings.patch_embedding.weight)"
    return kind.what


def _vision_key(key: str) -> str | None:
    """A file key -> its transformers 5.x SiglipVisionModel key; None for tensors anchors do not use
    (a full SiglipModel's text tower and logit scale, the attention-pool head)."""
    if key.startswith("vision_model."):  # ComfyUI's layout, or a full SiglipModel file
        key = key[len("vision_model."):]
    elif key.startswith(("text_model.", "logit_")):
        return None
    return None if key.startswith("head.") else key


def _check_siglip_keys(keys: list[str], path: Path) -> None:
    vision = {_vision_key(k) for k in keys}
    if "embeddings.patch_embedding.weight" not in vision or "embeddings.class_embedding" in vision:
        raise SamaModelFileError(
            f"{path} was given as the SigLIP vision encoder, but it looks like "
            f"{_describe_other_model(keys)}. Expected SigLIP so400m patch14 384, "
            f"e.g. ComfyUI's sigclip_vision_patch14_384.safetensors.")


def _read_vision_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The vision-tower tensors of a single safetensors file, under SiglipVisionModel key names."""
    if path.suffix.lower() != ".safetensors":
        raise SamaModelFileError(f"{path}: SigLIP single files are read as .safetensors only; convert it, or "
                                 f"give the transformers folder.")
    # On names alone first: a wrong (maybe huge) file is refused unread; unused tensors are never read.
    check = functools.partial(_check_siglip_keys, path=path)
    tensors, _ = read_state_dict(path, check_keys=check, rename=_vision_key)
    return tensors


def infer_siglip_config(sd: dict[str, torch.Tensor], num_attention_heads: int | None = None,
                        layer_norm_eps: float = SIGLIP_LAYER_NORM_EPS, path: Path | str = "the file"):
    """A SiglipVisionConfig (no head) from the shapes of a SiglipVisionModel state dict."""
    from transformers import SiglipVisionConfig

    patch = sd["embeddings.patch_embedding.weight"]  # (width, channels, patch, patch)
    width, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    positions = sd["embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise SamaModelFileError(f"{path}: {positions} position embeddings do not form a square patch grid")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if num_attention_heads is None:
        num_attention_heads = _HEADS_BY_WIDTH.get(width)
        if num_attention_heads is None:
            raise SamaInputError(
                f"{path}: a SigLIP encoder of width {width} is not a published size, so its attention head "
                f"count cannot be inferred from the weights: pass num_attention_heads.")
    return SiglipVisionConfig(
        hidden_size=width, intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(layers), num_attention_heads=num_attention_heads, num_channels=channels,
        image_size=grid * patch_size, patch_size=patch_size, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=layer_norm_eps, vision_use_head=False)


def _load_single_file(path: Path, dtype: torch.dtype, num_attention_heads: int | None,
                      layer_norm_eps: float | None):
    from accelerate import init_empty_weights
    from transformers import SiglipVisionModel

    sd = _read_vision_state_dict(path)
    config = infer_siglip_config(sd, num_attention_heads, layer_norm_eps or SIGLIP_LAYER_NORM_EPS, path)
    # Parameters on the meta device (assigned from the file below); buffers such as position_ids stay real.
    with init_empty_weights(include_buffers=False):
        model = SiglipVisionModel(config)
    result = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise SamaModelFileError(
            f"{path} does not match the SigLIP architecture inferred from it "
            f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}); the file may be "
            f"incomplete.")
    return model


def _load_folder(folder: Path, dtype: torch.dtype, layer_norm_eps: float | None):
    from transformers import SiglipVisionModel

    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in ("siglip_vision_model", "siglip"):
        raise SamaModelFileError(
            f"{folder} holds a {model_type or 'unknown'} model, not SigLIP: SAMA's anchors need a SigLIP "
            f"vision encoder (so400m patch14 384).")
    extra = {} if layer_norm_eps is None else {"layer_norm_eps": layer_norm_eps}
    try:
        return SiglipVisionModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype, **extra)
    except (OSError, ValueError, RuntimeError) as e:
        raise SamaModelFileError(f"could not load the SigLIP folder {folder}: {e}") from e


def load_siglip_vision(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", num_attention_heads: int | None = None,
                       layer_norm_eps: float | None = None):
    """A transformers SiglipVisionModel (eval mode) from a folder or a single safetensors file.

    layer_norm_eps: None keeps a folder's configured value and uses SigLIP's 1e-6 for single files;
    1e-5 reproduces ComfyUI's numerics. num_attention_heads: needed only for unpublished widths.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise SamaFileNotFoundError(
            f"SigLIP vision encoder not found at {path}: give sigclip_vision_patch14_384.safetensors "
            f"(ComfyUI models/clip_vision) or a transformers SigLIP folder.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SamaModelFileError(f"{path} is a folder without config.json: give the .safetensors file "
                                     f"itself or a transformers SigLIP folder.")
        model = _load_folder(path, dtype, layer_norm_eps)
    else:
        model = _load_single_file(path, dtype, num_attention_heads, layer_norm_eps)
    if model.config.hidden_size != SIGLIP_WIDTH:  # fine for small models; the pipeline checks the DiT's width
        log.info("%s: SigLIP width %d (so400m, which SAMA-14B uses, is %d)", path, model.config.hidden_size,
                 SIGLIP_WIDTH)
    return model.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ encoder

class AnchorEncoder:
    """SigLIP anchor-frame encoder: video frames -> (1, 65 * N, width) semantic tokens (float32)."""

    def __init__(self, model, hidden_layer: int | None = None, crop: bool = False,
                 interpolation: str = "bicubic", local_grid: int = LOCAL_GRID):
        self.model = model  # transformers SiglipVisionModel
        self.hidden_layer = hidden_layer
        self.crop = crop
        self.interpolation = interpolation
        self.local_grid = local_grid

    @classmethod
    def from_file(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", num_attention_heads: int | None = None,
                  layer_norm_eps: float | None = None, **options) -> "AnchorEncoder":
        model = load_siglip_vision(path, dtype, device, num_attention_heads, layer_norm_eps)
        return cls(model, **options)

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def patch_grid(self) -> int:
        return self.model.config.image_size // self.model.config.patch_size

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> SigLIP patch tokens (N, P*P, width), float32."""
        pixels = preprocess_for_siglip(images.to(self.device), self.image_size, self.crop, self.interpolation)
        with_layers = self.hidden_layer is not None
        out = self.model(pixel_values=pixels.to(self.dtype), output_hidden_states=with_layers)
        tokens = out.last_hidden_state if self.hidden_layer is None else out.hidden_states[self.hidden_layer]
        return tokens.float()  # (N, P*P, width)

    def encode_images(self, images: torch.Tensor,
                      value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Each image its own anchor: frames in any accepted layout -> (N, 65, width)."""
        return self._pooled(frames_to_nchw(images, value_range))

    def encode(self, frames: torch.Tensor, anchor_frames: Sequence[int] | None = None,
               num_anchors: int | None = None, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Frames of one video -> (1, 65 * N, width): the pooled tokens of its anchor frames, in the order
        of `anchor_frames` (default: choose_anchor_frames(F, num_anchors), i.e. the first frame)."""
        x = frames_to_nchw(frames, value_range)  # (F, 3, H, W)
        indices = choose_anchor_frames(x.shape[0], num_anchors, anchor_frames)
        return concat_anchors(self._pooled(x[indices]))  # (1, 65 * N, width)

    def _pooled(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_tokens(images)  # (N, P*P, width)
        return pool_anchor_tokens(tokens, self.patch_grid, self.local_grid)  # (N, 65, width)
