"""train.losses: the flow-matching + semantic L1 objective against an independent computation, the sigma
and noise draws, padded-frame masking, and the latent-frame bookkeeping behind it."""

import math

import pytest
import torch

from tiny_models import TINY, tiny_dit
from train.config import SigmaConfig
from train.data import derive_seed
from train.features import latent_frames_of, pad_rows, valid_latent_frames
from train.losses import NoiseDraw, draw_noise, flow_matching_loss, latent_frame_mask, training_loss


def feature_batch(batch=2, frames=3, size=4, text_rows=(5, 9), semantic=65, seed=0, source=True):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, TINY.in_dim, frames, size, size)
    return {
        "target": torch.randn(shape, generator=g),
        "source": torch.randn(shape, generator=g) if source else None,
        "context": pad_rows([torch.randn(n, TINY.text_dim, generator=g) for n in text_rows[:batch]]),
        "semantic": torch.randn(batch, semantic, TINY.siglip_dim, generator=g) if semantic else None,
        "valid_latent_frames": torch.full((batch,), frames),
        "seeds": torch.arange(batch, dtype=torch.int64) + 100,
    }


def fixed_draw(batch, sigmas, seed=1):
    g = torch.Generator().manual_seed(seed)
    return NoiseDraw(torch.tensor(sigmas), torch.randn(batch["target"].shape, generator=g),
                     torch.randn(batch["semantic"].shape, generator=g) if batch["semantic"] is not None else None)


