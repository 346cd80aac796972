"""Train the tiny Wan2.1-architecture VAE of SAMA-Shapes on the synthetic clips (train/synthetic.py).

    python -m train.vae_train --config train/configs/shapes_vae.yaml [--resume latest] [key=value ...]

The model is diffusers' `AutoencoderKLWan` at a small width (`model.base_dim`), with everything else as
Wan2.1's: z_dim 16, 2 residual blocks per level, dim_mult [1, 2, 4, 4], temporal downsampling in the last
two levels. Only that layout converts to the original / ComfyUI file layout that sama_core and ComfyUI
load, so only the width is configurable.

Data: single frames for the first `data.image_steps` steps (cheap; they get the spatial autoencoder past
its slow start), then `data.num_frames`-frame windows (random start, random horizontal flip) of the clips.
Objective, per batch, in [-1, 1]:

    z = mu + sigma * e                           (the posterior sampled with the step's own noise)
    L = l1 * |x' - x| + mse * (x' - x)^2 + kl * KL(q(z|x) || N(0, I))       (all means per element)

The KL term is small (1e-4 per latent element by default): it keeps the posterior from collapsing to a
point, so the decoder learns to tolerate small latent errors (the DiT's), without blurring the output.

Latent statistics. sama_core normalises latents with the Wan2.1 per-channel mean/std constants, which mean
nothing for a new VAE. The export therefore measures the per-channel mean m and std s of the posterior
mean on training clips and folds the affine map mu -> (mu - m) / s * std_wan + mean_wan into the 1x1x1
`quant_conv` (encoder side) and its inverse into `post_quant_conv` (decoder side). Both are linear, so
the fold is exact: decode(encode(x)) does not change, and the latents that sama_core normalises with the
Wan2.1 constants come out zero-mean, unit-std per channel on the data. Nothing in sama_core, the bundle
format or ComfyUI's native Wan latent format has to change. The measured statistics (before and after
the fold) are written to `final/latent_stats.json`.

Resumable like train/: accelerate's save_state + EMA in atomic `checkpoint-<step>` folders
(train/checkpoint.py), `--resume latest`. The batch of step n is a pure function of (seed, n), so a
resumed run sees the same clips, windows, flips and noise as an uninterrupted one.

Output folder:
    checkpoint-<step>/      resumable state
    logs/metrics.jsonl      loss, l1, mse, kl, psnr, lr, frames per sample, steps/s, samples/s
    final/vae.safetensors   the (EMA) VAE, normalisation folded in, original / ComfyUI layout
    final/latent_stats.json per-channel statistics before/after the fold, reconstruction PSNR
    final/export.json, final/config.yaml
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

from sama_core.cli import command_line
from sama_core.errors import SamaError, SamaFileNotFoundError, SamaInputError
from sama_core.vae import LATENT_CHANNELS, WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

from . import checkpoint as ckpt
from . import loop  # the wall clock and the time-budget check (train.max_minutes) shared with train/
from .config import (
    CheckpointConfig,
    EMAConfig,
    build_config,
    check_learning_rate_step,
    learning_rate_at,
    read_config_file,
)
from .data import derive_seed

log = logging.getLogger(__name__)

FINAL_DIR = "final"
VAE_FILE = "vae.safetensors"
STATS_FILE = "latent_stats.json"
# A channel whose std is below this fraction of the largest channel's is treated as (nearly) unused: its
# std is floored there, so the fold does not blow its noise up by orders of magnitude.
STD_FLOOR_FRACTION = 1e-2
INITIAL_LOGVAR = -8.0
TRAINABLE = ("all", "decoder")
EMA_START_WEIGHT_WARNING = 0.05  # warn when the exported EMA still holds more of the starting weights


# --------------------------------------------------------------------------------------------- config

@dataclasses.dataclass
class VAEArchConfig:
    base_dim: int = 12                  # Wan2.1's is 96
    # The decoder's width when it differs from the encoder's (diffusers' `decoder_base_dim`; sama_core and the
    # node pack read such files). None = base_dim. With `trainable: decoder` a wider decoder can be trained
    # behind a frozen encoder: more capacity for the pixels while the latents the DiT learned stay the same.
    decoder_base_dim: Optional[int] = None
    z_dim: int = LATENT_CHANNELS        # fixed by SAMA (16); checked
    # "default": PyTorch's layer init (diffusers builds the model for loading, not training): at init the
    # latents barely depend on the input (std across a batch 0.03) and training stalled near the mean colour.
    # "kaiming_zero": Kaiming-normal convolutions, zero biases, and every residual branch (second conv of
    # each residual block, the middle attention's proj) zero, so each block starts as the identity. Probe
    # (flat colour + disc images, lr 3e-4): 21 dB after 400 steps against 12 dB with "default" (measured).
    init: str = "default"


@dataclasses.dataclass
class VAEDataConfig:
    datasets: list = dataclasses.field(default_factory=list)  # SAMA-Shapes folders (with video_edits.jsonl)
    num_frames: int = 9                 # training window, 4k+1, cut at a random start from each clip
    # Curriculum: the first `image_steps` steps train on single frames (batch `image_batch_size`). They cost a
    # quarter of a clip step and get the spatial autoencoder going, which is the slow part: from scratch the
    # output stays near each clip's mean colour for the first ~500 steps (measured).
    image_steps: int = 0
    image_batch_size: int = 8
    # Then, from step `long_from_step` on, whole `long_num_frames`-frame clips (batch `long_batch_size`): a
    # causal chunk's cache is only trained as far as the training windows reach. Trained on 5-frame windows
    # only, frames 5-16 of a 17-frame clip fell from ~18.5 dB to 12-13 dB (measured); None = no such phase.
    long_from_step: Optional[int] = None
    long_num_frames: int = 17
    long_batch_size: int = 2
    hflip: bool = True                  # random horizontal flips
    stats_clips: int = 128              # training clips the export measures the latent statistics on
    eval_dataset: Optional[str] = None  # held-out SAMA-Shapes folder for the export's reconstruction PSNR
    eval_clips: int = 32
    # The DiT's own latents (folders of `python -m train.sampled_latents`; trainable: decoder only):
    # `sampled_per_batch` of each process's batch_size samples are such a latent, decoded and compared with its
    # edit's ground-truth target outside the edit region (the kept objects and the background, which the DiT
    # copies; inside it a failed edit's latent does not say what the target holds). The rest are encoded
    # clips as before, so the decoder keeps reading the encoder's latents. 0 = off.
    sampled_latents: list = dataclasses.field(default_factory=list)
    sampled_per_batch: int = 0


@dataclasses.dataclass
class VAELossConfig:
    l1: float = 1.0
    mse: float = 1.0
    kl: float = 1.0e-4                  # weight of the mean per-element KL(q(z|x) || N(0, I))
    # weight of the MSE between the 8x8-pixel means of output and input (what one latent position covers).
    # Without it the small VAE spent its capacity on high-contrast background textures and decoded the
    # shapes as grey blobs: colour, the thing SAMA-Shapes edits, was lost (measured on the demo clip).
    lowpass: float = 0.0
    # Decoder robustness (trainable: decoder only): Gaussian noise of this std, in the DiT's normalised latent
    # units (per-channel Wan2.1 std), added to the sampled latent before decoding, so that the decoder learns
    # to decode the imperfect latents a DiT samples, not only the encoder's. 0 = off.
    latent_noise: float = 0.0


@dataclasses.dataclass
class VAEOptimConfig:
    lr: float = 5.0e-4
    betas: list = dataclasses.field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    max_grad_norm: Optional[float] = 1.0
    # A step decay: from `decay_from_step` on, the learning rate is `final_lr` (both or neither). Measured on
    # SAMA-Shapes (session 5): resuming at 1e-4 after 3e-4 lifted the whole-clip PSNR by ~1.5 dB.
    decay_from_step: Optional[int] = None
    final_lr: Optional[float] = None


@dataclasses.dataclass
class VAELogConfig:
    every: int = 50
    progress_bar: bool = True


@dataclasses.dataclass
class VAETrainConfig:
    output_dir: str = "runs/shapes_vae"
    seed: int = 0
    batch_size: int = 4                 # per process
    max_steps: int = 4000
    mixed_precision: str = "no"         # no | bf16 (accelerate autocast; weights stay fp32)
    max_minutes: Optional[float] = None  # wall-clock budget of one invocation: then checkpoint + export (as train/)
    # Start from an exported VAE file (final/vae.safetensors, original layout) instead of a fresh model.
    init_from: Optional[str] = None
    # "all", or "decoder": the encoder and quant_conv stay frozen (needs init_from), so encode() gives the
    # same latents bit for bit and a DiT trained on them keeps working; only post_quant_conv and the decoder
    # learn (from the init file's weights, or from scratch when model.decoder_base_dim differs). The export
    # then keeps the init file's latent normalisation instead of measuring and folding a new one.
    trainable: str = "all"
    model: VAEArchConfig = dataclasses.field(default_factory=VAEArchConfig)
    data: VAEDataConfig = dataclasses.field(default_factory=VAEDataConfig)
    loss: VAELossConfig = dataclasses.field(default_factory=VAELossConfig)
    optim: VAEOptimConfig = dataclasses.field(default_factory=VAEOptimConfig)
    ema: EMAConfig = dataclasses.field(default_factory=lambda: EMAConfig(decay=0.999))
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=lambda: CheckpointConfig(every=500, keep=2))
    log: VAELogConfig = dataclasses.field(default_factory=VAELogConfig)
    base_dir: Optional[str] = None      # the config file's folder: relative paths resolve against it

    def resolve_path(self, path) -> Optional[Path]:
        if path is None:
            return None
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.base_dir is None else Path(self.base_dir) / p

    @property
    def output_path(self) -> Path:
        return self.resolve_path(self.output_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate_vae_config(cfg: VAETrainConfig) -> None:
    if cfg.model.init not in ("default", "kaiming_zero"):
        raise SamaInputError(f"model.init must be 'default' or 'kaiming_zero', got {cfg.model.init!r}")
    if cfg.trainable not in TRAINABLE:
        raise SamaInputError(f"trainable must be one of {TRAINABLE}, got {cfg.trainable!r}")
    if cfg.trainable == "decoder" and not cfg.init_from:
        raise SamaInputError("trainable: decoder needs init_from: the exported VAE file whose encoder (and "
                             "latent space) the decoder is trained for, e.g. init_from=runs/shapes/vae/final/"
                             "vae.safetensors")
    if cfg.model.decoder_base_dim is not None and (not isinstance(cfg.model.decoder_base_dim, int)
                                                   or cfg.model.decoder_base_dim < 1):
        raise SamaInputError(f"model.decoder_base_dim must be a positive integer or null (= model.base_dim), "
                             f"got {cfg.model.decoder_base_dim!r}")
    if cfg.model.z_dim != LATENT_CHANNELS:
        raise SamaInputError(f"model.z_dim must be {LATENT_CHANNELS} (the Wan2.1 latent channels the SAMA DiT "
                             f"reads), got {cfg.model.z_dim}")
    if not isinstance(cfg.data.image_steps, int) or cfg.data.image_steps < 0:
        raise SamaInputError(f"data.image_steps must be an integer >= 0, got {cfg.data.image_steps!r}")
    positive = {"model.base_dim": cfg.model.base_dim, "batch_size": cfg.batch_size, "max_steps": cfg.max_steps,
                "data.image_batch_size": cfg.data.image_batch_size,
                "data.stats_clips": cfg.data.stats_clips, "data.eval_clips": cfg.data.eval_clips,
                "log.every": cfg.log.every, "checkpoint.every": cfg.checkpoint.every,
                "checkpoint.keep": cfg.checkpoint.keep}
    for name, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SamaInputError(f"{name} must be a positive integer, got {value!r}")
    frames = cfg.data.num_frames
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % 4:
        raise SamaInputError(f"data.num_frames must be 4k+1 (1, 5, 9, 17, ...), got {frames!r}: the Wan VAE "
                             "encodes the first frame alone, then 4 frames per latent frame")
    if not cfg.data.datasets:
        raise SamaInputError("data.datasets is empty: give SAMA-Shapes folders written by `python -m "
                             "train.synthetic` (each holds video_edits.jsonl)")
    check_learning_rate_step(cfg.optim)
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise SamaInputError(f"max_minutes must be > 0 (or null for no time limit), got {cfg.max_minutes}")
    if cfg.mixed_precision not in ("no", "bf16"):
        raise SamaInputError(f"mixed_precision must be 'no' or 'bf16', got {cfg.mixed_precision!r} (fp16 "
                             "overflows in the Wan VAE)")
    if cfg.loss.latent_noise and cfg.trainable != "decoder":
        raise SamaInputError("loss.latent_noise needs trainable: decoder (the noise is in the units of a finished, "
                             "normalised encoder's latents)")
    check_sampled_latents_config(cfg)
    for name in ("l1", "mse", "kl", "latent_noise"):
        if getattr(cfg.loss, name) < 0:
            raise SamaInputError(f"loss.{name} must be >= 0, got {getattr(cfg.loss, name)}")


def check_sampled_latents_config(cfg: VAETrainConfig) -> None:
    data = cfg.data
    k = data.sampled_per_batch
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise SamaInputError(f"data.sampled_per_batch must be an integer >= 0, got {k!r}")
    if bool(k) != bool(data.sampled_latents):
        raise SamaInputError("data.sampled_latents and data.sampled_per_batch go together: give the folders of "
                             "`python -m train.sampled_latents` and how many of each batch's samples they fill "
                             f"(got {len(data.sampled_latents)} folder(s), sampled_per_batch {k})")
    if not k:
        return
    if cfg.trainable != "decoder":
        raise SamaInputError("data.sampled_latents needs trainable: decoder (the DiT sampled them in the init "
                             "file's latent space; a trained encoder would leave it)")
    if k >= cfg.batch_size:
        raise SamaInputError(f"data.sampled_per_batch ({k}) must be below batch_size ({cfg.batch_size}): the "
                             "rest are encoded clips, which keep the decoder reading the encoder's latents")
    if data.image_steps or data.long_from_step is not None:
        raise SamaInputError("data.sampled_latents decodes whole clips: set data.image_steps=0 and "
                             "data.long_from_step=null, and data.num_frames to the clips' frame count (17)")


def vae_config_from_dict(values: dict, overrides=(), base_dir=None) -> VAETrainConfig:
    cfg = build_config(VAETrainConfig, values, overrides, base_dir)
    validate_vae_config(cfg)
    return cfg


def load_vae_config(path, overrides=()) -> VAETrainConfig:
    values, folder = read_config_file(path, example="train/configs/shapes_vae.yaml")
    return vae_config_from_dict(values, overrides, base_dir=folder)


# ----------------------------------------------------------------------------------------------- data

def dataset_clip_paths(folder) -> list[Path]:
    """Every distinct source and target clip of a SAMA-Shapes folder's video_edits.jsonl, sorted."""
    from .synthetic import MANIFEST_NAMES, read_manifest
    manifest = Path(folder) / MANIFEST_NAMES["video_edits"]
    if not manifest.is_file():
        raise SamaFileNotFoundError(f"{folder} has no {manifest.name}: give a folder written by "
                                    "`python -m train.synthetic --out FOLDER ...`")
    paths = {Path(row[key]) for row in read_manifest(manifest) for key in ("source_video", "target_video")}
    return sorted(paths)


