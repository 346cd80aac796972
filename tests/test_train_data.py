"""train.config and train.data: manifests (aliases, relative paths, errors), probing, bucketing, the batch
plan (one bucket and one pretext per batch, determinism, resume position, process split), clip loading
(padding to the frame bucket), pretext sources, prompts, and skipping files that cannot be decoded."""

import collections
import json
from pathlib import Path

import pytest
import torch

from sama_core.errors import SamaInputError
from sama_core.pretext import TASK_TOKENS
from sama_core.video import write_video
from train.config import config_from_dict, parse_override
from train.data import (EDIT_GROUP, IMAGE_EDIT, RAW_GROUP, RAW_VIDEO, VIDEO_EDIT, BatchItem, BucketBatchPlan,
                        BucketSpec, MediaMeta, ProcessBatchSampler, RawMediaDataset, build_index, derive_seed,
                        make_source, plan_sample, prompt_for, read_clip, read_manifest)
from train.tiny import square_clip


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def base_config(tmp_path, **data):
    return config_from_dict({"model": {"preset": "tiny"}, "output_dir": str(tmp_path / "out"),
                             "data": {"buckets": [[32, 32], [64, 32]], "frame_buckets": [5, 9], "probe_workers": 2,
                                      **data}})


# -------------------------------------------------------------------------------------------- config

def test_unknown_config_key_names_the_closest_one(tmp_path):
    with pytest.raises(SamaInputError, match="data.bucket_aera.*did you mean 'bucket_area'"):
        config_from_dict({"model": {"preset": "tiny"}, "data": {"bucket_aera": 100}})
    with pytest.raises(SamaInputError, match="4k\\+1"):
        config_from_dict({"model": {"preset": "tiny"}, "data": {"frame_buckets": [16]}})
    with pytest.raises(SamaInputError, match="model: give init_from"):
        config_from_dict({})


def test_overrides_are_yaml_values():
    assert parse_override("train.max_steps=10") == ("train.max_steps", 10)
    assert parse_override("data.buckets=[[32, 32]]") == ("data.buckets", [[32, 32]])
    assert parse_override("model.init_from=null") == ("model.init_from", None)
    cfg = config_from_dict({"model": {"preset": "tiny"}}, ["optim.lr=2e-4", "ema.device=cpu"])
    assert cfg.optim.lr == 2e-4 and cfg.ema.device == "cpu"
    with pytest.raises(SamaInputError, match="key.sub=value"):
        parse_override("train.max_steps")


def test_relative_config_paths_resolve_against_the_config_file(tmp_path):
    cfg = config_from_dict({"model": {"preset": "tiny"}, "output_dir": "runs/a", "data": {"manifests": ["m.jsonl"]}},
                           base_dir=tmp_path)
    assert cfg.output_path == tmp_path / "runs" / "a"
    assert cfg.manifest_specs()[0].path == str(tmp_path / "m.jsonl")


# ----------------------------------------------------------------------------------------- manifests

def test_manifest_rows_aliases_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    manifest = write_jsonl(tmp_path / "sub" / "m.jsonl", [
        {"source_video": "a.mp4", "target_video": "b.mp4", "instruction": "make it red"},
        {"original_video": "c.mp4", "target_video": "/abs/d.mp4", "prompt": "make it blue"},
        {"video": "e.mp4", "target_video": "f.mp4", "instruction": "x"},
        {"source_image": "g.png", "target_image": "h.png", "instruction": "add a hat"},
        {"image": "i.png", "target_image": "j.png", "prompt": "remove the hat"},
        {"video": "k.mp4", "caption": "a dog runs"},
        "",
        {"video": "l.mp4", "prompt": "a cat sleeps", "width": 64, "height": 32, "num_frames": 9},
        {"source_video": "a.mp4", "target_video": "b.mp4", "instruction": "make it red", "keep_mask": "keep.npz"},
    ])
    rows = read_manifest(manifest)
    folder = (tmp_path / "sub").resolve()
    assert [r.kind for r in rows] == [VIDEO_EDIT] * 3 + [IMAGE_EDIT] * 2 + [RAW_VIDEO] * 2 + [VIDEO_EDIT]
    assert rows[7].keep == str(folder / "keep.npz") and rows[0].keep is None
    assert rows[0].source == str(folder / "a.mp4") and rows[0].target == str(folder / "b.mp4")
    assert rows[1].source == str(folder / "c.mp4") and rows[1].target == "/abs/d.mp4"
    assert rows[1].text == "make it blue" and rows[2].source == str(folder / "e.mp4")
    assert rows[4].source == str(folder / "i.png") and rows[4].text == "remove the hat"
    assert rows[5].source is None and rows[5].target == str(folder / "k.mp4") and rows[5].text == "a dog runs"
    assert dict(rows[6].hints) == {"width": 64, "height": 32, "num_frames": 9}
    assert rows[6].line == 8 and rows[6].where.endswith("m.jsonl:8")


