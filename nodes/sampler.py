"""SAMA sampling nodes.

- SAMA Sampler: the exact reference loop of sama_core (CFG forms, anchors, long-video windows), with
  ComfyUI's progress bar, latent previews and interrupt button.
- SAMA In-Context + SAMA Extract Latent: put the source and the semantic tokens into the conditioning
  and the latent, so any native sampler (KSampler, SamplerCustomAdvanced, ...) edits with SAMA.
"""

import logging

import torch

import comfy.latent_formats
import comfy.model_management
import comfy.utils
import latent_preview
import node_helpers
from comfy_api.latest import io

from ..sama_core.anchors import SIGLIP_WIDTH
from ..sama_core.errors import SamaInputError
from ..sama_core.region import check_pixel_mask, latent_region, resize_mask
from ..sama_core.sampler import NUM_SEMANTIC_TOKENS, SamplerOptions, sample
from ..sama_core.scheduler import anchor_sigma_cut, flow_sigmas
from ..sama_core.video import next_4k_plus_1, pad_to_4k_plus_1
from .comfy_model import SAMA_SHIFT, DirectSama, compute_dtype, sama_diffusion_model
from .packing import pack

log = logging.getLogger(__name__)

CATEGORY = "SAMA"
Anchors = io.Custom("SAMA_ANCHORS")
SAMA_VIDEO_FRAMES = "sama_video_frames"  # LATENT key: how many leading frames are video


def _source_inputs():
    return [
        io.Image.Input("source_images", optional=True,
                       tooltip="The video to edit (frames 4k+1: 1, 5, 9, ..., 81; sides multiples of 16). "
                               "Needs 'vae'. A single image is edited as a 1-frame video."),
        io.Vae.Input("vae", optional=True, tooltip="Wan2.1 VAE, to encode source_images."),
        io.Latent.Input("source_latent", optional=True,
                        tooltip="Or the source already encoded with the Wan2.1 VAE (takes precedence)."),
    ]


def _anchor_inputs():
    return [
        Anchors.Input("anchors", optional=True, tooltip="Semantic anchors of an edited frame (SAMA Anchor Encode)."),
        io.Float.Input("anchor_strength", default=0.5, min=0.0, max=1.0, step=0.05, optional=True,
                       tooltip="Fraction of the steps during which the anchors replace the semantic stream "
                               "(0 = plain SAMA)."),
    ]


def encode_source(source_images=None, vae=None, source_latent=None) -> torch.Tensor:
    """The source as raw (un-normalised) Wan latents (1, 16, F, H/8, W/8), validated with clear errors."""
    if source_latent is not None:
        samples = source_latent["samples"]
        if samples.ndim != 5 or samples.shape[1] != 16:
            raise SamaInputError(f"source_latent must be a Wan2.1 video latent (B, 16, F, H, W), got "
                                 f"{tuple(samples.shape)}; encode the video with the Wan2.1 VAE")
        return samples[:, :, :source_latent.get(SAMA_VIDEO_FRAMES, samples.shape[2])]
    if source_images is None:
        raise SamaInputError("no source: connect 'source_images' (with a 'vae') or 'source_latent'")
    if vae is None:
        raise SamaInputError("'source_images' needs a 'vae' (Wan2.1 VAE) to be encoded")
    frames, height, width = source_images.shape[0], source_images.shape[1], source_images.shape[2]
    if (frames - 1) % 4:
        lower = (frames - 1) // 4 * 4 + 1
        raise SamaInputError(f"the source has {frames} frames; SAMA needs 4k+1 frames (e.g. {lower} or "
                             f"{lower + 4}): insert 'SAMA Frames To 4k+1' before this node")
    if height % 16 or width % 16:
        raise SamaInputError(f"the source is {width}x{height}; both sides must be multiples of 16 (e.g. "
                             f"{width // 16 * 16}x{height // 16 * 16}): resize it first")
    return vae.encode(source_images[:, :, :, :3])


def _text(conditioning, name):
    if not conditioning:
        raise SamaInputError(f"'{name}' conditioning is empty: connect SAMA Text Encode")
    return conditioning[0][0]


def _anchor_tokens(anchors, batch):
    if anchors is None:
        return None
    return anchors["tokens"].expand(batch, -1, -1)


class SamaSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamaSampler", display_name="SAMA Sampler (in-context V2V)", category=CATEGORY,
            description=(
                "Edits a video with SAMA exactly as the released inference does by default: 50 Euler steps "
                "on flow-matching sigmas with shift 5, guidance 5, the source seen by both CFG passes and 65 "
                "semantic tokens denoised jointly. Options: two-scale guidance (source / text), an edited "
                "anchor frame (SAMA Anchor Encode) steering the semantics, denoise < 1 (start from the noised "
                "source) and temporal windows for long videos. Output: a LATENT for VAE Decode."),
            inputs=[
                io.Model.Input("model", tooltip="From Load SAMA Model."),
                io.Conditioning.Input("positive", tooltip="From SAMA Text Encode."),
                io.Conditioning.Input("negative", tooltip="From SAMA Text Encode."),
                *_source_inputs(),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Same seed, same edit (noise is drawn on the CPU, video then semantics)."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Euler steps (reference: 50)."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Guidance scale (reference: 5.0). 1.0 = no guidance (half the time)."),
                io.Float.Input("shift", default=SAMA_SHIFT, min=0.1, max=20.0, step=0.1,
                               tooltip="Flow-matching sigma shift (reference: 5.0)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="1.0 = full edit from noise; lower keeps more of the source."),
                io.Float.Input("source_scale", default=0.0, min=0.0, max=30.0, step=0.1, optional=True,
                               tooltip="Two-scale CFG: with source_scale or text_scale > 0, pred = c + "
                                       "source_scale*(c - no_source) + text_scale*(c - negative); cfg unused."),
                io.Float.Input("text_scale", default=0.0, min=0.0, max=30.0, step=0.1, optional=True,
                               tooltip="Two-scale CFG text scale (see source_scale)."),
                *_anchor_inputs(),
                io.Int.Input("window_frames", default=0, min=0, max=4097, optional=True,
                             tooltip="Long videos: edit in overlapping windows of this many frames (4k+1; "
                                     "0 = one window for the whole video)."),
                io.Int.Input("window_overlap_frames", default=16, min=4, max=1024, optional=True,
                             tooltip="Frames shared by neighbouring windows, blended linearly."),
                io.Boolean.Input("batch_cfg", default=False, optional=True,
                                 tooltip="Run the CFG passes as one batch (faster on big GPUs, more memory)."),
                io.Combo.Input("solver", options=["euler", "unipc"], default="euler", optional=True,
                               tooltip="euler = the released sampler (exact). unipc = good results in 20-30 steps "
                                       "(approximate)."),
                io.Float.Input("cache_threshold", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Step caching: reuse the model's last result while the input barely "
                                       "changes (0 = off; 0.05 mild, 0.15 aggressive; approximate)."),
                io.Boolean.Input("flowedit", default=False, optional=True,
                                 tooltip="FlowEdit: start from the source and apply only what the instruction "
                                         "changes (the edit's velocity minus the negative prompt's "
                                         "reconstruction), so the rest stays closer to the source. Two model "
                                         "passes per step more; euler only, no anchors, windows or caching."),
                io.Int.Input("flowedit_skip", default=2, min=0, max=1000, optional=True,
                             tooltip="FlowEdit: the first, noisiest steps skipped; more keeps more of the source "
                                     "(and edits less)."),
                Anchors.Input("flowedit_source_anchors", optional=True,
                              tooltip="FlowEdit: SAMA Anchor Encode of the SOURCE video (its first frame). The "
                                      "semantic tokens then follow FlowEdit too, as in the headless pipeline; "
                                      "without them they are sampled from noise."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where the edit may change the video (1 = white): one mask for every frame "
                                      "or one per frame (of the clip before or after SAMA Frames To 4k+1; another "
                                      "size is stretched to the frames'). Outside it the latent stays the "
                                      "source's; for the source's exact pixels there, put ImageCompositeMasked "
                                      "(destination = source, source = decoded edit, this mask) after VAE "
                                      "Decode."),
            ],
            outputs=[io.Latent.Output(tooltip="The edited video's latent: connect VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, seed, steps, cfg, shift, denoise, source_images=None, vae=None,
                source_latent=None, source_scale=0.0, text_scale=0.0, anchors=None, anchor_strength=0.5,
                window_frames=0, window_overlap_frames=16, batch_cfg=False, solver="euler",
                cache_threshold=0.0, flowedit=False, flowedit_skip=2, flowedit_source_anchors=None,
                mask=None) -> io.NodeOutput:
        dit = sama_diffusion_model(model)
        raw_source = encode_source(source_images, vae, source_latent)
        two_scale = (source_scale or 0) > 0 or (text_scale or 0) > 0
        opts = SamplerOptions(
            steps=steps, guidance=cfg, shift=shift, seed=seed, denoise=denoise,
            source_guidance=source_scale if two_scale else None, text_guidance=text_scale if two_scale else None,
            batch_cfg=batch_cfg, solver=solver, cache_threshold=cache_threshold,
            anchor_strength=anchor_strength if anchors is not None else 0.0,
            window_latent_frames=(window_frames - 1) // 4 + 1 if window_frames else None,
            window_overlap=max(1, window_overlap_frames // 4), flowedit=bool(flowedit), flowedit_skip=flowedit_skip)

        comfy.model_management.load_models_gpu([model])
        device, dtype = model.load_device, compute_dtype(model)
        base = model.model
        source = base.process_latent_in(raw_source).to(device, dtype)
        cond = _text(positive, "positive").to(device, dtype)
        uncond = _text(negative, "negative").to(device, dtype)
        anchor_tokens = _anchor_tokens(anchors, source.shape[0])
        if anchor_tokens is not None:
            anchor_tokens = anchor_tokens.to(device, dtype)
        region = None if mask is None else _edit_region(mask, raw_source.shape).to(device, dtype)
        source_semantic = None
        if flowedit and flowedit_source_anchors is not None:
            source_semantic = _anchor_tokens(flowedit_source_anchors, source.shape[0]).to(device, dtype)

        previewer = latent_preview.get_previewer(device, base.latent_format)
        pbar = comfy.utils.ProgressBar(steps)

        def on_step(info):
            preview = previewer.decode_latent_to_preview_image("JPEG", info.denoised) if previewer else None
            pbar.update_absolute(info.step + 1, steps, preview)

        def interrupted():
            comfy.model_management.throw_exception_if_processing_interrupted()  # ComfyUI's own interrupt
            return False

        with torch.inference_mode():
            result = sample(DirectSama(dit), cond, uncond, source=source, options=opts,
                            anchor_tokens=anchor_tokens, callback=on_step, should_interrupt=interrupted,
                            region=region, source_semantic=source_semantic)
        samples = base.process_latent_out(result.latents.float()).cpu()
        return io.NodeOutput({"samples": samples})


def _edit_region(mask: torch.Tensor, latent_shape) -> torch.Tensor:
    """A ComfyUI MASK ((H, W) or (frames, H, W), 1 = may change) -> the sampler's region on the latent grid.
    A mask of another size is stretched to the frames' size first, as ComfyUI's own mask consumers do
    (Image Composite Masked, a latent's noise_mask): a mask painted on the full-size video keeps working
    after the frames are scaled for the model. Per-frame masks of the video before padding to 4k+1 are
    padded the same way (the last mask repeated)."""
    t, h, w = latent_shape[2:]
    mask = mask.float().cpu()
    if mask.ndim in (2, 3) and tuple(mask.shape[-2:]) != (8 * h, 8 * w):
        log.info("SAMA: mask %dx%d stretched to the video's %dx%d", mask.shape[-1], mask.shape[-2], 8 * w, 8 * h)
        mask = resize_mask(mask, 8 * h, 8 * w)
    frames = 4 * (t - 1) + 1
    if mask.ndim == 3 and 1 < mask.shape[0] < frames and next_4k_plus_1(mask.shape[0]) == frames:
        mask, _ = pad_to_4k_plus_1(mask)  # one mask per frame of the video before SAMA Frames To 4k+1 padded it
    pixels = check_pixel_mask(mask, frames, 8 * h, 8 * w, name="mask")
    return latent_region(pixels, latent_shape)


class SamaInContext(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamaInContext", display_name="SAMA In-Context (for native samplers)", category=CATEGORY,
            description=(
                "Prepares a SAMA edit for ANY native sampler (KSampler, SamplerCustomAdvanced, ...): adds the "
                "source video to both conditionings and returns a latent that carries the 65 semantic tokens "
                "as extra frames, denoised by the sampler like the video. Use the SAMA model with shift 5 "
                "(the loader's default), then 'SAMA Extract Latent' before VAE Decode. KSampler with euler / "
                "simple, 50 steps, cfg 5 reproduces SAMA Sampler up to float rounding (the noise layout "
                "differs, so the same seed gives a different sample)."),
            inputs=[
                io.Conditioning.Input("positive", tooltip="From SAMA Text Encode."),
                io.Conditioning.Input("negative", tooltip="From SAMA Text Encode."),
                *_source_inputs(),
                *_anchor_inputs(),
                io.Model.Input("model", optional=True,
                               tooltip="The SAMA model: sizes the semantic stream for models other than SAMA-14B "
                                       "(whose width, 1152, is the default)."),
                io.Float.Input("shift", default=SAMA_SHIFT, min=0.1, max=20.0, step=0.1, optional=True,
                               tooltip="The sampling shift in use (to place anchor_strength on the schedule)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where the edit may change the video (1 = white), as on SAMA Sampler: set "
                                      "as the latent's noise_mask, so the native sampler keeps the source "
                                      "latent outside it."),
            ],
            outputs=[io.Conditioning.Output("positive_out", display_name="positive",
                                            tooltip="positive with the source (and anchors) added"),
                     io.Conditioning.Output("negative_out", display_name="negative",
                                            tooltip="negative with the source (and anchors) added"),
                     io.Latent.Output("latent", display_name="latent",
                                      tooltip="Video + packed semantic frames: sample it, then Extract.")],
        )

    @classmethod
    def execute(cls, positive, negative, source_images=None, vae=None, source_latent=None, anchors=None,
                anchor_strength=0.5, model=None, shift=SAMA_SHIFT, mask=None) -> io.NodeOutput:
        source = encode_source(source_images, vae, source_latent).float().cpu()
        tokens = _anchor_tokens(anchors, source.shape[0])
        num_tokens = tokens.shape[1] if tokens is not None else NUM_SEMANTIC_TOKENS
        width = sama_diffusion_model(model).config.siglip_dim if model is not None else SIGLIP_WIDTH
        if tokens is not None and tokens.shape[2] != width:
            raise SamaInputError(f"the anchors are {tokens.shape[2]} wide but the model's semantic stream is {width}: "
                                 "encode them with the SigLIP encoder that belongs to this model")
        # Pad entries hold the Wan latent mean, which the model's latent normalisation maps to exactly 0.
        mean = comfy.latent_formats.Wan21().latents_mean.reshape(-1)
        latent = pack(source, torch.zeros(source.shape[0], num_tokens, width), fill=mean)
        values = {"sama_source": source, "sama_layout": (source.shape[2], num_tokens)}
        if tokens is not None:
            values.update(sama_anchor=tokens.float().cpu(), sama_anchor_sigma=anchor_sigma_cut(anchor_strength, shift))
        positive = node_helpers.conditioning_set_values(positive, values)
        negative = node_helpers.conditioning_set_values(negative, values)
        out = {"samples": latent, SAMA_VIDEO_FRAMES: source.shape[2]}
        if mask is not None:
            # ComfyUI's samplers keep noise_mask == 0 on the latent's own flow path (its video part is the
            # source), the same rule as SAMA Sampler's region; the semantic frames stay free.
            noise_mask = torch.ones(latent.shape[0], 1, *latent.shape[2:])
            noise_mask[:, :, :source.shape[2]] = _edit_region(mask, source.shape)
            out["noise_mask"] = noise_mask
        return io.NodeOutput(positive, negative, out)


class SamaExtractLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamaExtractLatent", display_name="SAMA Extract Latent", category=CATEGORY,
            description="Drops the packed semantic frames that SAMA In-Context added, leaving the video latent "
                        "for VAE Decode. A latent without them passes through unchanged.",
            inputs=[io.Latent.Input("latent", tooltip="The sampler's output.")],
            outputs=[io.Latent.Output(tooltip="The video latent only.")],
        )

    @classmethod
    def execute(cls, latent) -> io.NodeOutput:
        frames = latent.get(SAMA_VIDEO_FRAMES)
        out = {k: v for k, v in latent.items() if k not in (SAMA_VIDEO_FRAMES, "noise_mask")}
        if frames is not None:
            out["samples"] = latent["samples"][:, :, :frames]
        return io.NodeOutput(out)


class SamaSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamaSigmas", display_name="SAMA Sigmas", category=CATEGORY,
            description="SAMA's exact flow-matching sigmas (linspace(denoise, 0) shifted, last = 0) for "
                        "SamplerCustomAdvanced. KSampler's 'simple' scheduler equals them only when steps "
                        "divides 1000 (e.g. 50); this node is exact for any step count.",
            inputs=[io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Number of steps."),
                    io.Float.Input("shift", default=SAMA_SHIFT, min=0.1, max=20.0, step=0.1,
                                   tooltip="Sigma shift (SAMA: 5.0)."),
                    io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                                   tooltip="Start sigma (1.0 = from pure noise).")],
            outputs=[io.Sigmas.Output(tooltip="steps + 1 sigmas, ending at 0.")],
        )

    @classmethod
    def execute(cls, steps, shift, denoise) -> io.NodeOutput:
        return io.NodeOutput(flow_sigmas(steps, shift, denoise))


NODES = [SamaSampler, SamaInContext, SamaExtractLatent, SamaSigmas]
