import logging
import math
import subprocess
from fractions import Fraction

import numpy as np
import pytest
import torch

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
from PIL import Image  # noqa: E402

from sama_core import video as V  # noqa: E402
from sama_core.errors import SamaFileNotFoundError, SamaInputError, SamaInterrupted  # noqa: E402

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg(*args):
    subprocess.run([FFMPEG, "-hide_banner", "-v", "error", "-y", *map(str, args)], check=True)


def make_clip(path, size="64x48", rate="12", seconds=1, audio=False, faststart=False):
    """A test-pattern H.264 clip made with lavfi sources, optionally with a 440 Hz sine-tone AAC track."""
    args = ["-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}"]
    if audio:
        args += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000", "-c:a", "aac"]
    args += ["-t", seconds, "-c:v", "libx264", "-g", "4", "-pix_fmt", "yuv420p"]
    if faststart:
        args += ["-movflags", "+faststart"]
    ffmpeg(*args, path)
    return path


def write_lossless(path, frames_u8, pix_fmt, codec, fps=8):
    """Write (F, H, W, C) uint8 frames losslessly (ffv1 / png codec) in ``pix_fmt``."""
    f, h, w, _ = frames_u8.shape
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), pix_fmt_in=pix_fmt, pix_fmt_out=pix_fmt, codec=codec, fps=fps, quality=None,
        macro_block_size=1, ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in frames_u8:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    return path


def smooth_frames(n, h, w):
    """(n, h, w, 3) smooth colour ramps that move with the frame index (compress well, resample well)."""
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    frames = []
    for i in range(n):
        t = i / max(n - 1, 1)
        frames.append(torch.stack([(x + 0 * y) * 0.8 + 0.1 * t, y + 0 * x, 0.5 * x + 0.3 * y + 0.1 * t], -1))
    return torch.stack(frames).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# 4k+1 and layout


def test_pad_to_4k_plus_1_and_trim_round_trip():
    g = torch.Generator().manual_seed(0)
    for n in range(1, 14):
        frames = torch.rand(n, 4, 5, 3, generator=g)
        padded, original = V.pad_to_4k_plus_1(frames)
        expected_len = min(m for m in range(1, 100) if m % 4 == 1 and m >= n)
        assert original == n and padded.shape == (expected_len, 4, 5, 3)
        assert torch.equal(padded[:n], frames)
        assert all(torch.equal(padded[i], frames[-1]) for i in range(n, expected_len))
        assert torch.equal(V.trim(padded, original), frames)
    # The same on a (B, C, F, H, W) video along dim 2.
    video = torch.rand(1, 3, 6, 2, 2, generator=g)
    padded, original = V.pad_to_4k_plus_1(video, dim=2)
    assert padded.shape == (1, 3, 9, 2, 2) and original == 6
    assert torch.equal(padded[:, :, 8], video[:, :, 5])
    assert torch.equal(V.trim(padded, original, dim=2), video)
    with pytest.raises(SamaInputError):
        V.trim(padded, 0, dim=2)


def test_vae_layout_round_trip():
    frames = torch.rand(3, 4, 6, 3, generator=torch.Generator().manual_seed(1))
    x = V.frames_to_vae_input(frames)
    assert x.shape == (1, 3, 3, 4, 6)
    assert x[0, 2, 1, 3, 5] == frames[1, 3, 5, 2] * 2 - 1
    torch.testing.assert_close(V.vae_output_to_frames(x), frames, atol=1e-6, rtol=0)
    # Decoder overshoot is clamped into [0, 1].
    assert V.vae_output_to_frames(x * 3).min() >= 0 and V.vae_output_to_frames(x * 3).max() <= 1
    with pytest.raises(SamaInputError, match="batch"):
        V.vae_output_to_frames(torch.zeros(2, 3, 1, 4, 4))


# ----------------------------------------------------------------------------------------------------------
# Buckets and sizes


def brute_force_buckets(area, multiple=32, limit=2048):
    """Every (w, h) on the grid whose w gives the closest area for its h (ties: larger w), aspect 0.5..2."""
    sides = range(multiple, limit + 1, multiple)
    buckets = set()
    for h in sides:
        best_w = min(sides, key=lambda w: (abs(w * h - area), -w))
        if 0.5 <= best_w / h <= 2.0:
            buckets.add((best_w, h))
    return buckets


