"""The DiT's own latents as decoder training data: `python -m train.sampled_latents` (the pipeline's latents,
sharded, resumable, never from a held-out split) and `train.vae_train`'s data.sampled_latents (decoded to the
edit's target outside the edit region, behind the frozen encoder)."""

import json

import numpy as np
import pytest
import torch

from sama_core.errors import SamaInputError
from sama_core.vae import denormalize_latents
from train import sampled_latents as sl
from train.synthetic import SynthConfig, load_clip, read_manifest, write_dataset
from train.vae_train import (
    SampledLatentPool,
    VAELossConfig,
    reconstruction_loss,
    train_vae,
    vae_config_from_dict,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from sama_core.bundle import write_tiny_random_bundle
    return write_tiny_random_bundle(tmp_path_factory.mktemp("bundle"), defaults={"steps": 2})


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    """One 9-frame train clip with its five video edits."""
    folder = tmp_path_factory.mktemp("train")
    write_dataset(folder, 1, seed=3, split="train", config=SynthConfig(num_frames=9), video_format="npz",
                  image_pairs=False)
    return folder


@pytest.fixture(scope="module")
def sampled(bundle, train_set, tmp_path_factory):
    """The tiny bundle's latents for the clip's five edits, written by two shards through the CLI."""
    out = tmp_path_factory.mktemp("sampled")
    for shard in ("0/2", "1/2"):
        assert sl.main(["--bundle", str(bundle), "--data", str(train_set), "--out", str(out),
                        "--shard", shard]) == 0
    return out


def test_sampled_latents_are_the_pipelines_latents_for_each_edit(bundle, train_set, sampled):
    from sama_core.pipeline import EditSettings, SamaPipeline
    rows = [r for r in read_manifest(train_set / "ground_truth.jsonl")]
    files = sl.sampled_latent_files([sampled])
    assert sorted(p.stem for p in files) == sorted(r["id"] for r in rows)  # the two shards cover every edit
    pipe = SamaPipeline.from_bundle(bundle, device="cpu", dtype="fp32")
    seeds = set()
    for row in rows[:2]:
        latents, meta = sl.read_sampled_latent(sampled / "latents" / f"{row['id']}.npz")
        assert meta["target_video"] == str(row["target_video"]) and meta["edit_mask_key"] == row["edit_mask_key"]
        assert meta["steps"] == 2 and len(meta["dit_sha256"]) == 64
        options = pipe.sampler_options(seed=meta["seed"])
        _, result = pipe.edit_frames(load_clip(row["source_video"]), row["instruction"], EditSettings(), options)
        assert latents.shape == (16, 3, 8, 8)  # 9 frames of 64x64
        # the same computation; CPU kernels may sum in another order between calls (measured: <= 5e-6)
        np.testing.assert_allclose(latents, result.latents[0].numpy(), rtol=0, atol=1e-4)
        seeds.add(meta["seed"])
    assert len(seeds) == 2  # every edit its own noise


def test_a_rerun_skips_written_edits_and_bad_inputs_are_refused(bundle, train_set, sampled, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (sampled / "latents").iterdir()}
    assert sl.main(["--bundle", str(bundle), "--data", str(train_set), "--out", str(sampled)]) == 0
    assert "wrote 0 sampled latents" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (sampled / "latents").iterdir()} == before

    heldout = tmp_path / "heldout"
    write_dataset(heldout, 1, seed=0, split="heldout", config=SynthConfig(num_frames=5), video_format="npz",
                  image_pairs=False)
    assert sl.main(["--bundle", str(bundle), "--data", str(heldout), "--out", str(tmp_path / "x")]) == 2
    assert "held-out split" in capsys.readouterr().err
    assert sl.main(["--bundle", str(bundle), "--data", str(train_set), "--out", str(tmp_path / "x"),
                    "--shard", "2/2"]) == 2
    assert "K must be in 0..N-1" in capsys.readouterr().err
    with pytest.raises(SamaInputError, match="has no latents"):
        sl.sampled_latent_files([tmp_path / "empty"])