@pytest.mark.parametrize("line, message", [
    ("{not json", "m.jsonl:1: not valid JSON"),
    ('{"source_video": "a.mp4", "target_video": "b.mp4"}', "lacks text \\(instruction/prompt\\)"),
    ('{"target_image": "b.png", "instruction": "x"}', "lacks source \\(source_image/original_image/image\\)"),
    ('{"foo": 1}', "cannot tell what this row is"),
    ('{"video": "a.mp4", "caption": "   "}', "caption is empty"),
    ('{"video": "a.mp4", "caption": "c", "keep_mask": "k.npz"}', "keep_mask belongs to edit rows"),
])
def test_manifest_errors_name_file_and_line(tmp_path, line, message):
    manifest = write_jsonl(tmp_path / "m.jsonl", [line])
    with pytest.raises(SamaInputError, match=message):
        read_manifest(manifest)


# ---------------------------------------------------------------------------------------- buckets

def test_bucketing_groups_shapes_and_frame_counts(tmp_path):
    spec = BucketSpec(sizes=[(32, 32), (64, 32), (32, 64)], frame_buckets=[5, 9, 17])
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"video": "a.mp4", "caption": "c"},
        {"source_video": "a.mp4", "target_video": "b.mp4", "instruction": "i"},
        {"source_image": "a.png", "target_image": "b.png", "instruction": "i"},
    ])
    raw, edit, image = read_manifest(manifest)
    # aspect decides the size: 1280x720 (16:9) -> 64x32; 480x832 portrait -> 32x64
    s = plan_sample(raw, None, MediaMeta(1280, 720, 40), spec)
    assert (s.bucket.group, s.bucket.frames, s.bucket.height, s.bucket.width) == (RAW_GROUP, 17, 32, 64)
    assert s.valid_frames == 17 and s.available_frames == 40
    s = plan_sample(edit, MediaMeta(480, 832, 12), MediaMeta(480, 832, 8), spec)  # shorter of the pair: 8
    assert (s.bucket.group, s.bucket.frames, s.bucket.height, s.bucket.width) == (EDIT_GROUP, 5, 64, 32)
    assert s.valid_frames == 5
    s = plan_sample(edit, MediaMeta(100, 100, 3), MediaMeta(100, 100, 3), spec)  # too short: padded bucket
    assert s.bucket.frames == 5 and s.valid_frames == 3
    s = plan_sample(image, MediaMeta(300, 310, 1), MediaMeta(300, 310, 1), spec)
    assert (s.bucket.frames, s.bucket.height, s.bucket.width, s.valid_frames) == (1, 32, 32, 1)
    assert s.bucket.key == "edit-1x32x32"
    with_one = BucketSpec.from_config(base_config(tmp_path, frame_buckets=[1, 5]).data)  # 1 = images only
    assert with_one.frame_buckets == [5]
    assert plan_sample(raw, None, MediaMeta(32, 32, 3), with_one).bucket.frames == 5
    with pytest.raises(SamaInputError, match="no video length"):
        BucketSpec.from_config(base_config(tmp_path, frame_buckets=[1]).data)
    stride = BucketSpec(sizes=[(32, 32)], frame_buckets=[5, 9], stride=2)
    assert plan_sample(raw, None, MediaMeta(32, 32, 17), stride).bucket.frames == 9  # 17 frames / 2 -> 9


