"""SAMA-Shapes: the tiny VAE trainer (latent-statistics fold, unclamped decode, loss, deterministic batches,
exact resume), the evaluation metrics against their baselines, the orchestrator's stage bookkeeping, and
the whole tiny budget end to end (slow: every stage, resume, the bundle through the pipeline and the demo).
"""

import dataclasses
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from sama_core.errors import SamaFileNotFoundError, SamaInputError
from sama_core.video import read_video
from sama_core.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
from train import eval as ev
from train import shapes
from train.synthetic import SynthConfig, load_clip, write_dataset
from train.vae_train import (
    ClipPool,
    VAEArchConfig,
    VAELossConfig,
    build_vae,
    decode_unclamped,
    fold_latent_normalisation,
    latent_statistics,
    learning_rate,
    reconstruction_loss,
    train_vae,
    vae_config_from_dict,
)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # tests/conftest.py


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """3 held-out clips of 17 frames with all five edits."""
    folder = tmp_path_factory.mktemp("heldout")
    write_dataset(folder, 3, seed=0, split="heldout", video_format="npz")
    return folder


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    write_dataset(folder, 2, seed=0, split="train", config=SynthConfig(num_frames=9), video_format="npz",
                  image_pairs=False)
    return folder


# ------------------------------------------------------------------------------------------------ VAE

def _clip_tensor(frames):  # (F, H, W, 3) [0, 1] -> (1, 3, F, H, W) [-1, 1]
    return frames.permute(3, 0, 1, 2)[None] * 2 - 1


def test_decode_unclamped_is_diffusers_decode_without_the_clamp():
    vae = build_vae(VAEArchConfig(base_dim=4), seed=0).eval()
    z = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 4  # overshoots [-1, 1]
    with torch.no_grad():
        raw = decode_unclamped(vae, z)
        reference = vae.decode(z).sample
    assert raw.shape == (2, 3, 9, 32, 32)
    assert raw.abs().max() > 1  # really unclamped
    assert torch.equal(raw.clamp(-1, 1), reference)