def test_the_pool_gives_raw_latents_targets_and_the_keep_region(sampled):
    pool = SampledLatentPool.from_folders([sampled])
    assert len(pool) == 5
    raw, target, keep = pool.load(0, num_frames=9)
    latents, meta = sl.read_sampled_latent(pool.files[0])
    torch.testing.assert_close(raw, denormalize_latents(torch.from_numpy(latents)[None])[0])
    torch.testing.assert_close(target, load_clip(meta["target_video"]).permute(3, 0, 1, 2) * 2 - 1)
    with np.load(meta["mask_file"]) as masks:
        edit_mask = masks[meta["edit_mask_key"]]
    assert edit_mask.any() and np.array_equal(keep[0].numpy(), (~edit_mask).astype(np.float32))

    a, b = pool.batch(4, 3, 9, seed=0), pool.batch(4, 3, 9, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # a function of (seed, step): resume stays exact
    assert [t.shape[0] for t in a] == [3, 3, 3] and a[0].shape[1:] == (16, 3, 8, 8)
    assert any(not torch.equal(x, y) for x, y in zip(a, pool.batch(5, 3, 9, seed=0)))
    with pytest.raises(SamaInputError, match="set data.num_frames=9"):
        pool.load(0, num_frames=17)


def test_weighted_reconstruction_loss_is_the_weighted_mean():
    g = torch.Generator().manual_seed(0)
    recon, frames = torch.randn(2, 3, 5, 16, 16, generator=g), torch.randn(2, 3, 5, 16, 16, generator=g)
    weight = (torch.rand(2, 1, 5, 16, 16, generator=g) > 0.3).float()
    mean, logvar = torch.zeros(2, 16, 2, 2, 2), torch.zeros(2, 16, 2, 2, 2)
    loss = reconstruction_loss(recon, frames, mean, logvar, VAELossConfig(l1=1.0, mse=0.5, kl=0.0, lowpass=2.0),
                               weight)
    kept = weight.expand_as(recon).bool()
    d = (recon - frames)[kept]
    torch.testing.assert_close(loss.l1, d.abs().mean())
    torch.testing.assert_close(loss.mse, d.pow(2).mean())
    blocks = torch.nn.functional.avg_pool3d((recon - frames) * weight, (1, 8, 8))
    torch.testing.assert_close(loss.total, d.abs().mean() + 0.5 * d.pow(2).mean() + 2.0 * blocks.pow(2).mean())
    # pixels of weight 0 do not count: changing them leaves the loss as it was
    moved = torch.where(weight.bool().expand_as(recon), recon, recon + 5.0)
    torch.testing.assert_close(reconstruction_loss(moved, frames, mean, logvar, VAELossConfig(), weight).total,
                               reconstruction_loss(recon, frames, mean, logvar, VAELossConfig(), weight).total)


def _decoder_cfg(train_set, sampled, out, init_from, **data):
    return vae_config_from_dict({
        "output_dir": str(out), "max_steps": 2, "batch_size": 2, "init_from": str(init_from),
        "trainable": "decoder", "model": {"base_dim": 4},
        "data": {"datasets": [str(train_set)], "num_frames": 9, "stats_clips": 1, "eval_clips": 1,
                 "sampled_latents": [str(sampled)], "sampled_per_batch": 1, **data},
        "optim": {"warmup_steps": 1}, "checkpoint": {"every": 2, "keep": 1},
        "log": {"every": 1, "progress_bar": False}})


def test_decoder_trains_on_the_dits_latents_behind_the_frozen_encoder(train_set, sampled, tmp_path):
    from safetensors.torch import load_file

    from sama_core.vae import save_original_layout
    from train.vae_train import VAEArchConfig, build_vae
    base = tmp_path / "base.safetensors"
    save_original_layout(build_vae(VAEArchConfig(base_dim=4), seed=0), base)
    final = train_vae(_decoder_cfg(train_set, sampled, tmp_path / "run", base))
    a, b = load_file(str(base)), load_file(str(final / "vae.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "conv1.")))
    assert not torch.equal(a["decoder.head.2.weight"], b["decoder.head.2.weight"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["sampled_psnr"] == pytest.approx(10 * np.log10(4 / m["sampled_mse"])) for m in metrics)
    stats = json.loads((final / "latent_stats.json").read_text())
    assert stats["sampled_latents"] == {"folders": [str(sampled)], "per_batch": 1}


@pytest.mark.parametrize("data, extra, message", [
    ({"sampled_per_batch": 2}, {}, "must be below batch_size"),
    ({"sampled_per_batch": 0}, {}, "go together"),
    ({"sampled_latents": []}, {}, "go together"),
    ({"image_steps": 3}, {}, "data.image_steps=0"),
    ({}, {"trainable": "all"}, "needs trainable: decoder"),
])
def test_sampled_latent_config_errors_name_the_fix(train_set, sampled, tmp_path, data, extra, message):
    values = {"output_dir": str(tmp_path), "batch_size": 2, "init_from": "x.safetensors", "trainable": "decoder",
              "data": {"datasets": [str(train_set)], "num_frames": 9, "sampled_latents": [str(sampled)],
                       "sampled_per_batch": 1, **data}, **extra}
    with pytest.raises(SamaInputError, match=message):
        vae_config_from_dict(values)


def test_latent_cells_follow_the_vae_grid():
    mask = np.zeros((9, 16, 16), bool)
    mask[5, 10, 3] = True   # frames 5-8 are latent frame 2; pixel row 10 -> cell row 1, column 3 -> 0
    mask[0, 0, 15] = True   # frame 0 alone is latent frame 0
    cells = sl.latent_cells(mask)
    assert cells.shape == (3, 2, 2)
    assert {tuple(i) for i in np.argwhere(cells)} == {(2, 1, 0), (0, 0, 1)}


def test_latent_gap_is_zero_for_the_targets_latents_and_the_copys_for_the_sources(bundle, sampled, tmp_path,
                                                                                  capsys):
    import shutil

    from sama_core import video as vio
    from sama_core.pipeline import SamaPipeline
    from train.eval import load_case, read_cases
    pipe = SamaPipeline.from_bundle(bundle, device="cpu", dtype="fp32")
    measured = sl.latent_gap(bundle, [sampled])
    assert measured["dit_kept"]["edits"] > 0 and measured["dit_kept"]["rms"] > 0
    for which in ("target", "source"):
        folder = tmp_path / which
        shutil.copytree(sampled, folder)
        for path in sl.sampled_latent_files([folder]):
            _, meta = sl.read_sampled_latent(path)
            case = load_case({r["id"]: r for r in read_cases(meta["data"])}[meta["id"]])
            frames = torch.from_numpy(getattr(case, which))
            latents = pipe.vae.encode(vio.frames_to_vae_input(frames))[0].numpy()
            np.savez(path, latents=latents, meta=np.array(json.dumps(meta)))
        gap = sl.latent_gap(bundle, [folder])
        for name in ("kept", "background"):
            assert gap[f"copy_{name}"] == measured[f"copy_{name}"]
            expected = 0.0 if which == "target" else measured[f"copy_{name}"]["rms"]
            assert gap[f"dit_{name}"]["rms"] == pytest.approx(expected, abs=1e-6)
    assert sl.main(["--bundle", str(bundle), "--out", str(sampled), "--gap"]) == 0
    assert "dit_kept" in capsys.readouterr().out
    assert sl.main(["--bundle", str(bundle), "--out", str(tmp_path / "new")]) == 2
    assert "--data is needed" in capsys.readouterr().err
