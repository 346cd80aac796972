"""The shipped SAMA-Shapes bundle (sama_core/assets/sama-shapes, issue 9): size and card, and real edits through
the demo command, the edit command and the pipeline, judged against the demo clip's ground-truth edit.

These tests check the trained model's behaviour, so they run on the bundle that is committed; they skip (with
the reason) only in a checkout without it. The ComfyUI workflow on the same bundle is in
tests/test_comfy_sama_nodes.py."""

import json
import sys
from pathlib import Path

import pytest
import torch

from sama_core.__main__ import main as cli
from sama_core.commands.demo import TRAINED_BUNDLE
from sama_core.video import read_video

sys.path.insert(0, str(Path(__file__).parent))
from edit_judge import edit_region, judge, kept_objects, vae_round_trip

pytestmark = pytest.mark.skipif(not (TRAINED_BUNDLE / "bundle.json").is_file(),
                                reason=f"no trained bundle at {TRAINED_BUNDLE} (python -m train.shapes run --install)")

MAX_BUNDLE_BYTES = 20 * 1024 * 1024


def card():
    return json.loads((TRAINED_BUNDLE / "bundle.json").read_text())["card"]


def read_demo_clips():
    source, _ = read_video(TRAINED_BUNDLE / card()["demo_video"])
    target, _ = read_video(TRAINED_BUNDLE / card()["demo_target_video"])
    return source, target


