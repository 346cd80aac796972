"""SAMA's training objective (SAMA_REFERENCE.md sections 4-5): flow matching on the target latents plus
an L1 term on the semantic tokens' velocity.

For each sample, with one sigma shared by its video and semantic tokens:
    x_sigma = (1 - sigma) x0 + sigma e          v* = e - x0        (target latents; the source stays clean)
    s_sigma = (1 - sigma) s0 + sigma e_s        v_s* = e_s - s0    (SigLIP anchor tokens)
    L = MSE(v_video, v*) over the real latent frames + 0.1 * L1(v_semantic, v_s*)
(a batch's optional `semantic_mask` (B,) zeroes the L1 of samples without a semantic target; the mean stays
over the whole batch)
Per-sample means first (each over its own real frames), then the mean over the batch, so a sample padded
to a longer frame bucket weighs as much as any other.

Edit-region weighting (off by default; not in the paper): with `edit_weight` lambda > 0, the video MSE of a
sample with a source of the target's shape is a weighted mean with weight 1 + lambda * clamp(d / tau, 0, 1)
per latent position, where d is the channel-mean |target - source| of the clean latents (the region the
edit changes) and tau = `edit_threshold`. Why: in a small-object edit (objects of 2-5% of a frame) the
changed region carries ~2% of the plain loss, so a small model learns to copy the source and stops; the
weighted mean keeps each sample's loss on the plain loss's scale (a background edit, which changes
everything, is weighted as before).

Keep-region weighting (off by default; not in the paper): with `keep_weight` kappa > 0, a sample with a
keep mask (the manifest's "keep_mask" on the latent grid, `batch["keep"]` (B, T, h, w) in [0, 1]) adds
kappa * keep to that weight. Why: the edit-region weight makes changing things the loss's main business,
and an object the instruction does not name then costs a small model as little as a patch of background
to lose (SAMA-Shapes, session 10: a quarter of the clearly visible kept objects lost); the keep mask
marks exactly those objects.

Sigma: t ~ U(0, 1] ("shift", the training counterpart of the sampler's shifted schedule) or
t = sigmoid(N(mean, std)) ("logit_normal"), then shifted s t / (1 + (s - 1) t).
Randomness: every sample's sigma and noise come from its own CPU generator seeded by the sample's seed
(draw order: t, video noise, semantic noise), so a batch gives the same numbers on any device and for
any number of processes.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch

from sama_core.errors import SamaInputError
from sama_core.scheduler import add_noise, shift_sigmas, timesteps_of

from .data import derive_seed


@dataclasses.dataclass
class NoiseDraw:
    sigma: torch.Tensor                      # (B,) float32
    noise: torch.Tensor                      # (B, 16, T, h, w)
    semantic_noise: Optional[torch.Tensor]   # (B, N, siglip_dim)


class LossParts(NamedTuple):
    loss: torch.Tensor                       # scalar: video + weight * semantic
    video: torch.Tensor                      # scalar masked MSE
    semantic: torch.Tensor                   # scalar L1 (0 without semantic tokens)


def sample_t(generator: torch.Generator, sigma_cfg) -> torch.Tensor:
    """One t in (0, 1] (before the shift), as a 0-dim float32 tensor."""
    if sigma_cfg.sampling == "logit_normal":
        z = torch.randn((), generator=generator)
        return torch.sigmoid(sigma_cfg.logit_mean + sigma_cfg.logit_std * z)
    return 1.0 - torch.rand((), generator=generator)  # U(0, 1]: sigma = 0 (no noise) never comes up


def draw_noise(seeds: torch.Tensor, target_shape, semantic_shape, sigma_cfg) -> NoiseDraw:
    """Sigma and noise for each sample from its seed; shapes are the batch's (B, ...) shapes."""
    sigmas, noises, sem_noises = [], [], []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(derive_seed(seed, "noise"))
        sigmas.append(shift_sigmas(sample_t(g, sigma_cfg), sigma_cfg.shift))
        noises.append(torch.randn(tuple(target_shape[1:]), generator=g))
        if semantic_shape is not None:
            sem_noises.append(torch.randn(tuple(semantic_shape[1:]), generator=g))
    return NoiseDraw(torch.stack(sigmas).float(), torch.stack(noises),
                     torch.stack(sem_noises) if semantic_shape is not None else None)


