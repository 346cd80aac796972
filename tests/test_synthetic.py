"""Tests of the SAMA-Shapes generator (train/synthetic.py): determinism, geometry, edit exactness,
language, files and the CLI."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train.synthetic as syn
from sama_core.errors import SamaFileNotFoundError, SamaInputError

SMALL = syn.SynthConfig(width=48, height=48, num_frames=9)


@pytest.fixture(scope="module")
def clips():
    """A dozen default-size clips with every edit, shared by the tests that only read them."""
    return [syn.generate_clip(seed=7, index=i, split="train") for i in range(12)]


def test_same_seed_gives_identical_clips_and_other_seeds_or_splits_differ():
    a = syn.generate_clip(3, 0, "train", SMALL)
    b = syn.generate_clip(3, 0, "train", SMALL)
    assert a.scene.to_json() == b.scene.to_json()
    assert a.caption == b.caption
    assert torch.equal(a.source.frames, b.source.frames)
    for ea, eb in zip(a.edits, b.edits):
        assert ea.edit.instruction == eb.edit.instruction
        assert torch.equal(ea.target.frames, eb.target.frames)
        assert torch.equal(ea.mask, eb.mask)
    for other in (syn.generate_clip(4, 0, "train", SMALL), syn.generate_clip(3, 1, "train", SMALL),
                  syn.generate_clip(3, 0, "heldout", SMALL)):
        assert other.scene.to_json() != a.scene.to_json()
        assert not torch.equal(other.source.frames, a.source.frames)


def test_train_and_heldout_scenes_never_coincide():
    def fingerprints(split, seed):
        return {syn.sample_scene(syn.clip_generator(seed, i, split, 0)).fingerprint() for i in range(40)}

    train = fingerprints("train", 0) | fingerprints("train", 1)
    heldout = fingerprints("heldout", 0) | fingerprints("heldout", 1)
    assert len(train) == 80 and len(heldout) == 80
    assert not train & heldout


def test_clip_shapes_ranges_and_weights(clips):
    for clip in clips:
        f = clip.source.frames
        n = len(clip.scene.objects)
        assert 1 <= n <= 3
        assert f.shape == (17, 64, 64, 3) and f.dtype == torch.float32
        assert float(f.min()) >= 0.0 and float(f.max()) <= 1.0
        assert clip.source.coverage.shape == clip.source.visible.shape == (n, 17, 64, 64)
        total = clip.source.visible.numpy().sum(0) + clip.source.background_weight.numpy()  # (F, H, W)
        np.testing.assert_allclose(total, 1.0, atol=1e-5)
        assert [e.edit.kind for e in clip.edits] == list(syn.EDIT_KINDS)
        for e in clip.edits:
            assert e.target.frames.shape == f.shape
            assert e.mask.shape == (17, 64, 64) and e.mask.dtype == torch.bool

    small = syn.generate_clip(0, 0, "train", syn.SynthConfig(width=32, height=48, num_frames=9))
    assert small.source.frames.shape == (9, 48, 32, 3)


@pytest.mark.parametrize("kwargs, words", [
    ({"num_frames": 16}, r"4k\+1"),
    ({"width": 50}, "multiple of 16"),
    ({"max_objects": 4}, "max_objects"),
    ({"edits": ("colour",)}, "Unknown edit kinds"),
    ({"max_radius": 30.0}, "do not fit"),
    ({"min_period": 30.0, "max_period": 20.0}, "min_period <= max_period"),
    ({"min_period": 0.0}, "periods must be positive"),
])
def test_bad_config_is_a_clear_error(kwargs, words):
    with pytest.raises(SamaInputError, match=words):
        syn.SynthConfig(**kwargs)


def test_sizes_follow_the_config():
    rng = np.random.default_rng(3)
    config = syn.SynthConfig(min_radius=6.0, max_radius=7.0, min_period=24.0, max_period=24.0,
                             textured_prob=1.0)
    scenes = [syn.sample_scene(rng, config) for _ in range(20)]
    assert all(6.0 <= o.radius <= 7.0 for s in scenes for o in s.objects)
    assert {s.background.period for s in scenes} == {24.0}
    # the defaults: objects of about 2x2 DiT tokens (16 px each), coarse backgrounds
    default = syn.SynthConfig()
    sizes = (default.min_radius, default.max_radius, default.min_period, default.max_period)
    assert sizes == (8.0, 12.0, 20.0, 32.0)


def test_bad_split_and_seed_are_clear_errors(tmp_path):
    with pytest.raises(SamaInputError, match="Unknown split 'test'"):
        syn.generate_clip(0, 0, "test")
    with pytest.raises(SamaInputError, match="seed"):
        syn.write_dataset(tmp_path, 1, -1)
    with pytest.raises(SamaInputError, match="video_format"):
        syn.write_dataset(tmp_path, 1, 0, video_format="avi")


def test_pixels_outside_the_edit_mask_are_identical_and_the_mask_is_not_vacuous(clips):
    for clip in clips:
        src = clip.source.frames.numpy()
        for e in clip.edits:
            tgt, mask = e.target.frames.numpy(), e.mask.numpy()
            assert np.array_equal(src[~mask], tgt[~mask]), (clip.clip_id, e.edit.kind)
            changed = np.abs(src - tgt).max(-1) > 0  # (F, H, W)
            if e.edit.kind == "color" or e.edit.kind == "background":
                # every masked pixel that shows the edited thing changes (colours/backgrounds differ)
                assert changed[mask].mean() > 0.5, (clip.clip_id, e.edit.kind)
            else:
                assert changed.any(), (clip.clip_id, e.edit.kind)
            # the mask is tight: it is the union of visible pixels, not a blanket over the frame
            if e.edit.kind != "background":
                assert mask.mean() < 0.5


def test_removed_object_is_gone(clips):
    for clip in clips:
        e = next(e for e in clip.edits if e.edit.kind == "remove")
        removed = clip.scene.objects[e.edit.object_index]
        was_there = clip.source.visible[e.edit.object_index].numpy() > 0.5  # (F, H, W)
        only_background = e.target.background_weight.numpy() == 1.0
        region = was_there & only_background
        assert region.any()
        pixels = e.target.frames.numpy()[region]  # (P, 3)
        distance = np.linalg.norm(pixels - np.asarray(syn.OBJECT_COLORS[removed.color]), axis=-1)
        assert distance.min() > 0.2
        # and what is there is exactly the background, rendered on its own
        background = syn.render_background(clip.scene.background, 64, 64, 17, clip.scene.pan)
        np.testing.assert_allclose(pixels, background[region], atol=1e-6)
        assert len(e.edit.target.objects) == len(clip.scene.objects) - 1


def test_color_change_gives_the_requested_colour(clips):
    for clip in clips:
        e = next(e for e in clip.edits if e.edit.kind == "color")
        i = e.edit.object_index
        new, old = e.edit.change["to"], e.edit.change["from"]
        assert new != old and old == clip.scene.objects[i].color
        interior = e.target.visible[i].numpy() == 1.0
        if interior.any():  # an object can be fully hidden behind another one
            mean = e.target.frames.numpy()[interior].astype(np.float64).mean(0)
            np.testing.assert_allclose(mean, syn.OBJECT_COLORS[new], atol=1e-6)
            before = clip.source.frames.numpy()[interior].astype(np.float64).mean(0)
            np.testing.assert_allclose(before, syn.OBJECT_COLORS[old], atol=1e-6)
        assert e.edit.target.objects[i].centers == clip.scene.objects[i].centers


def test_shape_change_and_add_keep_the_motion_of_everything_else(clips):
    for clip in clips:
        shape = next(e for e in clip.edits if e.edit.kind == "shape")
        i = shape.edit.object_index
        before, after = clip.scene.objects[i], shape.edit.target.objects[i]
        assert after.shape == shape.edit.change["to"] != before.shape
        assert (after.color, after.centers, after.radius) == (before.color, before.centers, before.radius)

        add = next(e for e in clip.edits if e.edit.kind == "add")
        target = add.edit.target
        assert target.objects[:-1] == clip.scene.objects and add.edit.object_index == len(clip.scene.objects)
        new = target.objects[-1]
        assert (new.color, new.shape) not in {(o.color, o.shape) for o in clip.scene.objects}
        assert f"{new.color} {new.shape}" in add.edit.instruction

        bg = next(e for e in clip.edits if e.edit.kind == "background")
        assert bg.edit.target.objects == clip.scene.objects
        assert bg.edit.target.background.noun_phrase() != clip.scene.background.noun_phrase()


def _skeleton(text: str) -> str:
    words = list(syn.OBJECT_COLORS) + list(syn.SHAPES) + list(syn.BACKGROUND_COLORS)
    words += ["stripes", "striped", "checkerboard", "checkered", "mottled"]
    words += ["shape", "object", "one", "an", "a"]
    words += ["up", "down", "left", "right", "and", "to the"]
    pattern = r"\b(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")\b"
    return re.sub(pattern, "X", text)


def test_instructions_name_the_edited_object_unambiguously_in_varied_phrasing():
    config = syn.SynthConfig()
    skeletons = {kind: set() for kind in syn.EDIT_KINDS}
    for i in range(60):
        scene = syn.sample_scene(syn.clip_generator(11, i, "train", 0), config)
        for kind in syn.EDIT_KINDS:
            edit = syn.make_edit(scene, kind, np.random.default_rng([i, len(kind)]), config)
            text = edit.instruction
            skeletons[kind].add(_skeleton(text))
            if kind in ("color", "shape", "remove"):
                reference = edit.reference
                phrase_words = [w for w in (reference["color"], reference["shape"]) if w]
                assert " ".join(phrase_words) in text
                matches = [o for o in scene.objects if syn.reference_matches(reference, o)]
                assert matches == [scene.objects[edit.object_index]], (text, scene.objects)
                # no other object fits the words used either (checked against the text itself)
                for j, other in enumerate(scene.objects):
                    if j != edit.object_index:
                        assert not all(w in (other.color, other.shape) for w in phrase_words)
                if kind != "remove":
                    assert edit.change["to"] in text
            elif kind == "add":
                assert not any(syn.reference_matches(edit.reference, o) for o in scene.objects)
            else:
                new = edit.target.background
                assert new.adjective() in text or new.pattern_noun() in text or new.noun_phrase() in text
            assert "moving" not in edit.image_instruction and "video" not in edit.image_instruction
    for kind, forms in skeletons.items():
        assert len(forms) >= 3, (kind, forms)


def test_trajectories_match_the_rendered_centroid():
    # For each object, render it alone on its background and recover its alpha from the pixels.
    errors = []
    for i in range(6):
        scene = syn.sample_scene(syn.clip_generator(5, i, "train", 0))
        background = syn.render_background(scene.background, scene.width, scene.height, scene.num_frames,
                                           scene.pan)
        ys, xs = np.mgrid[0:scene.height, 0:scene.width] + 0.5
        for obj in scene.objects:
            frames = syn.render_scene(syn.Scene(scene.width, scene.height, scene.num_frames, [obj],
                                                scene.background, scene.pan)).frames.numpy()
            colour = np.asarray(syn.OBJECT_COLORS[obj.color])
            direction = colour - background  # (F, H, W, 3)
            alpha = ((frames - background) * direction).sum(-1) / (direction ** 2).sum(-1)
            alpha = np.clip(alpha, 0.0, 1.0)
            for k, (cx, cy) in enumerate(obj.centers):
                a = alpha[k]
                centroid = ((a * xs).sum() / a.sum(), (a * ys).sum() / a.sum())
                errors.append(math.dist(centroid, (cx, cy)))
    # within a pixel is what eval needs; the rasteriser does much better, and has no bias (a half
    # supersampled-pixel misalignment would show as a mean error of ~0.18 px)
    assert len(errors) > 100
    assert max(errors) < 0.3 and np.mean(errors) < 0.06, (max(errors), np.mean(errors))


def test_polygon_coverage_has_the_analytic_area():
    r = 8.0
    n = syn.CIRCLE_VERTICES
    big, small = syn.STAR_OUTER_RADIUS * r, syn.STAR_OUTER_RADIUS * syn.STAR_INNER_RATIO * r
    areas = {
        "circle": 0.5 * n * r * r * math.sin(2 * math.pi / n),
        "square": 2 * (syn.SQUARE_CIRCUMRADIUS * r) ** 2,
        "triangle": 3 * math.sqrt(3) / 4 * (syn.TRIANGLE_CIRCUMRADIUS * r) ** 2,
        "star": 5 * big * small * math.sin(math.radians(36)),
    }
    for shape, area in areas.items():
        for shift in (0.0, 0.3, 0.7):
            outline = syn.shape_outline(shape, 31.3 + shift, 30.6 - shift, r, 17.0 + 50 * shift)
            coverage = syn.rasterize(outline, 64, 64, 4)
            assert coverage.max() == 1.0 and coverage.min() == 0.0
            assert abs(coverage.sum() / area - 1) < 0.02, (shape, shift, coverage.sum(), area)
    # inset moves a unit square's edges in by exactly the distance
    square = np.array([[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0]])
    inner = [[0.5, 0.5], [3.5, 0.5], [3.5, 3.5], [0.5, 3.5]]
    np.testing.assert_allclose(syn.inset_polygon(square, 0.5), inner)
    np.testing.assert_allclose(syn.inset_polygon(square[::-1], 0.5), [[0.5, 3.5], [3.5, 3.5], [3.5, 0.5],
                                                                       [0.5, 0.5]])


def test_depth_order_and_occlusion_happen():
    occluded = 0
    for i in range(40):
        scene = syn.sample_scene(syn.clip_generator(2, i, "train", 0))
        clip = syn.render_scene(scene)
        if len(scene.objects) < 2:
            continue
        coverage, frames = clip.coverage.numpy(), clip.frames.numpy()
        hidden = (coverage[:-1] > 0.5) & (coverage[-1] == 1.0)  # behind the front object
        if hidden.any():
            occluded += 1
            pixels = frames[hidden.any(0)]  # (P, 3)
            expected = np.asarray(syn.OBJECT_COLORS[scene.objects[-1].color])
            np.testing.assert_allclose(pixels, np.broadcast_to(expected, pixels.shape), atol=1e-6)
    assert occluded >= 5


def test_speed_changes_change_the_step_length():
    seen = 0
    for i in range(60):
        scene = syn.sample_scene(syn.clip_generator(9, i, "train", 0))
        for obj in scene.objects:
            if obj.motion != "linear" or obj.speed_ratio == 1.0:
                continue
            steps = np.linalg.norm(np.diff(np.asarray(obj.centers), axis=0), axis=1)  # (F-1,)
            assert steps[-1] / steps[0] == pytest.approx(obj.speed_ratio, rel=0.02)
            seen += 1
    assert seen >= 3


def test_camera_pan_moves_the_background_against_the_pan():
    background = syn.Background(style="stripes", colors=["white", "black"], period=10.0, angle=30.0)
    frames = syn.render_background(background, 32, 32, 3, pan=[2.0, 1.0])
    # panning right/down by (2, 1) px per frame: next frame's pixel (y, x) shows this frame's (y+1, x+2)
    np.testing.assert_allclose(frames[1][:-1, :-2], frames[0][1:, 2:], atol=1e-6)
    assert not np.allclose(frames[1], frames[0])


def test_scene_json_round_trip_renders_the_same_clip(clips):
    scene = clips[3].scene
    again = syn.Scene.from_dict(json.loads(scene.to_json()))
    assert again == scene and again.fingerprint() == scene.fingerprint()
    assert torch.equal(syn.render_scene(again).frames, clips[3].source.frames)
    with pytest.raises(SamaInputError, match="scene description"):
        syn.Scene.from_dict({"width": 64})


def test_captions_describe_objects_background_and_camera(clips):
    for clip in clips:
        caption = clip.caption
        for obj in clip.scene.objects:
            assert f"{obj.color} {obj.shape}" in caption
        assert clip.scene.background.noun_phrase() in caption
        assert ("camera pans" in caption) == (clip.scene.pan != [0.0, 0.0])


def test_image_pairs_are_frames_where_the_edit_shows(clips):
    for clip in clips:
        for e in clip.edits:
            source, target, instruction = clip.image_pair(e)
            k = e.image_frame
            assert torch.equal(source, clip.source.frames[k]) and torch.equal(target, e.target.frames[k])
            assert e.mask[k].sum() >= 0.5 * e.mask.flatten(1).sum(1).max()
            assert instruction == e.edit.image_instruction


def test_write_dataset_manifests_resolve_and_round_trip(tmp_path):
    out = tmp_path / "ds"
    summary = syn.write_dataset(out, 2, seed=5, split="heldout", config=SMALL, video_format="npz")
    assert summary.counts == {"video_edits": 10, "image_edits": 10, "raw_videos": 2, "ground_truth": 10}
    info = json.loads((out / "dataset.json").read_text())
    assert info["split"] == "heldout" and info["seed"] == 5 and info["config"]["num_frames"] == 9

    def rows(name):
        return [json.loads(line) for line in (out / name).read_text().splitlines()]

    expected_keys = {"video_edits.jsonl": {"source_video", "target_video", "instruction", "keep_mask"},
                     "image_edits.jsonl": {"source_image", "target_image", "instruction", "keep_mask"},
                     "raw_videos.jsonl": {"video", "caption"}}
    for name, keys in expected_keys.items():
        for row in rows(name):
            assert keys <= set(row)
            assert (row["width"], row["height"]) == (48, 48)  # size hints train/data.py reads
            assert row.get("num_frames", 9) == 9
            for key in keys - {"instruction", "caption"}:
                assert not Path(row[key]).is_absolute() and (out / row[key]).is_file()

    clip = syn.generate_clip(5, 1, "heldout", SMALL)
    gt = [r for r in rows("ground_truth.jsonl") if r["clip"] == clip.clip_id]
    assert [r["kind"] for r in gt] == list(syn.EDIT_KINDS)
    quantised = np.round(clip.source.frames.numpy() * 255) / 255
    for r, e in zip(gt, clip.edits):
        assert r["instruction"] == e.edit.instruction
        assert r["scene_fingerprint"] == clip.scene.fingerprint()
        assert syn.Scene.from_dict(r["scene"]).fingerprint() == clip.scene.fingerprint()
        assert syn.Scene.from_dict(r["target_scene"]) == e.edit.target
        np.testing.assert_allclose(syn.load_clip(out / r["source_video"]).numpy(), quantised, atol=1e-7)
        with np.load(out / r["mask_file"]) as masks:
            assert np.array_equal(masks[r["edit_mask_key"]], e.mask.numpy())
            assert np.array_equal(masks[r["source_objects_key"]], clip.source.object_masks().numpy())
        png = np.asarray(Image.open(out / r["target_image"]))
        assert np.array_equal(png, np.round(e.target.frames[e.image_frame].numpy() * 255).astype(np.uint8))

    absolute = syn.read_manifest(out / "video_edits.jsonl")
    assert all(Path(r["source_video"]).is_absolute() and Path(r["source_video"]).is_file() for r in absolute)

    with pytest.raises(SamaInputError, match="already holds a dataset"):
        syn.write_dataset(out, 1, seed=5, config=SMALL, video_format="npz")


def test_keep_masks_are_the_untouched_objects_and_the_edit_leaves_them_exact(tmp_path, clips):
    """keep_mask(): the target's object pixels outside the edit mask: every object the instruction does not
    name shows there (where the edit does not cover it), the edited object never, and source == target on
    it; the files in the manifests hold the same mask (video: every frame; image: its frame)."""
    for clip in clips:
        for e in clip.edits:
            keep = syn.keep_mask(e).numpy()
            assert not (keep & e.mask.numpy()).any()
            assert np.array_equal(keep, e.target.object_masks().numpy().any(0) & ~e.mask.numpy())
            if e.edit.kind in ("color", "shape"):
                assert not (keep & e.target.object_masks()[e.edit.object_index].numpy()).any()
            np.testing.assert_array_equal(clip.source.frames.numpy()[keep], e.target.frames.numpy()[keep])
    assert any(syn.keep_mask(e).any() for c in clips for e in c.edits if e.edit.kind == "remove")
    out = tmp_path / "ds"
    syn.write_dataset(out, 1, seed=5, config=SMALL, video_format="mp4")  # masks stay lossless with mp4 clips
    clip = syn.generate_clip(5, 0, "train", SMALL)
    videos = [json.loads(line) for line in (out / "video_edits.jsonl").read_text().splitlines()]
    images = [json.loads(line) for line in (out / "image_edits.jsonl").read_text().splitlines()]
    for e, video, image in zip(clip.edits, videos, images, strict=True):
        keep = syn.keep_mask(e).numpy()
        assert video["keep_mask"].endswith(".npz")
        assert np.array_equal(syn.load_clip(out / video["keep_mask"]).numpy(), np.repeat(keep[..., None], 3, -1))
        png = np.asarray(Image.open(out / image["keep_mask"]))
        assert np.array_equal(png > 127, np.repeat(keep[e.image_frame][..., None], 3, -1))


def test_safetensors_and_mp4_clips_read_back(tmp_path):
    frames = syn.generate_clip(1, 0, "train", SMALL).source.frames
    exact = np.round(frames.numpy() * 255) / 255
    syn.save_clip(tmp_path / "a.safetensors", frames)
    np.testing.assert_allclose(syn.load_clip(tmp_path / "a.safetensors").numpy(), exact, atol=1e-7)
    syn.save_clip(tmp_path / "a.mp4", frames, fps=16)
    decoded = syn.load_clip(tmp_path / "a.mp4")
    assert decoded.shape == frames.shape
    psnr = 10 * math.log10(1.0 / float(((decoded - frames) ** 2).mean()))
    assert psnr > 25  # H.264 yuv420p is lossy (chroma at half resolution), but close
    with pytest.raises(SamaInputError, match=r"\.mp4, \.npz or \.safetensors"):
        syn.save_clip(tmp_path / "a.avi", frames)
    with pytest.raises(SamaFileNotFoundError, match="does not exist"):
        syn.load_clip(tmp_path / "missing.npz")


def test_parallel_writing_gives_the_same_dataset(tmp_path):
    config = syn.SynthConfig(width=32, height=32, num_frames=5, min_radius=3.0, max_radius=5.0, min_path=6.0,
                             max_path=12.0)
    syn.write_dataset(tmp_path / "one", 3, seed=2, config=config, video_format="npz", image_pairs=False)
    syn.write_dataset(tmp_path / "two", 3, seed=2, config=config, video_format="npz", image_pairs=False,
                      workers=2)
    for name in syn.MANIFEST_NAMES.values():
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
    assert not any((tmp_path / "one" / "images").iterdir())


def test_cli_writes_a_small_dataset(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--clips", "2", "--seed", "3", "--split", "train", "--format", "npz",
            "--width", "32", "--height", "32", "--frames", "9", "--edits", "color,remove"]
    assert syn.main(args) == 0
    printed = capsys.readouterr().out
    assert "Wrote 2 clips" in printed and "video_edits.jsonl: 4 rows" in printed
    kinds = [json.loads(line)["kind"] for line in (out / "ground_truth.jsonl").read_text().splitlines()]
    assert kinds == ["color", "remove", "color", "remove"]
    assert syn.load_clip(out / "videos" / "train_s3_000000_source.npz").shape == (9, 32, 32, 3)
    assert syn.main(args) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert syn.main(args + ["--overwrite"]) == 0
    assert syn.main(["--out", str(tmp_path / "x"), "--clips", "1", "--frames", "8"]) == 2
    assert "4k+1" in capsys.readouterr().err
