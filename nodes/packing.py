"""Semantic tokens riding inside a LATENT, so native ComfyUI samplers denoise them (no ComfyUI import).

SAMA's semantic tokens (B, N, D) follow exactly the flow-matching update and CFG combination of the
video latents, so they can be stored as extra latent frames appended after the video frames:
    latent (B, C, F + P, H, W) = [video frames][P packed frames]
The packed frames hold the N*D token values (frame-major: frame, channel, row, column) and zeros
after them ("pad" entries). The model wrapper unpacks the tokens before the DiT and packs their
velocity back; pad entries get v = x / sigma, whose clean estimate x - sigma * v is exactly 0, so
they stay on their own flow path and never disturb anything. Everything here is pure tensor code.
"""

from __future__ import annotations

import math

import torch


def packed_frames(num_tokens: int, token_dim: int, channels: int, height: int, width: int) -> int:
    """How many latent frames hold N x D values."""
    return math.ceil(num_tokens * token_dim / (channels * height * width))


def pack(video: torch.Tensor, tokens: torch.Tensor, fill: float | torch.Tensor = 0.0) -> torch.Tensor:
    """video (B, C, F, H, W) + tokens (B, N, D) -> (B, C, F + P, H, W). `fill` (a scalar or a per-channel
    (C,) tensor) is written to the pad entries."""
    b, c, _, h, w = video.shape
    n, d = tokens.shape[1:]
    p = packed_frames(n, d, c, h, w)
    region = torch.empty(b, p, c, h, w, dtype=video.dtype, device=video.device)
    region[:] = torch.as_tensor(fill, dtype=video.dtype, device=video.device).reshape(-1, 1, 1) \
        if torch.is_tensor(fill) else fill
    flat = region.view(b, -1)
    flat[:, : n * d] = tokens.reshape(b, -1).to(video.dtype)
    return torch.cat([video, region.transpose(1, 2)], dim=2)


def unpack(latent: torch.Tensor, video_frames: int, num_tokens: int, token_dim: int):
    """(B, C, F + P, H, W) -> video (B, C, F, H, W), tokens (B, N, D)."""
    b = latent.shape[0]
    region = latent[:, :, video_frames:].transpose(1, 2).reshape(b, -1)  # (B, P*C*H*W)
    if region.shape[1] < num_tokens * token_dim:
        raise ValueError(f"the latent holds {latent.shape[2] - video_frames} packed frames, too few for "
                         f"{num_tokens} semantic tokens of width {token_dim}; it was not made by SAMA In-Context")
    return latent[:, :, :video_frames], region[:, : num_tokens * token_dim].reshape(b, num_tokens, token_dim)


def pack_velocity(latent: torch.Tensor, video_v: torch.Tensor, token_v: torch.Tensor,
                  sigma: torch.Tensor) -> torch.Tensor:
    """The model output for a packed latent: the video velocity, the tokens' velocity in their slots,
    and x / sigma for the pad entries. sigma: (B,)."""
    b = latent.shape[0]
    video_frames = video_v.shape[2]
    pad_v = latent[:, :, video_frames:] / sigma.reshape(b, 1, 1, 1, 1).to(latent.dtype)
    region = pad_v.transpose(1, 2).contiguous()  # (B, P, C, H, W)
    flat = region.view(b, -1)
    flat[:, : token_v[0].numel()] = token_v.reshape(b, -1).to(latent.dtype)
    return torch.cat([video_v.to(latent.dtype), region.transpose(1, 2)], dim=2)