def test_latent_statistics_and_the_fold(train_set):
    vae = build_vae(VAEArchConfig(base_dim=4), seed=0).eval()
    clips = [load_clip(p) for p in ClipPool.from_datasets([train_set]).paths[:3]]
    mean, std = latent_statistics(vae, clips)
    with torch.no_grad():  # independent: every latent position of every clip, channel by channel
        mus = torch.cat([vae.encode(_clip_tensor(c)).latent_dist.mean.transpose(0, 1).flatten(1) for c in clips],
                        dim=1).double()  # (16, positions)
        before = [vae.decode(vae.encode(_clip_tensor(c)).latent_dist.mean).sample for c in clips]
    torch.testing.assert_close(mean, mus.mean(1))
    torch.testing.assert_close(std, mus.std(1, unbiased=False))

    scale, _ = fold_latent_normalisation(vae, mean, std)
    torch.testing.assert_close(scale.double(), torch.tensor(WAN21_LATENTS_STD, dtype=torch.float64) / std,
                               rtol=1e-6, atol=0)
    with torch.no_grad():
        after = [vae.decode(vae.encode(_clip_tensor(c)).latent_dist.mean).sample for c in clips]
    for a, b in zip(before, after):  # the fold changes the latents, not what they decode to
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    folded_mean, folded_std = latent_statistics(vae, clips)
    wan_mean = torch.tensor(WAN21_LATENTS_MEAN, dtype=torch.float64)
    wan_std = torch.tensor(WAN21_LATENTS_STD, dtype=torch.float64)
    # what sama_core's normalisation (z - mean_wan) / std_wan makes of them: zero mean, unit std per channel
    torch.testing.assert_close((folded_mean - wan_mean) / wan_std, torch.zeros(16, dtype=torch.float64),
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(folded_std / wan_std, torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-4)


def test_reconstruction_loss_is_the_documented_formula():
    g = torch.Generator().manual_seed(0)
    recon, frames = torch.randn(2, 3, 5, 8, 8, generator=g), torch.rand(2, 3, 5, 8, 8, generator=g) * 2 - 1
    mean, logvar = torch.randn(2, 16, 2, 1, 1, generator=g), torch.randn(2, 16, 2, 1, 1, generator=g)
    weights = VAELossConfig(l1=0.5, mse=2.0, kl=0.1)
    loss = reconstruction_loss(recon, frames, mean, logvar, weights)
    n = frames.numel()
    l1 = sum(abs(a - b) for a, b in zip(recon.flatten().tolist(), frames.flatten().tolist())) / n
    mse = sum((a - b) ** 2 for a, b in zip(recon.flatten().tolist(), frames.flatten().tolist())) / n
    kl = sum(0.5 * (m * m + math.exp(v) - 1 - v) for m, v in zip(mean.flatten().tolist(),
                                                                 logvar.flatten().tolist())) / mean.numel()
    assert float(loss.l1) == pytest.approx(l1, rel=1e-5)
    assert float(loss.mse) == pytest.approx(mse, rel=1e-5)
    assert float(loss.kl) == pytest.approx(kl, rel=1e-5)
    assert float(loss.total) == pytest.approx(0.5 * l1 + 2.0 * mse + 0.1 * kl, rel=1e-5)

    # the low-pass term: squared error of the 8x8-pixel block means, per frame and channel (loops, not pooling)
    lowpass = VAELossConfig(l1=0.5, mse=2.0, kl=0.1, lowpass=3.0)
    recon16, frames16 = torch.randn(1, 3, 2, 16, 16, generator=g), torch.rand(1, 3, 2, 16, 16, generator=g)
    m16, v16 = torch.zeros(1, 16, 1, 2, 2), torch.zeros(1, 16, 1, 2, 2)
    base = reconstruction_loss(recon16, frames16, m16, v16, weights)
    with_lowpass = reconstruction_loss(recon16, frames16, m16, v16, lowpass)
    d = (recon16 - frames16)[0]
    blocks = [float(d[c, f, 8 * i:8 * i + 8, 8 * j:8 * j + 8].mean()) ** 2
              for c in range(3) for f in range(2) for i in range(2) for j in range(2)]
    assert float(with_lowpass.total - base.total) == pytest.approx(3.0 * sum(blocks) / len(blocks), rel=1e-4)


def test_clip_pool_batches_are_windows_of_the_clips_and_a_function_of_the_step(train_set):
    pool = ClipPool.from_datasets([train_set])
    assert len(pool) == 2 + 2 * 5  # 2 sources + 10 edit targets, each once
    frames, noise = pool.batch(7, 3, 5, seed=0, hflip=True)
    again, noise_again = pool.batch(7, 3, 5, seed=0, hflip=True)
    other, _ = pool.batch(8, 3, 5, seed=0, hflip=True)
    assert frames.shape == (3, 3, 5, 64, 64) and noise.shape == (3, 16, 2, 8, 8)
    assert torch.equal(frames, again) and torch.equal(noise, noise_again) and not torch.equal(frames, other)
    clips = [_clip_tensor(pool.load(i))[0] for i in range(len(pool))]  # (3, 9, H, W) each
    for window in frames:  # every window is 5 consecutive frames of some clip, maybe mirrored
        found = any(torch.equal(window, c[:, s:s + 5]) or torch.equal(window, c[:, s:s + 5].flip(-1))
                    for c in clips for s in range(5))
        assert found


def test_vae_config_errors_name_the_key_and_the_fix():
    base = {"data": {"datasets": ["d"]}}
    with pytest.raises(SamaInputError, match="model.z_dim must be 16"):
        vae_config_from_dict(base, ["model.z_dim=8"])
    with pytest.raises(SamaInputError, match="data.num_frames must be 4k\\+1"):
        vae_config_from_dict(base, ["data.num_frames=8"])
    with pytest.raises(SamaInputError, match="did you mean 'base_dim'"):
        vae_config_from_dict(base, ["model.base_dims=8"])
    with pytest.raises(SamaInputError, match="data.datasets is empty"):
        vae_config_from_dict({})
    with pytest.raises(SamaInputError, match="max_minutes must be > 0"):
        vae_config_from_dict(base, ["max_minutes=0"])


def test_vae_learning_rate_warms_up_holds_then_steps_down():
    base = {"data": {"datasets": ["d"]}, "optim": {"lr": 3e-4, "warmup_steps": 4}}
    cfg = vae_config_from_dict(base, ["optim.decay_from_step=10", "optim.final_lr=1e-4"])
    assert [learning_rate(cfg, s) for s in (0, 3, 9, 10, 500)] == pytest.approx([7.5e-5, 3e-4, 3e-4, 1e-4, 1e-4])
    assert learning_rate(vae_config_from_dict(base), 500) == pytest.approx(3e-4)  # no decay unless asked
    with pytest.raises(SamaInputError, match="go together"):
        vae_config_from_dict(base, ["optim.final_lr=1e-4"])
    with pytest.raises(SamaInputError, match="optim.final_lr must be > 0"):
        vae_config_from_dict(base, ["optim.decay_from_step=10", "optim.final_lr=0"])


def _small_vae_cfg(train_set, out, steps):
    return vae_config_from_dict({
        "output_dir": str(out), "max_steps": steps, "batch_size": 1, "model": {"base_dim": 4},
        "data": {"datasets": [str(train_set)], "num_frames": 5, "image_steps": 1, "image_batch_size": 2,
                 "stats_clips": 2, "eval_clips": 1},
        "optim": {"warmup_steps": 1}, "checkpoint": {"every": 2, "keep": 3},
        "log": {"every": 1, "progress_bar": False}})


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_vae_training_resumes_exactly_and_exports_a_loadable_normalised_vae(train_set, tmp_path):
    from safetensors.torch import load_file

    from sama_core.vae import WanVAE
    whole = train_vae(_small_vae_cfg(train_set, tmp_path / "whole", 4))
    _reset_accelerate()
    train_vae(_small_vae_cfg(train_set, tmp_path / "split", 2))  # "interrupted" after step 2 ...
    _reset_accelerate()
    split = train_vae(_small_vae_cfg(train_set, tmp_path / "split", 4), resume="latest")  # ... and resumed
    a, b = load_file(str(whole / "vae.safetensors")), load_file(str(split / "vae.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    stats = json.loads((whole / "latent_stats.json").read_text())
    assert stats["step"] == 4 and stats["ema"] is True and len(stats["raw_std"]) == 16
    assert max(abs(v) for v in stats["normalized_mean"]) < 1e-3
    assert max(abs(v - 1) for v in stats["normalized_std"]) < 1e-3
    vae = WanVAE.from_file(whole / "vae.safetensors")  # the original layout, through sama_core's loader
    assert vae.model.config.base_dim == 4
    metrics_file = tmp_path / "whole" / "logs" / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["frames"] for m in metrics] == [1, 5, 5, 5]  # one single-frame step, then clips
    assert all(m["psnr"] == pytest.approx(10 * math.log10(4 / m["mse"])) for m in metrics)


def test_vae_max_minutes_stops_with_a_checkpoint_and_an_export_and_resume_matches(train_set, tmp_path,
                                                                                   monkeypatch):
    from safetensors.torch import load_file

    import train.loop as loop
    whole = train_vae(_small_vae_cfg(train_set, tmp_path / "whole", 4))
    _reset_accelerate()
    minutes = iter(range(0, 100_000, 60))  # each look at the clock: one more minute
    monkeypatch.setattr(loop, "clock", lambda: float(next(minutes)))
    timed = _small_vae_cfg(train_set, tmp_path / "timed", 4)
    timed.max_minutes = 0.5  # deadline 30 s: the clock reads 60 after step 1 -> stop (checkpoints every 2)
    train_vae(timed)
    stats = json.loads((tmp_path / "timed" / "final" / "latent_stats.json").read_text())
    assert stats["step"] == 1  # exported at the stop
    assert [p.name for p in sorted((tmp_path / "timed").glob("checkpoint-*"))] == ["checkpoint-1"]
    _reset_accelerate()
    monkeypatch.setattr(loop, "clock", lambda: 0.0)
    timed.max_minutes = None
    resumed = train_vae(timed, resume="latest")
    a, b = load_file(str(whole / "vae.safetensors")), load_file(str(resumed / "vae.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("decoder_base_dim", [None, 8])
def test_decoder_training_keeps_the_latents_and_changes_the_decoder(train_set, tmp_path, decoder_base_dim):
    """trainable: decoder (same width: from the file's decoder; wider: a fresh one) leaves encode() bit for
    bit as the init file's, so a DiT trained on those latents still reads them, and the decoder learns."""
    from safetensors.torch import load_file

    from sama_core.vae import WanVAE
    base = train_vae(_small_vae_cfg(train_set, tmp_path / "base", 2)) / "vae.safetensors"
    _reset_accelerate()
    cfg = _small_vae_cfg(train_set, tmp_path / "dec", 3)
    cfg.init_from, cfg.trainable = str(base), "decoder"
    cfg.model.decoder_base_dim = decoder_base_dim
    cfg.data.image_steps = 0
    out = train_vae(cfg) / "vae.safetensors"
    a, b = load_file(str(base)), load_file(str(out))
    encoder_side = [k for k in a if k.startswith(("encoder.", "conv1."))]
    assert encoder_side and all(torch.equal(a[k], b[k]) for k in encoder_side)
    assert b["decoder.head.0.gamma"].shape[0] == (decoder_base_dim or 4)
    if decoder_base_dim is None:
        assert not torch.equal(a["decoder.head.2.weight"], b["decoder.head.2.weight"])  # it trained

    old, new = WanVAE.from_file(base), WanVAE.from_file(out)  # both load through sama_core
    assert (new.model.config.decoder_base_dim or 4) == (decoder_base_dim or 4)
    x = _clip_tensor(load_clip(ClipPool.from_datasets([train_set]).paths[0]))
    z = old.encode(x)
    assert torch.equal(z, new.encode(x))
    assert new.decode(z).shape == x.shape
    stats = json.loads((out.parent / "latent_stats.json").read_text())
    assert stats["trainable"] == "decoder" and stats["fold"]["target"].startswith("kept")
    assert stats["decoder_base_dim"] == (decoder_base_dim or 4)
    assert stats["ema_start_weight"] == pytest.approx(cfg.ema.decay ** 3)  # 3 steps of a 0.999 EMA: ~all start


def test_short_runs_are_warned_about_an_ema_that_still_holds_the_start(train_set, tmp_path, caplog):
    from train.vae_train import ema_start_weight, suggested_ema_decay
    assert ema_start_weight(0.999, 487) == pytest.approx(0.614, abs=1e-3)
    assert suggested_ema_decay(487) == 0.9792 and ema_start_weight(suggested_ema_decay(487), 487) < 1e-4
    assert suggested_ema_decay(3) == 0.9
    with caplog.at_level("WARNING", logger="train.vae_train"):
        train_vae(_small_vae_cfg(train_set, tmp_path / "short", 2))
    assert "still 100% the weights the run started from" in caplog.text and "ema.decay=0.9" in caplog.text


def test_latent_noise_is_added_to_the_decoded_latent_in_normalised_units(train_set, tmp_path):
    """loss.latent_noise: the decoder sees z + s * std_wan * e (e drawn after the posterior noise, so a run
    without it keeps its batches); a decoder-only run with it trains and keeps the encoder."""
    from train.vae_train import ReconstructionModel
    pool = ClipPool.from_datasets([train_set])
    frames, noise = pool.batch(3, 2, 5, seed=0, hflip=True)
    frames2, noise2, extra = pool.batch(3, 2, 5, seed=0, hflip=True, latent_noise=True)
    assert torch.equal(frames, frames2) and torch.equal(noise, noise2) and extra.shape == noise.shape
    vae = build_vae(VAEArchConfig(base_dim=4), seed=0).eval()
    model = ReconstructionModel(vae)
    shift = torch.full_like(noise, 0.5)
    with torch.no_grad():
        plain, mean, logvar = model(frames, noise)
        shifted, _, _ = model(frames, noise, shift)
        z = mean + (0.5 * logvar).exp() * noise + shift
        assert torch.allclose(shifted, decode_unclamped(vae, z), atol=1e-6) and not torch.equal(plain, shifted)

    base = train_vae(_small_vae_cfg(train_set, tmp_path / "base", 1)) / "vae.safetensors"
    _reset_accelerate()
    cfg = _small_vae_cfg(train_set, tmp_path / "noisy", 2)
    cfg.init_from, cfg.trainable, cfg.loss.latent_noise, cfg.data.image_steps = str(base), "decoder", 0.3, 0
    stats = json.loads((train_vae(cfg) / "latent_stats.json").read_text())
    assert stats["trainable"] == "decoder" and stats["step"] == 2
    with pytest.raises(SamaInputError, match="latent_noise needs trainable: decoder"):
        vae_config_from_dict({"output_dir": str(tmp_path), "data": {"datasets": [str(train_set)]},
                              "loss": {"latent_noise": 0.3}})


def test_decoder_training_config_errors_name_the_fix(train_set, tmp_path):
    values = {"output_dir": str(tmp_path), "data": {"datasets": [str(train_set)]}, "trainable": "decoder"}
    with pytest.raises(SamaInputError, match="needs init_from"):
        vae_config_from_dict(values)
    with pytest.raises(SamaInputError, match="trainable must be one of"):
        vae_config_from_dict({**values, "trainable": "encoder"})
    cfg = vae_config_from_dict({**values, "init_from": str(tmp_path / "missing.safetensors")})
    with pytest.raises(SamaFileNotFoundError, match="init_from"):
        train_vae(cfg)


# ------------------------------------------------------------------------------------------------ eval

def test_ground_truth_is_perfect_and_copy_fails_every_edit(heldout):
    rows = ev.read_cases(heldout)
    report = ev.evaluate({"gt": ev.ground_truth_method, "copy": ev.copy_method}, rows)
    gt, copy = report.summaries["gt"], report.summaries["copy"]
    assert set(gt) == {"all", "color", "shape", "remove", "add", "background", "by_background"}
    assert all(b["accuracy"] == 1.0 for b in gt["by_background"].values())
    assert all(b["accuracy"] == 0.0 for b in copy["by_background"].values())
    assert gt["all"]["edits"] == 15 and gt["all"]["judged"] == 15
    for kind in ("all", "color", "shape", "remove", "add", "background"):
        assert gt[kind]["accuracy"] == 1.0
        assert copy[kind]["accuracy"] == 0.0
    assert gt["all"]["progress"] == 1.0 and copy["all"]["progress"] == 0.0
    assert gt["shape"]["iou"] == 1.0
    assert gt["all"]["background_psnr"] == ev.PSNR_CAP and copy["all"]["background_psnr"] == ev.PSNR_CAP
    assert gt["all"]["motion_error"] == 0.0 and gt["all"]["motion_lost"] == 0.0
    assert copy["all"]["motion_error"] < 1.0  # unedited objects are where they were (occlusions aside)
    assert gt["all"]["temporal_ratio"] == 1.0 and gt["all"]["temporal_gap"] == 0.0


def test_accuracy_by_background_style_counts_each_style_separately(heldout, tmp_path):
    """A method that makes the edit only on one background style: 100% there, 0% elsewhere, in the summary
    and in results.md."""
    rows = ev.read_cases(heldout)
    styles = sorted({r["scene"]["background"]["style"] for r in rows})
    chosen = styles[0]

    def only_on_chosen(case):
        return case.target if case.row["scene"]["background"]["style"] == chosen else case.source
    report = ev.evaluate({"picky": only_on_chosen}, rows, tmp_path)
    by = report.summaries["picky"]["by_background"]
    assert set(by) == set(styles) and by[chosen]["accuracy"] == 1.0
    assert by[chosen]["judged"] == sum(r["scene"]["background"]["style"] == chosen for r in rows)
    assert all(by[st]["accuracy"] == 0.0 for st in styles if st != chosen)
    table = (tmp_path / "results.md").read_text()
    assert "Edit accuracy by the source's background style" in table
    assert "| picky | " + " | ".join("100.0%" if st == chosen else "0.0%" for st in styles) + " |" in table


def _case(heldout, kind, clip=0):
    row = next(r for r in ev.read_cases(heldout) if r["kind"] == kind and r["index"] == clip)
    return ev.load_case(row)


def test_colour_accuracy_needs_the_requested_colour(heldout):
    case = _case(heldout, "color")
    region = ev.edit_region(case)
    wanted = case.row["change"]["to"]
    other = next(n for n in ev.OBJECT_NAMES if n not in (wanted, case.row["change"]["from"]))
    wrong = case.target.copy()
    wrong[region] = ev.OBJECT_COLORS[other]  # the object recoloured, but in the wrong colour
    result = ev.edit_accuracy(case, wrong)
    assert result["color"] == other and result["success"] is False
    close = case.target.copy()
    close[region] = np.clip(close[region] + 0.05, 0, 1)  # the right colour, slightly off
    assert ev.edit_accuracy(case, close)["success"] is True


def test_background_psnr_motion_and_temporal_metrics_against_direct_computations(heldout):
    case = _case(heldout, "background")
    outside = ~case.edit_mask
    noisy = case.target.copy()
    noise = np.random.default_rng(0).normal(0, 0.02, noisy.shape).astype(np.float32)
    noisy[outside] = np.clip(noisy[outside] + noise[outside], 0, 1)
    mse = float(((noisy[outside] - case.target[outside]) ** 2).mean())
    assert ev.score(case, noisy)["background_psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)

    shifted = np.roll(case.target, 2, axis=2)  # everything 2 px to the right
    motion = ev.motion_error(case, shifted)
    assert motion["motion_frames"] > 0 and motion["motion_lost"] == 0
    assert motion["motion_error"] == pytest.approx(2.0, abs=0.25)

    assert motion["motion_position_error"] == pytest.approx(motion["motion_error"])  # nothing lost
    assert 0 < motion["motion_visible_frames"] <= motion["motion_frames"] and motion["motion_visible_lost"] == 0

    frozen = np.repeat(case.target[:1], case.target.shape[0], axis=0)
    temporal = ev.temporal_consistency(case, frozen)
    diffs = np.abs(np.diff(case.target, axis=0)).mean(axis=(1, 2, 3))
    assert temporal["temporal_ratio"] == 0.0
    assert temporal["temporal_gap"] == pytest.approx(diffs.mean() * 255, rel=1e-5)


def test_motion_parts_separate_slivers_from_clearly_visible_frames(heldout):
    """Paint one kept object grey in its least and its most visible frame: both count as lost in the motion
    error; only the most visible one in the clearly-visible part; the position error ignores both."""
    def sliver_objects():  # (case, pixels, sliver frame, most visible frame) of kept objects with a sliver
        for row in ev.read_cases(heldout, kinds=["background"]):
            case = ev.load_case(row)
            for j, color in ev.unedited_objects(case):
                window = ev.dilate(case.target_visible[j] >= ev.MASK_COVERAGE, ev.TRACK_DILATE)
                pixels = ev.color_pixels(case.target, color) & window
                counts = pixels.sum(axis=(1, 2))
                tracked = np.flatnonzero(counts >= ev.MIN_TRACK_PIXELS)
                small, large = tracked[np.argmin(counts[tracked])], tracked[np.argmax(counts[tracked])]
                if counts[small] < ev.VISIBLE_SHARE * counts[large]:
                    yield case, pixels, small, large

    case, pixels, small, large = next(sliver_objects())
    output = case.target.copy()
    for k in (small, large):
        output[k][pixels[k]] = 0.5  # grey: no longer this object's colour
    clean, painted = ev.motion_error(case, case.target), ev.motion_error(case, output)
    assert clean["motion_error"] == clean["motion_position_error"] == clean["motion_visible_error"] == 0.0
    assert painted["motion_lost"] == 2 and painted["motion_visible_lost"] == 1
    assert painted["motion_error"] == pytest.approx(2 * ev.LOST_ERROR / painted["motion_frames"])
    assert painted["motion_visible_error"] == pytest.approx(ev.LOST_ERROR / painted["motion_visible_frames"])
    assert painted["motion_position_error"] == 0.0
    summary = ev.summarize([{**ev.score(case, output), "success": None}])["all"]
    assert summary["motion_visible_lost"] == pytest.approx(1 / painted["motion_visible_frames"])
    table = ev.markdown_tables({"painted": ev.summarize([ev.score(case, output)])})
    assert "| method | motion error (px) | lost | position error where found (px) |" in table
    # per edit kind: the painted background edit has lost 1 clearly visible frame of its kept object
    per_kind = table.split("Kept objects lost where clearly visible, per edit kind")[1]
    share = 100 / painted["motion_visible_frames"]
    assert f"| painted | {share:.1f}% |" in per_kind and "| method | background |" in per_kind
    per_kind_motion = table.split("Motion error per edit kind")[1].split("\n\n")[1]
    assert per_kind_motion.splitlines()[2] == f"| painted | {painted['motion_error']:.2f} |"


def test_eval_writes_tables_and_plots_and_refuses_bad_inputs(heldout, train_set, tmp_path):
    rows = ev.read_cases(heldout, limit=1, kinds=["color", "remove"])
    assert [r["kind"] for r in rows] == ["color", "remove"]
    report = ev.evaluate({"copy": ev.copy_method, "ground truth": ev.ground_truth_method}, rows, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "| copy | 0.0% | 0.0% | 0.0% |" in table and "| ground truth | 100.0% | 100.0% | 100.0% |" in table
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "examples.png").read_bytes()[:4] == b"\x89PNG"
    lines = (tmp_path / "per_edit.jsonl").read_text().splitlines()
    assert len(lines) == 4 and report.files["table"] == tmp_path / "results.md"
    # motion per kind: the mean over that kind's edits, from the per-edit file
    per_edit = [json.loads(line) for line in lines]
    motion_table = table.split("Motion error per edit kind")[1].split("\n\n")[1]
    copy_motion = [r["motion_error"] for k in ("color", "remove") for r in per_edit
                   if r["method"] == "copy" and r["kind"] == k]
    assert len(copy_motion) == 2 and None not in copy_motion
    assert f"| copy | {copy_motion[0]:.2f} | {copy_motion[1]:.2f} |" in motion_table
    assert "| ground truth | 0.00 | 0.00 |" in motion_table
    assert ev.check_disjoint(heldout, train_set) == 3
    with pytest.raises(SamaInputError, match="also occur in the training set"):
        ev.check_disjoint(heldout, heldout)
    with pytest.raises(SamaFileNotFoundError, match="ground_truth.jsonl"):
        ev.read_cases(tmp_path)
    with pytest.raises(SamaInputError, match="unknown edit kinds"):
        ev.read_cases(heldout, kinds=["recolour"])
    with pytest.raises(SamaInputError, match="the output has shape"):
        ev.score(ev.load_case(rows[0]), np.zeros((3, 64, 64, 3), np.float32))
    assert ev.main(["--data", str(heldout), "--baselines", "vae"]) == 2  # the VAE baseline needs a bundle


def test_eval_guidance_sweep_gives_a_row_per_value_and_the_default_is_the_bundles(heldout, tmp_path):
    from sama_core.bundle import write_tiny_random_bundle
    bundle = write_tiny_random_bundle(tmp_path / "bundle", defaults={"steps": 2, "guidance": 3.0})
    common = ["--bundle", str(bundle), "--data", str(heldout), "--limit", "1", "--kinds", "color",
              "--baselines", "copy"]
    assert ev.main([*common, "--out", str(tmp_path / "sweep"), "--guidance", "1,3"]) == 0
    assert ev.main([*common, "--out", str(tmp_path / "default")]) == 0
    sweep = {r["method"]: r for r in map(json.loads, (tmp_path / "sweep" / "per_edit.jsonl").read_text().splitlines())}
    assert set(sweep) == {"SAMA-Shapes (guidance 1)", "SAMA-Shapes (guidance 3)", "copy (output = source)"}
    default = [json.loads(line) for line in (tmp_path / "default" / "per_edit.jsonl").read_text().splitlines()]
    model = next(r for r in default if r["method"] == "SAMA-Shapes")
    # no --guidance: the bundle's 3.0, the same numbers as the sweep's guidance-3 row; guidance 1 differs
    assert model["progress"] == sweep["SAMA-Shapes (guidance 3)"]["progress"]
    assert model["progress"] != sweep["SAMA-Shapes (guidance 1)"]["progress"]
    assert ev.parse_guidances("1.5,2") == (1.5, 2.0) and ev.parse_guidances(None) == (None,)
    for bad, message in (("2,x", "numbers >= 0"), ("-1", "numbers >= 0"), ("2,2", "a value twice")):
        with pytest.raises(SamaInputError, match=message):
            ev.parse_guidances(bad)
    assert ev.main([*common, "--guidance", "2,fast"]) == 2


def _eval_recording_options(heldout, tmp_path, monkeypatch, defaults, record):
    """train.eval on one colour edit with a tiny random bundle of these defaults and the copy baseline; every
    model row's sampler options pass through record(options) into `seen`. Returns (seen, the common argv,
    rows(out, *extra) -> {method: its per-edit result})."""
    from sama_core.bundle import write_tiny_random_bundle
    bundle = write_tiny_random_bundle(tmp_path / "bundle", defaults=defaults)
    seen = []
    real_method = ev.pipeline_method
    monkeypatch.setattr(ev, "pipeline_method",
                        lambda model, options: seen.append(record(options)) or real_method(model, options))
    common = ["--bundle", str(bundle), "--data", str(heldout), "--limit", "1", "--kinds", "color",
              "--baselines", "copy"]

    def rows(out, *extra):
        assert ev.main([*common, "--out", str(tmp_path / out), *extra]) == 0
        lines = (tmp_path / out / "per_edit.jsonl").read_text().splitlines()
        return {r["method"]: r for r in map(json.loads, lines)}
    return seen, common, rows


def test_eval_denoise_sweep_reaches_the_sampler_and_crosses_with_guidance(heldout, tmp_path, capsys, monkeypatch):
    seen, common, rows = _eval_recording_options(heldout, tmp_path, monkeypatch, {"steps": 2, "guidance": 3.0},
                                                 lambda options: (options.guidance, options.denoise))
    sweep = rows("sweep", "--denoise", "1,0.05")
    assert set(sweep) == {"SAMA-Shapes (denoise 1)", "SAMA-Shapes (denoise 0.05)", "copy (output = source)"}
    default = rows("default")["SAMA-Shapes"]
    assert seen == [(3.0, 1.0), (3.0, 0.05), (3.0, 1.0)]  # the bundle sets no denoise: 1
    assert default["progress"] == sweep["SAMA-Shapes (denoise 1)"]["progress"]
    assert sweep["SAMA-Shapes (denoise 0.05)"]["progress"] != default["progress"]
    seen.clear()
    crossed = rows("crossed", "--guidance", "1,3", "--denoise", "1,0.5")
    assert set(crossed) - {"copy (output = source)"} == {
        f"SAMA-Shapes (guidance {g}, denoise {d})" for g in (1, 3) for d in (1, 0.5)}
    assert sorted(seen) == [(1.0, 0.5), (1.0, 1.0), (3.0, 0.5), (3.0, 1.0)]
    assert crossed["SAMA-Shapes (guidance 3, denoise 1)"]["progress"] == default["progress"]
    assert ev.parse_denoises("1,0.5") == (1.0, 0.5) and ev.parse_denoises(None) == (None,)
    for bad, message in (("0", r"numbers in \(0, 1\]"), ("1.5", r"numbers in \(0, 1\]"),
                         ("0.5,0.5", "a value twice"), ("half", r"numbers in \(0, 1\]")):
        with pytest.raises(SamaInputError, match=message):
            ev.parse_denoises(bad)
    assert ev.main([*common, "--denoise", "0"]) == 2
    assert "--denoise takes numbers in (0, 1]" in capsys.readouterr().err


def test_eval_flowedit_rows_sample_with_flowedit(heldout, tmp_path, capsys, monkeypatch):
    seen, common, rows = _eval_recording_options(heldout, tmp_path, monkeypatch, {"steps": 3, "guidance": 2.0},
                                                 lambda options: (options.flowedit, options.flowedit_skip))
    flow = rows("flow", "--flowedit", "0,1")
    assert set(flow) == {"SAMA-Shapes", "SAMA-Shapes + FlowEdit (skip 0)", "SAMA-Shapes + FlowEdit (skip 1)",
                         "copy (output = source)"}
    assert seen == [(False, 2), (True, 0), (True, 1)]
    assert len({flow[m]["psnr"] for m in flow if m.startswith("SAMA")}) == 3  # three different edits
    assert ev.parse_flowedit_skips("2,4") == (2, 4) and ev.parse_flowedit_skips(None) == ()
    assert ev.main([*common, "--flowedit", "1.5"]) == 2
    assert "--flowedit takes 'off' and/or whole numbers >= 0" in capsys.readouterr().err
    # "off": the released sampler beside a bundle default of FlowEdit (SAMA-Shapes' since session 17)
    seen.clear()
    off = rows("off", "--flowedit", "off,1")
    assert set(off) == {"SAMA-Shapes", "SAMA-Shapes (released sampler)", "SAMA-Shapes + FlowEdit (skip 1)",
                        "copy (output = source)"}
    assert seen == [(False, 2), (False, 2), (True, 1)]
    assert off["SAMA-Shapes (released sampler)"]["psnr"] == flow["SAMA-Shapes"]["psnr"]
    assert ev.parse_flowedit_skips("off") == ("off",)
    for bad in ("off,off", "of", "off,-1"):
        with pytest.raises(SamaInputError, match="--flowedit"):
            ev.parse_flowedit_skips(bad)


def test_eval_keep_unchanged_rows_keep_more_of_the_source(heldout, tmp_path, capsys):
    """--keep-unchanged T: a row per threshold, the pipeline's keep-unchanged edit of the same sample. Outside
    the edit mask the source is the target, so every pixel taken back from the source raises the background
    PSNR; threshold 1 takes back all that changed by less than 0.5."""
    from sama_core.bundle import write_tiny_random_bundle
    bundle = write_tiny_random_bundle(tmp_path / "bundle", defaults={"steps": 2})
    common = ["--bundle", str(bundle), "--data", str(heldout), "--limit", "1", "--kinds", "color,remove",
              "--baselines", ""]
    assert ev.main([*common, "--out", str(tmp_path / "keep"), "--keep-unchanged", "1,0.2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "keep" / "per_edit.jsonl").read_text().splitlines()]
    by = {(r["method"], r["id"]): r for r in rows}
    methods = {r["method"] for r in rows}
    assert methods == {"SAMA-Shapes", "SAMA-Shapes + keep unchanged 1", "SAMA-Shapes + keep unchanged 0.2"}
    for edit in {r["id"] for r in rows}:
        plain, kept = by[("SAMA-Shapes", edit)], by[("SAMA-Shapes + keep unchanged 1", edit)]
        assert kept["background_psnr"] > plain["background_psnr"]
    assert ev.parse_keep_unchanged("0.2,0.3") == (0.2, 0.3) and ev.parse_keep_unchanged(None) == ()
    assert ev.main([*common, "--out", str(tmp_path / "bad"), "--keep-unchanged", "1.5"]) == 2
    assert "--keep-unchanged takes numbers in [0, 1] (0 = off)" in capsys.readouterr().err


def test_eval_merge_of_two_processes_equals_one_evaluation_of_all_edits(heldout, tmp_path, capsys):
    """--merge: two evaluations of disjoint kinds (the two-process way the docs run them) give the same per-edit
    scores, tables and metrics as one evaluation of every edit."""
    common = ["--data", str(heldout), "--limit", "2", "--baselines", "copy,ground_truth"]
    assert ev.main([*common, "--out", str(tmp_path / "all")]) == 0
    assert ev.main([*common, "--kinds", "color,shape,remove", "--out", str(tmp_path / "a")]) == 0
    assert ev.main([*common, "--kinds", "add,background", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert ev.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "merged")]) == 0
    assert "merged 2 evaluations" in capsys.readouterr().out

    def per_edit(folder):
        return sorted((r["method"], r["id"], json.dumps(r, sort_keys=True))
                      for r in map(json.loads, (tmp_path / folder / "per_edit.jsonl").read_text().splitlines()))
    assert per_edit("merged") == per_edit("all") and len(per_edit("all")) == 2 * 10
    merged = json.loads((tmp_path / "merged" / "metrics.json").read_text())["summaries"]
    whole = json.loads((tmp_path / "all" / "metrics.json").read_text())["summaries"]
    assert merged == whole
    tables = [(tmp_path / f / "results.md").read_text().split("\n- ")[0] for f in ("merged", "all")]
    assert tables[0] == tables[1]  # the same tables (the timing lines differ)
    # refusals: overlapping parts, an unfinished part, no --out
    assert ev.main(["--merge", str(tmp_path / "a"), str(tmp_path / "all"), "--out", str(tmp_path / "x")]) == 2
    assert "is in two parts" in capsys.readouterr().err
    assert ev.main(["--merge", str(tmp_path / "a"), str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a finished evaluation" in capsys.readouterr().err
    assert ev.main(["--merge", str(tmp_path / "a")]) == 2
    assert "--merge needs --out" in capsys.readouterr().err


def test_eval_ctrl_c_says_nothing_was_written_instead_of_a_traceback(heldout, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "evaluate", interrupted)
    out = tmp_path / "eval"
    assert ev.main(["--data", str(heldout), "--baselines", "copy", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted: nothing was written" in err and "Traceback" not in err


def test_eval_shift_and_steps_reach_the_sampler_and_bad_values_are_refused(heldout, tmp_path, capsys,
                                                                           monkeypatch):
    from sama_core.bundle import write_tiny_random_bundle
    bundle = write_tiny_random_bundle(tmp_path / "bundle", defaults={"steps": 2, "shift": 5.0})
    common = ["--bundle", str(bundle), "--data", str(heldout), "--limit", "1", "--kinds", "color",
              "--baselines", ""]

    def progress(*extra):
        out = tmp_path / "_".join(extra or ("default",))
        assert ev.main([*common, "--out", str(out), *extra]) == 0
        return json.loads((out / "per_edit.jsonl").read_text().splitlines()[0])["progress"]
    default = progress()
    assert progress("--shift", "5") == default      # the bundle's shift, given explicitly
    assert progress("--shift", "1.5") != default
    assert progress("--steps", "3") != default
    for bad, message in ((["--shift", "0"], "--shift must be a positive number"),
                         (["--shift", "nan"], "--shift must be a positive number"),
                         (["--steps", "0"], "--steps must be at least 1")):
        assert ev.main([*common, *bad]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: refused before any sampling
    assert ev.main([*common, "--out", str(tmp_path / "noplot")]) == 2
    assert "pip install" in capsys.readouterr().err and not (tmp_path / "noplot").exists()


def test_eval_extra_vae_rows_decode_the_bundles_dit_with_another_vae(heldout, tmp_path):
    from safetensors.torch import load_file, save_file

    from sama_core.bundle import write_tiny_random_bundle
    bundle = write_tiny_random_bundle(tmp_path / "bundle", defaults={"steps": 2})
    vae_file = bundle / json.loads((bundle / "bundle.json").read_text())["vae"]
    weights = load_file(str(vae_file))
    same = tmp_path / "same.safetensors"
    save_file(weights, str(same))
    weights["decoder.head.2.bias"] = weights["decoder.head.2.bias"] + 0.5  # a brighter decoder, same encoder
    brighter = tmp_path / "brighter.safetensors"
    save_file(weights, str(brighter))
    assert ev.main(["--bundle", str(bundle), "--data", str(heldout), "--limit", "1", "--kinds", "color",
                    "--baselines", "vae", "--out", str(tmp_path / "out"), "--extra-vae", f"same={same}",
                    "--extra-vae", f"brighter={brighter}"]) == 0
    rows = {r["method"]: r for r in map(json.loads, (tmp_path / "out" / "per_edit.jsonl").read_text().splitlines())}
    assert set(rows) == {"SAMA-Shapes", "same", "brighter", "VAE(target) ceiling", "VAE(target) same",
                         "VAE(target) brighter"}
    metrics = ("progress", "psnr", "background_psnr")
    assert all(rows["same"][m] == rows["SAMA-Shapes"][m] for m in metrics)  # the same file: the same edit
    assert all(rows["VAE(target) same"][m] == rows["VAE(target) ceiling"][m] for m in metrics)
    assert rows["brighter"]["psnr"] != rows["SAMA-Shapes"]["psnr"]
    assert rows["VAE(target) brighter"]["psnr"] != rows["VAE(target) ceiling"]["psnr"]
    with pytest.raises(SamaInputError, match="given twice"):
        ev.parse_named_files([f"a={same}", f"a={brighter}"], "--extra-vae")
    assert ev.main(["--data", str(heldout), "--extra-vae", f"a={same}"]) == 2  # needs --bundle
    with pytest.raises(SamaInputError, match="already a row"):
        ev.bundle_methods(bundle, {}, 2, 0, "SAMA-Shapes", [], extra_vaes={"SAMA-Shapes": str(same)})


# ------------------------------------------------------------------------------------- orchestration

def _fake_stages(log):
    def action(name, output):
        def run(run_):
            log.append(name)
            path = run_.path(output)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(name)
        return run
    return (shapes.Stage("a", (), ("a/out",), ("a",), action("a", "a/out")),
            shapes.Stage("b", ("a",), ("b/out",), ("b",), action("b", "b/out")),
            shapes.Stage("c", ("b",), ("c/out",), ("c",), action("c", "c/out")))


def test_stages_skip_when_done_and_restart_after_a_dependency_ran_again(tmp_path, monkeypatch):
    log = []
    monkeypatch.setattr(shapes, "STAGES", _fake_stages(log))
    monkeypatch.setattr(shapes, "write_configs", lambda run: {})
    run = shapes.start_run(tmp_path, "tiny", "full", echo=lambda s: None)
    assert shapes.run_pipeline(run, until="b") == ["a", "b"]
    assert shapes.run_pipeline(run) == ["c"]          # continues where it stopped
    assert shapes.run_pipeline(run) == []             # everything done
    (tmp_path / "b" / "out").unlink()                 # a later stage's output lost
    assert shapes.run_pipeline(run) == ["b", "c"]     # that stage and what depends on it
    (tmp_path / "b" / "partial").write_text("x")      # b started, then a ran again: b's folder is stale
    shapes._stamp(run, "b", "started").touch()
    os.utime(shapes._stamp(run, "b", "started"), ns=(1, 1))
    (tmp_path / "a" / "out").unlink()
    assert shapes.run_pipeline(run) == ["a", "b", "c"]
    assert not (tmp_path / "b" / "partial").exists()  # removed before b started over
    assert log == ["a", "b", "c", "b", "c", "a", "b", "c"]
    state = json.loads((tmp_path / "run.json").read_text())
    assert state["stages"]["b"]["runs"] == 3
    with pytest.raises(SamaInputError, match="--until must be one of a, b, c"):
        shapes.run_pipeline(run, until="z")


def test_run_refuses_another_budget_and_bad_overrides(tmp_path):
    shapes.start_run(tmp_path, "tiny", "full", echo=lambda s: None)
    with pytest.raises(SamaInputError, match="started with --budget tiny"):
        shapes.start_run(tmp_path, "full", "full")
    with pytest.raises(SamaInputError, match="--variant must be one of"):
        shapes.start_run(tmp_path / "x", "tiny", "no_anchors")
    run = shapes.start_run(tmp_path, "tiny", "full", echo=lambda s: None)
    with pytest.raises(SamaInputError, match="did you mean 'max_steps'"):
        shapes.materialize_config(run, "shapes_stage0.yaml", ["train.max_step=3"])
    assert not (tmp_path / "shapes_stage0.yaml").exists()


def test_gpu_budget_trains_from_the_clips_on_the_clock(tmp_path):
    from train.config import load_config
    from train.vae_train import load_vae_config
    run = shapes.start_run(tmp_path, "gpu", "full", echo=lambda s: None)
    paths = shapes.write_configs(run)  # every override is a valid key (materialize_config checks)
    stage0, stage1 = load_config(paths["stage0"]), load_config(paths["stage1"])
    assert stage0.data.cache_dir is None and stage1.data.cache_dir is None
    assert (stage0.train.max_minutes, stage1.train.max_minutes) == (1.5, 4.5)
    assert stage1.train.batch_size == 64 and stage1.train.prompt_dropout == 0.1
    manifests = [m["path"] if isinstance(m, dict) else m for m in stage1.data.manifests]
    # every clip, no first-N subset
    assert manifests == ["data/train/video_edits.jsonl", "data/train/image_edits.jsonl"]
    vae = load_vae_config(paths["vae"])
    assert vae.max_minutes == 3.5 and (vae.optim.decay_from_step, vae.optim.final_lr) == (3200, 1e-4)
    names = [s.name for s in shapes.stages_of(run)]
    assert names == ["data", "vae", "encoders", "stage0", "stage1", "demo", "export", "eval"]
    assert dict((s.name, s.deps) for s in shapes.stages_of(run))["stage0"] == ("data", "vae", "encoders")
    with pytest.raises(SamaInputError, match="--until must be one of"):
        shapes.run_pipeline(run, until="cache0")


def test_default_guidance_follows_prompt_dropout(tmp_path, monkeypatch):
    for dropout, guidance in ((0.1, 2.0), (0.0, 1.0)):
        tiny = shapes.BUDGETS["tiny"]
        budget = dataclasses.replace(tiny, name=f"tiny{dropout}",
                                     stage1=(*tiny.stage1, f"train.prompt_dropout={dropout}"))
        monkeypatch.setitem(shapes.BUDGETS, budget.name, budget)
        run = shapes.start_run(tmp_path / str(dropout), budget.name, "full", echo=lambda s: None)
        shapes.write_configs(run)
        assert shapes.default_guidance(run) == guidance


@pytest.mark.slow
def test_an_uncached_budget_trains_both_stages_from_the_clips(tmp_path):
    from train.config import load_config
    run = shapes.start_run(tmp_path, "tiny_gpu", "full", echo=lambda s: None)
    ran = shapes.run_pipeline(run, until="export")
    assert ran == ["data", "vae", "encoders", "stage0", "stage1", "demo", "export"]
    assert not (tmp_path / "cache").exists()
    assert load_config(tmp_path / "shapes_stage1.yaml").data.cache_dir is None
    index = json.loads((tmp_path / "stage1" / "data_index.json").read_text())  # the raw path's index
    assert index["samples"]
    assert (tmp_path / "bundle" / "bundle.json").is_file()

    # The run folder copied without its clips (to a GPU machine, say): the data stage regenerates them, finds
    # the same digest, and nothing after it runs again.
    shutil.rmtree(tmp_path / "data")
    assert shapes.run_pipeline(run, until="export") == ["data"]
    assert shapes.stage_state(run, dict((s.name, s) for s in shapes.stages_of(run))["vae"]) == "done"


@pytest.mark.slow
def test_gpu_lease_script_carries_a_run_between_calls_without_its_clips(tmp_path):
    """scripts/shapes_gpu_lease.sh at toy size: each step starts from the previous step's packed run (a new
    folder each time, as on a fresh machine) and runs only its own stages."""
    import subprocess
    script = os.path.join(REPO, "scripts", "shapes_gpu_lease.sh")
    env = dict(os.environ, BUDGET="tiny_gpu", PYTHON=sys.executable)

    def step(*args):
        done = subprocess.run(["bash", script, *map(str, args)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return [line for line in done.stdout.splitlines() if line.startswith("[")]

    base = step("base", tmp_path / "a", tmp_path / "p1")
    assert "[stage0] running" in base and not any(line.startswith("[stage1]") for line in base)
    assert all(p.stat().st_size <= 15 * 2 ** 20 for p in (tmp_path / "p1").iterdir())
    second = step("stage1", tmp_path / "b", tmp_path / "p2", tmp_path / "p1")
    assert "[data] running" in second and "[vae] done, skipped" in second
    assert "[stage0] done, skipped" in second
    assert "[stage1] running" in second
    last = step("finish", tmp_path / "c", tmp_path / "p2")
    assert "[stage1] done, skipped" in last and "[export] running" in last and "[eval] running" in last
    assert (tmp_path / "c" / "bundle" / "bundle.json").is_file()


def test_decoder_gpu_script_trains_decoders_side_by_side_and_packs_their_exports(tmp_path):
    """scripts/vae_decoder_gpu.sh at toy size on the CPU (the bundle's VAE, 2 clips, a few seconds of
    training): the packed export unpacks to a VAE with the bundle's encoder, bit for bit."""
    import subprocess
    import tarfile

    from safetensors.torch import load_file
    script = os.path.join(REPO, "scripts", "vae_decoder_gpu.sh")
    env = dict(os.environ, PYTHON=sys.executable, CLIPS="2", HELDOUT="1", MINUTES="0.02", BATCH="1",
               WORKERS="1", OMP_NUM_THREADS="2")
    done = subprocess.run(["bash", script, str(tmp_path / "work"), str(tmp_path / "parts"), "tuned:12:1e-4"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "data: 2 + 1 clips" in done.stdout and "== tuned:" in done.stdout
    parts = sorted((tmp_path / "parts").iterdir())
    assert parts and all(p.name.startswith("decoders.tgz.part-") for p in parts)
    packed = tmp_path / "packed.tgz"
    packed.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(packed) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    final = tmp_path / "unpacked" / "tuned" / "final"
    stats = json.loads((final / "latent_stats.json").read_text())
    assert stats["trainable"] == "decoder" and stats["step"] >= 1
    bundle_vae = load_file(os.path.join(REPO, "sama_core", "assets", "sama-shapes", "vae.safetensors"))
    tuned = load_file(str(final / "vae.safetensors"))
    assert all(torch.equal(bundle_vae[k], tuned[k]) for k in bundle_vae if k.startswith(("encoder.", "conv1.")))
    assert (tmp_path / "unpacked" / "tuned.log").is_file() and (tmp_path / "unpacked" / "data.log").is_file()
    no_spec = subprocess.run(["bash", script, str(tmp_path / "w2"), str(tmp_path / "p2")], env=env,
                             capture_output=True, text=True, timeout=60)
    assert no_spec.returncode == 2 and "NAME:DECODER_WIDTH:LR" in no_spec.stderr


def test_data_digest_changes_with_any_manifest_line(tmp_path):
    run = shapes.start_run(tmp_path, "tiny", "full", echo=lambda s: None)
    for split in ("train", "heldout"):
        folder = tmp_path / "data" / split
        folder.mkdir(parents=True)
        (folder / "dataset.json").write_text('{"seed": 0}')
        (folder / "video_edits.jsonl").write_text('{"instruction": "make the red circle blue"}\n')
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "sample.json").write_text('{"instruction": "delete the star"}')
    first, demo = shapes.data_digest(run), shapes.demo_digest(run)
    (tmp_path / "data" / "train" / "dataset.json").write_text('{"seed": 0, "seconds": 2.5}')  # timing only
    assert shapes.data_digest(run) == first
    (tmp_path / "demo" / "sample.json").write_text('{"instruction": "delete the circle"}')  # the demo's own stage
    assert shapes.data_digest(run) == first and shapes.demo_digest(run) != demo
    changed = '{"instruction": "make the red circle green"}\n'
    (tmp_path / "data" / "heldout" / "video_edits.jsonl").write_text(changed)
    assert shapes.data_digest(run) != first


def test_demo_clip_is_a_clear_removal_from_the_demo_split():
    clip = shapes.pick_demo_clip()
    edit = clip.edits[0].edit
    assert shapes.DEMO_KIND == "remove"
    assert clip.split == "demo" and edit.kind == "remove"
    assert shapes.is_clear_demo(clip.scene, edit)
    assert clip.scene.background.style == "plain"
    removed = clip.scene.objects[edit.object_index]
    assert [o.color for o in clip.scene.objects].count(removed.color) == 1
    assert len(edit.target.objects) == len(clip.scene.objects) - 1
    named = [w for w in (edit.reference["color"], edit.reference["shape"]) if w]
    assert named and all(w in edit.instruction for w in named)


def test_colour_demo_clip_is_still_available():
    clip = shapes.pick_demo_clip("color")
    edit = clip.edits[0].edit
    assert edit.kind == "color" and shapes.is_clear_demo(clip.scene, edit)
    assert edit.change["to"] in edit.instruction


def test_demo_clip_kind_outside_the_demo_kinds_is_named():
    with pytest.raises(SamaInputError, match="demo shows a color or remove edit, not 'shape'"):
        shapes.pick_demo_clip("shape")


def test_removal_demo_is_rejected_when_another_object_has_the_removed_colour():
    import dataclasses
    clip = shapes.pick_demo_clip()
    edit = clip.edits[0].edit
    removed = clip.scene.objects[edit.object_index]
    same = dataclasses.replace(clip.scene, objects=[
        o if i == edit.object_index else dataclasses.replace(o, color=removed.color)
        for i, o in enumerate(clip.scene.objects)])
    assert not shapes.is_clear_demo(same, edit)


@pytest.mark.parametrize("kind", shapes.DEMO_KINDS)
def test_demo_clip_is_rejected_on_a_textured_background(kind):
    import dataclasses
    clip = shapes.pick_demo_clip(kind)
    edit = clip.edits[0].edit
    for style in ("stripes", "checker", "noise"):
        textured = dataclasses.replace(clip.scene, background=dataclasses.replace(clip.scene.background, style=style,
                                                                                    period=30.0))
        assert not shapes.is_clear_demo(textured, edit), style


@pytest.mark.parametrize("kind", shapes.DEMO_KINDS)
def test_demo_clip_is_rejected_when_the_edited_object_touches_another(kind):
    import dataclasses

    from train.synthetic import render_scene
    clip = shapes.pick_demo_clip(kind)
    edit = clip.edits[0].edit
    scene = clip.scene
    other = next(i for i in range(len(scene.objects)) if i != edit.object_index)
    # move the other object onto the edited one's path, 1 radius beside it: the outlines overlap
    edited = scene.objects[edit.object_index]
    centers = [[x + edited.radius, y] for x, y in edited.centers]
    touching = dataclasses.replace(scene, objects=[
        dataclasses.replace(o, centers=centers) if i == other else o for i, o in enumerate(scene.objects)])
    coverage = render_scene(touching).coverage > 0
    assert (coverage[edit.object_index] & coverage[other]).any()
    assert not shapes.is_clear_demo(touching, edit)


def _fake_finished_run(folder, variant, accuracy, stage0_accuracy, motion, curve, baselines=False):
    """A run folder with what `compare` reads: run.json, eval/metrics.json, curves, training losses."""
    def summary(acc, motion_error):
        block = {"edits": 10, "judged": 10, "accuracy": acc, "progress": acc - 0.1, "iou": None,
                 "background_psnr": 30.0, "psnr": 25.0, "motion_error": motion_error, "motion_lost": 0.0,
                 "temporal_ratio": 1.1, "temporal_gap": 3.0}
        return {"all": block, "color": dict(block)}
    summaries = {"SAMA-Shapes": summary(accuracy, motion), "stage 0 only (zero-shot)": summary(stage0_accuracy, 1.0),
                 "copy (output = source)": summary(0.0, 0.3)}
    if baselines:
        summaries["ground truth"] = summary(1.0, 0.0)
    (folder / "eval").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"budget": "full", "variant": variant}))
    (folder / "eval" / "metrics.json").write_text(json.dumps({"summaries": summaries, "seconds": {}}))
    (folder / "curves").mkdir()
    (folder / "curves" / "curves.json").write_text(json.dumps({"points": [
        {"stage": "stage1", "step": step, "accuracy": acc, "progress": acc} for step, acc in curve]}))
    for stage in ("stage0", "stage1"):
        (folder / stage / "logs").mkdir(parents=True)
        (folder / stage / "logs" / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": k, "loss_video": 1.0 / k}) + "\n" for k in range(1, 6)))


def test_compare_puts_the_arms_in_one_table_with_the_claims(tmp_path, capsys):
    _fake_finished_run(tmp_path / "a", "full", 0.8, 0.3, motion=0.5, curve=[(500, 0.2), (1000, 0.6), (1500, 0.8)],
                       baselines=True)
    _fake_finished_run(tmp_path / "b", "no_sa", 0.6, 0.2, motion=0.6, curve=[(500, 0.1), (1000, 0.5), (1500, 0.6)])
    _fake_finished_run(tmp_path / "c", "no_ma", 0.7, 0.25, motion=0.9, curve=[(500, 0.3)])
    out = tmp_path / "report"
    # given out of order: the table is (a), (b), (c), (d) and the stage-0 rows, then the baselines
    assert shapes.main(["compare", "--runs", str(tmp_path / "c"), str(tmp_path / "a"), str(tmp_path / "b"),
                        "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    main_table = table.split("| method |")[1].split("\n\n")[0]  # the first table (the others repeat the rows)
    names = [line.split(" | ")[0][2:] for line in main_table.splitlines() if line.startswith("| (") or
             line.startswith("| copy") or line.startswith("| ground")]
    # the main table, motion in parts, motion per kind, kept objects per kind
    assert table.count("| (a) full SAMA |") == 4
    assert names == ["(a) full SAMA", "(b) without semantic anchoring", "(c) without motion alignment",
                     "(d) stage 0 only (zero-shot)", "(b) stage 0 only", "(c) stage 0 only",
                     "copy (output = source)", "ground truth"]
    assert "| (a) full SAMA | 80.0% |" in table and "| (d) stage 0 only (zero-shot) | 30.0% |" in table
    # (b)'s best stage-1 accuracy is 60%: 90% of it (54%) is first reached at step 1000 by (a), 1500 by (b)
    assert "steps to reach 54% (90% of (b)'s best): (a) 1000, (b) 1500" in table
    assert "motion error (a) 0.50 px vs (c) 0.90 px" in table
    assert "(d) edit accuracy 30.0%, edit progress 0.20 (copy: 0.0%, -0.10)" in table
    assert (out / "convergence.png").stat().st_size > 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert rows["(c) without motion alignment"]["all"]["motion_error"] == 0.9

    assert shapes.main(["compare", "--runs", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(out)]) == 2
    assert "each variant once" in capsys.readouterr().err
    (tmp_path / "b" / "eval" / "metrics.json").unlink()
    assert shapes.main(["compare", "--runs", str(tmp_path / "b"), "--out", str(out)]) == 2
    assert "has no evaluation yet" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_tiny")
    lines = []
    run = shapes.start_run(out, "tiny", "full", echo=lines.append)
    first = shapes.run_pipeline(run, until="stage0")  # an "interruption" after stage 0
    rest = shapes.run_pipeline(run)
    return {"run": run, "out": out, "first": first, "rest": rest, "lines": lines}


@pytest.mark.slow
def test_tiny_budget_runs_every_stage_and_continues_after_a_stop(tiny_run):
    assert tiny_run["first"] == ["data", "vae", "encoders", "cache0", "stage0"]
    assert tiny_run["rest"] == ["cache1", "stage1", "demo", "export", "eval"]
    out = tiny_run["out"]
    spec = json.loads((out / "bundle" / "bundle.json").read_text())
    assert {"dit", "vae", "text_encoder", "siglip"} <= set(spec)
    # guidance 2: the stage-1 template trains with prompt dropout (shapes.default_guidance); FlowEdit where it
    # combines (sessions 16-17; with the tiny budget's 2 steps it gives way to the released sampler); keep
    # unchanged 0.2 (session 20)
    assert spec["defaults"] == {"steps": 2, "guidance": 2.0, "shift": 5.0, "target_area": 4096, "flowedit": "auto",
                                "keep_unchanged": 0.2}
    readme = (out / "bundle" / "README.md").read_text()
    assert 'Sampling is FlowEdit where it combines' in readme and "Keep unchanged 0.2: wherever" in readme
    card = spec["card"]
    assert card["demo_video"] == "sample.mp4" and card["demo_prompt"]
    # the demo's region mask (workflows/sama_shapes_region_demo), from the bundle's own clips
    from PIL import Image
    region = np.array(Image.open(out / "bundle" / shapes.DEMO_REGION))
    source, _ = read_video(out / "bundle" / "sample.mp4")
    target, _ = read_video(out / "bundle" / "sample_target.mp4")
    assert region.shape == tuple(source.shape[1:3]) and set(np.unique(region)) == {0, 255}
    assert (region == 255).tolist() == shapes.demo_region(source, target).tolist()
    demo = json.loads((out / "demo" / "sample.json").read_text())
    assert card["demo_kind"] == demo["kind"] == shapes.DEMO_KIND and card["demo_prompt"] == demo["instruction"]
    # the steps the exported DiTs were trained for, read from their exports (the tiny budget runs to max_steps)
    for stage in ("stage0", "stage1"):
        exported = json.loads((out / stage / "final" / "export.json").read_text())["step"]
        assert card["training"][f"{stage}_steps"] == exported == shapes.final_config(run_of(out), stage).train.max_steps
    assert "stage1_lr_from_step" not in card["training"]
    # the text encoder was fine-tuned to tag word roles (train/text_roles.py) for the budget's steps
    assert "5 steps of word-role tagging" in card["components"]["text_encoder"]["init"]
    assert f"a {shapes.DEMO_KIND} edit: the first clear one" in (out / "bundle" / "README.md").read_text()
    assert card["metrics"]["ground truth"]["accuracy"] == 1.0
    assert card["metrics"]["copy (output = source)"]["accuracy"] == 0.0
    assert set(card["seconds"]) == set(shapes.STAGE_NAMES)
    size = sum(p.stat().st_size for p in (out / "bundle").iterdir())
    assert size <= shapes.MAX_BUNDLE_BYTES
    table = (out / "eval" / "results.md").read_text()
    for row in ("| SAMA-Shapes |", f"| {shapes.STAGE0_ROW} |", "| copy (output = source) |", "| ground truth |",
                "| VAE(target) ceiling |"):
        assert row in table
    assert "## Evaluation" in (out / "bundle" / "README.md").read_text()


def run_of(out):
    return shapes.start_run(out, "tiny", "full", echo=lambda line: None)


@pytest.mark.slow
def test_card_reports_the_config_the_export_was_trained_with(tiny_run, tmp_path):
    """A run resumed with overrides (here a learning-rate step) exports its config beside the DiT: the card
    reports that one and the exported step, not the run's template."""
    from train.config import load_config, save_config
    run, out = tiny_run["run"], tiny_run["out"]
    final = out / "stage1" / "final"
    saved = {name: (final / name).read_bytes() for name in ("config.yaml", "export.json")}
    try:
        cfg = load_config(final / "config.yaml")
        cfg.optim.decay_from_step, cfg.optim.final_lr = 1, 1e-5
        save_config(cfg, final / "config.yaml")
        (final / "export.json").write_text(json.dumps({**json.loads(saved["export.json"]), "step": 7}))
        folder = shapes.export_bundle(run, tmp_path / "bundle")
        training = json.loads((folder / "bundle.json").read_text())["card"]["training"]
        assert training["stage1_steps"] == 7 and training["stage1_lr_from_step"] == 1
        assert training["stage1_final_lr"] == 1e-5
    finally:
        for name, content in saved.items():
            (final / name).write_bytes(content)


def test_card_names_a_decoder_trained_behind_the_frozen_encoder():
    stats = {"step": 480, "trainable": "decoder", "decoder_base_dim": 16, "heldout_psnr": 22.0}
    assert shapes.decoder_card(stats) == {"decoder": {
        "trained": "behind the frozen encoder (train/vae_train.py trainable: decoder)", "base_dim": 16,
        "last_run_steps": 480}}
    assert shapes.decoder_card({"step": 5500, "trainable": "all"}) == {} == shapes.decoder_card({})


@pytest.mark.slow
def test_card_records_a_continued_models_lineage(tiny_run, tmp_path):
    run, out = tiny_run["run"], tiny_run["out"]
    lineage = out / shapes.LINEAGE_FILE
    steps = [{"what": "stage 1 (older data)", "steps": 3, "batch": 2, "data": "radius 5-9", "hardware": "CPU",
              "minutes": 0.1},
             {"what": "stage 1 continued", "steps": 5, "batch": 2, "data": "radius 8-12", "hardware": "CPU"}]
    try:
        lineage.write_text(json.dumps(steps))
        folder = shapes.export_bundle(run, tmp_path / "bundle")
        shapes.write_card(run, folder)
        card = json.loads((folder / "bundle.json").read_text())["card"]
        assert card["lineage"] == steps
        readme = (folder / "README.md").read_text()
        assert "## Lineage" in readme and "| stage 1 continued | 5 | 2 | radius 8-12 | CPU |  |" in readme
        assert "Guidance 2.0 (stage 1 trained with prompt dropout)" in readme
        lineage.write_text('{"what": "not a list"}')
        with pytest.raises(SamaInputError, match="JSON list of objects"):
            shapes.export_bundle(run, tmp_path / "bundle2")
    finally:
        lineage.unlink(missing_ok=True)
    assert "lineage" not in json.loads((out / "bundle" / "bundle.json").read_text())["card"]


@pytest.mark.slow
def test_tiny_bundle_loads_through_the_pipeline_and_the_demo_runs(tiny_run, tmp_path, capsys):
    from sama_core.__main__ import main as sama_main
    from sama_core.pipeline import SamaPipeline
    from sama_core.video import read_video
    bundle = tiny_run["out"] / "bundle"
    pipe = SamaPipeline.from_bundle(bundle, device="cpu", dtype="fp32")
    assert pipe.dit.config.dim == 32 and pipe.text_encoder.hidden_size == 16 and pipe.anchor_encoder.width == 16
    source, _ = read_video(bundle / "sample.mp4")
    edited, _ = pipe.edit_frames(source, "turn the red circle blue", options=pipe.sampler_options())
    assert edited.shape == source.shape and torch.isfinite(edited).all()
    code = sama_main(["demo", "--bundle", str(bundle), "--out", str(tmp_path)])  # no --video: the bundle's clip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"source video: {bundle / 'sample.mp4'}" in printed
    assert f"instruction: {json.loads((bundle / 'bundle.json').read_text())['card']['demo_prompt']}" in printed
    assert (tmp_path / "compare.png").exists() and (tmp_path / "edit.mp4").exists()


def gpu_script_run_folder(tiny_run, folder):
    """What scripts/shapes_stage1_gpu.sh needs in RUN, from the tiny run: its VAE, encoders and stage 0's DiT
    as init/; returns that DiT's path in the tiny run."""
    init = tiny_run["out"] / "stage0" / "final" / "sama_dit.safetensors"
    shutil.copytree(tiny_run["out"] / "vae" / "final", folder / "vae" / "final")
    shutil.copytree(tiny_run["out"] / "encoders", folder / "encoders")
    (folder / "init").mkdir()
    shutil.copy2(init, folder / "init")
    return init


@pytest.mark.slow
def test_stage1_gpu_script_continues_a_dit_from_fresh_clips_on_the_clock(tiny_run, tmp_path):
    """scripts/shapes_stage1_gpu.sh (what ran on the H100 in session 5), on the tiny run's parts, on CPU."""
    import subprocess
    run = tmp_path / "run"
    gpu_script_run_folder(tiny_run, run)
    env = dict(os.environ, RUN=str(run), MINUTES="0.01", CLIPS="2", BATCH="2", WORKERS="1", PYTHON=sys.executable,
               EMA="0.99", EXTRA="train.keep_region_weight=25 optim.decay_from_step=5 optim.final_lr=1e-4")
    script = os.path.join(REPO, "scripts", "shapes_stage1_gpu.sh")
    for attempt in (1, 2):  # the second call continues the first (--resume latest)
        done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "train.max_minutes (0.01) spent" in done.stdout + done.stderr
    assert "resumed from" in done.stdout + done.stderr
    assert (run / "data" / "train" / "video_edits.jsonl").is_file()
    assert (run / "stage1" / "final" / "sama_dit.safetensors").is_file()
    from train.config import load_config
    cfg = load_config(run / "stage1_gpu.yaml")  # EMA and EXTRA reach the resolved config
    assert cfg.ema.decay == 0.99 and cfg.train.keep_region_weight == 25
    assert cfg.optim.decay_from_step == 5 and cfg.optim.final_lr == 1e-4
    empty = subprocess.run(["bash", script], env=dict(env, RUN=str(tmp_path / "empty")), capture_output=True,
                           text=True)
    assert empty.returncode == 2 and "missing" in empty.stderr and "vae.safetensors" in empty.stderr


@pytest.mark.slow
def test_stage1_gpu_arms_script_trains_runs_side_by_side_and_writes_bundle_ready_dits(tiny_run, tmp_path):
    """scripts/shapes_stage1_gpu_arms.sh (session 13's H100 lease) at toy size on CPU: two arms, one deadline,
    the second from the DiT deepened by one block (train.grow)."""
    import subprocess

    from sama_core.loading import load_dit
    base = tmp_path / "base"
    init = gpu_script_run_folder(tiny_run, base)
    out, work = tmp_path / "out", tmp_path / "work"
    # No warm-up: even one step on a loaded machine must move the weights past fp16's rounding.
    env = dict(os.environ, OUT=str(out), WORK=str(work), BATCH="2", WORKERS="1", GEN_WORKERS="1", LR="1e-3",
               EMA="0.9", EXTRA="train.keep_region_weight=25 optim.warmup_steps=0", PYTHON=sys.executable)
    script = os.path.join(REPO, "scripts", "shapes_stage1_gpu_arms.sh")
    trained = load_dit(init, dtype=torch.float32)
    layers = trained.config.num_layers + 1
    done = subprocess.run(["bash", script, str(base), "1", "small:2", f"large:3:{layers}"], env=env,
                          capture_output=True, text=True, timeout=900)
    logs = {name: (out / f"{name}.log").read_text() for name in ("small", "large")}
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + str(logs)
    assert done.stdout.count(" clips in ") == 2  # each count generated once, before the arms
    start = {k: v.half() for k, v in trained.state_dict().items()}  # as stored
    for name, clips, blocks in (("small", 2, layers - 1), ("large", 3, layers)):
        assert f"{name}: {clips} clips" in logs[name] and "train.max_minutes (0.2) spent" in logs[name]
        ema_dit = load_dit(out / f"{name}_ema.safetensors")  # the config travels in the file
        assert ema_dit.config.num_layers == blocks
        ema, raw = ema_dit.state_dict(), load_dit(out / f"{name}_raw.safetensors").state_dict()
        assert set(raw) == set(ema) and raw["patch_embedding.weight"].dtype == torch.float16
        assert (set(raw) == set(start)) == (name == "small")
        assert any((raw[k] != start[k]).any() for k in start)  # trained (the steps a slow machine allows)
        assert any((ema[k] != raw[k]).any() for k in start)  # the EMA is not the raw
    assert f"{layers} blocks" in logs["large"] and "grew" in logs["large"]
    # the smaller arm's clips are the first ones of the larger arm's (the same seed and split)
    small = (work / "small" / "data" / "train" / "video_edits.jsonl").read_text().splitlines()
    large = (work / "large" / "data" / "train" / "video_edits.jsonl").read_text().splitlines()
    assert len(small) == 10 and large[:10] == small
    missing = subprocess.run(["bash", script, str(tmp_path / "nothing"), "1", "a:1"], env=env, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "missing" in missing.stderr and "vae.safetensors" in missing.stderr


@pytest.mark.slow
def test_stage1_gpu_arms_share_one_feature_cache_with_cached_1(tiny_run, tmp_path):
    """CACHED=1: one feature cache per clip count, built once before the arms (scripts/shapes_stage1_gpu.sh
    CACHE, CACHE_ONLY), and every arm of that count trains from it instead of encoding its own batches."""
    import subprocess

    from sama_core.loading import load_dit
    from train.config import load_config
    base = tmp_path / "base"
    init = gpu_script_run_folder(tiny_run, base)
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), WORK=str(work), BATCH="2", WORKERS="1", GEN_WORKERS="1", LR="1e-3",
               EMA="0.9", EXTRA="optim.warmup_steps=0", PYTHON=sys.executable, CACHED="1", CACHE_BATCH="3")
    script = os.path.join(REPO, "scripts", "shapes_stage1_gpu_arms.sh")
    done = subprocess.run(["bash", script, str(base), "1", "a:2", "b:2"], env=env, capture_output=True, text=True,
                          timeout=900)
    logs = {name: (out / f"{name}.log").read_text() for name in ("a", "b")}
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + str(logs)
    assert done.stdout.count("cache of 2 clips in") == 1 and "cache built in" in (out / "cache_2.log").read_text()
    cache = work / "cache_2"
    index = json.loads((cache / "cache_index.json").read_text())
    rows = sum(len((work / "clips_2" / f).read_text().splitlines()) for f in ("video_edits.jsonl", "image_edits.jsonl"))
    assert len(index["samples"]) == rows and index["skipped"] == []  # every row once (the manifest repeats edits)
    start = load_dit(init, dtype=torch.float16).state_dict()
    for name in ("a", "b"):
        cfg = load_config(work / name / "stage1_gpu.yaml")
        assert cfg.resolve_path(cfg.data.cache_dir) == cache.resolve() and cfg.data.cache_encode_batch == 3
        assert "feature cache of the clips" not in logs[name]  # used, not rebuilt
        assert "train.max_minutes (0.2) spent" in logs[name]
        ema = load_dit(out / f"{name}_ema.safetensors").state_dict()
        assert any((ema[k] != start[k]).any() for k in start)


@pytest.mark.slow
def test_gpu_throughput_check_times_the_cache_and_raw_against_cached_steps(tiny_run, tmp_path):
    """scripts/gpu_throughput_check.sh (the measurement to run first on a lease) at toy size on CPU: every part
    runs and the summary names the clips, the cache, both encode batch sizes and both step sources."""
    import subprocess
    base = tmp_path / "base"
    gpu_script_run_folder(tiny_run, base)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), WORK=str(tmp_path / "work"), CLIPS="2", SAMPLES="3", BATCH="2",
               BATCHES="1", CACHE_BATCH="2", WORKERS="1", PYTHON=sys.executable)
    script = os.path.join(REPO, "scripts", "gpu_throughput_check.sh")
    done = subprocess.run(["bash", script, str(base)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    summary = done.stdout.split("== summary", 1)[1].splitlines()
    assert summary[1].startswith("clips: 2 in ")
    rows = sum(len((tmp_path / "work" / "throughput" / "data" / "train" / f).read_text().splitlines())
               for f in ("video_edits.jsonl", "image_edits.jsonl"))
    assert summary[2].startswith(f"cache: {rows} samples in ")
    assert [line.split()[0] for line in summary[3:5]] == ["8", "2"]  # clips per VAE call
    assert [line.split(":")[0] for line in summary[5:7]] == ["raw", "cached"]
    assert all("samples/s" in line for line in summary[5:7])
    def encoder_ms(source):
        return float((out / f"step_{source}.txt").read_text().split("encoders")[1].split("ms/batch")[0])
    assert encoder_ms("raw") > 0
    assert encoder_ms("cached") == 0.0  # the encoders never run on a cache's batches
    assert "not run: features from the cache" in (out / "step_cached.txt").read_text()
    assert (out / "throughput.log").read_text().count("== summary") == 1
    missing = subprocess.run(["bash", script, str(tmp_path / "nothing")], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "missing" in missing.stderr


@pytest.mark.slow
def test_tiny_tokenizer_covers_the_held_out_instructions(tiny_run):
    import sentencepiece

    from sama_core.text import load_umt5_encoder
    out = tiny_run["out"]
    _, spiece = load_umt5_encoder([out / "encoders" / "text_encoder.safetensors"], dtype=torch.float32)
    sp = sentencepiece.SentencePieceProcessor(model_proto=spiece)
    rows = ev.read_cases(out / "data" / "heldout")
    pieces = [sp.encode(r["instruction"]) for r in rows]
    assert all(2 not in ids for ids in pieces)  # no unknown pieces: the vocabulary is the instructions'


@pytest.mark.slow
def test_rerun_after_losing_stage1_redoes_only_what_depends_on_it(tiny_run):
    run, out = tiny_run["run"], tiny_run["out"]
    kept = ("vae/final/vae.safetensors", "stage0/final/sama_dit.safetensors", "cache/stage1/cache_index.json")
    before = {p: (out / p).stat().st_mtime_ns for p in kept}
    assert shapes.run_pipeline(run) == []
    shutil.rmtree(out / "stage1" / "final")
    lines = []
    run.echo = lines.append
    assert shapes.run_pipeline(run) == ["stage1", "export", "eval"]
    assert any("resumed from" in line for line in lines)  # stage 1 continued from its last checkpoint
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before
    assert (out / "bundle" / "README.md").exists()


@pytest.mark.slow
def test_a_new_demo_pick_re_exports_without_retraining(tiny_run, monkeypatch):
    run, out = tiny_run["run"], tiny_run["out"]
    kept = ("data/train/dataset.json", "encoders/text_encoder.safetensors", "stage1/final/sama_dit.safetensors")
    before = {p: (out / p).stat().st_mtime_ns for p in kept}
    shutil.rmtree(out / "demo")  # lost, then rewritten as the same pick: nothing after it runs again
    assert shapes.run_pipeline(run) == ["demo"]
    original = shapes.pick_demo_clip
    monkeypatch.setattr(shapes, "pick_demo_clip", lambda: original("color"))
    shutil.rmtree(out / "demo")  # another pick: the bundle is exported and evaluated again, nothing trained
    assert shapes.run_pipeline(run) == ["demo", "export", "eval"]
    card = json.loads((out / "bundle" / "bundle.json").read_text())["card"]
    assert card["demo_kind"] == "color"
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before
    monkeypatch.setattr(shapes, "pick_demo_clip", original)  # back to the default pick for the other tests
    shutil.rmtree(out / "demo")
    assert shapes.run_pipeline(run) == ["demo", "export", "eval"]
    assert json.loads((out / "bundle" / "bundle.json").read_text())["card"]["demo_kind"] == shapes.DEMO_KIND


def test_a_demo_prompt_the_tokenizer_cannot_read_is_refused():
    spiece = shapes.train_tokenizer(["make the red circle blue", "delete the star", "[Video edit]"] * 20, 40)
    shapes.check_known_pieces(spiece, "delete the red star", "the demo instruction")  # known characters
    with pytest.raises(SamaInputError, match=r"the demo instruction 'löschen den Stern' has pieces the tokenizer "
                                             r"never saw .*pick a prompt made from the training templates"):
        shapes.check_known_pieces(spiece, "löschen den Stern", "the demo instruction")


@pytest.mark.slow
def test_ablations_share_the_feature_caches_their_switch_does_not_change(tiny_run, tmp_path):
    """no_sa trains from the full run's two caches (their anchor tokens dropped), no_ma from its stage-1
    cache, while it builds its own stage-0 cache (other pretexts)."""
    out = tiny_run["out"]
    for variant, shared in (("no_sa", {"stage0", "stage1"}), ("no_ma", {"stage1"})):
        lines = []
        run = shapes.start_run(tmp_path / variant, "tiny", variant, reuse=out, echo=lines.append)
        assert shapes.run_pipeline(run, until="stage1") == ["cache0", "stage0", "cache1", "stage1"]
        for stage in ("stage0", "stage1"):
            cache = tmp_path / variant / "cache" / stage
            assert cache.is_symlink() == (stage in shared), (variant, stage)
            assert (cache.resolve() == (out / "cache" / stage).resolve()) == (stage in shared)
            assert (cache / "cache_index.json").exists()
        assert sum("shared (symlink)" in line for line in lines) == len(shared)
        assert (tmp_path / variant / "stage1" / "final" / "sama_dit.safetensors").exists()
        if variant == "no_sa":
            for stage in ("stage0", "stage1"):
                rows = (tmp_path / variant / stage / "logs" / "metrics.jsonl").read_text().splitlines()
                assert rows and all(json.loads(r)["loss_semantic"] == 0 for r in rows)
    assert not (out / "cache" / "stage0" / "cache_index.json").is_symlink()  # the reused run is untouched


def test_kaiming_zero_init_starts_every_residual_branch_at_zero_and_reads_the_input():
    """model.init = kaiming_zero: residual blocks and the middle attention start as identities, convolutions
    are Kaiming-normal (std sqrt(2 / fan_in)), and the latents depend on the input far more than with
    PyTorch's default init (the measured cause of the stalled from-scratch training)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResidualBlock

    from train.vae_train import VAEArchConfig, build_vae
    vae = build_vae(VAEArchConfig(base_dim=8, init="kaiming_zero"), seed=0)
    blocks = [m for m in vae.modules() if isinstance(m, WanResidualBlock)]
    attention = [m for m in vae.modules() if isinstance(m, WanAttentionBlock)]
    assert blocks and attention
    assert all(float(b.conv2.weight.abs().max()) == 0 and float(b.conv2.bias.abs().max()) == 0 for b in blocks)
    assert all(float(a.proj.weight.abs().max()) == 0 for a in attention)
    conv1 = blocks[0].conv1.weight
    expected_std = (2.0 / conv1[0].numel()) ** 0.5
    assert abs(float(conv1.std()) / expected_std - 1) < 0.2

    g = torch.Generator().manual_seed(0)
    frames = torch.rand(6, 3, 1, 64, 64, generator=g) * 2 - 1
    spread = {}
    for init in ("default", "kaiming_zero"):
        model = build_vae(VAEArchConfig(base_dim=8, init=init), seed=0)
        with torch.no_grad():
            z = model.encode(frames).latent_dist.mean
        spread[init] = float(z.std(dim=0).mean() / z.std())  # variation across inputs, relative
    assert spread["kaiming_zero"] > 2 * spread["default"], spread


def test_demo_region_is_every_changed_pixel_grown_by_the_brush():
    """One pixel changed in one frame -> a (2 * grow + 1)-px square around it in the one region image; coding
    noise under DEMO_REGION_CHANGE changes nothing."""
    source = torch.zeros(5, 32, 32, 3)
    target = source.clone()
    target[3, 10, 20] = torch.tensor([0.0, 0.5, 0.0])
    target[1] += shapes.DEMO_REGION_CHANGE * 0.9  # noise everywhere in another frame
    region = shapes.demo_region(source, target, grow=2)
    expected = np.zeros((32, 32), bool)
    expected[8:13, 18:23] = True
    assert region.tolist() == expected.tolist()


def test_unbundle_lays_a_bundle_out_as_a_run_that_train_encodes_exactly_as_the_pipeline(tmp_path, capsys):
    """`python -m train.shapes unbundle`: the bundle's VAE, text encoder and DiT byte for byte, its SigLIP as
    a transformers folder; train/'s encoders built from the run's stage-1 config give the same latents, text
    rows and anchor tokens as the bundle's pipeline; scripts/shapes_stage1_gpu.sh accepts the folder."""
    import subprocess

    from sama_core.bundle import write_tiny_random_bundle
    from sama_core.pipeline import SamaPipeline
    from train.config import load_config
    from train.features import FeatureEncoders
    bundle = write_tiny_random_bundle(tmp_path / "bundle", seed=3)
    run = tmp_path / "run"
    assert shapes.main(["unbundle", "--bundle", str(bundle), "--out", str(run)]) == 0
    assert f"RUN={run}" in capsys.readouterr().out
    for name, copied in (("vae", "vae/final/vae.safetensors"), ("text_encoder", "encoders/text_encoder.safetensors"),
                         ("dit", "init/sama_dit.safetensors")):
        assert (run / copied).read_bytes() == (bundle / f"{name}.safetensors").read_bytes()
    shutil.copy2(os.path.join(REPO, "train", "configs", "shapes_stage1.yaml"), run / "stage1.yaml")
    train_side = FeatureEncoders.from_config(load_config(run / "stage1.yaml"))
    pipe = SamaPipeline.from_bundle(bundle, device="cpu")
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1
    assert torch.equal(train_side.latents(clip), pipe.vae.encode(clip))
    prompts = ["make the red circle blue", "remove the square"]
    assert torch.equal(train_side.text_encoder.encode(prompts), pipe.text_encoder.encode(prompts))
    frames = torch.rand(3, 32, 32, 3, generator=g)
    assert torch.equal(train_side.anchor_encoder.encode(frames), pipe.anchor_encoder.encode(frames))
    check = subprocess.run(["bash", os.path.join(REPO, "scripts", "shapes_stage1_gpu.sh")], capture_output=True,
                           text=True, env=dict(os.environ, RUN=str(run), CHECK_ONLY="1", PYTHON=sys.executable))
    assert check.returncode == 0, check.stderr
    capsys.readouterr()
    assert shapes.main(["unbundle", "--bundle", str(bundle), "--out", str(run)]) != 0
    assert "already exist: give an empty --out folder" in capsys.readouterr().err
    with pytest.raises(SamaFileNotFoundError, match="holds no bundle.json"):
        shapes.unpack_bundle(tmp_path, tmp_path / "other")
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "siglip.safetensors").write_bytes(b"not a safetensors file")
    assert shapes.main(["unbundle", "--bundle", str(broken), "--out", str(tmp_path / "half")]) != 0
    assert "siglip.safetensors" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "half").rglob("*") if p.is_file()]  # nothing half written


def test_swap_dit_then_card_rebuilds_a_bundles_card_from_its_evaluation(heldout, tmp_path, capsys):
    """`train.shapes swap-dit` puts another DiT into a copy of a bundle (in the bundle's stored dtype), appends
    the history and clears the old DiT's metrics; `train.shapes card` then fills them from train.eval's output
    of the new bundle, its table included."""
    from sama_core.bundle import write_tiny_random_bundle
    from sama_core.loading import load_dit, save_dit
    bundle = write_tiny_random_bundle(tmp_path / "bundle", defaults={"steps": 2})
    other = load_dit(write_tiny_random_bundle(tmp_path / "other", seed=5) / "dit.safetensors")
    dit_file = tmp_path / "continued.safetensors"
    save_dit(other, dit_file)
    steps = [{"what": "stage 1 continued", "steps": 7, "batch": 8, "data": "d", "hardware": "CPU", "minutes": 1}]
    (tmp_path / "lineage.json").write_text(json.dumps(steps))
    new = tmp_path / "new"
    swap = ["swap-dit", "--bundle", str(bundle), "--dit", str(dit_file), "--lineage", str(tmp_path / "lineage.json")]
    assert shapes.main([*swap, "--out", str(new)]) == 0
    swapped = load_dit(new / "dit.safetensors")
    for key, value in other.state_dict().items():
        assert torch.equal(swapped.state_dict()[key], value), key
    spec = json.loads((new / "bundle.json").read_text())
    assert spec["card"]["lineage"] == steps and spec["card"]["metrics"] == {}
    assert spec["card"]["components"]["dit"]["dim"] == other.config.dim
    assert "Not evaluated yet" in (new / "README.md").read_text()
    assert (new / "vae.safetensors").read_bytes() == (bundle / "vae.safetensors").read_bytes()
    capsys.readouterr()
    assert shapes.main([*swap, "--out", str(new)]) != 0  # never over an existing folder
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"what": "not a list"}')
    assert shapes.main([*swap[:-1], str(tmp_path / "bad.json"), "--out", str(tmp_path / "n2")]) != 0
    assert "must be a JSON list of objects" in capsys.readouterr().err

    evaluation = tmp_path / "eval"
    assert ev.main(["--bundle", str(new), "--data", str(heldout), "--limit", "1", "--kinds", "color",
                    "--baselines", "copy", "--out", str(evaluation)]) == 0
    assert shapes.main(["card", "--bundle", str(new), "--eval", str(evaluation)]) == 0
    card = json.loads((new / "bundle.json").read_text())["card"]
    summaries = json.loads((evaluation / "metrics.json").read_text())["summaries"]
    assert set(card["metrics"]) == {"SAMA-Shapes", "copy (output = source)"}
    assert card["metrics"]["SAMA-Shapes"]["motion_error"] == summaries["SAMA-Shapes"]["all"]["motion_error"]
    assert card["metrics"]["SAMA-Shapes"]["accuracy_per_kind"] == {"color": summaries["SAMA-Shapes"]["color"]["accuracy"]}
    assert card["lineage"] == steps and card["seconds"]["eval"] > 0
    readme = (new / "README.md").read_text()
    assert "Not evaluated yet" not in readme and "| copy (output = source) |" in readme
    other_eval = tmp_path / "eval_other"
    assert ev.main(["--data", str(heldout), "--limit", "1", "--kinds", "color", "--baselines", "copy",
                    "--out", str(other_eval)]) == 0
    assert shapes.main(["card", "--bundle", str(new), "--eval", str(other_eval)]) != 0
    assert "has no row 'SAMA-Shapes'" in capsys.readouterr().err
    assert shapes.main(["card", "--bundle", str(tmp_path / "eval"), "--eval", str(evaluation)]) != 0
    assert "holds no bundle.json" in capsys.readouterr().err
    assert shapes.main(["card", "--bundle", str(new), "--eval", str(tmp_path)]) != 0
    assert "not a finished train.eval output" in capsys.readouterr().err