def test_loss_equals_an_independent_computation():
    model = tiny_dit()
    batch = feature_batch()
    draw = fixed_draw(batch, [0.3, 0.85])
    parts, used = training_loss(model, batch, SigmaConfig(), semantic_weight=0.1, draw=draw)
    assert used is draw

    # independently: noise each sample with its own sigma, run the DiT, compare velocities
    s = torch.tensor([0.3, 0.85])
    x0, e = batch["target"], draw.noise
    x = torch.stack([(1 - s[i]) * x0[i] + s[i] * e[i] for i in range(2)])
    s0, es = batch["semantic"], draw.semantic_noise
    sem = torch.stack([(1 - s[i]) * s0[i] + s[i] * es[i] for i in range(2)])
    with torch.no_grad():
        out = model(x, s * 1000, batch["context"], source=batch["source"], semantic_tokens=sem)
    video = ((out.video - (e - x0)) ** 2).mean()
    semantic = (out.semantic - (es - s0)).abs().mean()
    torch.testing.assert_close(parts.video.detach(), video, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(parts.semantic.detach(), semantic, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(parts.loss.detach(), video + 0.1 * semantic, rtol=1e-6, atol=1e-7)
    assert parts.loss.requires_grad


def test_generation_batches_have_no_source_and_no_semantic_term_without_anchors():
    model = tiny_dit()
    batch = feature_batch(source=False, semantic=0)
    parts, draw = training_loss(model, batch, SigmaConfig())
    assert draw.semantic_noise is None and parts.semantic.item() == 0.0
    torch.testing.assert_close(parts.loss, parts.video)


@pytest.mark.parametrize("sampling", ["shift", "logit_normal"])
def test_sigma_and_noise_come_from_each_samples_seed(sampling):
    cfg = SigmaConfig(sampling=sampling, shift=3.0, logit_mean=0.2, logit_std=0.7)
    seeds = torch.tensor([5, 9], dtype=torch.int64)
    draw = draw_noise(seeds, (2, 16, 3, 4, 4), (2, 65, 8), cfg)
    for i, seed in enumerate(seeds.tolist()):
        g = torch.Generator().manual_seed(derive_seed(seed, "noise"))
        if sampling == "shift":
            t = 1.0 - torch.rand((), generator=g).item()
        else:
            t = 1.0 / (1.0 + math.exp(-(0.2 + 0.7 * torch.randn((), generator=g).item())))
        expected_sigma = 3.0 * t / (1 + 2.0 * t)
        assert draw.sigma[i].item() == pytest.approx(expected_sigma, rel=1e-6)
        assert torch.equal(draw.noise[i], torch.randn(16, 3, 4, 4, generator=g))
        assert torch.equal(draw.semantic_noise[i], torch.randn(65, 8, generator=g))
    # a sample draws the same wherever it sits in a batch (process count does not matter)
    alone = draw_noise(seeds[1:], (1, 16, 3, 4, 4), (1, 65, 8), cfg)
    assert torch.equal(alone.noise[0], draw.noise[1]) and alone.sigma[0] == draw.sigma[1]


def test_shifted_sigmas_lean_towards_noise():
    draw = draw_noise(torch.arange(2000), (2000, 1, 1, 1, 1), None, SigmaConfig(shift=5.0))
    assert 0 < draw.sigma.min() and draw.sigma.max() <= 1
    # t ~ U(0, 1]: P(sigma < 5t/(1+4t) at t=0.5) = 0.5 -> the median sigma is 5/6
    assert draw.sigma.median().item() == pytest.approx(5 / 6, abs=0.03)


def test_valid_latent_frames_follow_the_causal_vae():
    # video frames 1 -> 1 latent, 2..5 -> 2, 6..9 -> 3: latent j >= 1 holds frames 4j-3 .. 4j
    counts = valid_latent_frames(torch.arange(1, 14))
    assert counts.tolist() == [1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4]
    for n in range(1, 14):
        padded = 4 * ((n - 1 + 3) // 4) + 1  # next 4k+1
        assert counts[n - 1] == latent_frames_of(padded)
    assert latent_frames_of(81) == 21
    assert latent_frame_mask(torch.tensor([1, 3]), 3).tolist() == [[True, False, False], [True, True, True]]


def test_padded_latent_frames_do_not_count():
    batch = feature_batch(frames=4, semantic=0)
    batch["valid_latent_frames"] = torch.tensor([2, 4])
    draw = fixed_draw(batch, [0.5, 0.5])
    target_v = draw.noise - batch["target"]
    pred = target_v + 0.1 * torch.randn(target_v.shape, generator=torch.Generator().manual_seed(3))
    loss = flow_matching_loss(pred, None, batch, draw).video
    # independent: sample 0 over its 2 real frames, sample 1 over all 4, then the mean of the two
    err = (pred - target_v) ** 2
    expected = (err[0, :, :2].mean() + err[1].mean()) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-8)
    # garbage in the padded frames changes nothing; in a real frame it does
    spoiled = pred.clone()
    spoiled[0, :, 2:] += 100.0
    torch.testing.assert_close(flow_matching_loss(spoiled, None, batch, draw).video, loss)
    spoiled[0, :, 1] += 1.0
    assert flow_matching_loss(spoiled, None, batch, draw).video > loss + 0.1
    # without the mask the padded frames would count
    unmasked = dict(batch, valid_latent_frames=torch.tensor([4, 4]))
    torch.testing.assert_close(flow_matching_loss(pred, None, unmasked, draw).video, err.mean(), rtol=1e-6, atol=1e-8)
    assert not torch.allclose(flow_matching_loss(pred, None, unmasked, draw).video, loss)


def test_gradient_flows_only_through_real_frames():
    batch = feature_batch(frames=3, semantic=0)
    batch["valid_latent_frames"] = torch.tensor([1, 3])
    draw = fixed_draw(batch, [0.4, 0.6])
    pred = torch.zeros(batch["target"].shape, requires_grad=True)
    flow_matching_loss(pred, None, batch, draw).loss.backward()
    assert pred.grad[0, :, 1:].abs().sum() == 0 and pred.grad[0, :, 0].abs().sum() > 0
    assert pred.grad[1].abs().min() >= 0 and pred.grad[1, :, 2].abs().sum() > 0


def test_edit_region_weighting_equals_an_independent_weighted_mean():
    """train.edit_region_weight: per latent position w = 1 + lambda * clamp(d / tau, 0, 1) with d the
    channel-mean |target - source|; each sample's video loss is the w-weighted mean of its squared errors."""
    batch = feature_batch(semantic=0)
    target = batch["target"]
    # sample 0: the source equals the target except in one latent position (an edited object) ...
    source = target.clone()
    source[0, :, 1, 2, 3] += 1.0
    source[0, :, 2, 0, 0] += 0.1                     # ... and a faint change below the threshold
    batch["source"] = source                         # sample 1: identical (nothing edited)
    source[1] = target[1]
    draw = fixed_draw(batch, [0.4, 0.7])
    pred = torch.randn(target.shape, generator=torch.Generator().manual_seed(5))
    lam, tau = 20.0, 0.25
    parts = flow_matching_loss(pred, None, batch, draw, edit_weight=lam, edit_threshold=tau)

    squared = (pred - (draw.noise - target)) ** 2    # (B, C, T, h, w)
    expected = []
    for i in range(2):
        w = torch.ones(target.shape[2:])
        if i == 0:
            w[1, 2, 3] = 1 + lam                     # change 1.0 >= tau: the full extra weight
            w[2, 0, 0] = 1 + lam * 0.1 / tau         # change 0.1: a share of it
        expected.append((squared[i] * w).sum() / (w.sum() * target.shape[1]))
    torch.testing.assert_close(parts.video, torch.stack(expected).mean(), rtol=1e-6, atol=1e-7)
    # sample 1 has no change, so its loss is the plain mean; and lambda = 0 is the plain loss everywhere
    plain = flow_matching_loss(pred, None, batch, draw)
    torch.testing.assert_close(plain.video, squared.mean(dim=(1, 2, 3, 4)).mean(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(parts.video, plain.video)


def test_edit_region_weighting_skips_batches_without_a_matching_source():
    batch = feature_batch(source=False, semantic=0)
    draw = fixed_draw(batch, [0.4, 0.7])
    pred = torch.randn(batch["target"].shape)
    weighted = flow_matching_loss(pred, None, batch, draw, edit_weight=20.0)
    torch.testing.assert_close(weighted.video, flow_matching_loss(pred, None, batch, draw).video)


def test_keep_region_weighting_adds_kappa_times_the_keep_mask_to_the_weight():
    """train.keep_region_weight: w = 1 + lambda * clamp(d / tau) + kappa * keep per latent position, against
    an independent weighted mean; a batch without keep masks (or kappa 0) is the edit-weighted loss."""
    batch = feature_batch(semantic=0)
    target = batch["target"]
    source = target.clone()
    source[0, :, 1, 2, 3] += 1.0                     # sample 0 edits one position
    batch["source"] = source
    keep = torch.zeros(target.shape[0], *target.shape[2:])
    keep[0, 0, 1, 1] = 1.0                           # a kept object in sample 0 ...
    keep[0, 2, 0, 3] = 0.5                           # ... a soft mask value
    keep[1, 1, 2, 2] = 1.0                           # and one in sample 1, which edits nothing
    draw = fixed_draw(batch, [0.4, 0.7])
    pred = torch.randn(target.shape, generator=torch.Generator().manual_seed(5))
    lam, kappa = 20.0, 8.0
    without = flow_matching_loss(pred, None, batch, draw, edit_weight=lam)
    parts = flow_matching_loss(pred, None, dict(batch, keep=keep), draw, edit_weight=lam, keep_weight=kappa)

    squared = (pred - (draw.noise - target)) ** 2
    expected = []
    for i in range(2):
        w = torch.ones(target.shape[2:])
        if i == 0:
            w[1, 2, 3] += lam
            w[0, 1, 1] += kappa
            w[2, 0, 3] += kappa * 0.5
        else:
            w[1, 2, 2] += kappa
        expected.append((squared[i] * w).sum() / (w.sum() * target.shape[1]))
    torch.testing.assert_close(parts.video, torch.stack(expected).mean(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(parts.video, without.video)
    torch.testing.assert_close(flow_matching_loss(pred, None, dict(batch, keep=keep), draw, edit_weight=lam).video,
                               without.video)
    torch.testing.assert_close(flow_matching_loss(pred, None, batch, draw, edit_weight=lam, keep_weight=kappa).video,
                               without.video)


def test_keep_masks_off_the_latent_grid_are_refused():
    from sama_core.errors import SamaInputError
    batch = feature_batch(semantic=0)
    draw = fixed_draw(batch, [0.4, 0.7])
    wrong = torch.zeros(2, 3, 8, 8)                  # pixel-sized, not (B, T, h, w) of the latents
    with pytest.raises(SamaInputError, match="keep masks .* do not match its latents"):
        flow_matching_loss(torch.zeros_like(batch["target"]), None, dict(batch, keep=wrong), draw, keep_weight=1.0)


def test_bad_edit_region_and_dropout_settings_are_refused_with_the_key_name():
    from sama_core.errors import SamaInputError
    from train.config import TrainConfig, validate
    cfg = TrainConfig(stage="stage1")
    cfg.model.preset = "tiny"
    cfg.train.edit_region_weight = -1.0
    with pytest.raises(SamaInputError, match="train.edit_region_weight must be >= 0"):
        validate(cfg)
    cfg.train.edit_region_weight, cfg.train.keep_region_weight = 5.0, -0.5
    with pytest.raises(SamaInputError, match="train.keep_region_weight must be >= 0"):
        validate(cfg)
    cfg.train.keep_region_weight, cfg.train.edit_region_threshold = 0.0, 0.0
    with pytest.raises(SamaInputError, match="train.edit_region_threshold must be positive"):
        validate(cfg)
    cfg.train.edit_region_threshold, cfg.train.prompt_dropout = 0.25, 1.5
    with pytest.raises(SamaInputError, match=r"train.prompt_dropout must be in \[0, 1\]"):
        validate(cfg)


def test_prompt_dropout_is_decided_by_each_samples_seed():
    from train.features import drop_prompts, pad_rows
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, 8, generator=g) for n in (4, 6, 2)]
    context = pad_rows(rows)
    negative = torch.randn(5, 8, generator=g)
    seeds = torch.tensor([11, 12, 13])
    assert drop_prompts(context, seeds, negative, 0.0) is context
    everything = drop_prompts(context, seeds, negative, 1.0)
    assert everything.shape == (3, 5, 8)  # the longest remaining prompt: the negative one
    for i in range(3):
        assert torch.equal(everything[i, :5], negative) and not everything[i, 5:].any()
    # the choice for a seed does not depend on the rest of the batch; about p of many seeds drop
    many = torch.arange(2000)
    single = torch.zeros(1, 1, 8) + 1.0
    chosen = [bool(drop_prompts(single, many[i:i + 1], torch.zeros(1, 8), 0.3).abs().sum() == 0) for i in range(2000)]
    batch = drop_prompts(torch.ones(2000, 1, 8), many, torch.zeros(1, 8), 0.3)
    assert chosen == [bool(b.abs().sum() == 0) for b in batch]
    assert abs(sum(chosen) / 2000 - 0.3) < 0.035  # 3.5 sigma of a binomial(2000, 0.3) share
    mixed = drop_prompts(context, seeds, negative, 0.5)
    for i in range(3):
        kept = torch.equal(mixed[i, :rows[i].shape[0]], rows[i])
        assert kept or torch.equal(mixed[i, :5], negative)