def test_default_buckets_are_the_reference_480p_set():
    from sama_core.video import bucket_sizes
    cfg = config_from_dict({"model": {"preset": "tiny"}})
    spec = BucketSpec.from_config(cfg.data)
    assert spec.sizes == bucket_sizes(480 * 832, 32)
    assert spec.size_for(1920, 1080) == (832, 480)


def members(counts):
    out, i = {}, 0
    for key, n in counts.items():
        out[key] = list(range(i, i + n))
        i += n
    return out


def test_batch_plan_one_bucket_and_one_pretext_per_batch_and_deterministic():
    buckets = members({"edit-1x32x32": 7, "edit-9x32x32": 5, "raw-9x32x32": 9, "raw-5x64x32": 4})
    plan = BucketBatchPlan(buckets, global_batch=2, seed=3)
    owner = {i: k for k, ids in buckets.items() for i in ids}
    assert plan.batches_per_epoch == 3 + 2 + 4 + 2
    epoch = plan.epoch(0)
    assert len(epoch) == plan.batches_per_epoch
    seen = []
    for batch in epoch:
        assert {owner[it.index] for it in batch.items} == {batch.bucket}
        pretexts = {it.pretext for it in batch.items}
        assert len(pretexts) == 1
        assert pretexts.pop() in (("none", "cube", "speed", "tube") if batch.bucket.startswith("raw") else ("-",))
        seen += [it.index for it in batch.items]
    assert len(seen) == len(set(seen))  # no sample twice in an epoch
    again = BucketBatchPlan(buckets, global_batch=2, seed=3).epoch(0)
    assert again == epoch
    assert plan.epoch(1) != epoch and BucketBatchPlan(buckets, 2, seed=4).epoch(0) != epoch
    seeds = [it.seed for b in epoch for it in b.items]
    assert len(set(seeds)) == len(seeds)


def test_batch_plan_resumes_at_any_position():
    plan = BucketBatchPlan(members({"edit-1x32x32": 6, "raw-9x32x32": 5}), global_batch=2, seed=0)
    stream = plan.iterate(0)
    full = [next(stream) for _ in range(3 * plan.batches_per_epoch)]
    for start in (0, 1, plan.batches_per_epoch, plan.batches_per_epoch + 2):
        resumed = plan.iterate(start)
        assert [next(resumed) for _ in range(len(full) - start)] == full[start:]


def test_process_and_accumulation_split_cover_the_global_batch():
    plan = BucketBatchPlan(members({"edit-1x32x32": 16}), global_batch=8, seed=0)
    first = next(plan.iterate(0))
    parts = []
    for rank in range(2):
        stream = iter(ProcessBatchSampler(plan, num_processes=2, process_index=rank, accumulation_steps=2))
        micro = [next(stream) for _ in range(2)]  # the two micro-batches of step 1
        assert all(len(m) == 2 for m in micro)
        parts += [it for m in micro for it in m]
    assert sorted(parts, key=lambda it: it.index) == sorted(first.items, key=lambda it: it.index)
    single = iter(ProcessBatchSampler(plan))
    assert next(single) == list(first.items)
    with pytest.raises(SamaInputError, match="does not split"):
        ProcessBatchSampler(plan, num_processes=3)


def test_pretext_mix_follows_the_paper_ratio():
    plan = BucketBatchPlan(members({"raw-9x32x32": 4}), global_batch=1, seed=0)
    counts = collections.Counter(b.items[0].pretext for e in range(600) for b in plan.epoch(e))
    total = sum(counts.values())
    for name, weight in {"none": 0.1, "cube": 0.2, "speed": 0.3, "tube": 0.4}.items():
        assert abs(counts[name] / total - weight) < 0.03, counts
    only = BucketBatchPlan(members({"raw-9x32x32": 4}), 1, 0, pretext_mix={"tube": 1.0})
    assert {b.items[0].pretext for b in only.epoch(0)} == {"tube"}


