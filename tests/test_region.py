"""Edit regions (a user's mask): the latent grid, the sampler's keep-outside rule, the pipeline and the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

from sama_core.__main__ import main as cli
from sama_core.errors import SamaInputError
from sama_core.pipeline import EditSettings
from sama_core.region import (changed_weight, check_keep_unchanged, check_pixel_mask, composite, latent_region,
                               scale_mask)
from sama_core.sampler import SamplerOptions, initial_noise, sample
from sama_core.scheduler import flow_sigmas
from sama_core.video import read_video, write_video
from tiny_models import TINY, tiny_dit, tiny_inputs


def latent_frame_of(frame: int) -> int:
    """The Wan VAE's causal grouping, written independently: frame 0 alone, then groups of four."""
    return 0 if frame == 0 else (frame + 3) // 4


@pytest.mark.parametrize("frame,y,x", [(0, 0, 0), (1, 7, 8), (4, 31, 63), (5, 40, 9), (16, 63, 63), (8, 8, 7)])
def test_one_painted_pixel_marks_exactly_the_latent_cell_that_encodes_it(frame, y, x):
    mask = torch.zeros(17, 64, 64)
    mask[frame, y, x] = 1.0
    region = latent_region(mask, (1, 16, 5, 8, 8))
    expected = torch.zeros(1, 1, 5, 8, 8)
    expected[0, 0, latent_frame_of(frame), y // 8, x // 8] = 1.0
    assert torch.equal(region, expected)
    grown = latent_region(mask, (1, 16, 5, 8, 8), grow=1)[0, 0, latent_frame_of(frame)]
    ys, xs = np.nonzero(grown.numpy())
    assert set(ys) == set(range(max(0, y // 8 - 1), min(8, y // 8 + 2)))
    assert set(xs) == set(range(max(0, x // 8 - 1), min(8, x // 8 + 2)))


def test_soft_masks_keep_their_largest_value_per_cell():
    mask = torch.zeros(5, 16, 16)
    mask[2, 0:8, 0:8] = 0.25
    mask[3, 3, 3] = 0.75
    region = latent_region(mask, (1, 16, 2, 2, 2))
    assert region[0, 0, 1, 0, 0] == 0.75 and region.sum() == 0.75


def test_pixel_masks_are_checked_with_errors_that_name_the_fix():
    assert check_pixel_mask(torch.ones(8, 8), 3, 8, 8).shape == (3, 8, 8)   # one image for every frame
    assert check_pixel_mask(torch.ones(3, 8, 8), 3, 8, 8).shape == (3, 8, 8)
    for mask, message in ((torch.ones(8, 9), "of the video's size"), (torch.ones(2, 8, 8), "same length"),
                          (torch.full((8, 8), 2.0), r"\[0, 1\]"), (torch.zeros(8, 8), "empty"),
                          (torch.ones(1, 1, 8, 8), r"\(H, W\) or \(frames, H, W\)")):
        with pytest.raises(SamaInputError, match=message):
            check_pixel_mask(mask, 3, 8, 8)
    with pytest.raises(SamaInputError, match="pad it like the video"):
        latent_region(torch.ones(4, 16, 16), (1, 16, 2, 2, 2))


@pytest.fixture(scope="module")
def setup():
    inp = tiny_inputs(frames=2, size=4)
    g = torch.Generator().manual_seed(5)
    return tiny_dit(seed=7), inp, torch.randn(1, 3, TINY.text_dim, generator=g)


def test_sampler_keeps_the_outside_on_the_sources_flow_path_and_ends_at_the_source(setup):
    model, inp, uncond = setup
    source = inp["source"]
    region = torch.zeros(1, 1, 2, 4, 4)
    region[..., 1:3, 0:2] = 1.0
    opts = SamplerOptions(steps=4, guidance=2.0, seed=3)
    seen = []
    previews = []

    def on_step(info):
        seen.append(info.latents.clone())
        previews.append(info.denoised.clone())
    res = sample(model, inp["context"], uncond, source=source, options=opts, region=region, callback=on_step)
    noise, _ = initial_noise(source.shape, (1, 65, TINY.siglip_dim), 3)
    sigmas = torch.cat([flow_sigmas(4), torch.zeros(1)])
    outside = (region == 0).expand_as(source)
    for i, latents in enumerate(seen):  # after step i the outside sits at sigma_{i+1} on the source's path
        on_path = (1 - sigmas[i + 1]) * source + sigmas[i + 1] * noise
        torch.testing.assert_close(latents[outside], on_path[outside], atol=1e-6, rtol=0)
    assert torch.equal(res.latents[outside], source[outside])
    for preview in previews:  # the step's clean estimate (what previews show) is the source outside too
        assert torch.equal(preview[outside], source[outside])
    assert not torch.equal(previews[0][~outside], source[~outside])
    free = sample(model, inp["context"], uncond, source=source, options=opts)
    inside = (region == 1).expand_as(source)
    assert not torch.allclose(res.latents[inside], source[inside], atol=1e-3)
    # the region reaches the model: the inside differs from an unmasked run (it sees a different outside)
    assert not torch.allclose(res.latents[inside], free.latents[inside], atol=1e-6)
    everywhere = sample(model, inp["context"], uncond, source=source, options=opts, region=torch.ones_like(region))
    assert torch.equal(everywhere.latents, free.latents)


def test_sampler_refuses_a_region_it_cannot_use(setup):
    model, inp, uncond = setup
    with pytest.raises(SamaInputError, match="on the latent grid"):
        sample(model, inp["context"], uncond, source=inp["source"], options=SamplerOptions(steps=1),
               region=torch.ones(1, 1, 2, 8, 8))
    with pytest.raises(SamaInputError, match="needs a source video"):
        sample(model, inp["context"], uncond, target_shape=tuple(inp["source"].shape),
               options=SamplerOptions(steps=1), region=torch.ones(1, 1, 2, 4, 4))


def test_composite_takes_the_edit_inside_and_the_source_outside():
    edited, source = torch.full((2, 4, 4, 3), 0.9), torch.full((2, 4, 4, 3), 0.1)
    mask = torch.zeros(2, 4, 4)
    mask[:, :2] = 1.0
    mask[1, 3, 3] = 0.5
    out = composite(edited, source, mask)
    assert torch.equal(out[:, :2], edited[:, :2]) and torch.equal(out[0, 2:], source[0, 2:])
    assert out[1, 3, 3].tolist() == pytest.approx([0.5] * 3)


@pytest.mark.parametrize("restore", [True, False])
def test_pipeline_output_is_the_source_outside_the_mask(pipe, restore):
    g = torch.Generator().manual_seed(1)
    frames = torch.rand(9, 40, 56, 3, generator=g)  # not the bucket size: the mask is resized like the frames
    mask = torch.zeros(40, 56)
    mask[8:24, 16:40] = 1.0
    settings = EditSettings(restore_size=restore, width=64, height=48)
    options = pipe.sampler_options(steps=2)
    edited, _ = pipe.edit_frames(frames, "make the red circle blue", settings, options, mask=mask)
    free, _ = pipe.edit_frames(frames, "make the red circle blue", settings, options)
    if restore:
        outside = (mask == 0)[None].expand(9, 40, 56)
        assert torch.equal(edited[outside], frames[outside])
        inside = (mask == 1)[None].expand(9, 40, 56)
        assert (edited[inside] - frames[inside]).abs().mean() > 0.01
    else:
        assert edited.shape == (9, 48, 64, 3)
        assert torch.equal(edited[:, 0], pipe_fitted(frames)[:, 0])  # the top row is outside the mask
    assert not torch.equal(edited, free)


def pipe_fitted(frames):
    from sama_core import video as vio
    return vio.fit_frames(frames, width=64, height=48)[0]


def cli_edit_with_mask_image(bundle, tmp_path, seed: int, mask: np.ndarray):
    """A random 48x32 source image edited through the CLI with `mask` (uint8) as its --mask image:
    (source, edited) as uint8 arrays."""
    source = np.random.default_rng(seed).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(source).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert cli(["edit", "--model", str(bundle), "--video", str(tmp_path / "in.png"), "--prompt", "make it blue",
                "--out", str(out), "--steps", "2", "--mask", str(tmp_path / "mask.png")]) == 0
    return source, np.asarray(Image.open(out).convert("RGB"))


def test_cli_mask_image_keeps_every_pixel_outside_it(bundle, tmp_path):
    mask = np.zeros((32, 48), np.uint8)
    mask[4:20, 8:40] = 255
    source, edited = cli_edit_with_mask_image(bundle, tmp_path, 0, mask)
    assert np.array_equal(edited[mask == 0], source[mask == 0])
    assert np.abs(edited[mask == 255].astype(int) - source[mask == 255]).mean() > 2


def test_a_mask_of_the_videos_aspect_ratio_is_scaled_and_another_shape_refused(caplog):
    caplog.set_level("INFO", logger="sama_core.region")
    mask = torch.zeros(2, 16, 24)
    mask[:, 4:12, 8:16] = 1.0
    up = scale_mask(mask, 32, 48, "the mask m.png")
    assert up.shape == (2, 32, 48)
    assert torch.equal(up[:, 10:22, 18:30], torch.ones(2, 12, 12))  # well inside the region
    assert torch.equal(up[:, :6], torch.zeros(2, 6, 48)) and torch.equal(up[:, :, :14], torch.zeros(2, 32, 14))
    assert "the mask m.png: 24x16 scaled to the video's 48x32" in caplog.text
    down = scale_mask(up, 16, 24)
    torch.testing.assert_close(down[:, 5:11, 9:15], torch.ones(2, 6, 6))
    assert scale_mask(mask, 16, 24) is mask  # the video's size: as it is
    assert scale_mask(torch.ones(1, 128, 193), 64, 96).shape == (1, 64, 96)  # within 1% of the aspect ratio
    with pytest.raises(SamaInputError, match="m.png is 24x24 but the video is 48x32, another shape: give a mask"):
        scale_mask(torch.ones(24, 24), 32, 48, "the mask m.png")


def test_cli_mask_at_half_the_videos_size_keeps_the_source_outside_it(bundle, tmp_path):
    half = np.zeros((16, 24), np.uint8)
    half[2:10, 4:20] = 255
    source, edited = cli_edit_with_mask_image(bundle, tmp_path, 1, half)
    far = np.ones((32, 48), bool)
    far[1:23, 5:43] = False  # the scaled region (rows 4-19, columns 8-39) and its soft edge
    assert np.array_equal(edited[far], source[far])
    assert np.abs(edited[6:18, 10:38].astype(int) - source[6:18, 10:38]).mean() > 2


def test_cli_mask_errors_name_the_mask_and_the_fix(bundle, tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    write_video(tmp_path / "in.mp4", torch.rand(9, 32, 48, 3, generator=g), 8)
    write_video(tmp_path / "mask.mp4", torch.ones(5, 32, 48, 3), 8)
    Image.fromarray(np.zeros((32, 48), np.uint8)).save(tmp_path / "black.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "small.png")
    common = ["edit", "--model", str(bundle), "--video", str(tmp_path / "in.mp4"), "--prompt", "x", "--steps", "1"]
    for mask, message in (("mask.mp4", "has 5 frames where the source has 9"), ("black.png", "mask is empty"),
                          ("small.png", "small.png is 16x16 but the video is 48x32, another shape"),
                          ("none.png", "none.png")):
        assert cli([*common, "--out", str(tmp_path / "o.mp4"), "--mask", str(tmp_path / mask)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.mp4").exists()
    # a mask video of the source's length works, and the output keeps the source's frame count
    write_video(tmp_path / "mask9.mp4", torch.ones(9, 32, 48, 3), 8)
    assert cli([*common, "--out", str(tmp_path / "ok.mp4"), "--mask", str(tmp_path / "mask9.mp4")]) == 0
    assert read_video(tmp_path / "ok.mp4")[0].shape == (9, 32, 48, 3)


# ------------------------------------------------------------------------------------------ keep unchanged

def test_changed_weight_is_zero_to_half_the_threshold_one_from_it_and_linear_between():
    reconstruction = torch.full((1, 1, 6, 3), 0.5)
    edited = reconstruction.clone()
    edited[0, 0, 1, 0] += 0.05      # below half of 0.2: unchanged
    edited[0, 0, 2, 1] -= 0.15      # 3/4 of the way: (0.15 - 0.1) / 0.1 = 0.5
    edited[0, 0, 3, 2] += 0.2       # the threshold: changed
    edited[0, 0, 4] += torch.tensor([0.02, -0.3, 0.01])  # the largest channel counts
    edited[0, 0, 5] += 0.12         # every channel a little: the largest of them, 0.12 -> 0.2
    weight = changed_weight(edited, reconstruction, 0.2)
    torch.testing.assert_close(weight, torch.tensor([[[0.0, 0.0, 0.5, 1.0, 1.0, 0.2]]]))
    with pytest.raises(SamaInputError, match="same shape"):
        changed_weight(edited, reconstruction[:, :, :5], 0.2)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "high"])
def test_keep_unchanged_thresholds_outside_0_to_1_are_refused_naming_the_fix(bad):
    with pytest.raises(SamaInputError, match=r"keep-unchanged threshold .* must lie in \[0, 1\] \(0 = off\): e.g. 0.2"):
        check_keep_unchanged(bad)
    assert check_keep_unchanged("1") == 1.0 and check_keep_unchanged(0) == 0.0
    with pytest.raises(SamaInputError, match="0 means off"):
        changed_weight(torch.zeros(1, 1, 1, 3), torch.zeros(1, 1, 1, 3), 0)


def test_keep_unchanged_follows_the_bundles_default_and_0_turns_it_off(tmp_path):
    import json
    import shutil
    from sama_core.bundle import write_tiny_random_bundle
    from sama_core.pipeline import SamaPipeline
    folder = write_tiny_random_bundle(tmp_path / "plain")
    shutil.copytree(folder, tmp_path / "keeping")
    spec = json.loads((folder / "bundle.json").read_text())
    spec["defaults"]["keep_unchanged"] = 1.0
    (tmp_path / "keeping" / "bundle.json").write_text(json.dumps(spec))
    plain = SamaPipeline.from_bundle(folder, device="cpu")
    keeping = SamaPipeline.from_bundle(tmp_path / "keeping", device="cpu")
    frames = torch.rand(5, 32, 32, 3, generator=torch.Generator().manual_seed(6))
    edits = {}
    for name, pipe, threshold in (("plain", plain, None), ("plain 1", plain, 1.0), ("default", keeping, None),
                                  ("off", keeping, 0.0)):
        settings = EditSettings(width=32, height=32, keep_unchanged=threshold)
        edits[name], _ = pipe.edit_frames(frames, "make it blue", settings, pipe.sampler_options(steps=2))
    assert torch.equal(edits["default"], edits["plain 1"])  # the same random weights (seeded) and sample
    assert torch.equal(edits["off"], edits["plain"])
    assert not torch.equal(edits["default"], edits["off"])


def round_trip(pipe, frames):
    """The source's own VAE round trip, computed apart from the pipeline (frames already at the bucket size)."""
    from sama_core import video as vio
    with torch.no_grad():
        return vio.vae_output_to_frames(pipe.vae.decode(pipe.vae.encode(vio.frames_to_vae_input(frames))))


@pytest.mark.parametrize("restore", [True, False])
def test_keep_unchanged_takes_the_source_where_the_edit_matches_its_round_trip(pipe, restore):
    g = torch.Generator().manual_seed(3)
    frames = torch.rand(9, 48, 64, 3, generator=g)  # the bucket's size and 4k+1 frames: no resize, no padding
    settings = EditSettings(restore_size=restore, width=64, height=48)
    options = pipe.sampler_options(steps=2)
    free, _ = pipe.edit_frames(frames, "make the red circle blue", settings, options)
    change = (free - round_trip(pipe, frames)).abs().amax(-1)
    threshold = 2 * float(change.median())  # half of the pixels count as unchanged
    settings.keep_unchanged = threshold
    kept, _ = pipe.edit_frames(frames, "make the red circle blue", settings, options)
    weight = ((change - threshold / 2) / (threshold / 2)).clamp(0, 1)[..., None]
    torch.testing.assert_close(kept, weight * free + (1 - weight) * frames, atol=1e-5, rtol=0)
    unchanged, changed = (weight == 0).expand_as(kept), (weight == 1).expand_as(kept)
    # both sides of the rule are exercised: by construction half of the pixels are unchanged (the tiny random
    # model's share of pixels changed by twice the median varies with the weights, ~5%)
    assert unchanged.float().mean() >= 0.5 and changed.any()
    assert torch.equal(kept[unchanged], frames[unchanged])  # the source's exact pixels
    assert torch.allclose(kept[changed], free[changed], atol=1e-6)


def test_keep_unchanged_inside_a_mask_keeps_the_source_outside_it(pipe):
    g = torch.Generator().manual_seed(4)
    frames = torch.rand(9, 48, 64, 3, generator=g)
    mask = torch.zeros(48, 64)
    mask[8:40, 16:48] = 1.0
    options = pipe.sampler_options(steps=2)
    masked, _ = pipe.edit_frames(frames, "make it blue", EditSettings(width=64, height=48), options, mask=mask)
    both, _ = pipe.edit_frames(frames, "make it blue", EditSettings(width=64, height=48, keep_unchanged=1.0),
                               options, mask=mask)
    outside = (mask == 0)[None].expand(9, 48, 64)
    assert torch.equal(both[outside], frames[outside])
    change = (masked - round_trip(pipe, frames)).abs().amax(-1)  # inside the mask, `masked` is the edit
    weight = (((change - 0.5) / 0.5).clamp(0, 1) * mask)[..., None]
    torch.testing.assert_close(both, weight * masked + (1 - weight) * frames, atol=1e-5, rtol=0)
    assert not torch.equal(both, masked)


def test_cli_keep_unchanged_keeps_source_pixels_and_refuses_a_bad_threshold_before_loading(bundle, tmp_path,
                                                                                           capsys):
    source = np.random.default_rng(5).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(source).save(tmp_path / "in.png")
    common = ["edit", "--model", str(bundle), "--video", str(tmp_path / "in.png"), "--prompt", "make it blue",
              "--steps", "2"]
    outputs = {}
    for name, extra in (("free", []), ("kept", ["--keep-unchanged", "1"])):
        assert cli([*common, "--out", str(tmp_path / f"{name}.png"), *extra]) == 0
        outputs[name] = np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB"))
    same = lambda out: (out == source).all(-1).mean()  # noqa: E731 - share of pixels exactly the source's
    assert same(outputs["kept"]) > same(outputs["free"]) + 0.2
    for bad in ("-1", "2", "nan"):
        assert cli([*common, "--out", str(tmp_path / "bad.png"), "--keep-unchanged", bad]) == 2
        err = capsys.readouterr().err
        assert f"keep-unchanged threshold {float(bad)!r} must lie in [0, 1] (0 = off)" in err and "Traceback" not in err
    assert not (tmp_path / "bad.png").exists()


def test_cli_keep_unchanged_alone_is_the_documented_default():
    import argparse
    from sama_core.commands import edit
    from sama_core.region import KEEP_UNCHANGED_DEFAULT
    sub = argparse.ArgumentParser().add_subparsers()
    edit.register(sub)
    args = sub.choices["edit"].parse_args(["--model", "m", "--video", "v", "--prompt", "p", "--out", "o",
                                           "--keep-unchanged"])
    assert args.keep_unchanged == KEEP_UNCHANGED_DEFAULT
