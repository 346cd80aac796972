"""The Wan2.1 text-to-video DiT with SAMA's in-context additions.

Module and attribute names equal the checkpoint keys (official Wan / DiffSynth / SAMA-14B), so the
released files load with a plain `load_state_dict`. Every layer is built from an `operations`
namespace (Linear, LayerNorm, Conv3d, Embedding; default `torch.nn`) so ComfyUI can build the same
model with `comfy.ops` and manage its memory.

One forward covers every case of the reference (SAMA_REFERENCE.md section 3):
  sequence = [source tokens][semantic tokens][target tokens]   (each part optional but the target)
  segment ids: source 0, semantic 1, target 2
  RoPE: source and target grids both from (0,0,0); semantic tokens rotate by complex zero
With neither source nor semantic tokens it is plain Wan2.1 T2V.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .attention import get_attention
from .config import SamaConfig
from .errors import SamaInputError
from .rope import apply_rope, apply_rope_real, real_frequencies, sequence_frequencies

SEGMENT_SOURCE, SEGMENT_SEMANTIC, SEGMENT_TARGET = 0, 1, 2

# Tokens rows of the DiT's text input (SAMA_REFERENCE.md section 4): always exactly this many.
TEXT_LEN = 512


class SamaOutput(NamedTuple):
    video: torch.Tensor                 # (B, out_dim, F, H, W) flow-matching velocity of the target
    semantic: Optional[torch.Tensor]    # (B, N, siglip_dim) velocity of the semantic tokens, or None


def _param(p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A raw parameter (modulation, RMSNorm weight) in the dtype/device of the activations: keeps the
    model usable when weights are stored in another dtype or offloaded (ComfyUI, block offload)."""
    return p.to(dtype=like.dtype, device=like.device)


