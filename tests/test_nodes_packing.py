"""Semantic tokens packed into latent frames (the native-sampler path), without ComfyUI."""

import torch

from nodes.packing import pack, pack_velocity, packed_frames, unpack


def test_pack_unpack_round_trip_and_layout():
    video = torch.randn(2, 16, 3, 4, 6)
    tokens = torch.randn(2, 65, 48)
    p = packed_frames(65, 48, 16, 4, 6)
    assert p == -(-65 * 48 // (16 * 4 * 6)) == 9
    packed = pack(video, tokens, fill=torch.arange(16.0))
    assert packed.shape == (2, 16, 3 + p, 4, 6)
    assert torch.equal(packed[:, :, :3], video)
    v, t = unpack(packed, 3, 65, 48)
    assert torch.equal(v, video) and torch.equal(t, tokens)
    # Pad entries (after the 65*48 values, frame-major) carry the per-channel fill.
    region = packed[:, :, 3:].transpose(1, 2).reshape(2, -1)
    pad = region[:, 65 * 48:]
    channel_of_pad = (torch.arange(65 * 48, p * 16 * 24) // 24) % 16
    assert torch.equal(pad, channel_of_pad.float().expand(2, -1))


def test_pad_velocity_keeps_pad_entries_on_a_zero_clean_path():
    video = torch.randn(1, 16, 2, 4, 4)
    tokens = torch.randn(1, 10, 20)
    x = pack(video, tokens) + 0.5
    sigma = torch.tensor([0.7])
    vv, tv = torch.randn_like(video), torch.randn_like(tokens)
    out = pack_velocity(x, vv, tv, sigma)
    got_v, got_t = unpack(out, 2, 10, 20)
    assert torch.equal(got_v, vv) and torch.equal(got_t, tv)
    pad_x = x[:, :, 2:].transpose(1, 2).reshape(1, -1)[:, 200:]
    pad_v = out[:, :, 2:].transpose(1, 2).reshape(1, -1)[:, 200:]
    torch.testing.assert_close(pad_x - 0.7 * pad_v, torch.zeros_like(pad_x), atol=1e-6, rtol=0)
