"""FlowEdit sampling: edit by moving the source latents along the difference between the edit's velocity and
a reconstruction's, instead of generating the whole video again from noise.

FlowEdit (Kulikov et al., "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models",
arXiv 2412.08629) starts at the source latents x_src and, at every sigma of the schedule, draws fresh noise n:

    z_src = (1 - sigma) x_src + sigma n          the source on its own flow path
    z_tar = z + z_src - x_src                    the current edit, noised with the same n
    z    <- z + (sigma_next - sigma) (v_edit(z_tar) - v_rec(z_src))

Where the instruction does not apply, the two velocities agree and the video stays the source's, so the
model's own reconstruction errors (blur, drift of the objects the edit should leave alone) cancel instead of
being regenerated. Here v_edit is SAMA's guided edit (source in context, the instruction, CFG) and v_rec the
same model with the negative prompt: the source in context with no instruction.

The semantic stream (65 SigLIP-space tokens) moves with the video when the source's own tokens are given
(`source_semantic`: the SigLIP tokens of the source's anchor frame, the semantic half of the source sample):
the same rule in the joint space. Without them (no SigLIP encoder, e.g. in ComfyUI) it is sampled as in the
released loop, from noise with the edit's semantic velocity, and the reconstruction pass sees the same
tokens. On SAMA-Shapes the joint form kept the edit accuracy, the sampled one cost ~3 points (session 16).

`SamplerOptions.flowedit`: False (the released sampler, the default), True (FlowEdit; what it cannot combine
with is refused) or "auto" (FlowEdit where it combines with the other options, else the released sampler,
with a log line: what a bundle's defaults ask for, so that a user's --denoise or --fast still works).
SAMA-Shapes defaults to "auto" since session 17; measured in docs/sama_shapes.md (sessions 16-17).

Not in diffusers (only community pipelines for SD3 / FLUX, which cannot call an in-context video model),
hence this loop.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import torch

from .errors import SamaInputError, SamaInterrupted
from .scheduler import add_noise

log = logging.getLogger(__name__)

FLOWEDIT_SKIP = 2  # sigmas skipped at the start (FlowEdit's n_max = steps - skip): the first, noisiest ones


AUTO = "auto"  # SamplerOptions.flowedit: FlowEdit where it combines with the other options


def flowedit_clashes(opts, source, target_shape, anchor_tokens, negative: bool = True) -> dict[str, str]:
    """What keeps FlowEdit from running with these options: {name: the fix}, empty when nothing does.
    negative: whether a negative prompt is given (the reconstruction pass needs one)."""
    clashes = {}
    if source is None or tuple(source.shape) != tuple(target_shape):
        clashes["no source"] = ("FlowEdit edits a source video: give a source of the target's shape (or turn "
                                "flowedit off to generate)")
    if not negative:
        clashes["no negative prompt"] = ("FlowEdit reconstructs the source with the negative prompt: pass one "
                                         "(uncond)")
    if opts.window_latent_frames and target_shape[2] > opts.window_latent_frames:
        frames = 4 * (opts.window_latent_frames - 1) + 1
        clashes["temporal windows"] = (
            f"FlowEdit edits the whole clip at once, without temporal windows: this one needs them (over {frames} "
            f"frames); edit at most {frames} frames at a time (--frames / --max-frames, or trim the clip) or turn "
            "flowedit off")
    if not 0 <= opts.flowedit_skip < opts.steps:
        clashes["steps"] = (f"flowedit_skip must be in [0, steps), got {opts.flowedit_skip} for {opts.steps} steps "
                            f"(default {FLOWEDIT_SKIP}): give more steps or skip fewer")
    used = [name for name, on in {"solver": opts.solver != "euler", "denoise": opts.denoise < 1.0,
                                  "anchors": anchor_tokens is not None and opts.anchor_strength > 0,
                                  "step caching": opts.cache_threshold > 0}.items() if on]
    for name in used:
        clashes[name] = (f"FlowEdit works with the euler solver, denoise 1, no anchors and no step caching; turn "
                         f"off {', '.join(used)} or turn flowedit off (flowedit_skip plays the part of denoise)")
    return clashes


def check_flowedit_options(opts, source, target_shape, anchor_tokens, negative: bool = True) -> None:
    """Refuse what FlowEdit cannot combine with, naming the fix."""
    clashes = flowedit_clashes(opts, source, target_shape, anchor_tokens, negative)
    if clashes:
        raise SamaInputError(next(iter(clashes.values())))


def resolve_flowedit(opts, source, target_shape, anchor_tokens, negative: bool = True):
    """Options with flowedit "auto" -> the same with True where FlowEdit combines with the rest, else False
    (logged, naming what turned it off); other options unchanged."""
    if opts.flowedit != AUTO:
        return opts
    clashes = flowedit_clashes(opts, source, target_shape, anchor_tokens, negative)
    if clashes:
        log.info("FlowEdit (flowedit 'auto') is off for this edit: it does not combine with %s", ", ".join(clashes))
    return dataclasses.replace(opts, flowedit=not clashes)


def flowedit_loop(edit_velocity: Callable, reconstruction_velocity: Callable, source: torch.Tensor,
                  sigmas: torch.Tensor, semantic_shape, opts, keep_region: Optional[Callable] = None,
                  callback: Optional[Callable] = None, should_interrupt: Optional[Callable[[], bool]] = None,
                  source_semantic: Optional[torch.Tensor] = None):
    """The FlowEdit integration (module docstring). edit_velocity / reconstruction_velocity: the sampler's
    denoise closures (x, semantic, sigma) -> (v_video, v_semantic). source: (B, 16, F, H, W) normalised clean
    latents. sigmas: (steps + 1,). keep_region(z) -> z puts the source back outside an edit region.
    source_semantic: (B, 65, width) clean SigLIP tokens of the source (joint form), or None (sampled stream).
    Noise: one CPU generator; the sampled stream's start first, then per step the video, then (joint) the
    semantic draw. Returns (edited latents, semantic tokens or None)."""
    from .sampler import StepInfo, check_velocity  # sampler imports this module

    generator = torch.Generator("cpu").manual_seed(int(opts.seed))

    def draw(shape):  # one CPU generator: the same numbers on every device
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(source.device, source.dtype)

    z = source.clone()
    start = opts.flowedit_skip
    joint = source_semantic is not None and semantic_shape is not None
    if joint:
        sem = source_semantic.clone()
    else:  # the sampled stream starts from noise at the first used sigma, as the released loop at sigma 1
        sem = draw(semantic_shape) * sigmas[start] if semantic_shape else None
    for i in range(start, opts.steps):
        if should_interrupt is not None and should_interrupt():
            raise SamaInterrupted(f"sampling interrupted at step {i}/{opts.steps}; nothing was written")
        sigma, step = sigmas[i], sigmas[i + 1] - sigmas[i]
        z_source = add_noise(source, draw(source.shape), sigma)
        if joint:
            sem_source = add_noise(source_semantic, draw(source_semantic.shape), sigma)
            v_edit, v_sem = edit_velocity(z + z_source - source, sem + sem_source - source_semantic, sigma)
            v_rec, v_sem_rec = reconstruction_velocity(z_source, sem_source, sigma)
            v_sem = v_sem - v_sem_rec
        else:
            v_edit, v_sem = edit_velocity(z + z_source - source, sem, sigma)
            v_rec, _ = reconstruction_velocity(z_source, sem, sigma)
        check_velocity(v_edit, i, opts.steps, sigma)
        check_velocity(v_rec, i, opts.steps, sigma)
        z = z + step * (v_edit - v_rec)
        if keep_region is not None:
            z = keep_region(z)
        if sem is not None:
            sem = sem + step * v_sem
        if callback is not None:  # z is a clean estimate at every step: it is also the preview
            callback(StepInfo(i, opts.steps, float(sigma), z, z, sem))
    return z, sem


def reconstruction_options(opts):
    """The reconstruction pass: one unguided call with the negative prompt (no CFG, no two-scale)."""
    return dataclasses.replace(opts, guidance=1.0, source_guidance=None, text_guidance=None, batch_cfg=False)