def sinusoidal_embedding(dim: int, timestep: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, dim) [cos | sin] embedding computed in float64, returned in the timestep's dtype
    (so a bf16 timestep is embedded from its rounded value, as the released bf16 pipeline does)."""
    half = dim // 2
    position = timestep.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=timestep.device) / half)
    angles = torch.outer(position, freqs)  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(timestep.dtype)


def fit_text_rows(context: torch.Tensor, text_len: int = TEXT_LEN) -> torch.Tensor:
    """Exactly `text_len` rows: zero-pad or truncate (B, L, text_dim) before `text_embedding`.
    Zero rows still matter after the embedding's bias, so the count must match the reference."""
    rows = context.shape[1]
    if rows > text_len:
        return context[:, :text_len]
    if rows < text_len:
        return torch.cat([context, context.new_zeros(context.shape[0], text_len - rows, context.shape[2])], 1)
    return context


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, normalised in float32 (the weight is applied in the input dtype)."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * _param(self.weight, x)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    """q, k, v, o projections with RMSNorm on q and k; 3D RoPE on q and k."""

    def __init__(self, dim, num_heads, eps, attention, ops, **factory):
        super().__init__()
        self.num_heads = num_heads
        self.attention = attention
        self.q = ops.Linear(dim, dim, **factory)
        self.k = ops.Linear(dim, dim, **factory)
        self.v = ops.Linear(dim, dim, **factory)
        self.o = ops.Linear(dim, dim, **factory)
        self.norm_q = RMSNorm(dim, eps, **factory)
        self.norm_k = RMSNorm(dim, eps, **factory)

    def heads(self, x):
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1)  # (B, L, dim) -> (B, L, heads, hd)

    def forward(self, x, freqs, attention=None):
        # attention: replaces self.attention for this call (sequence parallelism: sama_core/parallel.py)
        rope = apply_rope if torch.is_tensor(freqs) else (lambda t, f: apply_rope_real(t, *f))  # exact | fast
        q = rope(self.heads(self.norm_q(self.q(x))), freqs)  # (B, L, heads, hd)
        k = rope(self.heads(self.norm_k(self.k(x))), freqs)
        return self.o((attention or self.attention)(q, k, self.heads(self.v(x))))  # (B, L, dim)


class CrossAttention(SelfAttention):
    """The same projections attending from the video tokens to the 512 text rows, without RoPE."""

    def forward(self, x, context):
        q = self.heads(self.norm_q(self.q(x)))
        k = self.heads(self.norm_k(self.k(context)))
        return self.o(self.attention(q, k, self.heads(self.v(context))))


class DiTBlock(nn.Module):
    def __init__(self, cfg: SamaConfig, attention, ops, **factory):
        super().__init__()
        dim = cfg.dim
        self.norm1 = ops.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False, **factory)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps, attention, ops, **factory)
        self.norm3 = ops.LayerNorm(dim, eps=cfg.eps, elementwise_affine=True, **factory)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, attention, ops, **factory)
        self.norm2 = ops.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False, **factory)
        self.ffn = nn.Sequential(ops.Linear(dim, cfg.ffn_dim, **factory), nn.GELU(approximate="tanh"),
                                 ops.Linear(cfg.ffn_dim, dim, **factory))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim, **factory) / dim ** 0.5)

    def forward(self, x, context, t_mod, freqs, self_attention=None):
        # t_mod: (B, 6, dim) -> six (B, 1, dim) shift/scale/gate vectors, shared by every token.
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (_param(self.modulation, t_mod) + t_mod).chunk(6, 1)
        x = x + gate_sa * self.self_attn(modulate(self.norm1(x), shift_sa, scale_sa), freqs, self_attention)
        x = x + self.cross_attn(self.norm3(x), context)
        x = x + gate_ff * self.ffn(modulate(self.norm2(x), shift_ff, scale_ff))
        return x


class Head(nn.Module):
    def __init__(self, cfg: SamaConfig, ops, **factory):
        super().__init__()
        self.norm = ops.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False, **factory)
        self.head = ops.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size), **factory)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim, **factory) / cfg.dim ** 0.5)

    def forward(self, x, t):
        # Modulated by the plain time embedding t (B, dim), not the 6-way projection.
        shift, scale = (_param(self.modulation, t) + t.unsqueeze(1)).chunk(2, dim=1)  # (B, 1, dim) each
        return self.head(modulate(self.norm(x), shift, scale))


class SiglipFeatMLP(nn.Module):
    """SigLIP-space semantic tokens (B, N, 1152) -> DiT width (B, N, dim)."""

    def __init__(self, cfg: SamaConfig, ops, **factory):
        super().__init__()
        self.norm = ops.LayerNorm(cfg.siglip_dim, eps=1e-6, **factory)
        self.fc1 = ops.Linear(cfg.siglip_dim, cfg.siglip_hidden_dim, **factory)
        self.act = nn.GELU()  # exact erf GELU here, unlike the tanh GELU of the backbone
        self.fc2 = ops.Linear(cfg.siglip_hidden_dim, cfg.dim, **factory)

    def forward(self, s):
        return self.fc2(self.act(self.fc1(self.norm(s))))


class SemanticHead(nn.Module):
    """Final hidden states of the semantic tokens (B, N, dim) -> their velocity in SigLIP space."""

    def __init__(self, cfg: SamaConfig, ops, **factory):
        super().__init__()
        self.norm = ops.LayerNorm(cfg.dim, eps=1e-6, **factory)
        self.proj = ops.Linear(cfg.dim, cfg.siglip_dim, **factory)

    def forward(self, h):
        return self.proj(self.norm(h))


class SamaDiT(nn.Module):
    def __init__(self, config: SamaConfig, operations=nn, attention_backend: str = "auto",
                 device=None, dtype=None, rope: str = "exact"):
        super().__init__()
        if rope not in ("exact", "fast"):
            raise SamaInputError(f"rope must be 'exact' (float64 complex, as released) or 'fast' (float32), got {rope}")
        self.rope = rope
        self.config = cfg = config
        ops = operations if operations is not None else nn
        factory = dict(device=device, dtype=dtype)
        attention = get_attention(attention_backend)
        self.attention_backend = attention_backend
        self.gradient_checkpointing = False
        self.sequence_parallel = None  # a parallel.SequenceParallel: tokens split across processes

        self.patch_embedding = ops.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size,
                                          stride=cfg.patch_size, **factory)
        self.text_embedding = nn.Sequential(ops.Linear(cfg.text_dim, cfg.dim, **factory),
                                            nn.GELU(approximate="tanh"), ops.Linear(cfg.dim, cfg.dim, **factory))
        self.time_embedding = nn.Sequential(ops.Linear(cfg.freq_dim, cfg.dim, **factory), nn.SiLU(),
                                            ops.Linear(cfg.dim, cfg.dim, **factory))
        self.time_projection = nn.Sequential(nn.SiLU(), ops.Linear(cfg.dim, 6 * cfg.dim, **factory))
        self.blocks = nn.ModuleList([DiTBlock(cfg, attention, ops, **factory) for _ in range(cfg.num_layers)])
        self.head = Head(cfg, ops, **factory)
        if cfg.has_sama:
            self.segment_embedding = ops.Embedding(cfg.num_segment_types, cfg.dim, **factory)
            self.siglip_feat_mlp = SiglipFeatMLP(cfg, ops, **factory)
            self.semantic_head = SemanticHead(cfg, ops, **factory)

    # ---- pieces of the forward, each small enough to read on its own ----

    def patchify(self, latents: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(B, C, F, H, W) -> tokens (B, f*h*w, dim) in (f, h, w) order, and the grid (f, h, w)."""
        x = self.patch_embedding(latents)  # (B, dim, f, h, w)
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid

    def unpatchify(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        """(B, f*h*w, prod(patch)*C) -> (B, C, f*pf, h*ph, w*pw); channels are the last factor."""
        b = tokens.shape[0]
        f, h, w = grid
        pf, ph, pw = self.config.patch_size
        x = tokens.view(b, f, h, w, pf, ph, pw, self.config.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.config.out_dim, f * pf, h * ph, w * pw)

    def embed_time(self, timestep: torch.Tensor, dtype: torch.dtype):
        """One timestep per sample -> t (B, dim) for the head and t_mod (B, 6, dim) for every block.
        The timestep is cast to the compute dtype first (bf16 rounds it, as the released pipeline)."""
        t = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, timestep.to(dtype)))
        t_mod = self.time_projection(t).unflatten(1, (6, self.config.dim))
        return t, t_mod

    def _check_inputs(self, target, timestep, source, semantic_tokens):
        if target.ndim != 5 or target.shape[1] != self.config.in_dim:
            raise SamaInputError(f"target latents must be (B, {self.config.in_dim}, F, H, W), got "
                                 f"{tuple(target.shape)}")
        b = target.shape[0]
        if timestep.numel() not in (1, b):
            raise SamaInputError(f"timestep must hold 1 or {b} values (one per sample), got {timestep.numel()}")
        if (source is not None or semantic_tokens is not None) and not self.config.has_sama:
            raise SamaInputError("this is a plain Wan2.1 model: source video and semantic tokens need the SAMA "
                                 "weights (segment_embedding, siglip_feat_mlp, semantic_head) loaded on top")
        if source is not None and (source.ndim != 5 or source.shape[:2] != target.shape[:2]):
            raise SamaInputError(f"source latents {tuple(source.shape)} must match the target's batch and "
                                 f"channels {tuple(target.shape[:2])}")
        if semantic_tokens is not None and (semantic_tokens.ndim != 3 or semantic_tokens.shape[0] != b
                                            or semantic_tokens.shape[2] != self.config.siglip_dim):
            raise SamaInputError(
                f"semantic tokens must be (B={b}, N, {self.config.siglip_dim}) in SigLIP space, got "
                f"{tuple(semantic_tokens.shape)}; anchors from a different image encoder width cannot be used")

    def forward(self, target: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                source: Optional[torch.Tensor] = None,
                semantic_tokens: Optional[torch.Tensor] = None) -> SamaOutput:
        """target (B, 16, F, H, W) noisy latents; timestep (B,) = sigma * 1000; context (B, L, text_dim);
        source (B, 16, F', H, W) clean latents; semantic_tokens (B, N, siglip_dim) noisy SigLIP tokens."""
        timestep = torch.as_tensor(timestep, device=target.device).reshape(-1)
        self._check_inputs(target, timestep, source, semantic_tokens)
        dtype = target.dtype
        b = target.shape[0]
        timestep = timestep.expand(b) if timestep.numel() == 1 else timestep

        t, t_mod = self.embed_time(timestep, dtype)
        context = self.text_embedding(fit_text_rows(context.to(dtype), self.config.text_len))  # (B, 512, dim)

        parts, segments, source_grid, num_semantic = [], [], None, 0
        if source is not None:
            src_tokens, source_grid = self.patchify(source.to(dtype))
            parts.append(src_tokens)
            segments.append(torch.full((src_tokens.shape[1],), SEGMENT_SOURCE))
        if semantic_tokens is not None:
            sem = self.siglip_feat_mlp(semantic_tokens.to(dtype))  # (B, N, dim)
            num_semantic = sem.shape[1]
            parts.append(sem)
            segments.append(torch.full((num_semantic,), SEGMENT_SEMANTIC))
        tgt_tokens, target_grid = self.patchify(target)
        parts.append(tgt_tokens)
        segments.append(torch.full((tgt_tokens.shape[1],), SEGMENT_TARGET))
        x = torch.cat(parts, dim=1)  # (B, L, dim)
        if self.config.has_sama:
            x = x + self.segment_embedding(torch.cat(segments).to(x.device)).to(dtype)

        freqs = sequence_frequencies(self.config.head_dim, source_grid, num_semantic, target_grid, x.device)
        if self.rope == "fast":
            freqs = real_frequencies(freqs)  # (cos, sin) float32: compile-friendly, ~1e-7 relative difference
        sp, full_length, attend = self.sequence_parallel, x.shape[1], None
        if sp is not None:  # this process keeps its part of the tokens; self-attention re-splits by heads
            x, freqs = sp.shard(x), sp.shard_frequencies(freqs)
            attend = sp.attention(self.blocks[0].self_attn.attention, full_length)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, context, t_mod, freqs, attend, use_reentrant=False)
            else:
                x = block(x, context, t_mod, freqs, attend)
        if sp is not None:
            x = sp.gather(x, full_length)  # (B, L, dim) on every process

        semantic = None
        if semantic_tokens is not None:
            start = 0 if source_grid is None else math.prod(source_grid)
            semantic = self.semantic_head(x[:, start:start + num_semantic])  # (B, N, siglip_dim)
        num_target = tgt_tokens.shape[1]
        video = self.unpatchify(self.head(x[:, -num_target:], t), target_grid)
        return SamaOutput(video, semantic)


def default_operations():
    """torch.nn as an operations namespace (what ComfyUI's comfy.ops provides in the host)."""
    return SimpleNamespace(Linear=nn.Linear, LayerNorm=nn.LayerNorm, Conv3d=nn.Conv3d, Embedding=nn.Embedding)
