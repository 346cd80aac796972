"""Frozen encoders that turn decoded samples into what the DiT trains on.

    target / source frames (B, 3, F, H, W) in [-1, 1]  --Wan VAE-->  normalised latents (B, 16, T, h, w)
    prompts                                            --UMT5----->  real token rows (L_i, text_dim) each
    anchor frames (B, N, H, W, 3) in [0, 1]            --SigLIP--->  (B, 65 * N, siglip_dim) anchor tokens

The same code serves the `cache` step (features written to shards) and training straight from raw
data (features computed next to the DiT every step), so both see identical features.
A "feature batch" is a dict:
    target (B, 16, T, h, w) | source (B, 16, T, h, w) or None | context (B, L, text_dim) zero-padded rows |
    semantic (B, 65N, siglip_dim) or None | valid_latent_frames (B,) | seeds (B,) | skipped [str] |
    semantic_mask (B,) float, optional: 0 for samples without a semantic target | ...
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from sama_core.errors import SamaInputError
from sama_core.prompts import clean_prompt, negative_prompt
from sama_core.region import latent_grid

from .data import derive_seed

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def latent_frames_of(num_frames: int) -> int:
    """Latent frames of `num_frames` video frames: the causal VAE encodes frame 0 alone, then 4 per latent."""
    return 1 + (num_frames - 1 + 3) // 4


def valid_latent_frames(valid_frames: torch.Tensor) -> torch.Tensor:
    """(B,) real video frames -> (B,) latent frames that hold at least one real frame. A latent frame j >= 1
    covers video frames 4j-3 .. 4j, so it is pure padding when 4j-3 >= valid."""
    return 1 + torch.div(valid_frames - 1 + 3, 4, rounding_mode="floor")


def latent_grid_mask(mask: torch.Tensor, latent_shape: Sequence[int]) -> torch.Tensor:
    """A keep mask (B, F, H, W) -> the latent grid (B, T, h, w) (sama_core.region.latent_grid)."""
    return latent_grid(mask, latent_shape, what="a keep mask")


def pad_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """[(L_i, D)] -> (B, max L_i, D), zeros after each sample's real rows (the DiT pads on to 512 rows)."""
    length = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


EDIT_BATCH = "-"  # the `pretext` of a batch of edits (train/data.py's batch plan)


def dropped(seeds: torch.Tensor, probability: float) -> list[bool]:
    """Which samples lose their prompt to prompt dropout: decided by each sample's seed alone (the same
    choice on any device and for any number of processes)."""
    if probability <= 0:
        return [False] * len(seeds)
    return [torch.rand((), generator=torch.Generator().manual_seed(derive_seed(s, "prompt_dropout"))).item()
            < probability for s in seeds.tolist()]


def drop_prompts(context: torch.Tensor, seeds: torch.Tensor, negative: torch.Tensor,
                 probability: float) -> torch.Tensor:
    """Prompt dropout for classifier-free guidance: each sample's prompt rows (B, L, D) are replaced by the
    negative prompt's rows (N, D) with `probability` (`dropped`). Zero rows past a prompt are the DiT's own
    padding, so the batch comes back padded to its longest remaining prompt."""
    drop = dropped(seeds, probability)
    if not any(drop):
        return context
    negative = negative.to(context)
    return pad_rows([negative if d else row for d, row in zip(drop, context)])


def copy_source_where_dropped(features: dict, probability: float) -> dict:
    """`train.dropout_copies_source`: in a batch of edits (not of stage-0 pretexts), every sample whose
    prompt dropout drops (same decision as drop_prompts) and whose source has the target's shape gets its
    source as the target, so the unconditional prediction learns "keep the source" instead of "some edit,
    any edit". Classifier-free
    guidance then extrapolates from a copy of the source towards the instruction's edit. Why (session 7):
    the SAMA-Shapes DiT kept the parts of the clip an edit leaves alone badly (its first-step error there 6x
    that of copying) and its unconditional prediction made edits of its own, while the same DiT learns a
    plain copy in ~800 steps. Such samples get `semantic_mask` 0: the cache holds the anchor tokens of the
    edited target only, so they have no semantic target (their anchor-token input stays the target's, as at
    sampling time, when the unconditional pass sees the anchor tokens being denoised towards the edit)."""
    if features.get("pretext", EDIT_BATCH) != EDIT_BATCH:
        return features  # a stage-0 pretext's source is the corrupted clip: copying it would be learnt
    source = features.get("source")
    if probability <= 0 or source is None or source.shape != features["target"].shape:
        return features
    drop = torch.tensor(dropped(features["seeds"], probability), device=source.device)
    if not drop.any():
        return features
    mask = drop.view(-1, *([1] * (source.ndim - 1)))
    return dict(features, target=torch.where(mask, source, features["target"]), semantic_mask=(~drop).float())


