"""FlowEdit sampling (sama_core/flowedit.py): the loop against an independent implementation written from the
paper's update rule, its defining property (a text-blind edit leaves the source), edit regions, refusals, and
the pipeline and CLI entry points."""

import dataclasses
import logging

import pytest
import torch

from sama_core.__main__ import main as cli
from sama_core.errors import SamaInputError, SamaInterrupted
from sama_core.sampler import SamplerOptions, sample
from sama_core.scheduler import flow_sigmas
from sama_core.video import read_video, write_video
from tiny_models import TINY, tiny_dit, tiny_inputs


def pipe_settings():
    from sama_core.pipeline import EditSettings
    return EditSettings()

NUM_SEMANTIC = 65


@pytest.fixture(scope="module")
def setup():
    inp = tiny_inputs(frames=2, size=4)
    uncond = torch.randn(1, 3, TINY.text_dim, generator=torch.Generator().manual_seed(5))
    return tiny_dit(seed=7), inp["source"], inp["context"], uncond


def flowedit_by_hand(model, source, cond, uncond, steps, shift, guidance, skip, seed, source_semantic=None):
    """FlowEdit (Kulikov et al. 2024, Algorithm 1) in the velocity convention v = noise - x0, calling the DiT
    directly: z starts at the source; per sigma, fresh noise n, z_src = (1 - s) x_src + s n, z_tar = z + z_src -
    x_src, z += (s_next - s) (guided v(z_tar) - v_negative(z_src)). The semantic stream, without source tokens:
    noise * sigma at the first used step, stepped with the guided semantic velocity (the reconstruction sees
    the same tokens); with them, the same rule as the video in the joint space. Noise from one CPU generator:
    the sampled stream's start first, then per step the video draw and (joint) the semantic draw."""
    sigmas = flow_sigmas(steps, shift)
    g = torch.Generator().manual_seed(seed)
    joint = source_semantic is not None
    if joint:
        sem = source_semantic.clone()
    else:
        sem = torch.randn(1, NUM_SEMANTIC, TINY.siglip_dim, generator=g) * sigmas[skip]
    z = source.clone()

    def velocity(x, semantic, sigma, context):
        out = model(x, (sigma * 1000).reshape(1), context, source=source, semantic_tokens=semantic)
        return out.video, out.semantic

    for i in range(skip, steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        z_src = (1 - s) * source + s * torch.randn(source.shape, generator=g)
        sem_src = (1 - s) * source_semantic + s * torch.randn(sem.shape, generator=g) if joint else sem
        sem_tar = sem + sem_src - source_semantic if joint else sem
        v_cond, sem_cond = velocity(z + z_src - source, sem_tar, s, cond)
        v_uncond, sem_uncond = velocity(z + z_src - source, sem_tar, s, uncond)
        v_rec, sem_rec = velocity(z_src, sem_src, s, uncond)
        z = z + (s_next - s) * (v_uncond + guidance * (v_cond - v_uncond) - v_rec)
        sem = sem + (s_next - s) * (sem_uncond + guidance * (sem_cond - sem_uncond) - (sem_rec if joint else 0))
    return z, sem


def test_flowedit_equals_the_papers_update_rule_computed_by_hand(setup):
    model, source, cond, uncond = setup
    opts = SamplerOptions(steps=5, guidance=2.5, shift=3.0, seed=11, flowedit=True, flowedit_skip=1)
    result = sample(model, cond, uncond, source=source, options=opts)
    z, sem = flowedit_by_hand(model, source, cond, uncond, 5, 3.0, 2.5, 1, 11)
    torch.testing.assert_close(result.latents, z, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.semantic, sem, atol=1e-6, rtol=0)
    assert result.stats == {"model_calls": 8, "skipped_steps": 1}
    assert (result.latents - source).abs().max() > 1e-3  # it edited something


def test_joint_flowedit_moves_the_semantic_stream_by_the_same_rule(setup):
    model, source, cond, uncond = setup
    source_semantic = torch.randn(1, NUM_SEMANTIC, TINY.siglip_dim, generator=torch.Generator().manual_seed(9))
    opts = SamplerOptions(steps=4, guidance=2.0, shift=5.0, seed=6, flowedit=True, flowedit_skip=1)
    result = sample(model, cond, uncond, source=source, options=opts, source_semantic=source_semantic)
    z, sem = flowedit_by_hand(model, source, cond, uncond, 4, 5.0, 2.0, 1, 6, source_semantic=source_semantic)
    torch.testing.assert_close(result.latents, z, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.semantic, sem, atol=1e-6, rtol=0)
    # text-blind: both halves of the source sample come back
    blind = sample(model, uncond, uncond, source=source, options=opts, source_semantic=source_semantic)
    torch.testing.assert_close(blind.latents, source, atol=1e-5, rtol=0)
    torch.testing.assert_close(blind.semantic, source_semantic, atol=1e-5, rtol=0)
    with pytest.raises(SamaInputError, match="source semantic tokens"):
        sample(model, cond, uncond, source=source, options=opts, source_semantic=source_semantic[:, :5])


def test_an_edit_that_ignores_the_text_leaves_the_source(setup):
    """With the instruction equal to the negative prompt the edit and reconstruction velocities agree, so
    FlowEdit returns the source (to float rounding), where the released sampler regenerates the video."""
    model, source, _, uncond = setup
    opts = SamplerOptions(steps=4, guidance=3.0, seed=2, flowedit=True, flowedit_skip=0)
    result = sample(model, uncond, uncond, source=source, options=opts)
    torch.testing.assert_close(result.latents, source, atol=1e-5, rtol=0)
    regenerated = sample(model, uncond, uncond, source=source, options=dataclasses.replace(opts, flowedit=False))
    assert (regenerated.latents - source).abs().max() > 0.1


def test_flowedit_keeps_the_source_outside_an_edit_region(setup):
    model, source, cond, uncond = setup
    region = torch.zeros(1, 1, 2, 4, 4)
    region[..., :2, 1:] = 1.0
    opts = SamplerOptions(steps=4, guidance=2.0, seed=1, flowedit=True)
    seen = []
    result = sample(model, cond, uncond, source=source, options=opts, region=region,
                    callback=lambda info: seen.append((info.step, info.latents.clone())))
    outside = (region == 0).expand_as(source)
    assert torch.equal(result.latents[outside], source[outside])
    assert (result.latents[~outside] - source[~outside]).abs().max() > 1e-3
    assert [step for step, _ in seen] == [2, 3]  # flowedit_skip 2: the first two sigmas are not used
    assert all(torch.equal(latents[outside], source[outside]) for _, latents in seen)


def test_flowedit_refuses_what_it_cannot_combine_with(setup):
    model, source, cond, uncond = setup
    base = SamplerOptions(steps=4, guidance=2.0, flowedit=True)
    for change, message in (({"solver": "unipc"}, "turn off solver"), ({"denoise": 0.5}, "turn off denoise"),
                            ({"cache_threshold": 0.1}, "turn off step caching"),
                            ({"window_latent_frames": 1}, "edit at most 1 frames at a time"),
                            ({"flowedit_skip": 4}, r"flowedit_skip must be in \[0, steps\)")):
        with pytest.raises(SamaInputError, match=message):
            sample(model, cond, uncond, source=source, options=dataclasses.replace(base, **change))
    # a window longer than the clip is never used, so it is no clash (the pipeline sets one for long clips)
    unused_window = dataclasses.replace(base, window_latent_frames=2)
    assert sample(model, cond, uncond, source=source, options=unused_window).latents.shape == source.shape
    with pytest.raises(SamaInputError, match="turn off anchors"):
        sample(model, cond, uncond, source=source, options=dataclasses.replace(base, anchor_strength=0.5),
               anchor_tokens=torch.zeros(1, NUM_SEMANTIC, TINY.siglip_dim))
    with pytest.raises(SamaInputError, match="give a source"):
        sample(model, cond, uncond, target_shape=tuple(source.shape), options=base)
    with pytest.raises(SamaInputError, match="negative prompt"):
        sample(model, cond, None, source=source, options=dataclasses.replace(base, guidance=1.0))
    with pytest.raises(SamaInterrupted):
        sample(model, cond, uncond, source=source, options=base, should_interrupt=lambda: True)


def test_pipeline_and_cli_run_flowedit(bundle, pipe, tmp_path):
    frames = torch.rand(5, 64, 64, 3, generator=torch.Generator().manual_seed(0))  # the bundle's bucket: no resize
    options = pipe.sampler_options(steps=3, seed=0)
    plain, _ = pipe.edit_frames(frames, "make it red", options=options)
    flow, result = pipe.edit_frames(frames, "make it red", options=dataclasses.replace(options, flowedit=True,
                                                                                      flowedit_skip=1))
    assert flow.shape == frames.shape and result.stats["skipped_steps"] == 1
    assert (flow - plain).abs().max() > 1e-3
    # the bundle has a SigLIP: the pipeline runs the joint form with the source frame's own tokens
    from sama_core import video as vio
    latents = pipe.vae.encode(vio.frames_to_vae_input(vio.pad_to_4k_plus_1(frames)[0]))
    cond, uncond = pipe.encode_text("make it red", pipe_settings())
    expected = sample(pipe.dit, cond, uncond, source=latents, options=dataclasses.replace(
        options, flowedit=True, flowedit_skip=1), source_semantic=pipe.anchor_encoder.encode(frames))
    torch.testing.assert_close(result.latents, expected.latents, atol=1e-5, rtol=0)
    video = tmp_path / "in.mp4"
    write_video(video, frames, 8)
    out = tmp_path / "out.mp4"
    assert cli(["edit", "--model", str(bundle), "--video", str(video), "--prompt", "make it red", "--out", str(out),
                "--steps", "3", "--flowedit", "--flowedit-skip", "1"]) == 0
    edited, _ = read_video(out)
    assert edited.shape == frames.shape
    assert cli(["edit", "--model", str(bundle), "--video", str(video), "--prompt", "make it red", "--out", str(out),
                "--steps", "3", "--flowedit", "--solver", "unipc"]) == 2  # one clear line, no traceback


def test_auto_is_flowedit_where_it_combines_and_the_released_sampler_where_not(setup, caplog):
    model, source, cond, uncond = setup
    base = SamplerOptions(steps=4, guidance=2.0, seed=3)
    flow = sample(model, cond, uncond, source=source, options=dataclasses.replace(base, flowedit=True))
    auto = sample(model, cond, uncond, source=source, options=dataclasses.replace(base, flowedit="auto"))
    assert torch.equal(auto.latents, flow.latents) and torch.equal(auto.semantic, flow.semantic)
    anchors = torch.randn(1, NUM_SEMANTIC, TINY.siglip_dim, generator=torch.Generator().manual_seed(2))
    for change, clash, kwargs in (({"denoise": 0.5}, "denoise", {}), ({"solver": "unipc"}, "solver", {}),
                                  ({"cache_threshold": 0.1}, "step caching", {}),
                                  ({"anchor_strength": 0.5}, "anchors", {"anchor_tokens": anchors}),
                                  ({}, "no source", {"target_shape": tuple(source.shape)}),
                                  ({"guidance": 1.0}, "no negative prompt", {"negative": None}),
                                  ({"steps": 2}, "steps", {})):  # flowedit_skip 2 would leave no step
        opts = dataclasses.replace(base, **change)
        negative = kwargs.pop("negative", uncond)
        given = {"source": source, **kwargs} if "target_shape" not in kwargs else kwargs
        plain = sample(model, cond, negative, options=opts, **given)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sama_core.flowedit"):
            auto = sample(model, cond, negative, options=dataclasses.replace(opts, flowedit="auto"), **given)
        assert torch.equal(auto.latents, plain.latents), clash
        assert f"it does not combine with {clash}" in caplog.text
    with pytest.raises(SamaInputError, match="flowedit must be true, false or 'auto', got 'yes'"):
        SamplerOptions(flowedit="yes")


@pytest.fixture(scope="module")
def auto_bundle(tmp_path_factory):
    """A tiny random bundle whose defaults ask for FlowEdit where it combines (as SAMA-Shapes' do)."""
    from sama_core.bundle import write_tiny_random_bundle
    return write_tiny_random_bundle(tmp_path_factory.mktemp("auto") / "tiny", defaults={"flowedit": "auto"})


def test_a_bundle_default_of_auto_reaches_the_pipeline_and_the_cli_turns_it_off(auto_bundle, tmp_path):
    from sama_core.pipeline import SamaPipeline
    pipe = SamaPipeline.from_bundle(auto_bundle, device="cpu")
    assert pipe.sampler_options().flowedit == "auto"
    frames = torch.rand(5, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    options = pipe.sampler_options(steps=3)
    default, result = pipe.edit_frames(frames, "make it red", options=options)
    forced, _ = pipe.edit_frames(frames, "make it red", options=dataclasses.replace(options, flowedit=True))
    plain, _ = pipe.edit_frames(frames, "make it red", options=dataclasses.replace(options, flowedit=False))
    assert torch.equal(default, forced) and result.stats["skipped_steps"] == 2
    assert (default - plain).abs().max() > 1e-3
    video = tmp_path / "in.mp4"
    write_video(video, frames, 8)
    common = ["edit", "--model", str(auto_bundle), "--video", str(video), "--prompt", "make it red", "--steps", "3"]
    outputs = {}
    for name, flags in (("default", []), ("flowedit", ["--flowedit"]), ("off", ["--no-flowedit"]),
                        ("denoise", ["--denoise", "0.5"])):
        assert cli(common + ["--out", str(tmp_path / f"{name}.mp4")] + flags) == 0, name
        outputs[name] = read_video(tmp_path / f"{name}.mp4")[0]
    assert torch.equal(outputs["default"], outputs["flowedit"])
    assert (outputs["default"] - outputs["off"]).abs().max() > 1e-3
    # the default gives way to an option it cannot combine with; asked for by name, it refuses instead
    assert cli(common + ["--out", str(tmp_path / "x.mp4"), "--flowedit", "--denoise", "0.5"]) == 2
    with pytest.raises(SystemExit):  # argparse: not both
        cli(common + ["--out", str(tmp_path / "x.mp4"), "--flowedit", "--no-flowedit"])
