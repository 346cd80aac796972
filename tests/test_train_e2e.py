"""End to end on the tiny workspace (tiny random UMT5 / Wan VAE / SigLIP / Wan base, synthetic clips):
the cache step (contents against the encoders, resume, stale settings, a corrupt video), stage 0 and
stage 1 through the CLI from raw data, raw and cached training agreeing, validation files."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from sama_core.anchors import AnchorEncoder
from sama_core.loading import load_dit
from sama_core.text import load_text_encoder
from sama_core.vae import WanVAE
from train.__main__ import main
import train.cache as cache_module
from train.cache import CACHE_INDEX, build_cache, shard_name
from train.config import load_config
from train.data import RawMediaDataset, build_index, derive_seed
from train.loop import DIT_FILE, FINAL_DIR, train
from train.tiny import make_tiny_workspace


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ws")
    return make_tiny_workspace(root)


def config(ws, name, *overrides):
    return load_config(ws[name], list(overrides))


def subset(ws, tmp_path, raw=(), images=(), edits=()):
    """A manifest with some rows of the workspace's manifests (fewer encodes: faster tests)."""
    lines = []
    for name, picks in (("raw_videos", raw), ("image_edits", images), ("video_edits", edits)):
        rows = ws[name].read_text().splitlines()
        lines += [rows[i] for i in picks]
    path = ws["raw_videos"].parent / f"subset_{tmp_path.name}.jsonl"  # next to the media: relative paths work
    path.write_text("\n".join(lines) + "\n")
    return f"data.manifests=[{path}]"


# -------------------------------------------------------------------------------------------- cache