def test_too_few_samples_for_a_batch_is_a_clear_error():
    with pytest.raises(SamaInputError, match="no bucket holds a full global batch of 4"):
        BucketBatchPlan(members({"edit-1x32x32": 3}), global_batch=4, seed=0)


def test_derive_seed_is_stable():
    assert derive_seed(1, "a", 2) == derive_seed(1, "a", 2)
    assert derive_seed(1, "a", 2) != derive_seed(1, "a", 3)
    assert 0 <= derive_seed("x") < 2 ** 63


# --------------------------------------------------------------------------------- files, skipping

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    write_video(root / "nine.mp4", square_clip(9, 32, 32, seed=1), 16)
    write_video(root / "three.mp4", square_clip(3, 32, 32, seed=2), 16)
    write_video(root / "wide.mp4", square_clip(9, 32, 64, seed=3), 16)
    write_video(root / "other.mp4", square_clip(9, 32, 32, seed=4), 16)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return root


def test_a_broken_video_is_skipped_and_counted(clips, tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [
        {"video": str(clips / "nine.mp4"), "caption": "ok"},
        {"video": str(clips / "broken.mp4"), "caption": "broken"},
        {"video": str(clips / "missing.mp4"), "caption": "missing"},
        {"video": str(clips / "wide.mp4"), "caption": "ok"},
    ])
    index = build_index(base_config(tmp_path, manifests=[str(manifest)]))
    assert len(index.samples) == 2
    assert [where.split("/")[-1] for where, _ in index.skipped] == ["m.jsonl:2", "m.jsonl:3"]
    assert "not found" in index.skipped[1][1]
    assert {s.bucket.key for s in index.samples} == {"raw-9x32x32", "raw-9x32x64"}
    assert "2 skipped" in index.summary()


def test_a_file_that_fails_at_load_is_replaced_and_reported(clips, tmp_path):
    import shutil
    bad = tmp_path / "goes_bad.mp4"
    shutil.copy(clips / "other.mp4", bad)
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"video": str(bad), "caption": "soon broken"},
                                                  {"video": str(clips / "nine.mp4"), "caption": "fine"}])
    cfg = config_from_dict({"model": {"preset": "tiny"}, "data": {
        "manifests": [str(manifest)], "buckets": [[32, 32]], "frame_buckets": [5, 9], "semantic_anchoring": False}})
    index = build_index(cfg)
    assert len(index.samples) == 2
    bad.write_bytes(b"garbage" * 100)  # the file changes after indexing (a truncated download, a bad disk)
    dataset = RawMediaDataset(index, cfg.data)
    item = dataset[BatchItem(0, "none", 7)]
    assert item["index"] == 1 and len(item["skipped"]) == 1 and "m.jsonl:1" in item["skipped"][0]
    assert item["target"].shape == (9, 32, 32, 3)
    bad_only = RawMediaDataset(index, cfg.data)
    bad_only.bad.add(1)
    with pytest.raises(SamaInputError, match="failed to load in a row"):
        bad_only[BatchItem(0, "none", 7)]


def test_short_clip_is_padded_to_its_bucket_with_the_last_frame(clips):
    spec = BucketSpec(sizes=[(32, 32)], frame_buckets=[5, 9])
    row = read_manifest(write_jsonl(clips / "short.jsonl", [{"video": "three.mp4", "caption": "c"}]))[0]
    sample = plan_sample(row, None, MediaMeta(32, 32, 3), spec)
    frames, valid = read_clip(row.target, sample, 0, 1, "crop")
    assert frames.shape == (5, 32, 32, 3) and valid == 3
    assert torch.equal(frames[3], frames[2]) and torch.equal(frames[4], frames[2])
    assert not torch.equal(frames[1], frames[2])


def test_clip_is_resized_to_the_bucket(clips):
    spec = BucketSpec(sizes=[(32, 32)], frame_buckets=[5])
    row = read_manifest(write_jsonl(clips / "wide.jsonl", [{"video": "wide.mp4", "caption": "c"}]))[0]
    sample = plan_sample(row, None, MediaMeta(64, 32, 9), spec)
    frames, valid = read_clip(row.target, sample, 0, 1, "crop")
    assert frames.shape == (5, 32, 32, 3) and valid == 5


