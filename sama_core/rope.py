"""3D rotary position embedding of the Wan2.1 DiT, with SAMA's token layout.

Layout facts reproduced from the released code (SAMA_REFERENCE.md sections 1, 3, 8):
- head_dim is split into three bands of real dims (frames, height, width) =
  (hd - 2*(hd//3), hd//3, hd//3), each band with its own frequencies 1/theta^(2j/band_dim);
- channels are rotated in ADJACENT pairs (channel 2j and 2j+1 form one complex number);
- the frequency tables and the rotation are computed in float64, then cast back;
- source and target video tokens both take positions starting at (0, 0, 0);
- semantic tokens take a complex-ZERO frequency, so their rotated q and k are exactly 0.
"""

from __future__ import annotations

import functools

import torch

THETA = 10000.0
MAX_POSITIONS = 1024


def rope_band_dims(head_dim: int) -> tuple[int, int, int]:
    """Real dims of the (frame, height, width) bands: 44/42/42 for head_dim 128, 12/10/10 for 32."""
    hw = head_dim // 3
    bands = (head_dim - 2 * hw, hw, hw)
    if any(b % 2 for b in bands):
        raise ValueError(f"head_dim {head_dim} gives RoPE bands {bands}; every band must be even")
    return bands


def band_frequencies(band_dim: int, max_positions: int = MAX_POSITIONS, theta: float = THETA) -> torch.Tensor:
    """(max_positions, band_dim // 2) complex128 rotations e^(i * pos * theta^(-2j/band_dim))."""
    inv_freq = 1.0 / theta ** (torch.arange(0, band_dim, 2, dtype=torch.float64) / band_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


@functools.lru_cache(maxsize=8)
def _band_tables(head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(band_frequencies(d) for d in rope_band_dims(head_dim))


def grid_frequencies(head_dim: int, grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """(f*h*w, head_dim // 2) complex128 rotations of a token grid flattened in (f, h, w) order,
    positions starting at (0, 0, 0)."""
    f, h, w = grid
    if max(grid) > MAX_POSITIONS:
        raise ValueError(f"token grid {grid} exceeds the {MAX_POSITIONS} RoPE positions per axis")
    ff, fh, fw = _band_tables(head_dim)
    table = torch.cat([
        ff[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
        fw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1)  # (f, h, w, head_dim // 2)
    return table.reshape(f * h * w, head_dim // 2).to(device)


def semantic_frequencies(head_dim: int, num_tokens: int, device=None) -> torch.Tensor:
    """(num_tokens, head_dim // 2) complex zeros: the released SAMA quirk. Rotating by 0 makes the
    semantic tokens' q and k exactly zero, so they attend uniformly and are attended with logit 0."""
    return torch.zeros(num_tokens, head_dim // 2, dtype=torch.complex128, device=device)


def sequence_frequencies(head_dim: int, source_grid=None, num_semantic: int = 0, target_grid=None,
                         device=None) -> torch.Tensor:
    """Rotations for the whole in-context sequence [source][semantic][target]: (L, head_dim // 2)."""
    parts = []
    if source_grid is not None:
        parts.append(grid_frequencies(head_dim, source_grid, device))
    if num_semantic:
        parts.append(semantic_frequencies(head_dim, num_semantic, device))
    parts.append(grid_frequencies(head_dim, target_grid, device))
    return torch.cat(parts, dim=0)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, L, heads, head_dim) by freqs (L, head_dim // 2), in float64."""
    b, seq, heads, hd = x.shape
    pairs = torch.view_as_complex(x.to(torch.float64).reshape(b, seq, heads, hd // 2, 2))
    rotated = torch.view_as_real(pairs * freqs.view(1, seq, 1, hd // 2)).flatten(3)  # (B, L, heads, hd)
    return rotated.to(x.dtype)


def real_frequencies(freqs: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) tables (L, head_dim // 2) of complex rotations, for `apply_rope_real`."""
    return freqs.real.to(dtype), freqs.imag.to(dtype)


def apply_rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation of adjacent channel pairs in real float32 arithmetic (opt-in "fast" RoPE): no
    complex or float64 ops, so torch.compile can fuse it; differs from `apply_rope` by float32 rounding.
    Semantic tokens have cos = sin = 0, so their q and k are still exactly zero."""
    b, seq, heads, hd = x.shape
    pairs = x.float().reshape(b, seq, heads, hd // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.view(1, seq, 1, hd // 2), sin.view(1, seq, 1, hd // 2)
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(3).to(x.dtype)
