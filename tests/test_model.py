"""The DiT's named behaviours, checked against an independent re-implementation written here."""

import math

import pytest
import torch
import torch.nn.functional as F

from sama_core.errors import SamaInputError
from sama_core.model import SamaDiT
from sama_core.rope import apply_rope, rope_band_dims, sequence_frequencies
from tiny_models import TINY, TINY_WAN, tiny_dit, tiny_inputs


# ------------------------------------------------------------------ an independent reference forward
# Written from the reference text with real-valued rotations and functional ops over a plain weight
# dict, so it shares no code with sama_core.

def _rope_real(x, grid, head_dim):
    """x (B, L, H, hd), grid (f, h, w): rotate adjacent pairs with cos/sin, positions from 0."""
    f, h, w = grid
    bands = (head_dim - 2 * (head_dim // 3), head_dim // 3, head_dim // 3)
    pos = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    pos = pos.reshape(-1, 3).double()  # (L, 3)
    angles = torch.cat([pos[:, i:i + 1] * 10000.0 ** (-torch.arange(0, d, 2).double() / d)
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
    ang = t.double()[:, None] * 10000.0 ** (-torch.arange(half).double() / half)[None]
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
        q = _rope_real(q.view(*q.shape[:2], cfg.num_heads, hd), grid, hd).flatten(2)
        k = _rope_real(k.view(*k.shape[:2], cfg.num_heads, hd), grid, hd).flatten(2)
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


# ------------------------------------------------------------------ tests

def test_plain_wan_matches_independent_reference():
    model = tiny_dit(TINY_WAN)
    inp = tiny_inputs(TINY_WAN)
    with torch.no_grad():
        ours = model(inp["target"], inp["timestep"], inp["context"]).video
        ref = reference_wan_t2v(model.state_dict(), TINY_WAN, inp["target"], inp["timestep"], inp["context"])
    assert ours.shape == (1, 16, 2, 8, 8)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_sama_target_only_is_wan_plus_target_segment():
    model = tiny_dit(TINY)
    inp = tiny_inputs(TINY)
    sd = model.state_dict()
    with torch.no_grad():
        ours = model(inp["target"], inp["timestep"], inp["context"]).video
        ref = reference_wan_t2v(sd, TINY, inp["target"], inp["timestep"], inp["context"],
                                segment_bias=sd["segment_embedding.weight"][2])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_shapes_and_determinism(dtype):
    model = tiny_dit().to(dtype)
    inp = {k: v.to(dtype) for k, v in tiny_inputs(batch=2, frames=3, size=6).items()}
    with torch.no_grad():
        a = model(**inp)
        b = model(**inp)
    assert a.video.shape == (2, 16, 3, 6, 6) and a.video.dtype == dtype
    assert a.semantic.shape == (2, 5, TINY.siglip_dim) and a.semantic.dtype == dtype
    assert torch.equal(a.video, b.video) and torch.equal(a.semantic, b.semantic)
    assert torch.isfinite(a.video.float()).all()


def test_semantic_tokens_have_zero_q_and_k_after_rope():
    model = tiny_dit()
    inp = tiny_inputs()
    seen = []
    attn = model.blocks[0].self_attn.attention

    def record(q, k, v):
        seen.append((q.clone(), k.clone()))
        return attn(q, k, v)
    model.blocks[0].self_attn.attention = record
    with torch.no_grad():
        model(**inp)
    q, k = seen[0]
    n_src = 2 * 4 * 4  # (F=2, 8/2, 8/2) source tokens come first
    sem = slice(n_src, n_src + 5)
    assert torch.count_nonzero(q[:, sem]) == 0 and torch.count_nonzero(k[:, sem]) == 0
    assert torch.count_nonzero(q[:, :n_src]) > 0 and torch.count_nonzero(k[:, n_src + 5:]) > 0


def test_source_and_target_rope_grids_both_start_at_origin():
    freqs = sequence_frequencies(32, source_grid=(2, 3, 3), num_semantic=4, target_grid=(2, 3, 3))
    assert torch.equal(freqs[:18], freqs[22:])
    assert torch.count_nonzero(freqs[18:22]) == 0
    assert torch.equal(freqs[0], torch.ones(16, dtype=torch.complex128))  # position (0,0,0) = no rotation
    assert rope_band_dims(128) == (44, 42, 42) and rope_band_dims(32) == (12, 10, 10)


def test_rope_rotates_adjacent_pairs_like_the_real_formula():
    x = torch.randn(1, 2 * 3 * 4, 2, 32)
    ours = apply_rope(x, sequence_frequencies(32, target_grid=(2, 3, 4)))
    torch.testing.assert_close(ours, _rope_real(x, (2, 3, 4), 32), atol=1e-6, rtol=1e-6)


def test_permuting_semantic_tokens_permutes_their_predictions_only():
    model = tiny_dit()
    inp = tiny_inputs(num_semantic=6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        a = model(**inp)
        b = model(**{**inp, "semantic_tokens": inp["semantic_tokens"][:, perm]})
    torch.testing.assert_close(b.semantic, a.semantic[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.video, a.video, atol=1e-5, rtol=1e-5)


def test_source_changes_the_output():
    model = tiny_dit()
    inp = tiny_inputs()
    with torch.no_grad():
        a = model(**inp).video
        b = model(**{**inp, "source": inp["source"] + 1.0}).video
        c = model(**{**inp, "source": None}).video
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3


def test_text_rows_are_padded_or_truncated_to_512():
    model = tiny_dit()
    inp = tiny_inputs(text_rows=9)
    padded = torch.cat([inp["context"], torch.zeros(1, 503, TINY.text_dim)], 1)
    long = torch.cat([padded, torch.randn(1, 88, TINY.text_dim)], 1)  # 600 rows
    with torch.no_grad():
        short_out = model(**inp).video
        padded_out = model(**{**inp, "context": padded}).video
        long_out = model(**{**inp, "context": long}).video
    assert torch.equal(short_out, padded_out)
    assert torch.equal(long_out, padded_out)


def test_bf16_runs_see_the_rounded_timestep_fp32_runs_do_not():
    model = tiny_dit()
    inp = tiny_inputs()
    with torch.no_grad():
        fp32_a = model(**{**inp, "timestep": torch.tensor([937.5])}).video
        fp32_b = model(**{**inp, "timestep": torch.tensor([936.0])}).video
        bf = model.to(torch.bfloat16)
        inp16 = {k: v.to(torch.bfloat16) for k, v in inp.items() if k != "timestep"}
        bf_a = bf(**inp16, timestep=torch.tensor([937.5])).video
        bf_b = bf(**inp16, timestep=torch.tensor([936.0])).video
    assert torch.equal(bf_a, bf_b)  # 937.5 rounds to 936 in bf16
    assert not torch.equal(fp32_a, fp32_b)


def test_gradient_checkpointing_gives_the_same_gradients():
    inp = tiny_inputs()
    grads = []
    for ckpt in (False, True):
        model = tiny_dit().train()
        model.gradient_checkpointing = ckpt
        out = model(**inp)
        (out.video.square().mean() + out.semantic.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_math_and_sdpa_attention_backends_agree():
    inp = tiny_inputs()
    with torch.no_grad():
        a = tiny_dit(attention_backend="auto")(**inp)
        b = tiny_dit(attention_backend="math")(**inp)
    torch.testing.assert_close(a.video, b.video, atol=1e-5, rtol=1e-5)


def test_bad_inputs_get_clear_errors():
    model = tiny_dit()
    inp = tiny_inputs()
    with pytest.raises(SamaInputError, match="semantic tokens must be"):
        model(**{**inp, "semantic_tokens": torch.randn(1, 65, 1152)})
    with pytest.raises(SamaInputError, match="target latents must be"):
        model(**{**inp, "target": torch.randn(1, 4, 2, 8, 8)})
    with pytest.raises(SamaInputError, match="plain Wan2.1 model"):
        tiny_dit(TINY_WAN)(**inp)
    with pytest.raises(SamaInputError, match="unknown attention backend 'fast'"):
        SamaDiT(TINY, attention_backend="fast")
    with pytest.raises(SamaInputError, match="needs the 'flash-attn' package"):
        SamaDiT(TINY, attention_backend="flash_attn")