def test_bucket_set_matches_brute_force():
    for area in (480 * 832, 256 * 256, 720 * 1280):
        assert set(V.bucket_sizes(area)) == brute_force_buckets(area)
    buckets = V.bucket_sizes()
    assert all(w % 32 == 0 and h % 32 == 0 and 0.5 <= w / h <= 2.0 for w, h in buckets)
    assert (832, 480) in buckets and (480, 832) in buckets


@pytest.mark.parametrize(
    "source",
    [(1920, 1080), (1080, 1920), (1000, 1000), (640, 480), (480, 640), (3840, 1600), (100, 400),
     (400, 100), (1280, 720), (720, 1280), (2048, 858), (1440, 1080), (853, 480), (64, 48)],
)
def test_bucket_choice_is_closest_aspect(source):
    area = 480 * 832
    aspect = source[0] / source[1]
    candidates = brute_force_buckets(area)
    best = min(abs(math.log(w / h) - math.log(aspect)) for w, h in candidates)
    chosen = V.choose_bucket(*source)
    assert chosen in candidates
    assert abs(math.log(chosen[0] / chosen[1]) - math.log(aspect)) == pytest.approx(best, abs=1e-12)


def test_reference_size_for_16_9():
    assert V.choose_bucket(1920, 1080) == (832, 480)
    assert V.choose_bucket(1080, 1920) == (480, 832)
    assert V.resolve_size(1280, 720) == (832, 480)


def test_explicit_sizes():
    assert V.resolve_size(1920, 1080, 640, 368) == (640, 368)
    # One side given: the other follows the source aspect, rounded to a multiple of 16.
    assert V.resolve_size(1920, 1080, width=640) == (640, 16 * round(640 / (1920 / 1080) / 16))
    assert V.resolve_size(1920, 1080, height=480) == (16 * round(480 * 1920 / 1080 / 16), 480)
    with pytest.raises(SamaInputError, match="496 or 512"):
        V.resolve_size(1920, 1080, 500, 288)
    with pytest.raises(SamaInputError, match="height 8 "):
        V.resolve_size(1920, 1080, 64, 8)


# ----------------------------------------------------------------------------------------------------------
# Resizing and restore


@pytest.mark.parametrize("target", [(32, 32), (16, 48), (64, 16)])
@pytest.mark.parametrize("mode", ["crop", "letterbox", "stretch"])
def test_restore_returns_the_source_size(mode, target):
    source = smooth_frames(2, 24, 40)  # (F, H, W, 3)
    plan = V.plan_resize((40, 24), target, mode)
    resized = V.apply_resize(source, plan)
    assert resized.shape == (2, target[1], target[0], 3)
    restored = V.restore(resized, plan, source=source if mode == "crop" else None)
    assert restored.shape == source.shape
    # The picture comes back (a smooth ramp survives down/up sampling within a few percent).
    assert (restored - source).abs().max() < 0.05