def latent_frame_mask(valid_latent_frames: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
    """(B,) counts -> (B, T) bool, True for latent frames that hold real (not padded) video frames."""
    frames = torch.arange(num_latent_frames, device=valid_latent_frames.device)
    return frames[None, :] < valid_latent_frames[:, None]


def expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against `like`."""
    return sigma.reshape(-1, *([1] * (like.ndim - 1))).to(like)


def noisy_inputs(batch: dict, draw: NoiseDraw):
    """(x_sigma, s_sigma or None, timestep (B,)) for the DiT."""
    x0, s0 = batch["target"], batch.get("semantic")
    x = add_noise(x0, draw.noise.to(x0), expand(draw.sigma, x0))
    s = None if s0 is None else add_noise(s0, draw.semantic_noise.to(s0), expand(draw.sigma, s0))
    return x, s, timesteps_of(draw.sigma).to(x0.device)


def edit_region_weight(target: torch.Tensor, source: Optional[torch.Tensor], edit_weight: float,
                       edit_threshold: float) -> torch.Tensor:
    """(B, 1, T, h, w) loss weight 1 + edit_weight * clamp(d / edit_threshold, 0, 1), d = channel-mean
    |target - source|; all ones without a source of the target's shape (plain clips, other pretext grids)."""
    ones = target.new_ones(target.shape[0], 1, *target.shape[2:])
    if edit_weight == 0 or source is None or source.shape != target.shape:
        return ones
    change = (target - source.to(target)).abs().mean(1, keepdim=True)  # (B, 1, T, h, w)
    return ones + edit_weight * (change / edit_threshold).clamp(0, 1)


def keep_region_weight(batch: dict, keep_weight: float, like: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, h, w) extra loss weight keep_weight * keep; zeros without keep masks in the batch."""
    keep = batch.get("keep")
    if keep_weight == 0 or keep is None:
        return like.new_zeros(like.shape[0], 1, *like.shape[2:])
    if keep.shape != (like.shape[0], *like.shape[2:]):
        raise SamaInputError(f"the batch's keep masks {tuple(keep.shape)} do not match its latents "
                             f"{tuple(like.shape)}: they must be (B, T, h, w) on the latent grid")
    return keep_weight * keep.to(like)[:, None]


def flow_matching_loss(pred_video: torch.Tensor, pred_semantic: Optional[torch.Tensor], batch: dict,
                       draw: NoiseDraw, semantic_weight: float = 0.1, edit_weight: float = 0.0,
                       edit_threshold: float = 0.25, keep_weight: float = 0.0) -> LossParts:
    x0 = batch["target"].float()
    target_v = draw.noise.to(x0) - x0  # (B, 16, T, h, w)
    mask = latent_frame_mask(batch["valid_latent_frames"].to(x0.device), x0.shape[2])  # (B, T)
    weight = mask[:, None, :, None, None].to(x0) * (edit_region_weight(
        x0, batch.get("source"), edit_weight, edit_threshold) + keep_region_weight(batch, keep_weight, x0))
    # weight: (B, 1, T, h, w)
    squared = (pred_video.float() - target_v).pow(2) * weight
    # Weighted mean per sample over its real frames (C values per weighted position).
    video = (squared.flatten(1).sum(1) / (weight.flatten(1).sum(1) * x0.shape[1])).mean()
    if pred_semantic is None:
        semantic = video.new_zeros(())
    else:
        s0 = batch["semantic"].float()
        per_sample = (pred_semantic.float() - (draw.semantic_noise.to(s0) - s0)).abs().flatten(1).mean(1)
        mask = batch.get("semantic_mask")  # (B,) 0 for samples without a semantic target (copy samples)
        semantic = per_sample.mean() if mask is None else (per_sample * mask.to(per_sample)).mean()
    return LossParts(video + semantic_weight * semantic, video, semantic)


def training_loss(model, batch: dict, sigma_cfg, semantic_weight: float = 0.1,
                  draw: Optional[NoiseDraw] = None, edit_weight: float = 0.0,
                  edit_threshold: float = 0.25, keep_weight: float = 0.0) -> tuple[LossParts, NoiseDraw]:
    """One forward of the DiT on a feature batch and its loss (the draw is made from the batch's seeds)."""
    semantic = batch.get("semantic")
    if draw is None:
        draw = draw_noise(batch["seeds"], batch["target"].shape,
                          None if semantic is None else semantic.shape, sigma_cfg)
    x, s, timestep = noisy_inputs(batch, draw)
    out = model(x, timestep, batch["context"], source=batch.get("source"), semantic_tokens=s)
    return flow_matching_loss(out.video, out.semantic, batch, draw, semantic_weight, edit_weight,
                              edit_threshold, keep_weight), draw