# ------------------------------------------------------------------------------ sources and prompts

def test_pretext_sources_perturb_the_target():
    frames = square_clip(9, 32, 32, seed=0)
    g = torch.Generator().manual_seed(0)
    cube = make_source(frames, "cube", g)
    blank = [f for f in range(9) if torch.all(cube[f] == 0)]  # black in [0, 1]
    assert len(blank) == 3 and 0 not in blank and blank == list(range(blank[0], blank[0] + 3))
    speed = make_source(frames, "speed", g)
    torch.testing.assert_close(speed[1], frames[2])  # 2x: output frame i shows input frame 2i
    tube = make_source(frames, "tube", g)
    assert not torch.equal(tube, frames)
    # a permutation of tubes: the same pixel values, moved (up to the [-1, 1] round trip's rounding)
    torch.testing.assert_close(tube.flatten().sort().values, frames.flatten().sort().values)
    assert make_source(frames, "none", g) is not None


def test_prompts_for_edits_and_pretexts(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"video": "a.mp4", "caption": "  a  dog runs "},
                                                  {"source_image": "a.png", "target_image": "b.png",
                                                   "instruction": "add a hat"}])
    raw, image = read_manifest(manifest)
    spec = BucketSpec(sizes=[(32, 32)], frame_buckets=[5])
    raw_s = plan_sample(raw, None, MediaMeta(32, 32, 5), spec)
    image_s = plan_sample(image, MediaMeta(32, 32, 1), MediaMeta(32, 32, 1), spec)
    assert prompt_for(raw_s, "none", True) == "a dog runs"
    assert prompt_for(raw_s, "cube", True) == TASK_TOKENS["cube"] + " a dog runs"
    assert prompt_for(image_s, "-", True) == "[Video edit] add a hat"
    assert prompt_for(image_s, "-", False) == "add a hat"


def test_example_configs_are_valid():
    from train.config import load_config
    configs = sorted((Path(__file__).resolve().parents[1] / "train" / "configs").glob("*.yaml"))
    assert len(configs) >= 7
    for path in configs:
        if path.name.endswith(("_vae.yaml", "_vae_decoder.yaml")):  # the tiny VAE trainer's own schema (train/vae_train.py)
            from train.vae_train import load_vae_config
            assert load_vae_config(path).optim.lr > 0, path
            continue
        cfg = load_config(path)
        assert isinstance(cfg.optim.lr, float) and cfg.optim.lr > 0, path
        assert cfg.manifest_specs(), path


def test_frame_array_clips_are_read_like_videos(tmp_path):
    """Lossless uint8 frame arrays ({"frames": (F, H, W, 3)} in .npz, as train/synthetic.py writes)."""
    import numpy as np
    frames = (square_clip(3, 32, 64, seed=5) * 255).round().to(torch.uint8)
    np.savez(tmp_path / "clip.npz", frames=frames.numpy())
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"video": "clip.npz", "caption": "c"}])
    cfg = base_config(tmp_path, manifests=[str(manifest)])
    sample = build_index(cfg).samples[0]
    assert sample.bucket.key == "raw-5x32x64" and sample.valid_frames == 3
    clip, valid = read_clip(sample.row.target, sample, 0, 1, "crop")
    assert valid == 3 and clip.shape == (5, 32, 64, 3)
    torch.testing.assert_close(clip[:3], frames.float() / 255)  # same size: no resampling
    assert torch.equal(clip[4], clip[2])


def test_anchor_frames_are_uniform_over_the_real_frames():
    from train.data import anchor_indices
    assert anchor_indices(9, 1) == [0]               # N = 1: the first frame (the released code)
    assert anchor_indices(9, 3) == [0, 4, 8]
    assert anchor_indices(3, 2) == [0, 2]            # padded clip: only its 3 real frames count
    assert anchor_indices(1, 2) == [0, 0]            # an image: the image itself, N times