def test_letterbox_pads_and_crop_keeps_the_centre():
    source = smooth_frames(1, 24, 40)
    plan = V.plan_resize((40, 24), (32, 32), "letterbox")
    scale = min(32 / 40, 32 / 24)
    inner_h = round(24 * scale)
    top = (32 - inner_h) // 2
    assert plan.scaled_size == (32, inner_h) and plan.offset == (0, top)
    out = V.apply_resize(source, plan, pad_value=0.25)
    assert torch.equal(out[:, :top], torch.full_like(out[:, :top], 0.25))
    assert torch.equal(out[:, top + inner_h :], torch.full_like(out[:, top + inner_h :], 0.25))

    plan = V.plan_resize((40, 24), (32, 32), "crop")
    scale = max(32 / 40, 32 / 24)
    scaled_w = round(40 * scale)
    assert plan.scaled_size == (scaled_w, 32) and plan.offset == ((scaled_w - 32) // 2, 0)
    out = V.apply_resize(source, plan)
    full = V.resize_frames(source, scaled_w, 32)
    assert torch.equal(out, full[:, :, plan.offset[0] : plan.offset[0] + 32])


def test_crop_restore_border_comes_from_source_or_fill():
    source = smooth_frames(2, 24, 40)
    plan = V.plan_resize((40, 24), (32, 32), "crop")
    edited = 1 - V.apply_resize(source, plan)  # an "edit" that changes every pixel
    inside = V.crop_region_mask(plan)
    # Pixel centres inside the kept window, computed here from the plan: x in [x0, x0 + 32) after scaling.
    xs = (torch.arange(40) + 0.5) * plan.scaled_size[0] / 40
    expected_cols = (xs >= plan.offset[0]) & (xs < plan.offset[0] + 32)
    assert torch.equal(inside, expected_cols[None, :].expand(24, 40))

    # Away from the crop edge the edit comes back; the edge column itself blends edit and source
    # (the resampling filter reaches across the seam), so it is excluded here.
    interior = inside & torch.roll(inside, 1, dims=1) & torch.roll(inside, -1, dims=1)
    assert interior.sum() == inside.sum() - 2 * 24

    with_source = V.restore(edited, plan, source=source)
    assert torch.equal(with_source[:, ~inside], source[:, ~inside])
    assert ((with_source[:, interior] - (1 - source[:, interior])).abs().max()) < 0.05
    filled = V.restore(edited, plan, fill_value=0.5)
    assert torch.equal(filled[:, ~inside], torch.full_like(filled[:, ~inside], 0.5))
    assert ((filled[:, inside] - (1 - source[:, inside])).abs().max()) < 0.05  # no fill colour bleeds in


def test_fit_frames_uses_the_bucket():
    frames = smooth_frames(1, 36, 64)  # 16:9
    out, plan = V.fit_frames(frames)
    assert out.shape == (1, 480, 832, 3) and plan.target_size == (832, 480)
    out, plan = V.fit_frames(frames, width=64, height=64, mode="letterbox")
    assert out.shape == (1, 64, 64, 3)


def test_side_by_side():
    a = torch.rand(2, 8, 6, 3, generator=torch.Generator().manual_seed(2))
    b = torch.rand(2, 8, 4, 3, generator=torch.Generator().manual_seed(3))
    out = V.side_by_side(a, b, scale=2)
    assert out.shape == (2, 16, 20, 3)
    up = lambda t: t.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # noqa: E731
    assert torch.equal(out[:, :, :12], up(a)) and torch.equal(out[:, :, 12:], up(b))
    gapped = V.side_by_side(a, b, gap=2, gap_value=1.0)
    assert gapped.shape == (2, 8, 12, 3) and torch.equal(gapped[:, :, 6:8], torch.ones(2, 8, 2, 3))
    taller = torch.rand(2, 16, 8, 3)
    assert V.side_by_side(a, taller).shape == (2, 8, 10, 3)  # right side scaled to the left's height
    with pytest.raises(SamaInputError, match="same frame count"):
        V.side_by_side(a, b[:1])


# ----------------------------------------------------------------------------------------------------------
# Reading


def test_read_video_metadata_and_range(tmp_path):
    # Frame i has the grey value 10 * i (lossless), so the selected frames can be identified exactly.
    values = np.arange(12, dtype=np.uint8) * 10
    frames_u8 = np.broadcast_to(values[:, None, None, None], (12, 32, 48, 1)).copy()
    path = write_lossless(tmp_path / "ramp.mkv", frames_u8, "gray", "ffv1", fps=8)

    frames, info = V.read_video(path)
    assert frames.shape == (12, 32, 48, 3) and frames.dtype == torch.float32
    assert info.fps == Fraction(8) and info.frame_count == 12 and info.source_frame_count == 12
    assert (info.width, info.height) == (48, 32) and not info.has_audio

    frames, info = V.read_video(path, frame_range=(2, 9), stride=3)
    assert torch.equal(frames[:, 0, 0, 0] * 255, torch.tensor([20.0, 50.0, 80.0]))
    assert info.first_frame == 2 and info.start_time == pytest.approx(2 / 8)
    frames, _ = V.read_video(path, frame_range=(2, None), stride=3, max_frames=2)
    assert torch.equal(frames[:, 0, 0, 0] * 255, torch.tensor([20.0, 50.0]))

    with pytest.raises(SamaInputError, match="No frames"):
        V.read_video(path, frame_range=(40, None))
    with pytest.raises(SamaInputError, match="stride"):
        V.read_video(path, stride=0)


def test_grayscale_and_alpha_video_become_rgb(tmp_path, caplog):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 32, 48, 1), dtype=np.uint8)
    with caplog.at_level(logging.INFO, logger="sama_core.video"):
        frames, info = V.read_video(write_lossless(tmp_path / "gray.mkv", gray, "gray", "ffv1"))
    assert info.pix_fmt == "gray" and "grayscale" in caplog.text
    expected = torch.from_numpy(gray).float().div(255).expand(-1, -1, -1, 3)
    assert torch.equal(frames, expected)

    rgba = rng.integers(0, 256, (3, 32, 48, 4), dtype=np.uint8)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sama_core.video"):
        frames, info = V.read_video(write_lossless(tmp_path / "alpha.mov", rgba, "rgba", "png"))
    assert info.pix_fmt == "rgba" and "alpha" in caplog.text
    # colours kept, alpha dropped
    assert torch.equal(frames, torch.from_numpy(rgba[..., :3]).float().div(255))


