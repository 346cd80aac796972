"""The bad-input matrix through the public CLI: every case either works with a logged adjustment or stops
with exit code 2 and ONE line that names the input and the fix (never a traceback, never a partial file).
Node-level cases run in the real ComfyUI (tests/test_comfy_sama_nodes.py), training ones in test_train_*."""

import pickle
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sama_core.__main__ import main as cli
from sama_core.video import read_video, write_video


@pytest.fixture(scope="module")
def files(tmp_path_factory, bundle):
    d = tmp_path_factory.mktemp("inputs")
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (f, h, w) in {"ok": (5, 32, 32), "two_frames": (2, 32, 32), "ten_frames": (10, 32, 48),
                            "odd_size": (5, 41, 57), "one_frame": (1, 32, 32), "tiny": (5, 8, 8)}.items():
        out[name] = d / f"{name}.mp4"
        write_video(out[name], torch.rand(f, h, w, 3, generator=g), 8)
    out["garbage"] = d / "garbage.mp4"
    out["garbage"].write_bytes(b"\x00not a video" * 100)
    out["empty"] = d / "empty.mp4"
    out["empty"].write_bytes(b"")
    out["truncated"] = d / "truncated.mp4"
    out["truncated"].write_bytes(out["ten_frames"].read_bytes()[:600])
    gray = d / "gray.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8), "L").save(gray)
    out["gray_png"] = gray
    rgba = d / "rgba.png"
    Image.new("RGBA", (32, 32), (200, 10, 10, 128)).save(rgba)
    out["rgba_png"] = rgba
    huge = d / "huge_8k.png"
    Image.new("RGB", (7680, 4320), (10, 200, 10)).save(huge)
    out["8k_png"] = huge
    sd = {"encoder.conv1.weight": torch.zeros(2, 2), "decoder.head.0.gamma": torch.zeros(2)}
    out["vae_like"] = d / "vae_like.safetensors"
    save_file(sd, str(out["vae_like"]))
    out["sd_ckpt"] = d / "sd15.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(out["sd_ckpt"]))
    dit = (bundle / "dit.safetensors").read_bytes()
    out["truncated_dit"] = d / "cut_dit.safetensors"
    out["truncated_dit"].write_bytes(dit[: len(dit) // 3])

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned > /tmp/sama_bad_input_pwned",))
    out["evil_pth"] = d / "evil.pth"
    with open(out["evil_pth"], "wb") as f:
        pickle.dump({"w": Evil()}, f)
    from safetensors.torch import load_file
    nan_sd = load_file(str(bundle / "dit.safetensors"))
    nan_sd["blocks.0.ffn.0.weight"][0, 0] = float("nan")
    out["nan_dit"] = d / "nan_dit.safetensors"
    from sama_core.bundle import TINY_DIT
    save_file(nan_sd, str(out["nan_dit"]), metadata={"sama_config": TINY_DIT.to_json()})
    out["out_dir"] = d / "outputs"
    return out


def edit(bundle, video, *extra, out):
    return cli(["edit", "--model", str(bundle), "--video", str(video), "--prompt", "make the red circle blue",
                "--out", str(out), "--steps", "1", *extra])


# (case, which input file, extra CLI args, expected message fragments) -> exit code 2, one clean line
REFUSED = [
    ("unreadable video", "garbage", [], ["garbage.mp4"]),
    ("empty video file", "empty", [], ["empty.mp4"]),
    ("truncated video", "truncated", [], ["truncated.mp4"]),
    ("video too small", "tiny", [], ["8", "16"]),
    ("missing video", None, [], ["missing.mp4"]),
    ("size not a multiple of 16", "ok", ["--size", "50x40"], ["multiple of 16", "48"]),
    ("size syntax", "ok", ["--size", "big"], ["--size must look like"]),
    ("frame range syntax", "ok", ["--frames", "a-b"], ["--frames must look like"]),
    ("frame range outside the clip", "ok", ["--frames", "50:60"], ["frame"]),
    ("unknown attention backend", "ok", ["--attention", "fast"], ["unknown attention backend 'fast'"]),
    ("cuda without a GPU", "ok", ["--device", "cuda"], ["no CUDA GPU", "--device cpu"]),
    ("unknown device", "ok", ["--device", "tpu7"], ["unknown device"]),
    ("anchor image missing", "ok", ["--anchor", "nope.png"], ["nope.png"]),
    ("guidance not a finite number", "ok", ["--cfg", "nan"], ["guidance must be a finite number, got nan"]),
    ("text scale infinite", "ok", ["--source-scale", "1", "--text-scale", "inf"], ["text_guidance must be a finite"]),
    ("negative flowedit skip", "ok", ["--flowedit-skip", "-1"], ["flowedit_skip must be 0 or more", "default is 2"]),
    ("flowedit skip past the steps", "ok", ["--flowedit-skip", "5"], ["--flowedit-skip 5 skips all of the 1 steps"]),
    ("anchor strength above 1", "ok", ["--anchor-strength", "2"], ["anchor_strength must lie in [0, 1]"]),
    ("negative step-cache threshold", "ok", ["--cache", "-1"], ["step-cache threshold must be 0 (off) or more"]),
    ("windows shorter than their overlap", "ok", ["--window-frames", "3"],
     ["--window-frames must be at least 17 (windows overlap by 16 frames), got 3"]),
]

# refused from the command line alone: no model file is opened first (a 14B load takes minutes)
BEFORE_LOADING = [["--cfg", "inf"], ["--flowedit-skip", "-2"], ["--anchor-strength", "-0.5"], ["--cache", "-1"],
                  ["--window-frames", "9"], ["--steps", "0"], ["--shift", "0"], ["--denoise", "1.5"],
                  ["--keep-unchanged", "2"]]


@pytest.mark.parametrize("case,video,extra,fragments", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_one_clear_line(bundle, files, tmp_path, capsys, case, video, extra, fragments):
    src = files[video] if video else tmp_path / "missing.mp4"
    out = tmp_path / "out.mp4"
    assert edit(bundle, src, *extra, out=out) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists()


@pytest.mark.parametrize("extra", BEFORE_LOADING, ids=[" ".join(e) for e in BEFORE_LOADING])
def test_impossible_sampling_options_are_refused_before_any_model_loads(bundle, files, tmp_path, capsys,
                                                                         monkeypatch, extra):
    from sama_core.commands import edit as edit_command

    def no_loading(args):
        raise AssertionError("the models were loaded before the options were checked")
    monkeypatch.setattr(edit_command, "build_pipeline", no_loading)
    out = tmp_path / "out.mp4"
    assert edit(bundle, files["ok"], *extra, out=out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "AssertionError" not in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("name", ["edit.txt", "edit.webm", "edit.gif", "edit", "edit."])
def test_an_output_name_no_writer_can_honour_is_refused_before_any_model_loads(bundle, files, tmp_path, capsys,
                                                                               monkeypatch, name):
    from sama_core.commands import edit as edit_command

    monkeypatch.setattr(edit_command, "build_pipeline", lambda args: pytest.fail("loaded before --out was checked"))
    out = tmp_path / name
    assert edit(bundle, files["ok"], out=out) == 2
    err = capsys.readouterr().err
    assert f"cannot write '{out}'" in err and "e.g. edit.mp4" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even ffmpeg's partial file


def test_an_image_output_for_a_video_is_refused_before_the_sampling(bundle, files, tmp_path, capsys, monkeypatch):
    from sama_core.pipeline import SamaPipeline

    monkeypatch.setattr(SamaPipeline, "edit_frames", lambda *a, **k: pytest.fail("sampled before --out was checked"))
    out = tmp_path / "frame.png"
    assert edit(bundle, files["ok"], out=out) == 2
    err = capsys.readouterr().err
    assert f"'{out}' is an image file but the result has 5 frames: write a video (e.g. frame.mp4)" in err, err
    assert not out.exists()


def test_restore_checks_its_sampling_options_before_loading_too(bundle, files, tmp_path, capsys, monkeypatch):
    from sama_core.commands import restore

    monkeypatch.setattr(restore, "build_pipeline", lambda args: pytest.fail("loaded before the options were checked"))
    assert cli(["restore", "--model", str(bundle), "--video", str(files["ok"]), "--task", "cube", "--out",
                str(tmp_path / "r.mp4"), "--cfg", "nan"]) == 2
    assert "guidance must be a finite number" in capsys.readouterr().err
    assert cli(["restore", "--model", str(bundle), "--video", str(files["ok"]), "--task", "cube", "--out",
                str(tmp_path / "r.webm")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_anchor_without_a_siglip_encoder(bundle, files, tmp_path, capsys):
    code = cli(["edit", "--model", str(bundle / "dit.safetensors"), "--vae", str(bundle / "vae.safetensors"),
                "--text-encoder", str(bundle / "text_encoder.safetensors"), "--video", str(files["ok"]),
                "--prompt", "x", "--anchor", str(files["rgba_png"]), "--out", str(tmp_path / "o.mp4")])
    assert code == 2 and "--siglip" in capsys.readouterr().err


@pytest.mark.parametrize("prompt,fragment", [("", "instruction"), ("   \n\t", "instruction")])
def test_empty_prompts_are_refused(bundle, files, tmp_path, capsys, prompt, fragment):
    code = cli(["edit", "--model", str(bundle), "--video", str(files["ok"]), "--prompt", prompt,
                "--out", str(tmp_path / "o.mp4"), "--steps", "1"])
    assert code == 2 and fragment in capsys.readouterr().err


@pytest.mark.parametrize("model_file,fragment", [
    ("vae_like", "Wan VAE"), ("sd_ckpt", "Stable Diffusion"), ("truncated_dit", "truncated or corrupt"),
    ("evil_pth", "weights_only=True"), ("nan_dit", "NaN"),
])
def test_wrong_model_files_are_named(files, tmp_path, capsys, bundle, model_file, fragment):
    code = cli(["edit", "--model", str(files[model_file]), "--vae", str(bundle / "vae.safetensors"),
                "--text-encoder", str(bundle / "text_encoder.safetensors"), "--video", str(files["ok"]),
                "--prompt", "x", "--out", str(tmp_path / "o.mp4"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err, err
    import os
    assert not os.path.exists("/tmp/sama_bad_input_pwned")


@pytest.mark.parametrize("flag,fragment", [("--vae", "Wan VAE"), ("--text-encoder", "text encoder")])
def test_dit_given_as_another_component_is_named(files, tmp_path, capsys, bundle, flag, fragment):
    args = {"--vae": str(bundle / "vae.safetensors"), "--text-encoder": str(bundle / "text_encoder.safetensors")}
    args[flag] = str(bundle / "dit.safetensors")
    code = cli(["edit", "--model", str(bundle / "dit.safetensors"), "--vae", args["--vae"], "--text-encoder",
                args["--text-encoder"], "--video", str(files["ok"]), "--prompt", "x", "--out",
                str(tmp_path / "o.mp4"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and ("DiT" in err or "diffusion" in err), err


# Inputs that are handled automatically (adjusted with a log line), producing a correct output.
HANDLED = [
    ("two frames (padded to 5, trimmed back)", "two_frames", (2, 32, 32)),
    ("ten frames (not 4k+1)", "ten_frames", (10, 32, 48)),
    ("odd size 57x41 (mp4 needs even sides: one row/column repeated)", "odd_size", (5, 42, 58)),
    ("single-frame video", "one_frame", (1, 32, 32)),
]


@pytest.mark.parametrize("case,video,shape", HANDLED, ids=[h[0] for h in HANDLED])
def test_handled_automatically(bundle, files, tmp_path, case, video, shape):
    out = tmp_path / "out.mp4"
    assert edit(bundle, files[video], out=out) == 0
    frames, _ = read_video(out)
    assert tuple(frames.shape[:3]) == shape


@pytest.mark.parametrize("image", ["gray_png", "rgba_png", "8k_png"])
def test_images_of_any_mode_and_size(bundle, files, tmp_path, image, caplog):
    import logging
    caplog.set_level(logging.INFO)
    out = tmp_path / "out.png"
    assert edit(bundle, files[image], out=out) == 0
    result = Image.open(out)
    assert result.mode == "RGB"
    if image == "8k_png":
        assert max(result.size) <= 4096 and any("downscal" in r.message.lower() or "resiz" in r.message.lower()
                                                for r in caplog.records)


def test_over_long_prompt_is_truncated_not_refused(bundle, files, tmp_path):
    out = tmp_path / "out.mp4"
    code = cli(["edit", "--model", str(bundle), "--video", str(files["ok"]), "--prompt",
                " ".join(["make the red circle blue"] * 600), "--out", str(out), "--steps", "1"])
    assert code == 0 and out.exists()


def test_demo_runs_with_networking_disabled(tmp_path, monkeypatch):
    """No network at run time: every socket connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert cli(["demo", "--out", str(tmp_path), "--steps", "1"]) == 0
    assert (tmp_path / "edit.mp4").exists()
