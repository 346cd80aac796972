"""An independent, straightforward re-implementation of the plain Wan2.1 T2V forward.

Written from the reference text with real-valued rotations and functional ops over a plain weight
dict, so it shares no code with sama_core. Used by tests/test_model.py as the ground truth and by
bench/dit_forward.py as the eager baseline.
"""

import math

import torch
import torch.nn.functional as F


def rope_real(x, grid, head_dim):
    """x (B, L, H, hd), grid (f, h, w): rotate adjacent pairs with cos/sin, positions from 0."""
    f, h, w = grid
    bands = (head_dim - 2 * (head_dim // 3), head_dim // 3, head_dim // 3)
    ar = lambda *a: torch.arange(*a, device=x.device)  # noqa: E731  (the inputs' device: CPU tests, GPU bench)
    pos = torch.stack(torch.meshgrid(ar(f), ar(h), ar(w), indexing="ij"), -1)
    pos = pos.reshape(-1, 3).double()  # (L, 3)
    angles = torch.cat([pos[:, i:i + 1] * 10000.0 ** (-ar(0, d, 2).double() / d)
                        for i, d in enumerate(bands)], dim=1)  # (L, hd/2)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    xe, xo = x.double()[..., 0::2], x.double()[..., 1::2]
    out = torch.stack([xe * cos - xo * sin, xe * sin + xo * cos], dim=-1).flatten(3)
    return out.to(x.dtype)


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _attn(q, k, v, heads):
    b, lq, d = q.shape
    q, k, v = (t.view(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), -1)
    return (p @ v).transpose(1, 2).reshape(b, lq, d)


def reference_wan_t2v(sd, cfg, x, t, ctx, segment_bias=None):
    """Plain Wan2.1 T2V forward over a weight dict (the optional bias is SAMA's target segment row)."""
    lin = lambda name, inp: F.linear(inp, sd[name + ".weight"], sd[name + ".bias"])
    half = cfg.freq_dim // 2
    ang = t.double()[:, None] * 10000.0 ** (-torch.arange(half, device=t.device).double() / half)[None]
    temb = torch.cat([ang.cos(), ang.sin()], 1).float()
    e = lin("time_embedding.2", F.silu(lin("time_embedding.0", temb)))
    e6 = lin("time_projection.1", F.silu(e)).view(-1, 6, cfg.dim)
    ctx = torch.cat([ctx, ctx.new_zeros(ctx.shape[0], 512 - ctx.shape[1], ctx.shape[2])], 1)
    ctx = lin("text_embedding.2", F.gelu(lin("text_embedding.0", ctx), approximate="tanh"))
    h = F.conv3d(x, sd["patch_embedding.weight"], sd["patch_embedding.bias"], stride=cfg.patch_size)
    grid = tuple(h.shape[2:])
    h = h.flatten(2).transpose(1, 2)
    if segment_bias is not None:
        h = h + segment_bias
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        m = sd[p + "modulation"] + e6
        ln = lambda z: F.layer_norm(z, (cfg.dim,), eps=cfg.eps)
        y = ln(h) * (1 + m[:, 1:2]) + m[:, 0:1]
        q = _rms(lin(p + "self_attn.q", y), sd[p + "self_attn.norm_q.weight"], cfg.eps)
        k = _rms(lin(p + "self_attn.k", y), sd[p + "self_attn.norm_k.weight"], cfg.eps)
        hd = cfg.dim // cfg.num_heads
        q = rope_real(q.view(*q.shape[:2], cfg.num_heads, hd), grid, hd).flatten(2)
        k = rope_real(k.view(*k.shape[:2], cfg.num_heads, hd), grid, hd).flatten(2)
        h = h + m[:, 2:3] * lin(p + "self_attn.o", _attn(q, k, lin(p + "self_attn.v", y), cfg.num_heads))
        y = F.layer_norm(h, (cfg.dim,), sd[p + "norm3.weight"], sd[p + "norm3.bias"], cfg.eps)
        q = _rms(lin(p + "cross_attn.q", y), sd[p + "cross_attn.norm_q.weight"], cfg.eps)
        k = _rms(lin(p + "cross_attn.k", ctx), sd[p + "cross_attn.norm_k.weight"], cfg.eps)
        h = h + lin(p + "cross_attn.o", _attn(q, k, lin(p + "cross_attn.v", ctx), cfg.num_heads))
        y = ln(h) * (1 + m[:, 4:5]) + m[:, 3:4]
        h = h + m[:, 5:6] * lin(p + "ffn.2", F.gelu(lin(p + "ffn.0", y), approximate="tanh"))
    m = sd["head.modulation"] + e[:, None]
    out = lin("head.head", F.layer_norm(h, (cfg.dim,), eps=cfg.eps) * (1 + m[:, 1:2]) + m[:, 0:1])
    f, hh, ww = grid
    pf, ph, pw = cfg.patch_size
    out = out.view(-1, f, hh, ww, pf, ph, pw, cfg.out_dim)
    return torch.einsum("bfhwpqrc->bcfphqwr", out).reshape(-1, cfg.out_dim, f * pf, hh * ph, ww * pw)
