import itertools
import math

import pytest
import torch

from sama_core.errors import SamaInputError
from sama_core.windows import (
    Window,
    WindowBlender,
    blend,
    latent_frame_count,
    needs_windows,
    pixel_frame_count,
    plan_windows,
)


def test_latent_and_pixel_frame_counts():
    # Causal 4x temporal VAE: frame 0 alone, then groups of 4.
    table = {1: 1, 2: 1, 4: 1, 5: 2, 8: 2, 9: 3, 49: 13, 81: 21}
    for pixels, latents in table.items():
        assert latent_frame_count(pixels) == latents
    for k in range(30):
        assert pixel_frame_count(latent_frame_count(4 * k + 1)) == 4 * k + 1
    with pytest.raises(SamaInputError):
        latent_frame_count(0)


def test_needs_windows():
    assert not needs_windows(21, 21)
    assert needs_windows(22, 21)
    assert not needs_windows(10_000, None)
    with pytest.raises(SamaInputError, match="at least 1"):
        needs_windows(5, 0)


def _check_plan(total, window, overlap):
    plan = plan_windows(total, window, overlap)
    length = min(window, total)
    bounds = [(w.start, w.end) for w in plan.windows]
    # Inside the video, full length, in order, first at 0 and last at the end.
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(0 <= s < e <= total and e - s == length for s, e in bounds)
    assert all(b[0] > a[0] for a, b in zip(bounds, bounds[1:]))
    # Every frame covered (no gaps between neighbours) and overlaps at least the requested one.
    assert all(b[0] <= a[1] - overlap for a, b in zip(bounds, bounds[1:]))
    covered = torch.zeros(total, dtype=torch.bool)
    for s, e in bounds:
        covered[s:e] = True
    assert covered.all()
    # Fewest windows: one window less cannot cover the video even with the smallest allowed overlap.
    n = len(bounds)
    if n > 1:
        assert (n - 2) * (window - overlap) + window < total
    # Weights: positive, at most 1, and summing to one at every frame.
    for w in plan.windows:
        assert w.weights.shape == (w.length,)
        assert (w.weights > 0).all() and (w.weights <= 1).all()
    torch.testing.assert_close(plan.weight_sum(), torch.ones(total, dtype=torch.float64), atol=1e-12, rtol=0)
    return plan


def test_windows_cover_every_frame_and_weights_sum_to_one():
    for total, window in itertools.product(range(1, 41), range(1, 11)):
        for overlap in range(window):
            _check_plan(total, window, overlap)


def test_three_window_plan_has_linear_ramps():
    plan = _check_plan(16, 8, 4)
    assert [(w.start, w.end) for w in plan.windows] == [(0, 8), (4, 12), (8, 16)]
    # Overlap of L = 4 frames: the incoming window ramps (j+1)/(L+1), the outgoing one the rest.
    ramp = torch.tensor([1, 2, 3, 4], dtype=torch.float64) / 5
    first, middle, last = plan.windows
    torch.testing.assert_close(first.weights, torch.cat([torch.ones(4, dtype=torch.float64), 1 - ramp]))
    torch.testing.assert_close(middle.weights, torch.cat([ramp, 1 - ramp]))
    torch.testing.assert_close(last.weights, torch.cat([ramp, torch.ones(4, dtype=torch.float64)]))


def test_short_video_is_one_window_of_its_own_length():
    plan = _check_plan(5, 21, 4)
    assert len(plan) == 1
    assert (plan.windows[0].start, plan.windows[0].end) == (0, 5)
    assert torch.equal(plan.windows[0].weights, torch.ones(5, dtype=torch.float64))


def test_three_windows_meeting_at_one_frame_still_sum_to_one():
    # Even spreading puts starts at 0, 4, 7: frame 7 lies in all three windows.
    plan = _check_plan(15, 8, 2)
    assert [(w.start, w.end) for w in plan.windows] == [(0, 8), (4, 12), (7, 15)]
    assert plan.coverage()[7] == 3


def test_blend_of_constant_windows_is_the_constant():
    plan = plan_windows(23, 8, 3)
    outputs = [torch.full((1, 4, w.length, 2, 3), 0.75) for w in plan.windows]
    out = blend(outputs, plan)
    assert out.shape == (1, 4, 23, 2, 3)
    torch.testing.assert_close(out, torch.full_like(out, 0.75), atol=1e-6, rtol=0)


def test_blend_reassembles_a_signal_and_averages_disagreements():
    plan = plan_windows(30, 10, 4)
    signal = torch.randn(2, 3, 30, 4, 5, generator=torch.Generator().manual_seed(0))  # (B, C, T, H, W)
    windows_of_signal = [signal[:, :, w.start : w.end] for w in plan.windows]
    torch.testing.assert_close(blend(windows_of_signal, plan), signal, atol=1e-6, rtol=0)

    # Window i outputs the constant i: the blend at frame t is sum_i w_i(t) * i.
    outputs = [torch.full((1, 1, w.length, 1, 1), float(i)) for i, w in enumerate(plan.windows)]
    expected = torch.zeros(30, dtype=torch.float64)
    for i, w in enumerate(plan.windows):
        expected[w.start : w.end] += i * w.weights
    torch.testing.assert_close(blend(outputs, plan)[0, 0, :, 0, 0], expected.float(), atol=1e-6, rtol=0)


def test_blend_keeps_dtype_and_supports_other_frame_dims():
    plan = plan_windows(12, 6, 2)
    outputs = [torch.full((w.length, 3), 2.0, dtype=torch.bfloat16) for w in plan.windows]  # frames on dim 0
    out = blend(outputs, plan, dim=0)
    assert out.dtype == torch.bfloat16 and out.shape == (12, 3)
    assert torch.equal(out, torch.full((12, 3), 2.0, dtype=torch.bfloat16))


def test_blend_errors():
    plan = plan_windows(20, 8, 2)
    good = [torch.zeros(1, 1, w.length, 1, 1) for w in plan.windows]
    with pytest.raises(SamaInputError, match="windows but"):
        blend(good[:-1], plan)
    bad = list(good)
    bad[1] = torch.zeros(1, 1, plan.windows[1].length + 1, 1, 1)
    with pytest.raises(SamaInputError, match="Window 1 covers"):
        blend(bad, plan)
    blender = WindowBlender(plan)
    blender.add(0, good[0])
    with pytest.raises(SamaInputError, match="already added"):
        blender.add(0, good[0])
    with pytest.raises(SamaInputError, match="never added"):
        blender.result()


def test_plan_rejects_bad_overlap():
    with pytest.raises(SamaInputError, match="smaller than the window length"):
        plan_windows(30, 8, 8)
    with pytest.raises(SamaInputError):
        plan_windows(0, 8, 2)


def test_window_pixel_range():
    # Latent 0 -> pixel 0; latent j >= 1 -> pixels 4j-3 .. 4j.
    assert Window(0, 3, torch.ones(3)).pixel_range == (0, 9)
    assert Window(2, 5, torch.ones(3)).pixel_range == (5, 17)
    plan = plan_windows(21, 8, 2)
    assert plan.windows[-1].pixel_range[1] == pixel_frame_count(21) == 81
    assert math.isclose(plan.weight_sum().sum().item(), 21.0)
