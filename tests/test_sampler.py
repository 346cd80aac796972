"""The reference sampler: sigmas, Euler, CFG forms, the joint semantic stream, seeding, interruption."""

import numpy as np
import pytest
import torch

from sama_core.errors import SamaInputError, SamaInterrupted
from sama_core.sampler import SamplerOptions, initial_noise, sample
from sama_core.scheduler import flow_sigmas
from tiny_models import TINY, TINY_WAN, tiny_dit, tiny_inputs


class Recorder(torch.nn.Module):
    """Wraps a DiT and records every call's inputs and outputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, x, t, ctx, source=None, semantic_tokens=None):
        out = self.model(x, t, ctx, source=source, semantic_tokens=semantic_tokens)
        self.calls.append(dict(x=x.clone(), t=t.clone(), ctx=ctx, source=source,
                               sem=None if semantic_tokens is None else semantic_tokens.clone(), out=out))
        return out


@pytest.fixture(scope="module")
def setup():
    inp = tiny_inputs(frames=2, size=4)
    g = torch.Generator().manual_seed(5)
    uncond = torch.randn(1, 3, TINY.text_dim, generator=g)
    return tiny_dit(seed=7), inp, uncond


def reference_sigmas(steps, shift=5.0, denoise=1.0):
    """The reference formulas in float64 (ours runs in float32 like the released scheduler)."""
    s = np.linspace(denoise, 0.0, steps + 1, dtype=np.float64)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    return np.concatenate([s, [0.0]])


@pytest.mark.parametrize("steps", range(1, 51))
def test_sigmas_and_timesteps_match_the_reference_formulas(steps):
    ours = flow_sigmas(steps).numpy()
    ref = reference_sigmas(steps)
    assert ours.shape == (steps + 1,) and ours[-1] == 0.0 and ours[0] == 1.0
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2.4e-7)  # float32 rounding: 2 ulp below 1.0
    np.testing.assert_allclose((flow_sigmas(steps) * 1000).numpy(), ref * 1000, rtol=0, atol=2.4e-4)


def test_scheduler_rejects_bad_options():
    with pytest.raises(SamaInputError, match="steps must be at least 1"):
        flow_sigmas(0)
    with pytest.raises(SamaInputError, match="denoise must be in"):
        flow_sigmas(10, denoise=1.5)


def test_one_euler_step_equals_the_hand_computed_update(setup):
    model, inp, uncond = setup
    opts = SamplerOptions(steps=1, guidance=3.0, seed=11)
    res = sample(model, inp["context"], uncond, source=inp["source"], options=opts)
    noise, sem_noise = initial_noise(inp["source"].shape, (1, 65, TINY.siglip_dim), 11)
    t = torch.tensor([1000.0])
    with torch.no_grad():
        c = model(noise, t, inp["context"], source=inp["source"], semantic_tokens=sem_noise)
        u = model(noise, t, uncond, source=inp["source"], semantic_tokens=sem_noise)
    v = u.video + 3.0 * (c.video - u.video)
    v_sem = u.semantic + 3.0 * (c.semantic - u.semantic)
    torch.testing.assert_close(res.latents, noise + v * (0.0 - 1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(res.semantic, sem_noise - v_sem, atol=1e-6, rtol=0)


def test_guidance_one_is_the_cond_pass_alone(setup):
    model, inp, uncond = setup
    rec = Recorder(model)
    opts = SamplerOptions(steps=3, guidance=1.0)
    res = sample(rec, inp["context"], uncond, source=inp["source"], options=opts)
    assert len(rec.calls) == 3 and all(c["ctx"] is inp["context"] for c in rec.calls)
    rec2 = Recorder(model)
    sample(rec2, inp["context"], None, source=inp["source"], options=opts)
    assert torch.equal(rec2.calls[-1]["out"].video, rec.calls[-1]["out"].video)
    assert res.latents.shape == inp["source"].shape


def test_two_scale_cfg_equals_its_formula(setup):
    model, inp, uncond = setup
    rec = Recorder(model)
    opts = SamplerOptions(steps=1, source_guidance=1.5, text_guidance=4.0)
    res = sample(rec, inp["context"], uncond, source=inp["source"], options=opts)
    by_kind = {("src" if c["source"] is not None else "nosrc", c["ctx"] is uncond): c["out"] for c in rec.calls}
    c_it, c_i0, c_0t = by_kind[("src", False)], by_kind[("src", True)], by_kind[("nosrc", False)]
    v = c_it.video + 1.5 * (c_it.video - c_0t.video) + 4.0 * (c_it.video - c_i0.video)
    torch.testing.assert_close(res.latents, rec.calls[0]["x"] - v, atol=1e-6, rtol=0)


def test_semantic_tokens_follow_the_guided_semantic_velocity_every_step(setup):
    model, inp, uncond = setup
    rec = Recorder(model)
    opts = SamplerOptions(steps=4, guidance=2.0)
    seen = []
    res = sample(rec, inp["context"], uncond, source=inp["source"], options=opts, callback=seen.append)
    sigmas = flow_sigmas(4)
    sem_inputs = [c["sem"] for c in rec.calls[::2]]  # cond, uncond per step
    for i in range(4):
        c, u = rec.calls[2 * i]["out"], rec.calls[2 * i + 1]["out"]
        assert torch.equal(rec.calls[2 * i]["sem"], rec.calls[2 * i + 1]["sem"])
        v_sem = u.semantic + 2.0 * (c.semantic - u.semantic)
        nxt = sem_inputs[i] + v_sem * (sigmas[i + 1] - sigmas[i])
        after = res.semantic if i == 3 else sem_inputs[i + 1]
        torch.testing.assert_close(after, nxt, atol=1e-6, rtol=0)
        assert not torch.equal(after, sem_inputs[i])
    assert [s.step for s in seen] == [0, 1, 2, 3] and seen[-1].sigma == pytest.approx(float(sigmas[3]))


def test_same_seed_is_bit_identical_and_seeds_differ(setup):
    model, inp, uncond = setup
    run = lambda seed: sample(model, inp["context"], uncond, source=inp["source"],
                              options=SamplerOptions(steps=2, seed=seed))
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.semantic, b.semantic)
    assert not torch.equal(a.latents, c.latents)


def test_batched_cfg_matches_separate_passes(setup):
    model, inp, uncond = setup
    for extra in (dict(guidance=5.0), dict(source_guidance=1.0, text_guidance=3.0)):
        a = sample(model, inp["context"], uncond, source=inp["source"], options=SamplerOptions(steps=2, **extra))
        b = sample(model, inp["context"], uncond, source=inp["source"],
                   options=SamplerOptions(steps=2, batch_cfg=True, **extra))
        # Same math; batch size changes the BLAS blocking, and guidance 5 amplifies its float noise.
        torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.semantic, b.semantic, atol=1e-4, rtol=1e-4)


def test_interrupt_raises_cleanly_mid_loop(setup):
    model, inp, uncond = setup
    rec = Recorder(model)
    steps_done = []
    with pytest.raises(SamaInterrupted, match="interrupted at step 2/5"):
        sample(rec, inp["context"], uncond, source=inp["source"], options=SamplerOptions(steps=5),
               callback=lambda s: steps_done.append(s.step), should_interrupt=lambda: len(steps_done) == 2)
    assert steps_done == [0, 1] and len(rec.calls) == 4


def test_anchor_injection_replaces_the_semantic_stream_for_the_first_steps(setup):
    model, inp, uncond = setup
    anchor = torch.randn(1, 65, TINY.siglip_dim, generator=torch.Generator().manual_seed(9))
    rec = Recorder(model)
    opts = SamplerOptions(steps=4, guidance=1.0, anchor_strength=0.5, seed=2)
    sample(rec, inp["context"], None, source=inp["source"], options=opts, anchor_tokens=anchor)
    _, sem_noise = initial_noise(inp["source"].shape, (1, 65, TINY.siglip_dim), 2)
    sigmas = flow_sigmas(4)
    for i in range(3):  # injected steps and the hand-off: (1 - sigma) * anchor + sigma * (the run's noise)
        torch.testing.assert_close(rec.calls[i]["sem"], (1 - sigmas[i]) * anchor + sigmas[i] * sem_noise,
                                   atol=1e-6, rtol=0)
    # Not injected afterwards: the stream continues from the model's own update.
    v = rec.calls[2]["out"].semantic
    torch.testing.assert_close(rec.calls[3]["sem"], rec.calls[2]["sem"] + v * (sigmas[3] - sigmas[2]),
                               atol=1e-6, rtol=0)
    with pytest.raises(SamaInputError, match="anchor tokens"):
        sample(model, inp["context"], None, source=inp["source"], options=opts,
               anchor_tokens=torch.randn(1, 65, 1152))


def test_anchor_strength_zero_is_plain_sama(setup):
    model, inp, uncond = setup
    anchor = torch.randn(1, 65, TINY.siglip_dim)
    opts = SamplerOptions(steps=2, anchor_strength=0.0)
    a = sample(model, inp["context"], uncond, source=inp["source"], options=opts, anchor_tokens=anchor)
    b = sample(model, inp["context"], uncond, source=inp["source"], options=opts)
    assert torch.equal(a.latents, b.latents)


def test_denoise_starts_from_the_noised_source(setup):
    model, inp, uncond = setup
    rec = Recorder(model)
    sample(rec, inp["context"], None, source=inp["source"], options=SamplerOptions(steps=2, guidance=1.0, denoise=0.6))
    noise, _ = initial_noise(inp["source"].shape, (1, 65, TINY.siglip_dim), 0)
    s0 = flow_sigmas(2, denoise=0.6)[0]
    assert s0 < 1.0
    torch.testing.assert_close(rec.calls[0]["x"], (1 - s0) * inp["source"] + s0 * noise, atol=1e-6, rtol=0)
    torch.testing.assert_close(rec.calls[0]["t"], (s0 * 1000).reshape(1), atol=1e-4, rtol=0)


def test_single_image_is_a_one_frame_video(setup):
    model, inp, uncond = setup
    src = inp["source"][:, :, :1]
    res = sample(model, inp["context"], uncond, source=src, options=SamplerOptions(steps=2))
    assert res.latents.shape == (1, 16, 1, 4, 4)


def test_plain_wan_generation_without_source():
    model = tiny_dit(TINY_WAN)
    inp = tiny_inputs(TINY_WAN, frames=2, size=4)
    res = sample(model, inp["context"], inp["context"] * 0, target_shape=(1, 16, 2, 4, 4),
                 options=SamplerOptions(steps=2))
    assert res.latents.shape == (1, 16, 2, 4, 4) and res.semantic is None


def test_long_video_runs_in_blended_windows_with_one_semantic_stream():
    model = tiny_dit(seed=7)
    inp = tiny_inputs(frames=7, size=4)
    rec = Recorder(model)
    opts = SamplerOptions(steps=2, guidance=1.0, window_latent_frames=3, window_overlap=1)
    res = sample(rec, inp["context"], None, source=inp["source"], options=opts)
    assert res.latents.shape == (1, 16, 7, 4, 4)
    first_step = rec.calls[:3]
    assert len(rec.calls) == 6 and [c["x"].shape[2] for c in first_step] == [3, 3, 3]  # 3 windows per step
    assert all(torch.equal(c["sem"], first_step[0]["sem"]) for c in first_step)  # shared semantic stream
    from sama_core.windows import plan_windows
    plan = plan_windows(7, 3, 1)
    # Blended velocity of step 1, rebuilt from the recorded window outputs:
    v = torch.zeros(1, 16, 7, 4, 4)
    for w, c in zip(plan.windows, first_step):
        v[:, :, w.start:w.end] += c["out"].video * w.weights.float().view(1, 1, -1, 1, 1)
        assert torch.equal(c["source"], inp["source"][:, :, w.start:w.end])
    sigmas = flow_sigmas(2)
    x1 = rec.calls[3]["x"]  # step 2's first window input = blended Euler update on frames [0, 3)
    expected = (initial_noise(inp["source"].shape, (1, 65, TINY.siglip_dim), 0)[0]
                + v * (sigmas[1] - sigmas[0]))[:, :, plan.windows[0].start:plan.windows[0].end]
    torch.testing.assert_close(x1, expected, atol=1e-6, rtol=0)
    # A window as long as the video is exactly the unwindowed run.
    full = sample(model, inp["context"], None, source=inp["source"], options=SamplerOptions(steps=2, guidance=1.0))
    same = sample(model, inp["context"], None, source=inp["source"],
                  options=SamplerOptions(steps=2, guidance=1.0, window_latent_frames=7))
    assert torch.equal(full.latents, same.latents)


@pytest.mark.parametrize("steps,strength", [(4, 0.5), (10, 0.25), (7, 0.3), (50, 1.0), (5, 0.0)])
def test_anchor_step_count_and_sigma_cut_agree(steps, strength):
    """Headless counts injected steps, the ComfyUI wrapper compares sigmas: both pick the same steps."""
    import math
    from sama_core.scheduler import anchor_sigma_cut
    sigmas = flow_sigmas(steps)[:-1]
    by_sigma = int((sigmas > anchor_sigma_cut(strength, 5.0)).sum())
    assert by_sigma == math.ceil(strength * steps - 1e-9)


def test_non_finite_inputs_and_outputs_are_reported(setup):
    from sama_core.errors import SamaNumericalError
    model, inp, uncond = setup
    bad = inp["source"].clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(SamaInputError, match="source_latents contains NaN"):
        sample(model, inp["context"], uncond, source=bad, options=SamplerOptions(steps=1))
    with pytest.raises(SamaInputError, match="negative_text_embedding contains NaN"):
        sample(model, inp["context"], uncond * float("inf"), source=inp["source"], options=SamplerOptions(steps=1))

    class Exploding(Recorder):
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            return type(out)(out.video * float("inf"), out.semantic)
    with pytest.raises(SamaNumericalError, match="NaN/inf at step 1/2.*bf16"):
        sample(Exploding(model), inp["context"], uncond, source=inp["source"], options=SamplerOptions(steps=2))