class ClipPool:
    """Training clips read on demand; batch n is a pure function of (seed, n) (what makes resume exact)."""

    def __init__(self, paths: list[Path]):
        if not paths:
            raise SamaInputError("no clips to train the VAE on")
        self.paths = list(paths)

    @classmethod
    def from_datasets(cls, folders) -> "ClipPool":
        return cls([p for folder in folders for p in dataset_clip_paths(folder)])

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        from .synthetic import load_clip
        return load_clip(self.paths[index])  # (F, H, W, 3) in [0, 1]

    def batch(self, step: int, global_batch: int, num_frames: int, seed: int, hflip: bool,
              z_dim: int = LATENT_CHANNELS, latent_noise: bool = False):
        """(frames (B, 3, F, H, W) in [-1, 1], posterior noise (B, z, T, H/8, W/8)) of a global batch, and with
        latent_noise a third tensor like the second (for loss.latent_noise), drawn after it."""
        g = torch.Generator().manual_seed(derive_seed(seed, "vae-batch", step))
        windows = []
        for index in torch.randint(len(self.paths), (global_batch,), generator=g).tolist():
            clip = self.load(index)
            if clip.shape[0] < num_frames:
                raise SamaInputError(f"{self.paths[index]} has {clip.shape[0]} frames, fewer than "
                                     f"data.num_frames={num_frames}: lower data.num_frames")
            start = int(torch.randint(clip.shape[0] - num_frames + 1, (1,), generator=g))
            window = clip[start:start + num_frames]  # (F, H, W, 3)
            if hflip and bool(torch.rand((), generator=g) < 0.5):
                window = window.flip(2)
            windows.append(window.permute(3, 0, 1, 2) * 2.0 - 1.0)  # (3, F, H, W)
        frames = torch.stack(windows)  # (B, 3, F, H, W)
        b, _, f, h, w = frames.shape
        noise = torch.randn((b, z_dim, 1 + (f - 1) // 4, h // 8, w // 8), generator=g)
        if latent_noise:
            return frames, noise, torch.randn(noise.shape, generator=g)
        return frames, noise


class SampledLatentPool:
    """Latents the DiT sampled (train.sampled_latents) with their edits' targets and keep masks; batch n is a
    pure function of (seed, n), like ClipPool's."""

    def __init__(self, files: list[Path]):
        self.files = list(files)

    @classmethod
    def from_folders(cls, folders) -> "SampledLatentPool":
        from .sampled_latents import sampled_latent_files
        return cls(sampled_latent_files(folders))

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, num_frames: int):
        """(raw latents (16, T, h, w), target frames (3, F, H, W) in [-1, 1], keep weight (1, F, H, W))."""
        from sama_core.vae import denormalize_latents

        from .sampled_latents import read_sampled_latent
        from .synthetic import load_clip
        latents, meta = read_sampled_latent(self.files[index])
        target = load_clip(meta["target_video"])  # (F, H, W, 3) in [0, 1]
        with np.load(meta["mask_file"], allow_pickle=False) as masks:
            edit_mask = torch.from_numpy(masks[meta["edit_mask_key"]])  # (F, H, W) bool
        frames, height, width = target.shape[:3]
        if tuple(latents.shape[2:]) != (height // 8, width // 8) or edit_mask.shape != target.shape[:3]:
            raise SamaInputError(f"{self.files[index]}: latents of {latents.shape[3] * 8}x{latents.shape[2] * 8} "
                                 f"pixels for a {width}x{height} target ({meta['target_video']}): the DiT was "
                                 "sampled at another size; write them again from clips at the bundle's size")
        if frames != num_frames or 1 + 4 * (latents.shape[1] - 1) != frames:
            raise SamaInputError(f"{self.files[index]}: {latents.shape[1]} latent frames for a {frames}-frame "
                                 f"target ({meta['target_video']}), but the decoder trains on "
                                 f"data.num_frames={num_frames}: set data.num_frames={frames}")
        raw = denormalize_latents(torch.from_numpy(latents)[None])[0]  # the pipeline's normalised -> the VAE's
        keep = (~edit_mask).float()[None]
        return raw, target.permute(3, 0, 1, 2) * 2.0 - 1.0, keep

    def batch(self, step: int, count: int, num_frames: int, seed: int):
        """(raw latents (B, 16, T, h, w), targets (B, 3, F, H, W), keep weights (B, 1, F, H, W)). No flips:
        a flipped latent is not the latent of the flipped clip."""
        g = torch.Generator().manual_seed(derive_seed(seed, "vae-sampled-batch", step))
        picks = [self.load(i, num_frames) for i in torch.randint(len(self.files), (count,), generator=g).tolist()]
        return tuple(torch.stack(parts) for parts in zip(*picks))


# ---------------------------------------------------------------------------------------------- model

def build_vae(arch: VAEArchConfig, seed: int):
    from diffusers import AutoencoderKLWan
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Wan2.1's layout except the width: the only layout sama_core.vae.save_original_layout converts.
        vae = AutoencoderKLWan(base_dim=arch.base_dim, decoder_base_dim=arch.decoder_base_dim, z_dim=arch.z_dim)
        if arch.init == "kaiming_zero":
            kaiming_zero_init(vae)
    with torch.no_grad():
        # Start with a narrow posterior (std ~ e^-4): with PyTorch's default init the log-variance starts
        # near 0, i.e. unit noise on latents of much smaller magnitude, and the decoder learns nothing until
        # the encoder has pushed it down (thousands of steps, measured). The KL term widens it again
        # where the reconstruction allows.
        vae.quant_conv.bias[arch.z_dim:] = INITIAL_LOGVAR
    return vae


def decoder_width(vae) -> int:
    return vae.config.decoder_base_dim or vae.config.base_dim


def initial_vae(cfg: VAETrainConfig):
    """The VAE a run starts from: a fresh one (build_vae), or cfg.init_from's weights. A decoder of another
    width than the file's (model.decoder_base_dim) starts fresh behind the file's encoder, quant_conv and
    post_quant_conv (post_quant_conv holds the inverse of the file's latent normalisation)."""
    if cfg.init_from is None:
        return build_vae(cfg.model, cfg.seed)
    from sama_core.vae import WanVAE
    path = cfg.resolve_path(cfg.init_from)
    if not path.is_file():
        raise SamaFileNotFoundError(f"init_from: {path} does not exist; give an exported VAE file "
                                    "(final/vae.safetensors of python -m train.vae_train)")
    source = WanVAE.from_file(path).model.float()
    if source.config.base_dim != cfg.model.base_dim:
        raise SamaInputError(f"init_from: {path} has an encoder of width {source.config.base_dim}, but "
                             f"model.base_dim is {cfg.model.base_dim}: set model.base_dim={source.config.base_dim}")
    width = cfg.model.decoder_base_dim or cfg.model.base_dim
    if width == decoder_width(source):
        vae = source
    else:
        vae = build_vae(cfg.model, cfg.seed)
        for name in ("encoder", "quant_conv", "post_quant_conv"):
            getattr(vae, name).load_state_dict(getattr(source, name).state_dict())
    vae.requires_grad_(True)
    if cfg.trainable == "decoder":
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    return vae


def encoder_side_keys(state_dict) -> list[str]:
    """The original-layout tensors that decide the latents: the encoder and conv1 (= quant_conv)."""
    return sorted(k for k in state_dict if k.startswith(("encoder.", "conv1.")))


@torch.no_grad()
def kaiming_zero_init(vae) -> None:
    """VAEArchConfig.init = "kaiming_zero" (see there): a trainable start for a from-scratch Wan VAE."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResidualBlock
    for module in vae.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                module.bias.zero_()
    for module in vae.modules():
        if isinstance(module, WanResidualBlock):
            module.conv2.weight.zero_()
        elif isinstance(module, WanAttentionBlock):
            module.proj.weight.zero_()


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents (B, z, T, h, w) -> frames (B, 3, 1 + 4(T - 1), 8h, 8w), NOT clamped to [-1, 1].

    diffusers' decode clamps its output, which zeroes the gradient of every pixel that overshoots, so a
    training step could never pull those back. This is the same frame-by-frame causal decode as
    diffusers 0.42's `AutoencoderKLWan._decode` without the clamp (a test checks that clamping this gives
    exactly `vae.decode(z).sample`)."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=(i == 0)))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


class ReconstructionModel(torch.nn.Module):
    """encode -> sample the posterior with the given noise -> decode; one forward, so DDP can wrap it."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, frames: torch.Tensor, noise: torch.Tensor, extra: Optional[torch.Tensor] = None,
                sampled: Optional[torch.Tensor] = None):
        """sampled: raw latents (B', 16, T, h, w) decoded after the B encoded ones (data.sampled_latents):
        the output is (B + B', 3, F, H, W); mean / logvar are the B encoded samples'."""
        # A frozen encoder (trainable: decoder) runs without a graph: half the memory, no backward through it.
        frozen = not any(p.requires_grad for p in self.vae.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            posterior = self.vae.encode(frames).latent_dist
        z = posterior.mean + posterior.std * noise.to(posterior.mean)  # (B, 16, T, h, w)
        if extra is not None:  # loss.latent_noise, already scaled to raw latent units
            z = z + extra.to(z)
        if sampled is not None:
            z = torch.cat([z, sampled.to(z)])
        return decode_unclamped(self.vae, z), posterior.mean, posterior.logvar


@dataclasses.dataclass
class VAELoss:
    total: torch.Tensor
    l1: torch.Tensor
    mse: torch.Tensor
    kl: torch.Tensor


def weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(values * weight) / sum(weight), weight broadcast to values' shape (e.g. (B, 1, F, H, W) over 3 channels)."""
    w = weight.float().expand_as(values)
    return (values * w).sum() / w.sum().clamp_min(1e-8)


def reconstruction_loss(recon: torch.Tensor, frames: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                        weights: VAELossConfig, pixel_weight: Optional[torch.Tensor] = None) -> VAELoss:
    """L1 + MSE over pixels, KL(N(mean, exp(logvar)) || N(0, 1)) per latent element; all means.
    pixel_weight (B, 1, F, H, W): the pixel means become weighted means (data.sampled_latents' keep region),
    and the low-pass term compares the weighted difference."""
    diff = recon.float() - frames.float()
    if pixel_weight is None:
        l1, mse = diff.abs().mean(), diff.pow(2).mean()
    else:
        l1, mse = weighted_mean(diff.abs(), pixel_weight), weighted_mean(diff.pow(2), pixel_weight)
        diff = diff * pixel_weight.float()
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).mean()
    total = weights.l1 * l1 + weights.mse * mse + weights.kl * kl
    if weights.lowpass:
        blocks = torch.nn.functional.avg_pool2d(diff.transpose(1, 2).flatten(0, 1), 8)  # (B*F, 3, H/8, W/8)
        total = total + weights.lowpass * blocks.pow(2).mean()
    return VAELoss(total, l1, mse, kl)


def psnr_from_mse(mse: float, value_range: float = 2.0) -> float:
    """PSNR in dB for an MSE measured on values spanning `value_range` ([-1, 1]: 2)."""
    return float("inf") if mse <= 0 else 10.0 * math.log10(value_range ** 2 / mse)


def phase(cfg: VAETrainConfig, step: int) -> tuple[int, int]:
    """(frames per sample, samples per process) of a step: single frames first, then clips."""
    if step < cfg.data.image_steps:
        return 1, cfg.data.image_batch_size
    if cfg.data.long_from_step is not None and step >= cfg.data.long_from_step:
        return cfg.data.long_num_frames, cfg.data.long_batch_size
    return cfg.data.num_frames, cfg.batch_size


def learning_rate(cfg: VAETrainConfig, step: int) -> float:
    """Linear warm-up to optim.lr, constant, then optim.final_lr from optim.decay_from_step on."""
    return learning_rate_at(cfg.optim, step)


# ------------------------------------------------------------------------------ latent normalisation

@torch.no_grad()
def latent_statistics(vae, clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (float64, (z,)) of the posterior mean over every latent position of the
    clips ((F, H, W, 3) in [0, 1] each)."""
    total = sq = None
    count = 0
    for clip in clips:
        x = (clip.permute(3, 0, 1, 2)[None] * 2.0 - 1.0).to(next(vae.parameters()).dtype)  # (1, 3, F, H, W)
        mu = vae.encode(x).latent_dist.mean.double()  # (1, z, T, h, w)
        values = mu.transpose(0, 1).flatten(1)  # (z, T * h * w)
        total = values.sum(1) if total is None else total + values.sum(1)
        sq = values.pow(2).sum(1) if sq is None else sq + values.pow(2).sum(1)
        count += values.shape[1]
    mean = total / count
    std = (sq / count - mean.pow(2)).clamp_min(0).sqrt()
    return mean, std


@torch.no_grad()
def fold_latent_normalisation(vae, mean, std, target_mean=WAN21_LATENTS_MEAN, target_std=WAN21_LATENTS_STD):
    """Make the VAE's posterior mean have per-channel `target_mean` / `target_std` where it had `mean` / `std`
    (in place; returns the scale a and shift c of mu' = a mu + c).

    encoder: quant_conv's mu rows become a * W, a * b + c; its logvar rows get + 2 log a (the posterior
    std scales with mu). decoder: post_quant_conv takes z' = a z + c, so its weight columns are divided by
    a and its bias loses P (c / a). Both convs are 1x1x1, i.e. per-voxel linear maps: the fold is exact."""
    z_dim = vae.config.z_dim
    std = torch.as_tensor(std, dtype=torch.float64)
    std = torch.maximum(std, STD_FLOOR_FRACTION * std.max())
    a = torch.as_tensor(target_std, dtype=torch.float64) / std  # (z,)
    c = torch.as_tensor(target_mean, dtype=torch.float64) - a * torch.as_tensor(mean, dtype=torch.float64)

    enc = vae.quant_conv  # weight (2z, 2z, 1, 1, 1): rows [0, z) -> mu, [z, 2z) -> logvar
    w, b = enc.weight.double(), enc.bias.double()
    w[:z_dim] *= a.view(-1, 1, 1, 1, 1)
    b[:z_dim] = a * b[:z_dim] + c
    b[z_dim:] += 2.0 * a.log()
    enc.weight.copy_(w.to(enc.weight.dtype))
    enc.bias.copy_(b.to(enc.bias.dtype))

    dec = vae.post_quant_conv  # weight (z, z, 1, 1, 1)
    p, q = dec.weight.double(), dec.bias.double()
    q = q - p.view(z_dim, z_dim) @ (c / a)
    p = p / a.view(1, -1, 1, 1, 1)
    dec.weight.copy_(p.to(dec.weight.dtype))
    dec.bias.copy_(q.to(dec.bias.dtype))
    return a.float(), c.float()


# --------------------------------------------------------------------------------------------- export

@torch.no_grad()
def reconstruction_psnr(wan_vae, clips: list[torch.Tensor]) -> float:
    """Mean PSNR (dB, [0, 1] pixels) of decode(encode(clip)) through sama_core's WanVAE (the bundle's path)."""
    values = []
    for clip in clips:
        x = clip.permute(3, 0, 1, 2)[None] * 2.0 - 1.0  # (1, 3, F, H, W)
        y = wan_vae.decode(wan_vae.encode(x))
        mse = float(((y - x) / 2.0).pow(2).mean())
        values.append(psnr_from_mse(mse, 1.0))
    return float(sum(values) / len(values))


def _pick_clips(pool: ClipPool, count: int, seed: int, label: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(derive_seed(seed, label))
    order = torch.randperm(len(pool), generator=g)[:count].tolist()
    return [pool.load(i) for i in order]


def export_vae(cfg: VAETrainConfig, vae, pool: ClipPool, step: int, used_ema: bool) -> Path:
    """final/: the VAE with the latent normalisation folded in (original layout), and its statistics."""
    from sama_core.vae import WanVAE, save_original_layout
    out = cfg.output_path
    final, tmp = out / FINAL_DIR, out / f".tmp-{FINAL_DIR}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    vae = copy.deepcopy(vae).float().eval()
    stats_clips = _pick_clips(pool, min(cfg.data.stats_clips, len(pool)), cfg.seed, "vae-stats")
    raw_mean, raw_std = latent_statistics(vae, stats_clips)
    if cfg.trainable == "decoder":  # the init file's encoder, already normalised: nothing to fold
        fold = {"target": "kept from init_from (trainable: decoder)"}
    else:
        scale, shift = fold_latent_normalisation(vae, raw_mean, raw_std)
        fold = {"target": "Wan2.1 latents_mean / latents_std", "scale": _rounded(scale),
                "shift": _rounded(shift), "std_floor_fraction": STD_FLOOR_FRACTION}
    save_original_layout(vae, tmp / VAE_FILE)
    if cfg.trainable == "decoder":
        _check_encoder_unchanged(tmp / VAE_FILE, cfg.resolve_path(cfg.init_from))

    # Check the written file through sama_core's loader: normalised latents ~ N(0, 1) per channel.
    loaded = WanVAE.from_file(tmp / VAE_FILE)
    check_mean, check_std = latent_statistics(loaded.model, stats_clips)
    norm_mean = (check_mean - torch.tensor(WAN21_LATENTS_MEAN, dtype=torch.float64)) / torch.tensor(
        WAN21_LATENTS_STD, dtype=torch.float64)
    norm_std = check_std / torch.tensor(WAN21_LATENTS_STD, dtype=torch.float64)
    report = {
        "step": step, "ema": used_ema, "base_dim": cfg.model.base_dim, "decoder_base_dim": decoder_width(vae),
        "trainable": cfg.trainable, "init_from": cfg.init_from, "stats_clips": len(stats_clips),
        "raw_mean": _rounded(raw_mean), "raw_std": _rounded(raw_std), "fold": fold,
        "normalized_mean": _rounded(norm_mean), "normalized_std": _rounded(norm_std),
        "train_psnr": reconstruction_psnr(loaded, stats_clips[: cfg.data.eval_clips]),
    }
    if cfg.data.sampled_per_batch:
        report["sampled_latents"] = {"folders": [str(f) for f in cfg.data.sampled_latents],
                                     "per_batch": cfg.data.sampled_per_batch}
    if cfg.data.eval_dataset:
        heldout = ClipPool.from_datasets([cfg.resolve_path(cfg.data.eval_dataset)])
        report["heldout_psnr"] = reconstruction_psnr(
            loaded, _pick_clips(heldout, min(cfg.data.eval_clips, len(heldout)), cfg.seed, "vae-eval"))
    if used_ema:
        report["ema_start_weight"] = ema_start_weight(cfg.ema.decay, step)
        if report["ema_start_weight"] > EMA_START_WEIGHT_WARNING:
            log.warning("the exported EMA weights are still %.0f%% the weights the run started from (ema.decay "
                        "%s over %d steps): a short run needs a shorter horizon, e.g. ema.decay=%s",
                        100 * report["ema_start_weight"], cfg.ema.decay, step,
                        suggested_ema_decay(step))
    (tmp / STATS_FILE).write_text(json.dumps(report, indent=1) + "\n")
    (tmp / "export.json").write_text(json.dumps({"step": step, "ema": used_ema}, indent=1) + "\n")
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log.info("exported the VAE (step %d, %s weights) to %s: reconstruction PSNR %.2f dB on training clips%s",
             step, "EMA" if used_ema else "raw", final, report["train_psnr"],
             f", {report['heldout_psnr']:.2f} dB held out" if "heldout_psnr" in report else "")
    return final


def ema_start_weight(decay: float, steps: int) -> float:
    """The share of the starting weights left in an EMA (no warm-up) after `steps` updates: decay ** steps.
    Measured (session 9): a 487-step decoder run with decay 0.999 exported 61% its start; through it, 100
    validation targets came back at 21.4 dB PSNR, through its raw weights at 22.4 dB."""
    return float(decay) ** int(steps)


def suggested_ema_decay(steps: int) -> float:
    """A decay whose horizon is a tenth of the run (at least 10 steps): its start weight ends near e^-10."""
    return round(1.0 - 1.0 / max(10, steps // 10), 4)


def _check_encoder_unchanged(written: Path, init_file: Path) -> None:
    """trainable: decoder promises the init file's latents: its encoder-side tensors, bit for bit."""
    from safetensors.torch import load_file
    new, old = load_file(str(written)), load_file(str(init_file))
    keys = encoder_side_keys(old)
    if keys != encoder_side_keys(new) or any(not torch.equal(new[k], old[k].to(new[k].dtype)) for k in keys):
        raise SamaError(f"the exported VAE's encoder differs from {init_file}'s although trainable is 'decoder' "
                        "(a bug: the encoder should have been frozen); the latents would not match the DiT's")


def _rounded(t) -> list:
    return [round(float(v), 6) for v in t]


# ---------------------------------------------------------------------------------------------- train

def train_vae(cfg: VAETrainConfig, resume: Optional[str] = None) -> Path:
    """Train (or continue) the VAE; returns the final/ export folder."""
    from accelerate import Accelerator

    from .ema import EMA

    out = cfg.output_path
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    if accelerator.is_main_process:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    pool = ClipPool.from_datasets([cfg.resolve_path(d) for d in cfg.data.datasets])
    sampled_pool = (SampledLatentPool.from_folders([cfg.resolve_path(d) for d in cfg.data.sampled_latents])
                    if cfg.data.sampled_per_batch else None)
    vae = initial_vae(cfg)
    model = ReconstructionModel(vae).train()
    trained = [p for p in model.parameters() if p.requires_grad]  # all, or the decoder side (trainable)
    optimizer = torch.optim.AdamW(trained, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = EMA(unwrapped.named_parameters(), cfg.ema.decay) if cfg.ema.enabled else None
    log.info("VAE base_dim %d (decoder %d, training %s%s): %.2fM parameters (%.2fM trained); %d training "
             "clips; %d process(es); %d steps of %d single frames, then batches of %d x %d frames to step %d",
             cfg.model.base_dim, decoder_width(unwrapped.vae), cfg.trainable,
             f" from {cfg.init_from}" if cfg.init_from else "",
             sum(p.numel() for p in unwrapped.parameters()) / 1e6, sum(p.numel() for p in trained) / 1e6,
             len(pool), accelerator.num_processes, cfg.data.image_steps, cfg.data.image_batch_size,
             cfg.batch_size, cfg.data.num_frames, cfg.max_steps)
    if sampled_pool is not None:
        log.info("%d of each batch's %d samples: the DiT's sampled latents (%d files), compared with their "
                 "targets outside the edit region", cfg.data.sampled_per_batch, cfg.batch_size, len(sampled_pool))

    # loss.latent_noise is in normalised units: raw latent = normalised * Wan2.1 std + mean (sama_core.vae).
    latent_noise_scale = cfg.loss.latent_noise * torch.tensor(WAN21_LATENTS_STD).view(1, -1, 1, 1, 1)
    step = 0
    resume_from = ckpt.resolve_resume(out, resume)
    if resume_from is not None:
        step = ckpt.load_checkpoint(accelerator, resume_from, ema)["step"]

    metrics_path = out / "logs" / "metrics.jsonl"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    rank = accelerator.process_index
    sums, count, samples, t0 = torch.zeros(5), 0, 0, time.perf_counter()
    bar = _progress_bar(cfg, accelerator, step)
    deadline = loop.deadline_after(cfg.max_minutes)
    while step < cfg.max_steps:
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        num_frames, batch_size = phase(cfg, step)
        n_sampled = cfg.data.sampled_per_batch  # 0 unless sampled_pool (checked with the config)
        n_encoded = batch_size - n_sampled
        frames, noise, *extra = pool.batch(step, n_encoded * accelerator.num_processes, num_frames, cfg.seed,
                                           cfg.data.hflip, latent_noise=bool(cfg.loss.latent_noise))
        part = slice(rank * n_encoded, (rank + 1) * n_encoded)  # this process's share
        extra = (extra[0][part] * latent_noise_scale).to(accelerator.device) if extra else None
        encoded = frames[part].to(accelerator.device)
        targets, sampled, pixel_weight = encoded, None, None
        if n_sampled:
            latents, sampled_targets, keep = sampled_pool.batch(step, n_sampled * accelerator.num_processes,
                                                                num_frames, cfg.seed)
            share = slice(rank * n_sampled, (rank + 1) * n_sampled)
            sampled = latents[share].to(accelerator.device)
            targets = torch.cat([targets, sampled_targets[share].to(accelerator.device)])
            pixel_weight = torch.cat([torch.ones((n_encoded, *keep.shape[1:])), keep[share]]).to(accelerator.device)
        with accelerator.autocast():
            recon, mean, logvar = model(encoded, noise[part].to(accelerator.device), extra, sampled)
        loss = reconstruction_loss(recon, targets, mean, logvar, cfg.loss, pixel_weight)
        if n_sampled:  # logged apart: how well the decoder renders the DiT's latents where they should copy
            with torch.no_grad():
                sampled_mse = weighted_mean((recon[n_encoded:].float() - targets[n_encoded:]).pow(2),
                                            pixel_weight[n_encoded:])
        else:
            sampled_mse = torch.tensor(float("nan"))
        accelerator.backward(loss.total)
        if cfg.optim.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            ema.update(unwrapped.named_parameters())
        total = float(loss.total.detach())
        if not math.isfinite(total):
            raise SamaInputError(f"the VAE loss became {total} at step {step}: lower optim.lr or resume from an "
                                 "earlier checkpoint")
        sums += torch.stack([loss.total, loss.l1, loss.mse, loss.kl, sampled_mse.to(loss.total)]).detach().float().cpu()
        count += 1
        samples += batch_size * accelerator.num_processes
        if bar is not None:
            bar.update(1)
        out_of_time = loop.time_is_up(accelerator, deadline)
        last = step == cfg.max_steps or out_of_time
        if step % cfg.log.every == 0 or last:
            means = accelerator.reduce(sums.to(accelerator.device) / count, reduction="mean").cpu().tolist()
            elapsed = max(time.perf_counter() - t0, 1e-9)
            row = {"step": step, "loss": means[0], "l1": means[1], "mse": means[2], "kl": means[3],
                   "psnr": psnr_from_mse(means[2]), "lr": lr, "frames": num_frames,
                   "steps_per_s": count / elapsed, "samples_per_s": samples / elapsed}
            if n_sampled:
                row["sampled_mse"], row["sampled_psnr"] = means[4], psnr_from_mse(means[4])
            if accelerator.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                log.info("step %d  loss %.5f  l1 %.4f  mse %.5f (%.2f dB)  kl %.3f  lr %.3g  %.2f steps/s", step,
                         row["loss"], row["l1"], row["mse"], row["psnr"], row["kl"], lr, row["steps_per_s"])
                if n_sampled:
                    log.info("step %d  the DiT's latents, outside the edit region: %.2f dB", step,
                             row["sampled_psnr"])
            sums, count, samples, t0 = torch.zeros(5), 0, 0, time.perf_counter()
        if step % cfg.checkpoint.every == 0 or last:
            ckpt.save_checkpoint(accelerator, out, step, ema, {"kind": "vae"}, cfg.checkpoint.keep)
        if out_of_time:
            log.info("max_minutes (%s) spent at step %d of %d: checkpoint saved; exporting (continue with "
                     "--resume latest)", cfg.max_minutes, step, cfg.max_steps)
            break
    if bar is not None:
        bar.close()

    final = out / FINAL_DIR
    if accelerator.is_main_process:
        use_ema = ema is not None
        weights = copy.deepcopy(unwrapped.vae)
        if use_ema:
            # EMA names are the wrapper's ("vae.encoder...."); copy them into the plain VAE's parameters.
            params = dict(weights.named_parameters())
            with torch.no_grad():
                for name, shadow in ema.shadow.items():
                    params[name.removeprefix("vae.")].copy_(shadow)
        final = export_vae(cfg, weights.cpu(), pool, step, use_ema)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _progress_bar(cfg: VAETrainConfig, accelerator, step: int):
    if not (cfg.log.progress_bar and accelerator.is_main_process):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.max_steps, initial=step, desc="vae", unit="step", leave=False)


# ------------------------------------------------------------------------------------------------ CLI

@command_line("interrupted: resume with --resume latest")
def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m train.vae_train",
                                     description="Train the tiny SAMA-Shapes Wan VAE (resumable).")
    parser.add_argument("--config", required=True, help="YAML config (train/configs/shapes_vae.yaml)")
    parser.add_argument("--resume", default=None, help="'latest' (or a fresh start) or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="key.sub=value, e.g. max_steps=100 model.base_dim=8")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = load_vae_config(args.config, args.overrides)
    final = train_vae(cfg, resume=args.resume)
    print(f"VAE exported to {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