def negative_rows(cfg, encoders=None, cached=None) -> torch.Tensor:
    """(N, text_dim) rows of the negative prompt, the unconditional input of classifier-free guidance:
    from a feature cache's extras, else encoded now."""
    if cached is not None:
        return cached.negative_rows()
    return encoders.text_rows([negative_prompt(None, cfg.data.edit_prefix)])[0]


class FeatureEncoders:
    """The Wan VAE, the UMT5 text encoder and (for semantic anchoring) the SigLIP anchor encoder."""

    def __init__(self, vae=None, text_encoder=None, anchor_encoder=None, device="cpu"):
        self.vae, self.text_encoder, self.anchor_encoder = vae, text_encoder, anchor_encoder
        self.device = torch.device(device)

    @classmethod
    def from_config(cls, cfg, device="cpu", need_vae=True, need_text=True, need_anchors=None) -> "FeatureEncoders":
        enc = cfg.encoders
        dtype = DTYPES[enc.dtype]
        need_anchors = cfg.data.semantic_anchoring if need_anchors is None else need_anchors
        missing = [name for name, needed, path in (("encoders.vae", need_vae, enc.vae),
                                                   ("encoders.text_encoder", need_text, enc.text_encoder),
                                                   ("encoders.siglip", need_anchors, enc.siglip))
                   if needed and not path]
        if missing:
            raise SamaInputError(
                f"{', '.join(missing)} not set: encoding raw data needs the frozen encoders (or set "
                "data.cache_dir to train from a feature cache built by `python -m train cache`)")
        vae = text = anchors = None
        if need_vae:
            from sama_core.vae import WanVAE
            # fp16 overflows in the Wan VAE; it runs in fp32 then, bf16 is fine.
            vae = WanVAE.from_file(cfg.resolve_path(enc.vae), dtype=torch.float32 if dtype == torch.float16 else dtype,
                                   device=device)
        if need_text:
            from sama_core.text import load_text_encoder
            text = load_text_encoder(cfg.resolve_path(enc.text_encoder),
                                     tokenizer_path=cfg.resolve_path(enc.tokenizer), dtype=dtype, device=device,
                                     cache_size=0)
        if need_anchors:
            from sama_core.anchors import AnchorEncoder
            anchors = AnchorEncoder.from_file(cfg.resolve_path(enc.siglip), dtype=dtype, device=device,
                                              layer_norm_eps=enc.siglip_layer_norm_eps)
        return cls(vae, text, anchors, device)

    # ---- the three encoders, each batched

    @torch.no_grad()
    def latents(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, 16, T, H/8, W/8), float32."""
        return self.vae.encode(frames.to(self.device))

    @torch.no_grad()
    def text_rows(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Real token rows of each prompt [(L_i, text_dim)], float32 (zeros after L_i are implied)."""
        full = self.text_encoder.encode(list(prompts)).float()  # (B, text_len, D), zeros after each length
        lengths = [len(self.text_encoder.token_ids(clean_prompt(p))) for p in prompts]
        return [full[i, : min(n, full.shape[1])].clone() for i, n in enumerate(lengths)]

    @torch.no_grad()
    def anchor_tokens(self, anchor_frames: torch.Tensor) -> torch.Tensor:
        """(B, N, H, W, 3) in [0, 1] -> (B, 65 * N, width): N anchors per sample, anchor after anchor."""
        b, n = anchor_frames.shape[:2]
        pooled = self.anchor_encoder.encode_images(anchor_frames.flatten(0, 1))  # (B * N, 65, width)
        return pooled.reshape(b, n * pooled.shape[1], pooled.shape[2]).float()

    # ---- a whole decoded batch

    def encode_batch(self, raw: dict) -> dict:
        """A `data.collate_raw` batch -> a feature batch (on this encoder's device)."""
        if raw["source_frames"] is not None:  # one VAE call for both (same shapes within a bucket)
            both = self.latents(torch.cat([raw["target_frames"], raw["source_frames"]]))
            target, source = both.chunk(2)
        else:
            target, source = self.latents(raw["target_frames"]), None
        context = pad_rows(self.text_rows(raw["prompts"])).to(self.device)
        semantic = None
        if raw["anchor_frames"] is not None:
            if self.anchor_encoder is None:
                raise SamaInputError("semantic anchoring is on but no SigLIP encoder is loaded (encoders.siglip)")
            semantic = self.anchor_tokens(raw["anchor_frames"])
        keep = raw.get("keep_masks")
        if keep is not None:
            keep = latent_grid_mask(keep, target.shape[2:]).to(target.device)
        return {"target": target, "source": source, "context": context, "semantic": semantic, "keep": keep,
                "valid_latent_frames": valid_latent_frames(raw["valid_frames"]),
                "seeds": raw["seeds"], "indices": raw["indices"], "skipped": raw["skipped"],
                "pretext": raw["pretext"]}


def batch_to(batch: dict, device, dtype: Optional[torch.dtype] = None) -> dict:
    """Move the tensors of a feature batch (float ones optionally cast); seeds and counts stay integers."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out
