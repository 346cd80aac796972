"""The SAMA sampling loop: video latents and semantic tokens denoised jointly (SAMA_REFERENCE.md section 4).

Default = the released inference: 50 Euler steps on shifted flow-matching sigmas (shift 5), guidance
5.0 with the uncond pass also seeing the source, 65 semantic tokens started from Gaussian noise in
SigLIP space and stepped with the guided semantic velocity. Where the released code is broken we do
better on purpose (section 8): the semantic start noise comes from the user's seed (draw order: video
noise, then semantic noise, both from one CPU generator), and the two-scale CFG works.

Seams for speed work: `solver` picks the update rule from scheduler.SOLVERS, and every model call goes
through one `denoise(x, semantic, sigma)` closure that step caches can wrap.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Optional

import torch

from .errors import SamaInputError, SamaInterrupted, SamaNumericalError
from .flowedit import AUTO, FLOWEDIT_SKIP, resolve_flowedit
from .model import TEXT_LEN, fit_text_rows
from .region import check_region, keep_outside
from .scheduler import add_noise, flow_sigmas, make_solver, predicted_clean, timesteps_of

log = logging.getLogger(__name__)

NUM_SEMANTIC_TOKENS = 65
# The "fast" preset (approximate): UniPC at 20 steps, step caching and batched CFG.
FAST_PRESET = {"steps": 20, "solver": "unipc", "cache_threshold": 0.05, "batch_cfg": True}


@dataclasses.dataclass
class SamplerOptions:
    steps: int = 50
    guidance: float = 5.0
    shift: float = 5.0
    seed: int = 0
    denoise: float = 1.0                       # < 1: start from the source noised to sigma = denoise
    # Two-scale CFG: pred = c_IT + s_I (c_IT - c_0T) + s_T (c_IT - c_I0); used when both are set.
    source_guidance: Optional[float] = None    # s_I
    text_guidance: Optional[float] = None      # s_T
    batch_cfg: bool = False                    # run the CFG passes as one batch (faster on GPUs, more memory)
    num_semantic_tokens: int = NUM_SEMANTIC_TOKENS
    anchor_strength: float = 0.0               # fraction of the steps that inject the anchor tokens
    solver: str = "euler"
    # Long videos: temporal windows in LATENT frames, used when the video is longer than one window
    # (None = never). Every window sees the same noise, prompt and the one shared semantic stream.
    window_latent_frames: Optional[int] = None
    window_overlap: int = 4
    # Step caching (approximate, opt-in): reuse the model's last transformation while the estimated
    # accumulated output change stays under this (0 = off; ~0.05-0.2 trades quality for speed).
    cache_threshold: float = 0.0
    cache_warmup: int = 2
    # FlowEdit (sama_core/flowedit.py): start from the source and integrate only the difference between the
    # edit's velocity and the negative prompt's reconstruction; skip the first sigmas. True, False, or "auto"
    # (FlowEdit where it combines with the other options: a bundle's default).
    flowedit: bool | str = False
    flowedit_skip: int = FLOWEDIT_SKIP

    def __post_init__(self):
        if self.flowedit not in (True, False, AUTO):
            raise SamaInputError(f"flowedit must be true, false or {AUTO!r}, got {self.flowedit!r}")
        # values no sampler path can use, refused here rather than as NaN latents (a NaN guidance) or a silent
        # fallback (a negative FlowEdit skip); steps, shift and denoise are checked with the sigmas (scheduler.py)
        for name in ("guidance", "source_guidance", "text_guidance"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise SamaInputError(f"{name} must be a finite number, got {value} (SAMA uses guidance 5.0)")
        if self.flowedit_skip < 0:
            raise SamaInputError(f"flowedit_skip must be 0 or more (sigmas skipped at the start), got "
                                 f"{self.flowedit_skip}; the default is {FLOWEDIT_SKIP}")
        if not 0 <= self.anchor_strength <= 1:  # also refuses NaN
            raise SamaInputError(f"anchor_strength must lie in [0, 1] (the fraction of the steps the anchor "
                                 f"steers), got {self.anchor_strength}")
        if not self.cache_threshold >= 0:
            raise SamaInputError(f"the step-cache threshold must be 0 (off) or more, got {self.cache_threshold}; "
                                 "~0.05-0.2 trades quality for speed")

    @classmethod
    def fast(cls, **overrides) -> "SamplerOptions":
        """The "fast" preset: UniPC at 20 steps, step caching (threshold 0.05) and batched CFG. Approximate;
        bench/sampling.py measures its speed-up and PSNR against the exact 50-step path."""
        return cls(**{**FAST_PRESET, **overrides})

    @property
    def two_scale(self) -> bool:
        return self.source_guidance is not None and self.text_guidance is not None


@dataclasses.dataclass
class StepInfo:
    """What a per-step callback sees (progress and previews). Tensors are the live ones: don't modify."""
    step: int                  # 0-based index of the step just finished
    total: int
    sigma: float
    latents: torch.Tensor      # (B, 16, F, H, W) after the step
    denoised: torch.Tensor     # (B, 16, F, H, W) predicted clean latents at this step (for previews; the
                               # source outside an edit region)
    semantic: Optional[torch.Tensor]