def test_cache_holds_exactly_what_the_encoders_compute(ws, tmp_path):
    cfg = config(ws, "config_stage0_cached", f"data.cache_dir={tmp_path / 'cache'}",
                 subset(ws, tmp_path, raw=[1], images=[0]))
    cache = build_cache(cfg)
    index = json.loads((cache / CACHE_INDEX).read_text())
    assert len(index["samples"]) == 2 and index["skipped"] == [] and index["complete"]
    by_kind = {}
    for s in index["samples"]:
        by_kind.setdefault(s["kind"], s)
    raw, image = by_kind["raw_video"], by_kind["image_edit"]
    assert raw["pretexts"] == ["none", "cube", "speed", "tube"] and image["pretexts"] == []

    vae = WanVAE.from_file(cfg.resolve_path(cfg.encoders.vae))
    text = load_text_encoder(cfg.resolve_path(cfg.encoders.text_encoder), dtype="fp32")
    anchors = AnchorEncoder.from_file(cfg.resolve_path(cfg.encoders.siglip))
    dataset = RawMediaDataset(build_index(cfg), cfg.data)

    # an image edit: latents of target and source, the "[Video edit] " prompt's real rows, the target anchor
    sid = image["id"]
    loaded = dataset.load(sid, "-", derive_seed(cfg.seed, "cache", sid))
    with safe_open(str(cache / image["shard"]), "pt") as f:
        got = {k.split("/", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(f"{sid}/")}
    assert set(got) == {"target", "source", "text", "semantic"}
    frames = torch.stack([loaded["target"], loaded["source"]]).permute(0, 4, 1, 2, 3) * 2 - 1
    torch.testing.assert_close(got["target"], vae.encode(frames[:1])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["source"], vae.encode(frames[1:])[0], rtol=1e-5, atol=1e-5)
    full = text.encode(["[Video edit] make the square blue"])[0]  # (512, 24), zeros after the real rows
    n = got["text"].shape[0]
    assert 1 < n < 512 and torch.equal(full[n:], torch.zeros_like(full[n:]))
    torch.testing.assert_close(got["text"], full[:n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["semantic"], anchors.encode(loaded["target"])[0], rtol=1e-5, atol=1e-5)
    assert got["semantic"].shape == (65, 48)

    # a raw video: the clean target, one perturbed source per pretext, a prompt per pretext
    sid = raw["id"]
    with safe_open(str(cache / raw["shard"]), "pt") as f:
        keys = {k.split("/", 1)[1] for k in f.keys() if k.startswith(f"{sid}/")}
        cube = f.get_tensor(f"{sid}/source/cube")
        target = f.get_tensor(f"{sid}/target")
    assert keys == {"target", "semantic", "source/cube", "source/speed", "source/tube", "text/none", "text/cube",
                    "text/speed", "text/tube"}
    assert cube.shape == target.shape and not torch.allclose(cube, target)
    with safe_open(str(cache / "extras.safetensors"), "pt") as f:
        negative = f.get_tensor("negative")
    torch.testing.assert_close(negative, text.encode(["[Video edit]"])[0][: negative.shape[0]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("limits, calls", [
    ({"ENCODE_BATCH": 3}, [3, 1]),  # 4 distinct clips (the repeated row's are not encoded again), <= 3 a call
    ({"ENCODE_VOXELS": 1}, [1, 1, 1, 1]),  # clips too large to batch go one at a time
    ({"ENCODE_CHUNK": 1}, [2, 2]),  # one sample per chunk: the repeated row's clips come from the memo
    ({"CHUNK_BYTES": 1}, [2, 2]),  # the same when the decoded frames of one sample fill a chunk
])
def test_cache_encodes_each_distinct_clip_once_in_batches_and_stores_it_for_every_edit(ws, tmp_path, monkeypatch,
                                                                                        limits, calls):
    from train.features import FeatureEncoders
    encoded = []
    original = FeatureEncoders.latents

    def counting(self, frames):
        encoded.append(frames.shape[0])
        return original(self, frames)

    monkeypatch.setattr(FeatureEncoders, "latents", counting)
    for name, value in limits.items():
        monkeypatch.setattr(cache_module, name, value)
    # the same video edit twice (two rows, one source clip) and a second edit of another source
    cfg = config(ws, "config_stage1", f"data.cache_dir={tmp_path / 'cache'}", subset(ws, tmp_path, edits=[0, 0, 1]))
    cache = build_cache(cfg)
    index = json.loads((cache / CACHE_INDEX).read_text())
    assert [s["kind"] for s in index["samples"]] == ["video_edit"] * 3
    assert encoded == calls

    vae = WanVAE.from_file(cfg.resolve_path(cfg.encoders.vae))
    dataset = RawMediaDataset(build_index(cfg), cfg.data)
    for s in index["samples"]:
        loaded = dataset.load(s["id"], "-", derive_seed(cfg.seed, "cache", s["id"]))
        with safe_open(str(cache / s["shard"]), "pt") as f:
            source, target = f.get_tensor(f"{s['id']}/source"), f.get_tensor(f"{s['id']}/target")
        frames = torch.stack([loaded["target"], loaded["source"]]).permute(0, 4, 1, 2, 3) * 2 - 1
        torch.testing.assert_close(target, vae.encode(frames[:1])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(source, vae.encode(frames[1:])[0], rtol=1e-5, atol=1e-5)


def test_cache_resumes_and_refuses_other_settings(ws, tmp_path):
    cfg = config(ws, "config_stage0_cached", f"data.cache_dir={tmp_path / 'cache'}", "data.cache_shard_size=1",
                 subset(ws, tmp_path, images=[0, 1, 2]))
    cache = build_cache(cfg)
    first = json.loads((cache / CACHE_INDEX).read_text())
    kept = {n: (cache / shard_name(n)).stat().st_mtime_ns for n in (0, 2)}
    (cache / shard_name(1)).unlink()                      # an interrupted run: one shard missing
    (cache / f".{shard_name(1)}.tmp123").write_bytes(b"half")  # and its partial file
    build_cache(cfg)
    assert (cache / shard_name(1)).exists()
    assert {n: (cache / shard_name(n)).stat().st_mtime_ns for n in (0, 2)} == kept  # not redone
    assert json.loads((cache / CACHE_INDEX).read_text())["samples"] == first["samples"]
    other = config(ws, "config_stage0_cached", f"data.cache_dir={tmp_path / 'cache'}", "data.cache_shard_size=1",
                   subset(ws, tmp_path, images=[0, 1, 2]), "data.num_anchors=2")
    with pytest.raises(ValueError, match="built with other data/encoder settings"):
        build_cache(other)


def test_cache_skips_and_reports_a_corrupt_video(ws, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(ws["raw_videos"].parent / "raw", data / "raw")
    (data / "raw" / "broken.mp4").write_bytes(b"not a video at all" * 50)
    rows = [{"video": f"raw/clip{i}.mp4", "caption": "a square"} for i in (1, 2)]
    rows.insert(1, {"video": "raw/broken.mp4", "caption": "broken"})
    (data / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(ws, "config_stage0_cached", f"data.cache_dir={tmp_path / 'cache'}",
                 f"data.manifests=[{data / 'm.jsonl'}]")
    cache = build_cache(cfg)
    index = json.loads((cache / CACHE_INDEX).read_text())
    assert len(index["samples"]) == 2
    assert len(index["skipped"]) == 1 and "m.jsonl:2" in index["skipped"][0]



def _cache_tensors(cache) -> dict:
    index = json.loads((cache / CACHE_INDEX).read_text())
    out = {}
    for s in index["samples"]:
        with safe_open(str(cache / s["shard"]), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(f"{s['id']}/")})
    return out


def test_cache_with_decoding_workers_and_larger_encoder_batches_holds_the_same_features(ws, tmp_path, monkeypatch):
    """data.num_workers decodes in loader processes and data.cache_encode_batch sets clips per VAE call (the
    chunk limits scale with it); prompts and anchors of a chunk are encoded together. Raw videos (a target and
    three perturbed sources each), image and video edits: the same samples and tensors as the defaults."""
    picks = subset(ws, tmp_path, raw=[0, 1], images=[0, 1], edits=[0, 1, 2])
    default = build_cache(config(ws, "config_stage0_cached", f"data.cache_dir={tmp_path / 'a'}", picks))
    workers = []
    original = cache_module.decoded_samples

    def recording(dataset, indices, seed, pretexts, n=0):
        workers.append(n)
        return original(dataset, indices, seed, pretexts, n)

    monkeypatch.setattr(cache_module, "decoded_samples", recording)
    text_calls = []
    from train.features import FeatureEncoders
    text_rows = FeatureEncoders.text_rows
    monkeypatch.setattr(FeatureEncoders, "text_rows", lambda self, p: text_calls.append(len(p)) or text_rows(self, p))
    batched = build_cache(config(ws, "config_stage0_cached", f"data.cache_dir={tmp_path / 'b'}", picks,
                                 "data.num_workers=2", "data.cache_encode_batch=16"))
    assert workers and set(workers) == {2}
    # one text-encoder call per shard (this config's shards hold 4 samples): 2 raw videos x 4 pretext prompts
    # + 2 image edits, then 3 video edits; then the negative prompt
    assert text_calls == [2 * 4 + 2, 3, 1]
    a, b = json.loads((default / CACHE_INDEX).read_text()), json.loads((batched / CACHE_INDEX).read_text())
    assert a["samples"] == b["samples"] and a["skipped"] == b["skipped"] == []
    ta, tb = _cache_tensors(default), _cache_tensors(batched)
    assert ta.keys() == tb.keys() and any(k.endswith("/semantic") for k in ta)
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-5, msg=k)


def test_a_sample_that_fails_in_a_decoding_worker_is_skipped_and_reported(ws, tmp_path, monkeypatch):
    real = cache_module.decode_sample

    def failing(dataset, index, seed, pretexts):
        if index == 1:
            raise ValueError("unreadable frames")
        return real(dataset, index, seed, pretexts)

    monkeypatch.setattr(cache_module, "decode_sample", failing)  # workers are forked: they see it too
    cfg = config(ws, "config_stage0_cached", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=2",
                 subset(ws, tmp_path, images=[0, 1, 2]))
    index = json.loads((build_cache(cfg) / CACHE_INDEX).read_text())
    assert [s["id"] for s in index["samples"]] == [0, 2]
    assert len(index["skipped"]) == 1 and "unreadable frames" in index["skipped"][0]


def test_encode_limits_scale_with_the_clips_per_call_and_refuse_none(ws):
    default = cache_module.encode_limits()
    assert (default.clips_per_call, default.chunk_samples) == (cache_module.ENCODE_BATCH, cache_module.ENCODE_CHUNK)
    big = cache_module.encode_limits(64)
    assert big.clips_per_call == 64 and big.voxels_per_call == 64 * 17 * 64 * 64
    assert big.chunk_samples == 8 * cache_module.ENCODE_CHUNK and big.chunk_bytes == 8 * cache_module.CHUNK_BYTES
    assert big.memo_size >= 2 * big.chunk_samples
    small = cache_module.encode_limits(2)  # fewer clips per call; chunks never below the defaults
    assert small.voxels_per_call == 2 * 17 * 64 * 64 and small.chunk_samples == cache_module.ENCODE_CHUNK
    with pytest.raises(ValueError, match="data.cache_encode_batch must be a positive integer, got 0"):
        config(ws, "config_stage0_cached", "data.cache_encode_batch=0")
    with pytest.raises(ValueError, match="data.cache_encode_batch is 0: give at least 1"):
        cache_module.encode_limits(0)


# ---------------------------------------------------------------------------------------- training

def test_stage0_then_stage1_through_the_cli_from_raw_data(ws, capsys):
    assert main(["stage0", "--config", str(ws["config_stage0"]), "train.max_steps=2", "checkpoint.every=2"]) == 0
    root = ws["config_stage0"].parent
    export = root / "runs" / "stage0" / FINAL_DIR / DIT_FILE
    model = load_dit(export)
    assert model.config.has_sama and model.config.siglip_dim == 48
    rows = [json.loads(x) for x in (root / "runs" / "stage0" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # stage 1 (its config's init_from is stage 0's export), resumable with --resume latest
    assert main(["stage1", "--config", str(ws["config_stage1"]), "train.max_steps=2", "checkpoint.every=1",
                 "--resume", "latest"]) == 0
    stage1 = root / "runs" / "stage1"
    assert (stage1 / FINAL_DIR / DIT_FILE).exists() and (stage1 / "checkpoint-2").is_dir()
    assert "finished at step 2" in capsys.readouterr().out


def test_cli_reports_bad_configs_without_a_traceback(ws, capsys):
    assert main(["stage0", "--config", str(ws["config_stage0"]), "train.max_step=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.max_step'" in err and "max_steps" in err and "Traceback" not in err
    assert main(["stage0", "--config", str(ws["config_stage0"].parent / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_raw_and_cached_training_agree_and_validation_writes_videos(ws, tmp_path):
    common = ["train.max_steps=2", "checkpoint.every=2", "model.init_from=null", "model.preset=tiny",
              "model.config={text_dim: 24, siglip_dim: 48, siglip_hidden_dim: 40, dim: 64, ffn_dim: 96, "
              "num_heads: 2, freq_dim: 32}"]
    common.append(subset(ws, tmp_path, edits=[0, 1, 2, 3]))
    raw = config(ws, "config_stage1", f"output_dir={tmp_path / 'raw'}", "validation.every=2", "validation.steps=2",
                 *common)
    cached = config(ws, "config_stage1", f"output_dir={tmp_path / 'cached'}", f"data.cache_dir={tmp_path / 'c'}",
                    *common)
    build_cache(cached)
    raw_run, cached_run = train(raw), train(cached)
    for a, b in zip(raw_run.history, cached_run.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    videos = sorted((tmp_path / "raw" / "validation" / "step-0000002").iterdir())
    assert [v.name for v in videos] == ["sample-0.mp4"] and videos[0].stat().st_size > 0


@pytest.fixture(scope="module")
def shapes_with_keep(tmp_path_factory):
    """One SAMA-Shapes clip (32x32, 9 frames, npz) with its five edits, their image pairs and keep masks."""
    from train.synthetic import SynthConfig, write_dataset
    out = tmp_path_factory.mktemp("shapes_keep")
    write_dataset(out, 1, seed=3, config=SynthConfig(width=32, height=32, num_frames=9), video_format="npz")
    return out


def independent_latent_grid(mask):
    """(F, H, W) -> (T, H/8, W/8) by loops: the largest value over each latent cell's frames and pixels."""
    groups = [[0]] + [list(range(1 + 4 * t, 5 + 4 * t)) for t in range((mask.shape[0] - 1) // 4)]
    out = torch.zeros(len(groups), mask.shape[1] // 8, mask.shape[2] // 8)
    for t, frames in enumerate(groups):
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                out[t, i, j] = mask[frames, 8 * i:8 * i + 8, 8 * j:8 * j + 8].max()
    return out


def test_keep_masks_go_from_the_manifest_through_the_cache_and_weight_the_loss(ws, tmp_path, shapes_with_keep):
    """SAMA-Shapes' keep masks: the cache's <id>/keep is the mask file on the latent grid (an independent
    computation), raw and cached training agree with train.keep_region_weight, and the weight changes the loss."""
    import numpy as np
    from train.synthetic import load_clip
    data = shapes_with_keep
    common = ["train.max_steps=2", "checkpoint.every=2", "model.init_from=null", "model.preset=tiny",
              "model.config={text_dim: 24, siglip_dim: 48, siglip_hidden_dim: 40, dim: 64, ffn_dim: 96, "
              "num_heads: 2, freq_dim: 32}", "train.batch_size=2", "data.buckets=[[32, 32]]", "data.frame_buckets=[9]",
              f"data.manifests=[{data / 'video_edits.jsonl'}, {data / 'image_edits.jsonl'}]",
              "train.edit_region_weight=5"]
    cache = tmp_path / "c"
    cached = config(ws, "config_stage1", f"output_dir={tmp_path / 'cached'}", f"data.cache_dir={cache}",
                    "train.keep_region_weight=10", *common)
    build_cache(cached)
    index = json.loads((cache / CACHE_INDEX).read_text())
    seen = {"video_edit": 0, "image_edit": 0}
    for sample in index["samples"]:
        with safe_open(str(cache / sample["shard"]), "pt") as f:
            keep = f.get_tensor(f"{sample['id']}/keep")
        manifest, line = sample["where"].rsplit(":", 1)
        row = json.loads(open(manifest).read().splitlines()[int(line) - 1])
        if sample["kind"] == "video_edit":
            mask = load_clip(data / row["keep_mask"])[..., 0]  # (F, H, W)
        else:
            from PIL import Image
            mask = torch.from_numpy(np.asarray(Image.open(data / row["keep_mask"]), dtype=np.float32)[None, ..., 0] / 255)
        torch.testing.assert_close(keep, independent_latent_grid(mask))
        seen[sample["kind"]] += 1
    assert seen == {"video_edit": 5, "image_edit": 5}
    raw = config(ws, "config_stage1", f"output_dir={tmp_path / 'raw'}", "train.keep_region_weight=10", *common)
    off = config(ws, "config_stage1", f"output_dir={tmp_path / 'off'}", f"data.cache_dir={cache}", *common)
    raw_run, cached_run, off_run = train(raw), train(cached), train(off)
    for a, b in zip(raw_run.history, cached_run.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert raw_run.history[0]["loss"] != pytest.approx(off_run.history[0]["loss"], rel=1e-4)


def test_prompt_dropout_drops_the_same_prompts_from_raw_data_and_from_the_cache(ws, tmp_path):
    """train.prompt_dropout: the negative prompt's rows come from the encoders (raw data) or the cache's
    extras; both paths give the same losses, which differ from training without dropout."""
    common = ["train.max_steps=2", "checkpoint.every=2", "model.init_from=null", "model.preset=tiny",
              "model.config={text_dim: 24, siglip_dim: 48, siglip_hidden_dim: 40, dim: 64, ffn_dim: 96, "
              "num_heads: 2, freq_dim: 32}", subset(ws, tmp_path, edits=[0, 1, 2, 3])]
    cache = tmp_path / "c"
    cached = config(ws, "config_stage1", f"output_dir={tmp_path / 'cached'}", f"data.cache_dir={cache}",
                    "train.prompt_dropout=0.5", *common)
    build_cache(cached)
    raw = config(ws, "config_stage1", f"output_dir={tmp_path / 'raw'}", "train.prompt_dropout=0.5", *common)
    plain = config(ws, "config_stage1", f"output_dir={tmp_path / 'plain'}", f"data.cache_dir={cache}", *common)
    raw_run, cached_run, plain_run = train(raw), train(cached), train(plain)
    for a, b in zip(raw_run.history, cached_run.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert [r["loss"] for r in cached_run.history] != pytest.approx([r["loss"] for r in plain_run.history],
                                                                    rel=1e-6)


def test_a_cache_with_anchor_tokens_serves_a_run_without_them(ws, tmp_path):
    """The no-semantic-anchoring ablation trains from the full run's cache: the anchor tokens are dropped,
    nothing is re-encoded, and the losses equal training without anchors from raw data."""
    common = ["train.max_steps=2", "checkpoint.every=2", "model.init_from=null", "model.preset=tiny",
              "model.config={text_dim: 24, siglip_dim: 48, siglip_hidden_dim: 40, dim: 64, ffn_dim: 96, "
              "num_heads: 2, freq_dim: 32}", subset(ws, tmp_path, edits=[0, 1, 2, 3])]
    with_anchors = config(ws, "config_stage1", f"output_dir={tmp_path / 'a'}", f"data.cache_dir={tmp_path / 'c'}",
                          *common)
    cache = build_cache(with_anchors)
    assert json.loads((cache / CACHE_INDEX).read_text())["semantic"] is True
    shards = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*")}

    no_sa = ["data.semantic_anchoring=false", *common]
    cached = config(ws, "config_stage1", f"output_dir={tmp_path / 'cached'}", f"data.cache_dir={cache}", *no_sa)
    assert build_cache(cached) == cache  # accepted as it is
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*")} == shards
    raw = config(ws, "config_stage1", f"output_dir={tmp_path / 'raw'}", *no_sa)
    raw_run, cached_run = train(raw), train(cached)
    for a, b in zip(raw_run.history, cached_run.history, strict=True):
        assert a["loss_semantic"] == 0 and b["loss_semantic"] == 0
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_a_cache_without_anchor_tokens_is_refused_for_semantic_anchoring(ws, tmp_path):
    common = ["train.max_steps=1", "model.init_from=null", "model.preset=tiny", f"data.cache_dir={tmp_path / 'c'}",
              f"output_dir={tmp_path / 'out'}", subset(ws, tmp_path, edits=[0, 1])]
    build_cache(config(ws, "config_stage1", "data.semantic_anchoring=false", *common))
    with_anchors = config(ws, "config_stage1", *common)
    for step in (build_cache, train):
        with pytest.raises(ValueError, match="built with data.semantic_anchoring=false .* rebuild it"):
            step(with_anchors)


def _load_bench(name):
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_train_step_bench_times_the_loader_the_encoders_and_the_dit_step(ws, tmp_path, capsys):
    """bench/train_step.py on the tiny workspace (stage 0 from raw clips, so the encoders run): four parts,
    every timed one but the move to the device (a no-op on a CPU) above zero."""
    bench = _load_bench("train_step")
    out = tmp_path / "bench_run"
    assert bench.main(["--config", str(ws["config_stage0"]), "--batches", "2", f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if "ms/batch" in line]
    assert [r.split()[0] for r in rows] == ["loader", "encoders", "to", "DiT"]
    ms = [float(r.split("ms/batch")[0].split()[-1]) for r in rows]
    assert ms[0] > 0 and ms[1] > 0 and ms[3] > 0 and ms[2] >= 0
    assert "samples/s" in printed.splitlines()[-1]
    assert not list(out.glob("checkpoint-*")) and not (out / "final").exists()


def test_cache_build_bench_compares_clips_per_vae_call_on_equal_shards(ws, capsys):
    """bench/cache_build.py on the tiny workspace's raw clips (stage 0: a target and perturbed sources per
    sample): one row per batch size, equal features, and the module's batch size restored afterwards."""
    bench = _load_bench("cache_build")
    before = cache_module.ENCODE_BATCH
    assert bench.main(["--config", str(ws["config_stage0"]), "--samples", "3", "--batches", "1,4"]) == 0
    assert cache_module.ENCODE_BATCH == before
    rows = [line for line in capsys.readouterr().out.splitlines() if "clips per VAE call" in line]
    assert [int(r.split()[0]) for r in rows] == [1, 4]
    assert all(float(r.split("ms/sample")[0].split()[-1]) > 0 for r in rows)
    assert float(rows[1].split("difference|")[1]) <= 1e-4
    with pytest.raises(SystemExit, match="--batches '0,2': give clip counts >= 1"):
        bench.main(["--config", str(ws["config_stage0"]), "--batches", "0,2"])