def test_grayscale_alpha_and_16bit_images(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    frames, info = V.read_image(tmp_path / "gray.png")
    assert frames.shape == (1, 20, 24, 3) and info.is_image and info.fps is None
    assert torch.equal(frames[0], torch.from_numpy(gray).float().div(255)[..., None].expand(-1, -1, 3))

    rgba = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    frames, _ = V.read_media(tmp_path / "rgba.png")
    assert torch.equal(frames[0], torch.from_numpy(rgba[..., :3]).float().div(255))

    deep = rng.integers(0, 65536, (20, 24), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    frames, _ = V.read_image(tmp_path / "deep.png")
    expected = torch.from_numpy(deep.astype(np.float32) / 65535)
    torch.testing.assert_close(frames[0, ..., 1], expected, atol=1e-6, rtol=0)


def test_unreadable_missing_and_truncated_files(tmp_path):
    with pytest.raises(SamaFileNotFoundError, match="missing.mp4"):
        V.read_video(tmp_path / "missing.mp4")
    with pytest.raises(SamaInputError, match="not a file"):
        V.read_video(tmp_path)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 10)
    with pytest.raises(SamaInputError, match="garbage.mp4"):
        V.read_video(garbage)

    # mp4 with its index at the end, cut in half: nothing can be decoded.
    clip = make_clip(tmp_path / "clip.mp4", seconds=4)
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SamaInputError, match="cut.mp4"):
        V.read_video(cut)

    # mp4 with its index first, cut in half: decodes partly, which is refused unless allowed.
    clip = make_clip(tmp_path / "fast.mp4", seconds=4, faststart=True)
    data = clip.read_bytes()
    cut = tmp_path / "cut_fast.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SamaInputError, match="truncated"):
        V.read_video(cut)
    frames, info = V.read_video(cut, allow_partial=True)
    assert 0 < frames.shape[0] < 48 == round(info.duration * info.fps)

    bad_png = tmp_path / "bad.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "good.png")
    bad_png.write_bytes((tmp_path / "good.png").read_bytes()[:60])
    with pytest.raises(SamaInputError, match="bad.png"):
        V.read_image(bad_png)
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(SamaInputError, match="text.png"):
        V.read_image(tmp_path / "text.png")


def test_too_small_and_too_large_inputs(tmp_path, caplog):
    with pytest.raises(SamaInputError, match="at least 16 pixels"):
        V.read_video(make_clip(tmp_path / "tiny.mp4", size="8x8"))
    Image.fromarray(np.zeros((40, 10, 3), np.uint8)).save(tmp_path / "thin.png")
    with pytest.raises(SamaInputError, match="10x40"):
        V.read_image(tmp_path / "thin.png")

    clip = make_clip(tmp_path / "big.mp4", size="64x48")
    with caplog.at_level(logging.INFO, logger="sama_core.video"):
        frames, info = V.read_video(clip, max_pixels=32 * 24)
    assert frames.shape[1:] == (24, 32, 3) and (info.source_width, info.source_height) == (64, 48)
    assert "downscaled" in caplog.text
    with pytest.raises(SamaInputError, match="max_frames"):
        V.read_video(clip, memory_budget_bytes=5 * 64 * 48 * 3 * 4)


def test_opencv_fallback(tmp_path, monkeypatch):
    clip = make_clip(tmp_path / "clip.mp4", size="32x32", rate="8")
    expected, info = V.read_video(clip)

    def ffmpeg_fails(*args, **kwargs):
        raise OSError("simulated: ffmpeg cannot read this file")

    monkeypatch.setattr(imageio_ffmpeg, "read_frames", ffmpeg_fails)
    frames, cv_info = V.read_video(clip)
    assert frames.shape == expected.shape and cv_info.fps == info.fps
    assert (frames - expected).abs().max() <= 2 / 255  # both decode with libavcodec; conversions may differ


