"""SamaPipeline: a video file and an instruction in, the edited video file out (headless).

    pipe = SamaPipeline.from_paths(dit="sama.safetensors", vae="wan_2.1_vae.safetensors",
                                   text_encoder="umt5_xxl_fp16.safetensors")
    pipe.edit_file("in.mp4", "make the car red", "out.mp4")

Steps: read -> bucket resize -> pad to 4k+1 -> VAE encode -> text encode -> joint sampling (sampler.py)
-> VAE decode -> trim -> restore the source size -> write mp4 with the source audio (atomically: an
interrupted run leaves no output file).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .bundle import BUNDLE_FILE
from .errors import SamaFileNotFoundError, SamaInputError
from .flowedit import AUTO, resolve_flowedit
from .loading import load_dit, merge_lora
from .pretext import blank_frames
from .region import (changed_weight, check_keep_unchanged, check_pixel_mask, composite, latent_region,
                     scale_mask)
from .sampler import SampleResult, SamplerOptions, StepInfo, sample
from .text import load_text_encoder
from .vae import WanVAE
from . import video as vio
from .windows import latent_frame_count

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Above this many latent frames (81 video frames, the reference's longest clip), edit in windows.
AUTO_WINDOW_LATENT_FRAMES = 21


@dataclasses.dataclass
class EditSettings:
    """What to edit and how the frames are prepared; the sampling options live in SamplerOptions."""
    width: Optional[int] = None          # explicit size (multiples of 16); default = the reference bucket
    height: Optional[int] = None
    target_area: Optional[int] = None    # bucket area; default: the bundle's, else the reference 480*832
    resize_mode: str = "crop"            # crop | letterbox | stretch
    restore_size: bool = True            # write the output at the source's size
    frame_range: Optional[tuple] = None  # (start, end) in source frames
    stride: int = 1
    max_frames: Optional[int] = None
    negative: Optional[str] = None
    use_prefix: bool = True
    anchor_image: Optional[str] = None   # an edited anchor frame (needs a SigLIP encoder)
    anchor_frames: Optional[Sequence[int]] = None
    blank_frames: Optional[tuple] = None  # (start, end): blank these source frames (cube-inpainting repair)
    mask: Optional[str] = None           # image or video: where the edit may change the video (white); the rest
                                         # stays the source's (sama_core/region.py)
    keep_unchanged: Optional[float] = None  # threshold: pixels the edit changed by less than half of it (0-1
                                         # scale, against the source's VAE round trip) are the source's own;
                                         # None: the bundle's default (else off), 0: off (region.changed_weight)


@dataclasses.dataclass
class EditResult:
    frames: torch.Tensor                 # (F, H, W, 3) in [0, 1], source frame count
    fps: object
    output: Optional[Path] = None
    comparison: Optional[Path] = None


def read_bundle_spec(manifest: Path) -> dict:
    """bundle.json, validated: file entries are relative paths (strings), defaults/card are objects."""
    try:
        spec = json.loads(manifest.read_text())
    except ValueError as e:
        raise SamaInputError(f"{manifest} is not valid JSON ({e})") from None
    if not isinstance(spec, dict):
        raise SamaInputError(f"{manifest} must hold a JSON object naming the model files")
    for key in ("dit", "vae", "text_encoder", "tokenizer", "siglip"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise SamaInputError(f"{manifest}: '{key}' must be a file name relative to the bundle folder")
    for key in ("defaults", "card"):
        if not isinstance(spec.get(key, {}), dict):
            raise SamaInputError(f"{manifest}: '{key}' must be a JSON object")
    heads = spec.get("siglip_num_heads")
    if heads is not None and (not isinstance(heads, int) or isinstance(heads, bool) or heads < 1):
        raise SamaInputError(f"{manifest}: 'siglip_num_heads' must be a positive integer")
    check_bundle_defaults(spec.get("defaults", {}), manifest)
    return spec


def _integer(low=None, null=False):
    def ok(v):
        return (null and v is None) or (isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low))
    return ok, (f"an integer >= {low}" if low is not None else "an integer") + (" or null" if null else "")


def _number(low=None, high=None, above=None, null=False):
    def ok(v):
        if null and v is None:
            return True
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return False
        return (low is None or v >= low) and (high is None or v <= high) and (above is None or v > above)
    bounds = [f"{sign} {bound:g}" for sign, bound in ((">", above), (">=", low), ("<=", high)) if bound is not None]
    return ok, "a number" + (" " + " and ".join(bounds) if bounds else "") + (" or null" if null else "")


def _one_of(*values):
    return (lambda v: any(type(v) is type(x) and v == x for x in values)), \
           "one of " + ", ".join(json.dumps(v) for v in values)


# What a bundle's "defaults" may set, and the JSON value each takes: the SamplerOptions fields
# (SamaPipeline.sampler_options) and the two edit settings the pipeline reads from it. Checked when the bundle is
# read, so a broken bundle.json is named before any model loads instead of failing deep in the sampler with a
# TypeError; tests/test_bundle_defaults.py keeps the table in step with SamplerOptions.
BUNDLE_DEFAULTS = {
    "steps": _integer(1), "guidance": _number(), "shift": _number(above=0), "seed": _integer(0),
    "denoise": _number(above=0, high=1), "source_guidance": _number(null=True), "text_guidance": _number(null=True),
    "batch_cfg": _one_of(True, False), "num_semantic_tokens": _integer(1), "anchor_strength": _number(0, 1),
    "solver": _one_of("euler", "unipc"), "window_latent_frames": _integer(1, null=True),
    "window_overlap": _integer(0), "cache_threshold": _number(low=0), "cache_warmup": _integer(0),
    "flowedit": _one_of(True, False, AUTO), "flowedit_skip": _integer(0),
    "target_area": _integer(1), "keep_unchanged": _number(0, 1),
}


_WARNED_UNKNOWN: set = set()  # (bundle.json, name): a bundle read twice (the demo reads its card) warns once


def check_bundle_defaults(defaults: dict, manifest) -> None:
    """A bundle's default settings, each of a known name and a value it can take, or a clear error naming
    bundle.json, the setting and the fix. An unknown name is only warned about (with the nearest known one):
    a bundle written by a newer version may carry settings this one does not know."""
    for key, value in defaults.items():
        if key not in BUNDLE_DEFAULTS:
            if (str(manifest), key) in _WARNED_UNKNOWN:
                continue
            _WARNED_UNKNOWN.add((str(manifest), key))
            near = difflib.get_close_matches(str(key), BUNDLE_DEFAULTS, n=1)
            log.warning("%s: defaults has a setting this version does not know, %r, ignored%s", manifest, key,
                        f" (did you mean {near[0]!r}?)" if near else "")
            continue
        ok, rule = BUNDLE_DEFAULTS[key]
        if not ok(value):
            raise SamaInputError(f"{manifest}: defaults.{key} must be {rule}, got {json.dumps(value)}: correct it "
                                 "or remove it from the bundle's \"defaults\"")


def resolve_dtype(name_or_dtype) -> torch.dtype:
    if isinstance(name_or_dtype, torch.dtype):
        return name_or_dtype
    try:
        return DTYPES[name_or_dtype]
    except KeyError:
        raise SamaInputError(f"unknown dtype '{name_or_dtype}'; choose one of {', '.join(DTYPES)}") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise SamaInputError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SamaInputError("device 'cuda' was asked for, but PyTorch sees no CUDA GPU (a CPU-only build, or "
                                 "no driver); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SamaInputError(f"device {device} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return device


class SamaPipeline:
    def __init__(self, dit, vae: WanVAE, text_encoder, anchor_encoder=None, device="cpu", dtype=torch.float32,
                 defaults: Optional[dict] = None):
        self.dit, self.vae, self.text_encoder, self.anchor_encoder = dit, vae, text_encoder, anchor_encoder
        self.device, self.dtype = torch.device(device), dtype
        self.defaults = defaults or {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_paths(cls, dit, vae, text_encoder, tokenizer=None, siglip=None, siglip_num_heads=None, device=None,
                   dtype="fp32",
                   attention_backend="auto", loras: Sequence[tuple] = (), offload: bool = False, fp8=None,
                   rope: str = "exact",
                   vae_tiling: bool = False, defaults: Optional[dict] = None) -> "SamaPipeline":
        device = str(check_device(device or default_device()))
        dtype = resolve_dtype(dtype)
        model = load_dit(dit, dtype=dtype, attention_backend=attention_backend, fp8=fp8, rope=rope)
        for path, strength in loras:
            merge_lora(model, path, strength)
        if offload and str(device).startswith("cuda"):
            # Blocks stream to the GPU one group at a time (diffusers' hooks; outputs are identical).
            from diffusers.hooks import apply_group_offloading
            apply_group_offloading(model, onload_device=torch.device(device), offload_type="block_level",
                                   num_blocks_per_group=1, use_stream=True)
        else:
            model = model.to(device)
        vae_model = WanVAE.from_file(vae, dtype=dtype if dtype != torch.float16 else torch.float32,
                                     device=device, tiling=vae_tiling or None)
        text = load_text_encoder(text_encoder, tokenizer_path=tokenizer, dtype=dtype, device=device)
        anchors = None
        if siglip is not None:
            from .anchors import AnchorEncoder
            anchors = AnchorEncoder.from_file(siglip, dtype=dtype, device=device,
                                              num_attention_heads=siglip_num_heads)
        check_widths(model, text, anchors)
        return cls(model, vae_model, text, anchors, device=device, dtype=dtype, defaults=defaults)

    @classmethod
    def from_bundle(cls, folder, **overrides) -> "SamaPipeline":
        """A model bundle folder: bundle.json naming the DiT, VAE, text encoder (+ tokenizer, SigLIP) files
        relative to the folder, and default settings."""
        folder = Path(folder)
        manifest = folder / BUNDLE_FILE
        if not manifest.exists():
            raise SamaFileNotFoundError(f"{folder} is not a SAMA model bundle (no {BUNDLE_FILE}); pass --model "
                                        "a bundle folder or --model DIT --vae VAE --text-encoder TE")
        spec = read_bundle_spec(manifest)
        paths = {k: (str(folder / spec[k]) if spec.get(k) else None)
                 for k in ("dit", "vae", "text_encoder", "tokenizer", "siglip")}
        missing = [k for k in ("dit", "vae", "text_encoder") if not paths[k]]
        if missing:
            raise SamaInputError(f"{manifest} does not name: {', '.join(missing)}")
        kwargs = {**paths, "siglip_num_heads": spec.get("siglip_num_heads"), "defaults": spec.get("defaults", {}),
                  **{k: v for k, v in overrides.items() if v is not None}}
        return cls.from_paths(**kwargs)

    # ------------------------------------------------------------------ editing

    def sampler_options(self, **overrides) -> SamplerOptions:
        names = {f.name for f in dataclasses.fields(SamplerOptions)}
        values = {k: v for k, v in self.defaults.items() if k in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplerOptions(**values)

    def encode_text(self, instruction: str, settings: EditSettings):
        cond, uncond = self.text_encoder.encode_edit(instruction, negative=settings.negative,
                                                     prefix=settings.use_prefix)
        return cond.to(self.device, self.dtype), uncond.to(self.device, self.dtype)

    def encode_anchor(self, settings: EditSettings, size) -> Optional[torch.Tensor]:
        if not settings.anchor_image:
            return None
        if self.anchor_encoder is None:
            raise SamaInputError("an anchor image needs a SigLIP encoder: pass --siglip FILE (or put 'siglip' in "
                                 "the bundle)")
        image, _ = vio.read_image(settings.anchor_image)
        image, _ = vio.fit_frames(image, width=size[0], height=size[1], mode=settings.resize_mode)
        return self.anchor_encoder.encode(image).to(self.device, self.dtype)  # (1, 65, 1152)

    def edit_frames(self, frames: torch.Tensor, instruction: str, settings: Optional[EditSettings] = None,
                    options: Optional[SamplerOptions] = None, callback: Optional[Callable[[StepInfo], None]] = None,
                    should_interrupt: Optional[Callable[[], bool]] = None, mask: Optional[torch.Tensor] = None):
        """frames (F, H, W, 3) in [0, 1] -> (edited frames at the source size, the sampling result).
        mask: (H, W) or (F, H, W) in [0, 1] at the frames' size, 1 where the edit may change the video; outside
        it the output is the source (the sampler keeps those latents on the source's path, and the pixels
        there are the source's own)."""
        settings = settings or EditSettings()
        if settings.blank_frames is not None:
            frames = blank_frames(frames, *settings.blank_frames)
        if mask is not None:
            mask = check_pixel_mask(mask, *frames.shape[:3])
        # before the sampling, not after it; None: the bundle's default (SAMA-Shapes: on), 0: off
        keep_unchanged = check_keep_unchanged(settings.keep_unchanged if settings.keep_unchanged is not None
                                              else self.defaults.get("keep_unchanged", 0))
        result, count, plan = self.sample_edit(frames, instruction, settings, options, callback, should_interrupt,
                                               mask=mask)
        decoded = vio.vae_output_to_frames(self.vae.decode(result.latents))  # (F', H, W, 3)
        edited = vio.trim(decoded, count)
        reconstruction = None
        if keep_unchanged:
            # the source's own VAE round trip: what "unchanged" looks like after decoding (region.changed_weight)
            reconstruction = vio.trim(vio.vae_output_to_frames(self.vae.decode(result.source)), count)
        if settings.restore_size:
            source = frames
            edited = vio.restore(edited, plan, source=frames)
        else:
            source = vio.apply_resize(frames, plan)
            mask = None if mask is None else fit_mask(mask, plan)
        if reconstruction is not None:
            if settings.restore_size:  # the same resize as the edit's; outside a crop both are the source
                reconstruction = vio.restore(reconstruction, plan, source=frames)
            weight = changed_weight(edited, reconstruction, keep_unchanged)
            mask = weight if mask is None else mask * weight
        if mask is not None:
            edited = composite(edited, source, mask)
        return edited, result

    def sample_edit(self, frames: torch.Tensor, instruction: str, settings: Optional[EditSettings] = None,
                    options: Optional[SamplerOptions] = None, callback: Optional[Callable[[StepInfo], None]] = None,
                    should_interrupt: Optional[Callable[[], bool]] = None, mask: Optional[torch.Tensor] = None):
        """edit_frames up to the sampled latents, without decoding: frames (F, H, W, 3) in [0, 1] (already
        blanked) -> (the sampling result, its normalised latents (1, 16, T, h, w) in result.latents; the
        source frame count; the resize plan). train.sampled_latents keeps such latents to train a decoder.
        mask: (F, H, W) checked pixel mask (edit_frames) -> the sampler's edit region."""
        settings = settings or EditSettings()
        options = options or self.sampler_options()
        source_h, source_w = frames.shape[1:3]
        area = settings.target_area or self.defaults.get("target_area", vio.REFERENCE_BUCKET_AREA)
        width, height = vio.resolve_size(source_w, source_h, settings.width, settings.height, area)
        fitted, plan = vio.fit_frames(frames, width=width, height=height, mode=settings.resize_mode)
        padded, count = vio.pad_to_4k_plus_1(fitted)
        latent_frames = latent_frame_count(padded.shape[0])
        if options.window_latent_frames is None and latent_frames > AUTO_WINDOW_LATENT_FRAMES:
            options = dataclasses.replace(options, window_latent_frames=AUTO_WINDOW_LATENT_FRAMES)
            log.info("%d frames: editing in windows of %d frames", padded.shape[0], 4 * AUTO_WINDOW_LATENT_FRAMES - 3)

        source = self.vae.encode(vio.frames_to_vae_input(padded)).to(self.device, self.dtype)  # (1, 16, T, h, w)
        cond, uncond = self.encode_text(instruction, settings)
        anchor = self.encode_anchor(settings, (width, height))
        if anchor is not None and options.anchor_strength == 0:
            options = dataclasses.replace(options, anchor_strength=0.5)
        region = None
        if mask is not None:
            padded_mask, _ = vio.pad_to_4k_plus_1(fit_mask(mask, plan))
            region = latent_region(padded_mask, source.shape).to(self.device, self.dtype)
        # "auto" decided here, before the SigLIP encode that only FlowEdit needs (sample() leaves it as is)
        options = resolve_flowedit(options, source, tuple(source.shape), anchor)
        source_semantic = None
        if options.flowedit and self.anchor_encoder is not None and anchor is None:
            # FlowEdit in the joint space: the source sample's semantic half is its anchor frame's SigLIP tokens
            with torch.no_grad():
                source_semantic = self.anchor_encoder.encode(padded).to(self.device, self.dtype)
        with torch.no_grad():
            result: SampleResult = sample(self.dit, cond, uncond, source=source, options=options,
                                          anchor_tokens=anchor, callback=callback, should_interrupt=should_interrupt,
                                          region=region, source_semantic=source_semantic)
        result.source = source
        return result, count, plan

    def edit_file(self, video_path, instruction: str, out_path, settings: Optional[EditSettings] = None,
                  options: Optional[SamplerOptions] = None, compare: bool = False, callback=None,
                  should_interrupt=None) -> EditResult:
        settings = settings or EditSettings()
        frames, info = vio.read_media(video_path, frame_range=settings.frame_range, stride=settings.stride,
                                      max_frames=settings.max_frames)
        vio.check_output_path(out_path, frames.shape[0])  # before the sampling, not after it
        mask = read_mask(settings, *frames.shape[:3]) if settings.mask else None
        edited, _ = self.edit_frames(frames, instruction, settings, options, callback, should_interrupt, mask=mask)
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fps = info.fps or 16
        if out_path.suffix.lower() in vio.IMAGE_EXTENSIONS:
            _write_image(out_path, edited[0])
            written = out_path
        else:
            written = vio.write_video(out_path, edited, fps, audio_from=None if info.is_image else video_path,
                                      audio_start=info.start_time)
        comparison = None
        if compare:
            comparison = out_path.with_name(out_path.stem + "_compare" + (out_path.suffix or ".mp4"))
            side = vio.side_by_side(_same_size(frames, edited), edited, scale=_view_scale(edited))
            if comparison.suffix.lower() in vio.IMAGE_EXTENSIONS:
                _write_image(comparison, side[len(side) // 2])
            else:
                vio.write_video(comparison, side, fps)
        return EditResult(edited, fps, written, comparison)


def fit_mask(mask: torch.Tensor, plan: vio.ResizePlan) -> torch.Tensor:
    """A (F, H, W) pixel mask resized like the frames (letterbox bars: outside the region)."""
    return vio.apply_resize(mask[..., None].expand(*mask.shape, 3).contiguous(), plan)[..., 0].clamp(0, 1)


def read_mask(settings: EditSettings, frames: int, height: int, width: int) -> torch.Tensor:
    """settings.mask (an image for every frame, or a video read with the source's frame range and stride)
    -> (F, H, W) in [0, 1] at the source's size: the mean of the channels, so white = may change. A mask of
    the source's aspect ratio at another size is scaled to it (region.scale_mask)."""
    name = f"the mask {settings.mask}"
    if Path(settings.mask).suffix.lower() in vio.IMAGE_EXTENSIONS:
        image, _ = vio.read_image(settings.mask)
        return scale_mask(image.mean(-1), height, width, name)  # (1, H, W)
    video, _ = vio.read_video(settings.mask, frame_range=settings.frame_range, stride=settings.stride,
                              max_frames=settings.max_frames)
    if video.shape[0] != frames:
        raise SamaInputError(f"the mask video {settings.mask} has {video.shape[0]} frames where the source has "
                             f"{frames}: give a mask video of the source's length, or one mask image")
    return scale_mask(video.mean(-1), height, width, name)


def check_widths(dit, text_encoder, anchor_encoder):
    """The encoders must produce what the DiT was trained on; say which file does not fit."""
    cfg = dit.config
    if text_encoder.hidden_size != cfg.text_dim:
        raise SamaInputError(f"the text encoder gives {text_encoder.hidden_size}-wide embeddings but the DiT "
                             f"expects {cfg.text_dim} (UMT5-XXL: 4096): use the text encoder that belongs to "
                             "this DiT")
    if anchor_encoder is not None and anchor_encoder.width != cfg.siglip_dim:
        raise SamaInputError(f"the SigLIP encoder gives {anchor_encoder.width}-wide tokens but the DiT's "
                             f"semantic stream is {cfg.siglip_dim} wide (SAMA-14B: so400m, 1152)")


def _same_size(frames, like):
    if frames.shape[1:3] == like.shape[1:3]:
        return frames
    return vio.resize_frames(frames, like.shape[2], like.shape[1])


def _view_scale(frames) -> float:
    """Upscale small clips for viewing (the tiny demo model works at 64 px)."""
    side = max(frames.shape[1:3])
    return float(max(1, 512 // side)) if side < 256 else 1.0


def _write_image(path: Path, frame: torch.Tensor):
    from PIL import Image
    arr = (frame.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    Image.fromarray(arr).save(tmp)
    os.replace(tmp, path)
