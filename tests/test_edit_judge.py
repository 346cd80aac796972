"""The judge of the SAMA-Shapes demo tests (tests/edit_judge.py), on hand-made clips: it must give 1 for the
target, 0 for the source, and measure in what the VAE renders when given a round trip."""

import pytest
import torch
import torch.nn.functional as F

from edit_judge import judge


def clips():
    source = torch.zeros(5, 24, 24, 3)
    source[:, 4:10, 4:10, 0] = 1.0   # a red square ...
    source[:, 16:20, 16:20, 2] = 1.0  # (a blue one the edit leaves alone)
    target = source.clone()
    target[:, 4:10, 4:10] = torch.tensor([0.0, 1.0, 0.0])  # ... made green
    return source, target


def blur(frames):
    """A stand-in for a blurry VAE: a 3x3 box filter."""
    x = frames.permute(0, 3, 1, 2)
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1).permute(0, 2, 3, 1)


def test_target_is_full_progress_and_source_none():
    source, target = clips()
    assert judge(target, source, target)["progress"] == pytest.approx(1.0)
    copy = judge(source, source, target)
    assert copy["progress"] == pytest.approx(0.0) and copy["outside_error"] == 0.0 and copy["kept_error"] == 0.0
    half = judge((source + target) / 2, source, target)
    assert half["progress"] == pytest.approx(0.5)


def test_recolouring_the_kept_object_too_shows_in_the_kept_error():
    source, target = clips()
    both = target.clone()
    both[:, 16:20, 16:20] = torch.tensor([0.0, 1.0, 0.0])  # the blue square made green as well
    verdict = judge(both, source, target)
    assert verdict["progress"] == pytest.approx(1.0)
    assert verdict["kept_error"] == pytest.approx(2 / 3)              # |(0,1,0) - (0,0,1)| averaged over RGB
    assert verdict["outside_error"] == pytest.approx(2 / 3 * 16 / (24 * 24 - 36))  # diluted by the background


def test_with_a_round_trip_the_rendered_target_is_the_goal():
    source, target = clips()
    rendered = blur(target)
    assert judge(rendered, source, target)["progress"] < 0.9            # the raw judge penalises the blur ...
    assert judge(rendered, source, target, blur)["progress"] == pytest.approx(1.0)  # ... the rendered one not
    assert judge(blur(source), source, target, blur)["progress"] == pytest.approx(0.0)
    assert judge(blur(source), source, target, blur)["outside_error"] == pytest.approx(0.0)


def test_a_clip_without_an_edit_is_no_demo():
    source, _ = clips()
    with pytest.raises(AssertionError, match="changes almost nothing"):
        judge(source, source, source)