@dataclasses.dataclass
class SampleResult:
    latents: torch.Tensor                  # (B, 16, F, H, W) normalised clean latents
    semantic: Optional[torch.Tensor]       # (B, N, siglip_dim) final semantic tokens
    stats: dict = dataclasses.field(default_factory=dict)  # e.g. model calls, steps served by the cache
    source: Optional[torch.Tensor] = None  # (B, 16, F, H, W) the source latents (set by the pipeline)


def check_finite(**tensors):
    """NaN/inf in an input poisons every step: refuse it up front, naming the input."""
    for name, t in tensors.items():
        if t is not None and not torch.isfinite(t).all():
            raise SamaInputError(f"{name} contains NaN or infinite values: check the file or node that produced it")


def initial_noise(shape, semantic_shape, seed: int, dtype=torch.float32):
    """Video noise, then semantic noise, from one CPU generator: identical on every device."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    video = torch.randn(shape, generator=g, dtype=torch.float32)
    semantic = torch.randn(semantic_shape, generator=g, dtype=torch.float32) if semantic_shape else None
    return video.to(dtype), (semantic.to(dtype) if semantic is not None else None)


def combine_cfg(preds: dict, opts: SamplerOptions):
    """CFG over the named passes: 'cond' (source + text), 'uncond' (source + negative text),
    'no_source' (text, no source; two-scale only). Applied to video and semantic alike."""
    def mix(c, u, n):
        if c is None:
            return None
        if opts.two_scale:
            return c + opts.source_guidance * (c - n) + opts.text_guidance * (c - u)
        if u is None:
            return c
        return u + opts.guidance * (c - u)
    video = mix(preds["cond"][0], preds.get("uncond", (None, None))[0], preds.get("no_source", (None, None))[0])
    sem = mix(preds["cond"][1], preds.get("uncond", (None, None))[1], preds.get("no_source", (None, None))[1])
    return video, sem


def _pass_plan(opts: SamplerOptions) -> list[str]:
    if opts.two_scale:
        return ["cond", "uncond", "no_source"]
    return ["cond"] if opts.guidance == 1.0 else ["cond", "uncond"]


def make_denoiser(model, source, cond, uncond, opts: SamplerOptions):
    """One closure (x, semantic, sigma) -> guided (v_video, v_semantic): the single place the DiT runs."""
    plan = _pass_plan(opts)
    contexts = {"cond": cond, "uncond": uncond, "no_source": cond}
    if "uncond" in plan and uncond is None:
        raise SamaInputError("guidance needs a negative (uncond) text embedding; pass one or set guidance 1.0")
    sources = {"cond": source, "uncond": source, "no_source": None}

    def run_separately(x, sem, t):
        return {name: tuple(model(x, t, contexts[name], source=sources[name], semantic_tokens=sem))
                for name in plan}

    def run_batched(x, sem, t):
        # Passes that share the source layout go in one batch; the no-source pass runs alone.
        out = {}
        with_source = [n for n in plan if sources[n] is not None]
        n = len(with_source)
        b = x.shape[0]
        ctx = torch.cat([fit_text_rows(contexts[name], TEXT_LEN) for name in with_source])
        src = torch.cat([source] * n)
        res = model(torch.cat([x] * n), t.repeat(n), ctx, source=src,
                    semantic_tokens=None if sem is None else torch.cat([sem] * n))
        for i, name in enumerate(with_source):
            out[name] = (res.video[i * b:(i + 1) * b], None if res.semantic is None else res.semantic[i * b:(i + 1) * b])
        if "no_source" in plan:
            out["no_source"] = tuple(model(x, t, cond, source=None, semantic_tokens=sem))
        return out

    run = run_batched if (opts.batch_cfg and source is not None and len(plan) > 1) else run_separately

    def denoise(x, sem, sigma):
        t = timesteps_of(torch.as_tensor(sigma, dtype=torch.float32)).reshape(1).expand(x.shape[0])  # (B,)
        return combine_cfg(run(x, sem, t.to(x.device)), opts)
    return denoise


def check_velocity(v: torch.Tensor, step: int, steps: int, sigma) -> None:
    """A NaN/inf velocity at step `step` (0-based) is an error that says what to do, not a black video."""
    if not torch.isfinite(v).all():
        raise SamaNumericalError(
            f"the model produced NaN/inf at step {step + 1}/{steps} (sigma {float(sigma):.3f}): fp16 can "
            "overflow in this model, use bf16 or fp32; otherwise the weights may be damaged")


def anchor_velocity(sem: torch.Tensor, anchor: torch.Tensor, sigma) -> torch.Tensor:
    """The velocity that keeps the semantic stream on the anchor's flow path: with it the model's
    clean estimate is the anchor, and an Euler step from (1-s) a + s e lands on (1-s') a + s' e.
    Used for the injected steps here and by the ComfyUI model wrapper (where the sampler owns the state)."""
    return (sem - anchor) / sigma


def make_windowed_denoiser(model, source, cond, uncond, opts: SamplerOptions, num_frames: int):
    """Long videos: each step runs the guided model on overlapping temporal windows of the latents
    (each with its own slice of the source) and blends the video velocities with weights that sum
    to one at every frame; the semantic stream is shared, its velocity averaged over the windows.
    Blending velocities every step (rather than whole edited windows at the end) keeps one latent
    video, so the overlaps agree and the edit stays consistent across windows."""
    from .windows import WindowBlender, plan_windows
    plan = plan_windows(num_frames, opts.window_latent_frames, opts.window_overlap)
    per_window = [make_denoiser(model, None if source is None else source[:, :, w.start:w.end], cond, uncond, opts)
                  for w in plan.windows]
    log.info("long video: %d latent frames in %d windows of %d", num_frames, len(plan), plan.window)

    def denoise(x, sem, sigma):
        blender, sem_v = WindowBlender(plan, dim=2), None
        for i, (w, run) in enumerate(zip(plan.windows, per_window)):
            v, v_sem = run(x[:, :, w.start:w.end], sem, sigma)
            blender.add(i, v)
            if v_sem is not None:
                sem_v = v_sem / len(plan) if sem_v is None else sem_v + v_sem / len(plan)
        return blender.result(), sem_v
    return denoise


@torch.no_grad()
def sample(model, cond: torch.Tensor, uncond: Optional[torch.Tensor] = None, *,
           source: Optional[torch.Tensor] = None, target_shape=None,
           options: Optional[SamplerOptions] = None, anchor_tokens: Optional[torch.Tensor] = None,
           callback: Optional[Callable[[StepInfo], None]] = None,
           should_interrupt: Optional[Callable[[], bool]] = None,
           denoiser_wrapper: Optional[Callable] = None, region: Optional[torch.Tensor] = None,
           source_semantic: Optional[torch.Tensor] = None) -> SampleResult:
    """Edit (or generate) latents.

    cond / uncond: (B, L, text_dim) text embeddings (L <= 512 rows; the DiT pads to 512).
    source: (B, 16, F, H, W) NORMALISED clean source latents; None = plain T2V generation.
    target_shape: the latent shape to generate (default: the source's).
    anchor_tokens: (B, 65*N, siglip_dim) clean SigLIP tokens of an edited anchor frame: for the first
        `anchor_strength` fraction of the steps the semantic stream is replaced by the anchor noised to the
        current sigma (with the run's own semantic noise) and moved along the anchor's flow path; the
        video latents meanwhile see the anchor's semantics. Afterwards the model's own semantic velocity
        takes over from the anchor path.
    callback(StepInfo) after each step; should_interrupt() before each step -> SamaInterrupted.
    denoiser_wrapper(denoise) -> denoise: a seam for step caches and long-video windows.
    region: (1 or B, 1, F, H, W) in [0, 1] on the latent grid (sama_core.region.latent_region): where the
        edit may change the video. After every step the latents outside it are put back on the source's
        flow path with the run's own noise, so they end exactly at the source latents.
    source_semantic: (B, 65, siglip_dim) clean SigLIP tokens of the source's anchor frame; with
        options.flowedit the semantic stream then follows FlowEdit's rule too (sama_core/flowedit.py).
    """
    opts = options or SamplerOptions()
    check_finite(source_latents=source, text_embedding=cond, negative_text_embedding=uncond,
                 anchor_tokens=anchor_tokens)
    model_has_sama = getattr(model, "config", None) is None or model.config.has_sama
    if target_shape is None:
        if source is None:
            raise SamaInputError("give a source video (editing) or a target_shape (generation)")
        target_shape = tuple(source.shape)
    device = cond.device
    dtype = source.dtype if source is not None else cond.dtype
    sigmas = flow_sigmas(opts.steps, opts.shift, opts.denoise)

    sem_shape = None
    if model_has_sama:
        n_sem = anchor_tokens.shape[1] if anchor_tokens is not None else opts.num_semantic_tokens
        sem_shape = (target_shape[0], n_sem, model.config.siglip_dim if hasattr(model, "config") else 1152)
        if anchor_tokens is not None and tuple(anchor_tokens.shape) != sem_shape:
            raise SamaInputError(f"anchor tokens {tuple(anchor_tokens.shape)} must be {sem_shape} "
                                 "(batch, 65 per anchor, SigLIP width)")
    check_region(region, target_shape, source)
    opts = resolve_flowedit(opts, source, target_shape, anchor_tokens, negative=uncond is not None)
    if opts.flowedit:
        return _flowedit(model, cond, uncond, source, target_shape, sigmas, sem_shape, opts, anchor_tokens,
                         callback, should_interrupt, denoiser_wrapper, region, source_semantic)
    noise, sem_noise = initial_noise(target_shape, sem_shape, opts.seed, dtype)
    noise, sem_noise = noise.to(device), (sem_noise.to(device) if sem_noise is not None else None)

    x = noise
    if opts.denoise < 1.0:
        if source is None or tuple(source.shape) != tuple(target_shape):
            raise SamaInputError("denoise < 1 starts from the source video: give a source of the target's shape")
        x = add_noise(source, noise, sigmas[0])
    # The semantic stream has no clean start: it starts from noise scaled to the start sigma (an anchor,
    # when given, is noised in below at every injected step).
    sem = None if sem_noise is None else sem_noise * sigmas[0]
    # Inject while the schedule's progress i / steps is below the strength (the ComfyUI wrapper uses the
    # same rule on sigmas: inject while the unshifted sigma is above 1 - strength).
    anchor_steps = math.ceil(opts.anchor_strength * opts.steps - 1e-9) if anchor_tokens is not None else 0

    denoise = make_denoiser(model, source, cond, uncond, opts)
    if opts.window_latent_frames and target_shape[2] > opts.window_latent_frames:
        denoise = make_windowed_denoiser(model, source, cond, uncond, opts, target_shape[2])
    if denoiser_wrapper is not None:
        denoise = denoiser_wrapper(denoise)
    cache = None
    if opts.cache_threshold > 0:
        from .step_cache import StepCache
        cache = StepCache(opts.cache_threshold, opts.steps, opts.cache_warmup)
        denoise = cache.wrap(denoise)
    video_solver = make_solver(opts.solver, sigmas)
    semantic_solver = make_solver(opts.solver, sigmas) if sem is not None else None
    if region is not None:
        region = region.to(x)

    for i in range(opts.steps):
        if should_interrupt is not None and should_interrupt():
            raise SamaInterrupted(f"sampling interrupted at step {i}/{opts.steps}; nothing was written")
        sigma = sigmas[i]  # a 0-dim float32 tensor, as in the released scheduler
        injecting = i < anchor_steps
        if injecting:
            sem = add_noise(anchor_tokens.to(sem), sem_noise, sigma)
        v, v_sem = denoise(x, sem, sigma)
        if injecting:
            v_sem = anchor_velocity(sem, anchor_tokens.to(sem), sigma)
        check_velocity(v, i, opts.steps, sigma)
        denoised = predicted_clean(x, v, sigma)
        x = video_solver.step(x, v, i)
        if region is not None:  # sigmas end at exactly 0: after the last step the outside is the source
            x = keep_outside(x, source, noise, sigmas[i + 1], region)
            denoised = keep_outside(denoised, source, noise, 0.0, region)  # previews show what will be kept
        if sem is not None:
            sem = semantic_solver.step(sem, v_sem, i)
        if callback is not None:
            callback(StepInfo(i, opts.steps, float(sigma), x, denoised, sem))
    stats = cache.stats if cache is not None else {"model_calls": opts.steps, "skipped_steps": 0}
    return SampleResult(x, sem, stats)


def _flowedit(model, cond, uncond, source, target_shape, sigmas, sem_shape, opts, anchor_tokens, callback,
              should_interrupt, denoiser_wrapper, region, source_semantic) -> SampleResult:
    from .flowedit import check_flowedit_options, flowedit_loop, reconstruction_options
    check_flowedit_options(opts, source, target_shape, anchor_tokens, negative=uncond is not None)
    if source_semantic is not None and sem_shape is not None and tuple(source_semantic.shape) != sem_shape:
        raise SamaInputError(f"source semantic tokens {tuple(source_semantic.shape)} must be {sem_shape} (batch, "
                             "65, SigLIP width): encode the source's first frame with the model's SigLIP")
    edit = make_denoiser(model, source, cond, uncond, opts)
    reconstruction = make_denoiser(model, source, uncond, None, reconstruction_options(opts))
    if denoiser_wrapper is not None:
        edit, reconstruction = denoiser_wrapper(edit), denoiser_wrapper(reconstruction)
    keep = None if region is None else (lambda z: region.to(z) * z + (1 - region.to(z)) * source)
    if source_semantic is not None:
        check_finite(source_semantic_tokens=source_semantic)
        source_semantic = source_semantic.to(source)
    z, sem = flowedit_loop(edit, reconstruction, source, sigmas, sem_shape, opts, keep, callback, should_interrupt,
                           source_semantic)
    used = opts.steps - opts.flowedit_skip
    return SampleResult(z, sem, {"model_calls": 2 * used, "skipped_steps": opts.flowedit_skip})