def test_bundle_fits_the_repository_and_carries_its_card():
    files = [p for p in TRAINED_BUNDLE.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BUNDLE_BYTES
    spec = json.loads((TRAINED_BUNDLE / "bundle.json").read_text())
    for key in ("dit", "vae", "text_encoder", "siglip"):
        assert (TRAINED_BUNDLE / spec[key]).is_file()
    c = spec["card"]
    assert c["trained"] is True and c["demo_prompt"] and (TRAINED_BUNDLE / "README.md").is_file()
    metrics = c["metrics"]
    model = metrics["SAMA-Shapes"]
    copy = metrics["copy (output = source)"]
    # far above the unedited copy (issue 9's bar): 27 points since session 20's keep-unchanged default (33.5
    # without it: the blurred near-copies that tipped the shape IoU towards the target no longer count)
    assert model["accuracy"] > copy["accuracy"] + 0.25
    # and, keeping what the edit left alone as the source's own pixels, the kept objects move less than through
    # the VAE alone (1.97 px against 2.28; 3.49 without keep-unchanged; copy 0.67)
    assert model["motion_error"] < metrics["VAE(target) ceiling"]["motion_error"]


def test_demo_command_edits_where_the_instruction_asks_and_nowhere_else(tmp_path, capsys):
    assert cli(["demo", "--out", str(tmp_path)]) == 0  # the README's first command, defaults only
    printed = capsys.readouterr().out
    assert f"instruction: {card()['demo_prompt']}" in printed and "RANDOM" not in printed
    output, _ = read_video(tmp_path / "edit.mp4")
    source, target = read_demo_clips()
    assert output.shape == source.shape == target.shape
    from sama_core.pipeline import SamaPipeline
    rendered = vae_round_trip(SamaPipeline.from_bundle(TRAINED_BUNDLE, device="cpu", dtype="fp32"))
    verdict = judge(output, source, target, rendered)
    assert verdict["progress"] > 0.5, verdict     # more than halfway to the requested edit (as the VAE draws it)
    assert verdict["outside_error"] < 0.08, verdict  # the rest of the clip is kept ...
    # ... the other objects included (VAE(target) scores ~0.02; session 7's colour demo, which recoloured
    # the other object too, ~0.5)
    assert verdict["kept_error"] is not None and verdict["kept_error"] < 0.15, verdict
    assert (tmp_path / "compare.png").is_file() and (tmp_path / "edit_compare.mp4").is_file()


def test_edit_command_and_pipeline_give_the_demo_result(tmp_path):
    from sama_core.pipeline import SamaPipeline
    prompt = card()["demo_prompt"]
    out = tmp_path / "edit.mp4"
    assert cli(["edit", "--model", str(TRAINED_BUNDLE), "--video", str(TRAINED_BUNDLE / "sample.mp4"),
                "--prompt", prompt, "--out", str(out), "--seed", "0"]) == 0
    from_cli, _ = read_video(out)
    pipe = SamaPipeline.from_bundle(TRAINED_BUNDLE, device="cpu", dtype="fp32")
    source, target = read_demo_clips()
    frames, _ = pipe.edit_frames(source, prompt, options=pipe.sampler_options(seed=0))
    verdict = judge(frames, source, target, vae_round_trip(pipe))
    assert verdict["progress"] > 0.5 and verdict["kept_error"] < 0.15, verdict
    # the CLI went through a lossy H.264 file, the pipeline did not
    assert (from_cli - frames.clamp(0, 1)).abs().mean() < 0.02


def test_another_instruction_changes_the_output(tmp_path):
    """The text conditioning is live: another instruction (a new background) gives another result than the
    demo's, outside the demo's edit region."""
    from sama_core.pipeline import SamaPipeline
    pipe = SamaPipeline.from_bundle(TRAINED_BUNDLE, device="cpu", dtype="fp32")
    source, target = read_demo_clips()
    region = edit_region(source, target)
    demo, _ = pipe.edit_frames(source, card()["demo_prompt"], options=pipe.sampler_options(seed=0))
    other, _ = pipe.edit_frames(source, "change the background to stripes", options=pipe.sampler_options(seed=0))
    assert (demo - other).abs()[~region].mean() > 0.05  # the background changed in one, not the other


def test_region_edit_from_the_shipped_mask_keeps_the_other_objects(tmp_path):
    """`python -m sama_core edit --mask sample_region.png` (the README's region example and the region
    workflow's mask): the output outside the mask is the source, the removal still happens inside it, and
    the objects the instruction leaves alone stay far closer to the source than with the instruction alone
    as decoded (--keep-unchanged 0); the bundle's default keep-unchanged does as much without a mask."""
    import numpy as np
    from PIL import Image

    from train.shapes import DEMO_REGION, demo_region
    source, target = read_demo_clips()
    mask_file = TRAINED_BUNDLE / DEMO_REGION
    region = torch.from_numpy(np.array(Image.open(mask_file)) > 127)
    assert region.tolist() == demo_region(source, target).tolist()  # what the export writes, from these clips
    outputs = {}
    for name, extra in (("region", ["--mask", str(mask_file)]), ("plain", ["--keep-unchanged", "0"]),
                        ("default", [])):
        out = tmp_path / f"{name}.mp4"
        assert cli(["edit", "--model", str(TRAINED_BUNDLE), "--video", str(TRAINED_BUNDLE / "sample.mp4"),
                    "--prompt", card()["demo_prompt"], "--out", str(out), *extra]) == 0
        outputs[name], _ = read_video(out)
    outside = {n: (x - source).abs()[:, ~region].mean() for n, x in outputs.items()}
    assert outside["region"] < 0.006 < outside["plain"] / 3, outside  # measured 0.0035 vs 0.024 (H.264 both)
    kept = kept_objects(source, edit_region(source, target))
    kept_error = {n: (x - source).abs()[kept].mean() for n, x in outputs.items()}
    assert kept_error["region"] < kept_error["plain"] / 2, kept_error
    # the bundle's default keep-unchanged, with no mask, keeps them too (session 20)
    assert kept_error["default"] < kept_error["plain"] / 2 and outside["default"] < outside["plain"] / 3, \
        (kept_error, outside)
    from sama_core.pipeline import SamaPipeline
    verdict = judge(outputs["region"], source, target, vae_round_trip(SamaPipeline.from_bundle(TRAINED_BUNDLE, device="cpu", dtype="fp32")))
    assert verdict["progress"] > 0.5, verdict