# ----------------------------------------------------------------------------------------------------------
# Writing


@pytest.mark.parametrize("fps", [Fraction(12), Fraction(30000, 1001), Fraction(25, 2)])
def test_fps_size_and_frames_survive_write_and_read(tmp_path, fps):
    frames = smooth_frames(9, 32, 48)
    out = V.write_video(tmp_path / "out.mp4", frames, fps)
    back, info = V.read_video(out)
    assert info.fps == fps
    assert back.shape == frames.shape
    assert (back - frames).abs().mean() < 0.02  # lossy H.264, but close
    assert not info.has_audio


def test_audio_is_copied(tmp_path):
    source = make_clip(tmp_path / "with_audio.mp4", size="32x32", rate="8", audio=True)
    assert V.has_audio_stream(source)
    frames, info = V.read_video(source)
    assert info.has_audio and info.audio_codec == "aac"

    out = V.write_video(tmp_path / "edited.mp4", 1 - frames, info.fps, audio_from=source)
    reader = imageio_ffmpeg.read_frames(str(out))
    meta = next(reader)
    reader.close()
    assert meta.get("audio_codec") == "aac" and V.has_audio_stream(out)
    back, back_info = V.read_video(out)
    assert back.shape == frames.shape and back_info.fps == info.fps

    # A source without audio gives a silent output, no error.
    silent = make_clip(tmp_path / "silent.mp4", size="32x32", rate="8")
    out = V.write_video(tmp_path / "edited_silent.mp4", frames, info.fps, audio_from=silent)
    assert not V.has_audio_stream(out)


def test_odd_sizes_are_padded_to_even(tmp_path):
    frames = smooth_frames(5, 31, 33)
    back, _ = V.read_video(V.write_video(tmp_path / "odd.mp4", frames, 8))
    assert back.shape == (5, 32, 34, 3)
    assert (back[:, :31, :33] - frames).abs().mean() < 0.02


@pytest.mark.parametrize("suffix", V.VIDEO_OUTPUT_EXTENSIONS)
def test_every_accepted_video_container_round_trips(tmp_path, suffix):
    frames = smooth_frames(3, 32, 32)
    out = V.write_video(tmp_path / f"out{suffix}", frames, 8)
    back, info = V.read_video(out)
    assert back.shape == frames.shape and (back - frames).abs().mean() < 0.02


@pytest.mark.parametrize("name,fragment", [("out.webm", "must be a video file ending in .mp4"),
                                           ("out.gif", "must be a video file ending in .mp4"),
                                           ("out", "e.g. out.mp4"), ("out.png", "writes videos, not")])
def test_write_video_refuses_a_name_ffmpeg_cannot_hold_h264_in_before_encoding(tmp_path, name, fragment):
    with pytest.raises(SamaInputError, match=fragment):
        V.write_video(tmp_path / name, smooth_frames(3, 32, 32), 8)
    assert list(tmp_path.iterdir()) == []


def test_check_output_path_takes_an_image_for_one_frame_only(tmp_path):
    assert V.check_output_path(tmp_path / "a.PNG", frames=1) == tmp_path / "a.PNG"
    assert V.check_output_path(tmp_path / "a.mp4", frames=81) == tmp_path / "a.mp4"
    with pytest.raises(SamaInputError, match="is an image file but the result has 2 frames"):
        V.check_output_path(tmp_path / "a.jpg", frames=2)


def test_interrupted_write_leaves_no_file(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")

    def frames_then_interrupt():
        for frame in smooth_frames(3, 32, 32):
            yield frame
        raise SamaInterrupted("stopped by the user")

    with pytest.raises(SamaInterrupted):
        V.write_video(out, frames_then_interrupt(), 8)
    assert out.read_bytes() == b"previous result"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temporary files left

    with pytest.raises(SamaInputError, match="No frames"):
        V.write_video(tmp_path / "empty.mp4", [], 8)
    with pytest.raises(SamaInputError, match="fps"):
        V.write_video(tmp_path / "bad.mp4", smooth_frames(1, 32, 32), 0)
    assert not (tmp_path / "empty.mp4").exists() and not (tmp_path / "bad.mp4").exists()
