"""Headless editing end to end with a tiny random model bundle: pipeline, CLI edit/restore/demo, LoRA."""

import json

import pytest
import torch
from safetensors.torch import save_file

from sama_core.__main__ import main as cli
from sama_core.errors import SamaInputError, SamaInterrupted, SamaModelFileError
from sama_core.loading import merge_lora
from sama_core.pipeline import SamaPipeline
from sama_core.pretext import blank_frames
from sama_core.sampler import SamplerOptions
from sama_core.video import read_video, write_video
from tiny_models import tiny_dit


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """10 frames (not 4k+1) of 56x40 at 12 fps."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "in.mp4"
    write_video(path, torch.rand(10, 40, 56, 3, generator=g), 12)
    return path


def test_cli_edit_writes_a_playable_video_of_the_source_length_size_and_fps(bundle, clip, tmp_path):
    out = tmp_path / "out.mp4"
    assert cli(["edit", "--model", str(bundle), "--video", str(clip), "--prompt", "make the red circle blue",
                "--out", str(out), "--steps", "2", "--compare"]) == 0
    frames, info = read_video(out)
    assert frames.shape == (10, 40, 56, 3)
    assert float(info.fps) == pytest.approx(12)
    compare, _ = read_video(tmp_path / "out_compare.mp4")
    assert compare.shape[0] == 10 and compare.shape[2] > 2 * 56


def test_cli_edit_without_restore_keeps_the_bucket_size(bundle, clip, tmp_path):
    out = tmp_path / "bucket.mp4"
    assert cli(["edit", "--model", str(bundle), "--video", str(clip), "--prompt", "make it green",
                "--out", str(out), "--steps", "1", "--no-restore", "--size", "64x48"]) == 0
    frames, _ = read_video(out)
    assert frames.shape == (10, 48, 64, 3)


def test_cli_reports_bad_input_in_one_line(bundle, clip, tmp_path, capsys):
    code = cli(["edit", "--model", str(bundle), "--video", str(clip), "--prompt", "x", "--out",
                str(tmp_path / "o.mp4"), "--size", "50x40"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "multiple" in err and "Traceback" not in err
    assert not (tmp_path / "o.mp4").exists()
    code = cli(["edit", "--model", str(bundle), "--video", str(tmp_path / "missing.mp4"), "--prompt", "x",
                "--out", str(tmp_path / "o.mp4")])
    assert code == 2 and "missing.mp4" in capsys.readouterr().err


def test_image_is_edited_as_a_one_frame_video(pipe, tmp_path):
    from PIL import Image
    src = tmp_path / "in.png"
    Image.new("RGB", (48, 32), (200, 20, 20)).save(src)
    result = pipe.edit_file(src, "make the red square blue", tmp_path / "out.png",
                            options=pipe.sampler_options(steps=1))
    assert Image.open(result.output).size == (48, 32) and result.frames.shape[0] == 1


def test_same_seed_same_edit_and_the_text_matters(pipe):
    frames = torch.rand(5, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    opts = SamplerOptions(steps=2, seed=4)
    a, _ = pipe.edit_frames(frames, "make the red circle blue", options=opts)
    b, _ = pipe.edit_frames(frames, "make the red circle blue", options=opts)
    c, _ = pipe.edit_frames(frames, "remove the green star", options=opts)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_interrupt_leaves_no_output_file(pipe, clip, tmp_path):
    out = tmp_path / "never.mp4"
    calls = []
    with pytest.raises(SamaInterrupted):
        pipe.edit_file(clip, "make it blue", out, options=pipe.sampler_options(steps=3),
                       callback=calls.append, should_interrupt=lambda: len(calls) == 1)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_blank_frames_for_restoration():
    frames = torch.rand(9, 8, 8, 3)
    out = blank_frames(frames, 3, 6)
    assert torch.count_nonzero(out[3:6]) == 0 and torch.equal(out[:3], frames[:3]) and torch.equal(out[6:], frames[6:])
    with pytest.raises(SamaInputError, match="frame 0 cannot be blanked"):
        blank_frames(frames, 0, 2)
    with pytest.raises(SamaInputError, match="outside the clip"):
        blank_frames(frames, 5, 12)


def test_cli_restore_uses_the_task_token(bundle, clip, tmp_path, monkeypatch):
    seen = {}
    original = SamaPipeline.encode_text

    def spy(self, instruction, settings):
        seen.update(instruction=instruction, prefix=settings.use_prefix, blank=settings.blank_frames,
                    keep=settings.keep_unchanged)
        return original(self, instruction, settings)
    monkeypatch.setattr(SamaPipeline, "encode_text", spy)
    out = tmp_path / "fixed.mp4"
    assert cli(["restore", "--model", str(bundle), "--video", str(clip), "--task", "cube", "--blank", "3:6",
                "--out", str(out), "--steps", "1"]) == 0
    # keep-unchanged off whatever the bundle's default: it would put the repaired blank back
    assert seen == {"instruction": "[Complete the missing regions in the video.]", "prefix": False, "blank": (3, 6),
                    "keep": 0}
    assert read_video(out)[0].shape[0] == 10


def test_demo_runs_offline_and_writes_its_outputs(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("edit.mp4", "edit_compare.mp4", "compare.png"):
        assert (tmp_path / name).exists() and str(tmp_path / name) in out
    assert read_video(tmp_path / "edit.mp4")[0].shape == (17, 64, 64, 3)


def test_demo_keep_unchanged_0_shows_the_edit_as_decoded(tmp_path, capsys):
    """The shipped bundle keeps unchanged pixels by default; --keep-unchanged 0 turns it off, and the default
    output has more of the source's own pixels (the demo's clip: a plain background, mostly unchanged)."""
    from sama_core.commands.demo import TRAINED_BUNDLE
    if not (TRAINED_BUNDLE / "bundle.json").is_file():
        pytest.skip(f"no trained bundle at {TRAINED_BUNDLE}")
    outputs = {}
    for name, extra in (("default", []), ("decoded", ["--keep-unchanged", "0"])):
        assert cli(["demo", "--out", str(tmp_path / name), "--steps", "2", *extra]) == 0
        outputs[name] = read_video(tmp_path / name / "edit.mp4")[0]
    source = read_video(TRAINED_BUNDLE / "sample.mp4")[0]
    near = {n: ((x - source).abs().amax(-1) < 0.02).float().mean() for n, x in outputs.items()}
    assert near["default"] > near["decoded"] + 0.2, near
    assert cli(["demo", "--out", str(tmp_path / "bad"), "--keep-unchanged", "3"]) == 2
    assert "keep-unchanged threshold 3.0 must lie in [0, 1]" in capsys.readouterr().err


def test_separate_files_instead_of_a_bundle(bundle, clip, tmp_path):
    spec = json.loads((bundle / "bundle.json").read_text())
    out = tmp_path / "o.mp4"
    assert cli(["edit", "--model", str(bundle / spec["dit"]), "--vae", str(bundle / spec["vae"]),
                "--text-encoder", str(bundle / spec["text_encoder"]), "--video", str(clip), "--prompt", "x",
                "--out", str(out), "--steps", "1", "--size", "64x48"]) == 0
    assert out.exists()


# ------------------------------------------------------------------ LoRA

def _lora(model, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = {"blocks.0.self_attn.q": model.blocks[0].self_attn.q, "blocks.1.ffn.0": model.blocks[1].ffn[0]}
    return {name: (torch.randn(rank, layer.in_features, generator=g),
                   torch.randn(layer.out_features, rank, generator=g)) for name, layer in layers.items()}


@pytest.mark.parametrize("style", ["peft", "kohya"])
def test_lora_merge_adds_scaled_low_rank_update(tmp_path, style):
    model = tiny_dit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = _lora(model)
    sd = {}
    for name, (down, up) in lora.items():
        if style == "peft":
            sd[f"diffusion_model.{name}.lora_A.weight"], sd[f"diffusion_model.{name}.lora_B.weight"] = down, up
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(4.0)
        else:
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "lora.safetensors"
    save_file(sd, str(path))
    assert merge_lora(model, path, strength=0.5) == 2
    after = model.state_dict()
    for name, (down, up) in lora.items():
        expected = before[name + ".weight"] + 0.5 * (4.0 / 2) * (up @ down)
        torch.testing.assert_close(after[name + ".weight"], expected)
    untouched = [k for k in before if not any(k.startswith(n + ".") for n in lora)]
    assert all(torch.equal(before[k], after[k]) for k in untouched)


def test_lora_for_another_model_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 4),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(4, 2)}, str(path))
    with pytest.raises(SamaModelFileError, match="do not exist in this DiT"):
        merge_lora(tiny_dit(), path)


def test_cli_fp8_option_runs(bundle, clip, tmp_path):
    out = tmp_path / "fp8.mp4"
    assert cli(["edit", "--model", str(bundle), "--video", str(clip), "--prompt", "make it blue", "--out", str(out),
                "--steps", "1", "--fp8", "row"]) == 0
    assert read_video(out)[0].shape[0] == 10


def test_cli_fast_preset_uses_fewer_model_calls(bundle, clip, tmp_path, monkeypatch):
    import sama_core.pipeline as pipeline_module
    seen = []
    original = pipeline_module.sample

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append((kwargs["options"], result.stats))
        return result
    monkeypatch.setattr(pipeline_module, "sample", spy)
    assert cli(["edit", "--model", str(bundle), "--video", str(clip), "--prompt", "make it blue", "--out",
                str(tmp_path / "fast.mp4"), "--fast", "--cfg", "4"]) == 0
    options, stats = seen[0]
    assert (options.steps, options.solver, options.batch_cfg, options.guidance) == (20, "unipc", True, 4.0)
    assert options.cache_threshold == 0.05 and stats["model_calls"] <= 20
