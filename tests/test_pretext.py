"""Motion-alignment pretexts: property tests over random shapes, the training mix, the preview CLI."""

import math
import sys
import types
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sama_core.commands import pretext as pretext_cmd
from sama_core.errors import SamaInputError
from sama_core.pretext import (PERTURBING_PRETEXTS, PRETEXT_NAMES, TASK_TOKENS, T2V_PRETEXT_MIX,
                               PretextMixSampler, apply_pretext, cube_inpaint, sample_pretexts,
                               speed_perturb, task_token, tube_shuffle, unshuffle_tubes, with_task_token)

FEW = settings(max_examples=40, deadline=None)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_frames(shape_fchw, channels_last, seed=0):
    """Distinct random values, so any moved or lost pixel is visible; returned in the asked layout."""
    x = torch.randn(shape_fchw, generator=gen(seed))
    return x.permute(0, 2, 3, 1).contiguous() if channels_last else x


def fchw(x, channels_last):
    return x.permute(0, 3, 1, 2) if channels_last else x


shapes = st.tuples(st.integers(1, 20), st.integers(1, 3), st.integers(1, 10), st.integers(1, 10))


def half_up(decimal_text, n):
    return int((Decimal(decimal_text) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


# ---------------------------------------------------------------------------------------------------- cube

@FEW
@given(shape=shapes.filter(lambda s: s[0] >= 2), ratio=st.sampled_from(["0.1", "0.25", "0.3", "0.5", "1.0"]),
       channels_last=st.booleans(), seed=st.integers(0, 2**31), fill=st.sampled_from([-1.0, 0.0]))
def test_cube_blanks_one_block_of_the_stated_count_never_frame_0(shape, ratio, channels_last, seed, fill):
    frames = make_frames(shape, channels_last, seed)
    out, info = cube_inpaint(frames, gen(seed), fill=fill, ratio=float(ratio), channels_last=channels_last)
    num_frames, _, height, width = shape
    expected_count = min(max(half_up(ratio, num_frames), 1), num_frames - 1)

    assert out.shape == frames.shape and out.dtype == frames.dtype
    assert info.mask.shape == (num_frames, height, width) and info.mask.dtype == torch.bool
    blanked = [t for t in range(num_frames) if info.mask[t].any()]
    assert len(blanked) == expected_count == len(info.blanked_frames)
    assert blanked == list(info.blanked_frames) == list(range(blanked[0], blanked[0] + expected_count))
    assert 0 not in blanked
    assert info.mask[blanked].all()  # full frames by default
    o, x = fchw(out, channels_last), fchw(frames, channels_last)
    assert (o[blanked] == fill).all()
    kept = [t for t in range(num_frames) if t not in blanked]
    assert torch.equal(o[kept], x[kept])


def test_cube_count_rounds_half_up_like_the_paper_ratio():
    # 0.3 * 5 = 1.5 -> 2 and 0.3 * 15 = 4.5 -> 5 (Python's round would give 2 and 4), 0.3 * 81 = 24.3 -> 24
    for num_frames, count in [(5, 2), (15, 5), (81, 24), (10, 3), (2, 1), (3, 1)]:
        _, info = cube_inpaint(torch.zeros(num_frames, 1, 2, 2), gen(0), fill=-1.0)
        assert len(info.blanked_frames) == count == max(half_up("0.3", num_frames), 1)


@FEW
@given(shape=shapes.filter(lambda s: s[0] >= 2), spatial=st.sampled_from(["0.25", "0.5", "0.6", "1.0"]),
       seed=st.integers(0, 2**31))
def test_cube_spatial_extent_is_a_box_of_the_stated_size(shape, spatial, seed):
    frames = make_frames(shape, False, seed)
    out, info = cube_inpaint(frames, gen(seed), fill=0.0, spatial_ratio=float(spatial))
    num_frames, _, height, width = shape
    box_h, box_w = max(1, half_up(spatial, height)), max(1, half_up(spatial, width))
    t0 = info.blanked_frames.start
    rows = info.mask[t0].any(dim=1).nonzero().flatten().tolist()
    cols = info.mask[t0].any(dim=0).nonzero().flatten().tolist()
    assert len(rows) == box_h and rows == list(range(rows[0], rows[0] + box_h))
    assert len(cols) == box_w and cols == list(range(cols[0], cols[0] + box_w))
    assert int(info.mask.sum()) == len(info.blanked_frames) * box_h * box_w
    assert (out.permute(0, 2, 3, 1)[info.mask] == 0).all()
    assert torch.equal(out.permute(0, 2, 3, 1)[~info.mask], frames.permute(0, 2, 3, 1)[~info.mask])


def test_cube_on_a_single_frame_is_an_error():
    with pytest.raises(SamaInputError, match="frame 0 is never blanked"):
        cube_inpaint(torch.zeros(1, 3, 4, 4), gen(0), fill=0.0)


def test_cube_uint8_frames_and_fill_checks():
    frames = torch.full((6, 3, 4, 4), 200, dtype=torch.uint8)
    out, info = cube_inpaint(frames, gen(1), fill=0)
    assert out.dtype == torch.uint8 and int(out[info.blanked_frames.start].max()) == 0
    with pytest.raises(SamaInputError, match="uint8"):
        cube_inpaint(frames, gen(1), fill=-1.0)
    with pytest.raises(SamaInputError, match="fill"):
        cube_inpaint(frames.float(), gen(1), fill=float("nan"))


# ---------------------------------------------------------------------------------------------------- speed

def expected_speed_map(num_frames, speed_text, length):
    """Independent: output frame i shows floor(i * speed) while that is a frame, then repeats the last one."""
    fast = []
    i = 0
    while (j := int((Decimal(i) * Decimal(speed_text)).to_integral_value(rounding=ROUND_FLOOR))) <= num_frames - 1:
        fast.append(j)
        i += 1
    return (fast + [fast[-1]] * length)[:length], min(len(fast), length)


@FEW
@given(shape=shapes.filter(lambda s: s[0] >= 2), speed=st.sampled_from(["2", "1.5", "3", "1.1", "0.7", "1"]),
       channels_last=st.booleans())
def test_speed_output_is_4k_plus_1_and_follows_the_index_map(shape, speed, channels_last):
    frames = make_frames(shape, channels_last)
    out, info = speed_perturb(frames, gen(0), speed=float(speed), channels_last=channels_last)
    num_frames = shape[0]
    length = max(n for n in range(1, num_frames + 1) if n % 4 == 1)
    expected_map, resampled = expected_speed_map(num_frames, speed, length)

    assert out.shape[0] == length and (out.shape[0] - 1) % 4 == 0 and out.shape[1:] == frames.shape[1:]
    assert info.index_map.tolist() == expected_map and info.num_resampled_frames == resampled
    for i, j in enumerate(info.index_map.tolist()):
        assert torch.equal(out[i], frames[j])


@FEW
@given(num_frames=st.integers(2, 30), k=st.integers(0, 10))
def test_speed_explicit_length_pads_with_the_last_resampled_frame(num_frames, k):
    frames = make_frames((num_frames, 2, 3, 3), False)
    out, info = speed_perturb(frames, gen(0), num_output_frames=4 * k + 1)
    expected_map, _ = expected_speed_map(num_frames, "2", 4 * k + 1)
    assert out.shape[0] == 4 * k + 1 and info.index_map.tolist() == expected_map
    assert torch.equal(out, frames[expected_map])


def test_speed_2x_on_81_frames_keeps_even_frames_then_holds_the_last():
    _, info = speed_perturb(torch.zeros(81, 1, 1, 1), gen(0))
    assert info.index_map.tolist() == list(range(0, 81, 2)) + [80] * 40


def test_speed_bad_options():
    frames = torch.zeros(9, 3, 2, 2)
    with pytest.raises(SamaInputError, match="4k\\+1"):
        speed_perturb(frames, gen(0), num_output_frames=8)
    with pytest.raises(SamaInputError, match="speed must be"):
        speed_perturb(frames, gen(0), speed=0.0)
    with pytest.raises(SamaInputError, match="at least 2"):
        speed_perturb(frames[:1], gen(0))


# ---------------------------------------------------------------------------------------------------- tube

grids = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)).filter(lambda g: math.prod(g) >= 2)


@FEW
@given(shape=shapes, grid=grids, channels_last=st.booleans(), seed=st.integers(0, 2**31))
def test_tube_shuffle_moves_equal_tubes_and_unshuffles_bit_exactly(shape, grid, channels_last, seed):
    num_frames, _, height, width = shape
    if any(n < g for n, g in zip((num_frames, height, width), grid)):
        return  # covered by test_tube_shuffle_rejects_grids_larger_than_the_clip
    frames = make_frames(shape, channels_last, seed)
    out, info = tube_shuffle(frames, gen(seed), grid=grid, channels_last=channels_last)
    assert out.shape == frames.shape
    assert torch.equal(unshuffle_tubes(out, info), frames)

    # Independent layout: each dimension cut to a multiple of its count; time remainder at the start.
    tt, th, tw = num_frames // grid[0], height // grid[1], width // grid[2]
    t_offset = num_frames - grid[0] * tt
    boxes = [(slice(t_offset + a * tt, t_offset + (a + 1) * tt), slice(b * th, (b + 1) * th),
              slice(c * tw, (c + 1) * tw))
             for a in range(grid[0]) for b in range(grid[1]) for c in range(grid[2])]
    assert [tuple(box) for box in info.tube_boxes] == boxes
    perm = info.permutation.tolist()
    assert sorted(perm) == list(range(len(boxes))) and perm != list(range(len(boxes)))
    assert info.inverse_permutation.tolist() == [perm.index(i) for i in range(len(boxes))]
    o, x = fchw(out, channels_last), fchw(frames, channels_last)
    moved = torch.zeros(num_frames, height, width, dtype=torch.bool)
    for slot, (t, h, w) in enumerate(boxes):
        st_, sh, sw = boxes[perm[slot]]
        assert torch.equal(o[t, :, h, w], x[st_, :, sh, sw])
        moved[t, h, w] = True
    assert torch.equal(o.permute(0, 2, 3, 1)[~moved], x.permute(0, 2, 3, 1)[~moved])  # remainder in place


def test_tube_shuffle_81_frames_keeps_frame_0_and_splits_the_rest_in_halves():
    frames = make_frames((81, 3, 8, 8), False)
    out, info = tube_shuffle(frames, gen(0))
    assert torch.equal(out[0], frames[0])
    assert {(b.t.start, b.t.stop) for b in info.tube_boxes} == {(1, 41), (41, 81)}


def test_tube_shuffle_identity_is_redrawn_unless_allowed():
    frames = make_frames((2, 1, 1, 1), False)  # 2 tubes: half of all draws are the identity
    perms = {tuple(tube_shuffle(frames, gen(s), grid=(2, 1, 1)).info.permutation.tolist()) for s in range(20)}
    assert perms == {(1, 0)}
    allowed = {tuple(tube_shuffle(frames, gen(s), grid=(2, 1, 1), allow_identity=True).info.permutation.tolist())
               for s in range(20)}
    assert allowed == {(0, 1), (1, 0)}


def test_tube_shuffle_rejects_grids_larger_than_the_clip():
    with pytest.raises(SamaInputError, match="H=1 cannot be split into 2"):
        tube_shuffle(torch.zeros(4, 3, 1, 4), gen(0))
    with pytest.raises(SamaInputError, match="F=1 cannot be split into 2"):
        tube_shuffle(torch.zeros(1, 3, 4, 4), gen(0))
    with pytest.raises(SamaInputError, match="single tube"):
        tube_shuffle(torch.zeros(4, 3, 4, 4), gen(0), grid=(1, 1, 1))
    with pytest.raises(SamaInputError, match="three positive integers"):
        tube_shuffle(torch.zeros(4, 3, 4, 4), gen(0), grid=(2, 2))


def test_unshuffle_checks_its_inputs():
    frames = make_frames((4, 3, 4, 4), False)
    out, info = tube_shuffle(frames, gen(0))
    with pytest.raises(SamaInputError, match="shuffled with shape"):
        unshuffle_tubes(out[:, :, :2], info)
    _, cube_info = cube_inpaint(frames, gen(0), fill=0.0)
    with pytest.raises(SamaInputError, match="not 'tube'"):
        unshuffle_tubes(out, cube_info)


# ---------------------------------------------------------------------------------------------------- seeds

def _run(name, seed, frames):
    return apply_pretext(name, frames, gen(seed), **({"fill": -1.0} if name == "cube" else {}))


@pytest.mark.parametrize("name", ["cube", "tube"])
def test_same_seed_same_result_different_seeds_differ(name):
    frames = make_frames((21, 3, 8, 8), False)
    first, again = _run(name, 7, frames), _run(name, 7, frames)
    assert torch.equal(first.frames, again.frames)
    results = {_run(name, seed, frames).frames.numpy().tobytes() for seed in range(8)}
    assert len(results) > 1


def test_speed_is_deterministic_and_draws_nothing():
    frames = make_frames((9, 3, 4, 4), False)
    generator = gen(3)
    state = generator.get_state()
    assert torch.equal(speed_perturb(frames, generator).frames, speed_perturb(frames, gen(4)).frames)
    assert torch.equal(generator.get_state(), state)


def test_channels_last_gives_the_same_perturbation():
    frames = make_frames((9, 3, 6, 4), False)
    for name in PERTURBING_PRETEXTS:
        first = _run(name, 5, frames)
        last = apply_pretext(name, frames.permute(0, 2, 3, 1).contiguous(), gen(5), channels_last=True,
                             **({"fill": -1.0} if name == "cube" else {}))
        assert torch.equal(last.frames, first.frames.permute(0, 2, 3, 1))


# ---------------------------------------------------------------------------------------------------- mix

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mix_frequencies_over_10000_draws_match_1_2_3_4(seed):
    draws = sample_pretexts(10_000, gen(seed))
    for name, share in {"none": 0.1, "cube": 0.2, "speed": 0.3, "tube": 0.4}.items():
        assert abs(draws.count(name) / 10_000 - share) < 0.02, (name, draws.count(name))


def test_mix_sampler_is_seeded_and_takes_custom_weights():
    assert [PretextMixSampler(seed=3)() for _ in range(1)] == [PretextMixSampler(seed=3)()]
    assert PretextMixSampler(seed=3).sample(50) == PretextMixSampler(seed=3).sample(50)
    assert PretextMixSampler(seed=3).sample(50) != PretextMixSampler(seed=4).sample(50)
    draws = PretextMixSampler(seed=0, weights={"cube": 1, "tube": 3}).sample(4000)
    assert set(draws) == {"cube", "tube"} and abs(draws.count("tube") / 4000 - 0.75) < 0.03
    assert T2V_PRETEXT_MIX == {"none": 1, "cube": 2, "speed": 3, "tube": 4}
    with pytest.raises(SamaInputError, match="unknown pretext 'blur'"):
        sample_pretexts(5, gen(0), {"blur": 1.0})
    with pytest.raises(SamaInputError, match="sum to 0"):
        sample_pretexts(5, gen(0), {"cube": 0.0})
    with pytest.raises(SamaInputError, match=">= 0"):
        sample_pretexts(5, gen(0), {"cube": -1.0})


# ---------------------------------------------------------------------------------------------------- task tokens

def test_task_token_table_covers_every_pretext():
    assert set(TASK_TOKENS) == set(PERTURBING_PRETEXTS) == set(PRETEXT_NAMES) - {"none"}
    assert TASK_TOKENS["cube"] == "[Complete the missing regions in the video.]"
    for name, token in TASK_TOKENS.items():
        assert token.startswith("[") and token.endswith(".]") and task_token(name) == token
    assert len(set(TASK_TOKENS.values())) == len(TASK_TOKENS)
    assert task_token("none") == ""


def test_with_task_token_prepends_once():
    token = TASK_TOKENS["speed"]
    assert with_task_token("speed", "  a dog runs ") == f"{token} a dog runs"
    assert with_task_token("speed", with_task_token("speed", "a dog runs")) == f"{token} a dog runs"
    assert with_task_token("speed", "") == token
    assert with_task_token("none", "a dog runs") == "a dog runs"
    with pytest.raises(SamaInputError, match="unknown pretext"):
        with_task_token("Cube", "x")


# ---------------------------------------------------------------------------------------------------- dispatcher errors

def test_apply_pretext_none_returns_the_frames():
    frames = make_frames((3, 3, 2, 2), False)
    out, info = apply_pretext("none", frames, gen(0))
    assert out is frames and info.name == "none" and info.mask is None


@pytest.mark.parametrize("call, message", [
    (lambda: apply_pretext("blur", torch.zeros(5, 3, 4, 4), gen(0)), "unknown pretext 'blur'; choose one of none"),
    (lambda: apply_pretext("tube", torch.zeros(5, 3, 4), gen(0)), "must be 4-D"),
    (lambda: apply_pretext("speed", torch.zeros(1, 5, 3, 4, 4), gen(0)), "pass one clip at a time"),
    (lambda: apply_pretext("speed", np.zeros((5, 3, 4, 4)), gen(0)), "must be a torch.Tensor"),
    (lambda: apply_pretext("tube", torch.zeros(0, 3, 4, 4), gen(0)), "empty dimension"),
    (lambda: apply_pretext("cube", torch.zeros(5, 3, 4, 4), gen(0)), "needs fill="),
    (lambda: apply_pretext("cube", torch.zeros(1, 3, 4, 4), gen(0), fill=0.0), "at least 2"),
    (lambda: apply_pretext("speed", torch.zeros(5, 3, 4, 4), gen(0), grid=(2, 2, 2)), "grid do not apply"),
    (lambda: apply_pretext("tube", torch.zeros(5, 3, 4, 4), 123), "torch.Generator"),
    (lambda: cube_inpaint(torch.zeros(5, 3, 4, 4), gen(0), fill=0.0, ratio=0.0), "ratio must be"),
    (lambda: cube_inpaint(torch.zeros(5, 3, 4, 4), gen(0), fill=0.0, spatial_ratio=(0.5,)), "spatial_ratio"),
])
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(SamaInputError, match=message.replace("(", "\\(").replace(")", "\\)")):
        call()


# ---------------------------------------------------------------------------------------------------- CLI

def _png(path):
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def tile(grid, row, column, height, width=None):
    """One tile of the preview grid: rows of 14 caption pixels + tile, columns after the row names."""
    width = height if width is None else width
    y = row * (height + 14 + pretext_cmd.GAP) + 14
    x = pretext_cmd.LABEL_WIDTH + column * (width + pretext_cmd.GAP)
    return grid[y:y + height, x:x + width]


@pytest.mark.parametrize("name", ["cube", "speed", "tube"])
def test_cli_writes_a_preview_grid_for_the_synthetic_clip(tmp_path, name, capsys):
    out = tmp_path / "sub" / f"{name}.png"
    size, columns, num_frames = 32, 5, 17
    rc = pretext_cmd.main(["pretext-preview", "--synthetic", "--pretext", name, "--seed", "3", "--out", str(out),
                           "--size", str(size), "--columns", str(columns), "--synthetic-frames", str(num_frames)])
    assert rc == 0 and name in capsys.readouterr().out
    grid = _png(out)
    assert grid.shape == (3 * (size + 14 + pretext_cmd.GAP), pretext_cmd.LABEL_WIDTH + columns * (size + 4), 3)

    clip = pretext_cmd.synthetic_clip(num_frames, size, size)
    result = _run(name, 3, clip) if name != "cube" else apply_pretext("cube", clip, gen(3), fill=0.0)
    as_u8 = lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # noqa: E731
    columns_shown = [round(i * (result.frames.shape[0] - 1) / (columns - 1)) for i in range(columns)]
    for c, t in enumerate(columns_shown):
        assert np.array_equal(tile(grid, 0, c, size), as_u8(clip[t]))
        assert np.array_equal(tile(grid, 1, c, size), as_u8(result.frames[t]))
    if name == "cube":
        for c, t in enumerate(columns_shown):
            assert (tile(grid, 2, c, size) == 255).all() == (t in result.info.blanked_frames)


def test_cli_reads_a_video_through_the_video_module(tmp_path, monkeypatch):
    clip = (np.arange(12 * 40 * 60 * 3) % 251).astype(np.uint8).reshape(12, 40, 60, 3)  # (F, H, W, C)
    fake = types.ModuleType("sama_core.video")
    fake.read_video = lambda path, max_frames=None: (clip[:max_frames], 24.0)
    monkeypatch.setitem(sys.modules, "sama_core.video", fake)
    out = tmp_path / "v.png"
    rc = pretext_cmd.main(["pretext-preview", "--video", str(tmp_path / "in.mp4"), "--pretext", "tube",
                           "--out", str(out), "--size", "30", "--columns", "3"])
    assert rc == 0
    grid = _png(out)
    assert grid.shape == (3 * (20 + 14 + pretext_cmd.GAP), pretext_cmd.LABEL_WIDTH + 3 * (30 + 4), 3)


def test_cli_errors(tmp_path, capsys):
    rc = pretext_cmd.main(["pretext-preview", "--synthetic", "--pretext", "cube", "--out", str(tmp_path / "a.jpg")])
    assert rc == 2 and "ending in .png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretext_cmd.main(["pretext-preview", "--synthetic", "--pretext", "blur", "--out", str(tmp_path / "a.png")])
    with pytest.raises(SystemExit):
        pretext_cmd.main(["pretext-preview", "--pretext", "cube", "--out", str(tmp_path / "a.png")])
    rc = pretext_cmd.main(["pretext-preview", "--synthetic", "--pretext", "tube", "--grid", "1,1,1",
                           "--out", str(tmp_path / "b.png")])
    assert rc == 2 and "single tube" in capsys.readouterr().err


def test_cli_previews_a_real_video_file(tmp_path):
    imageio = pytest.importorskip("imageio.v3")
    pytest.importorskip("imageio_ffmpeg")
    clip = pretext_cmd.synthetic_clip(20, 48, 64)  # (F, 3, H, W) in [0, 1]
    path = tmp_path / "clip.mp4"
    imageio.imwrite(path, (clip * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), fps=8,
                    codec="libx264", macro_block_size=16)
    out = tmp_path / "v.png"
    rc = pretext_cmd.main(["pretext-preview", "--video", str(path), "--pretext", "cube", "--out", str(out),
                           "--size", "32", "--columns", "4", "--max-frames", "13"])
    assert rc == 0
    grid = _png(out)
    assert grid.shape == (3 * (24 + 14 + pretext_cmd.GAP), pretext_cmd.LABEL_WIDTH + 4 * (32 + 4), 3)
    # 13 frames: the cube blanks round(0.3 * 13) = 4 of them; the last column (frame 12) is shown
    blanked_columns = [c for c in range(4) if (tile(grid, 2, c, 24, 32) == 255).all()]
    assert len(blanked_columns) >= 1 and 0 not in blanked_columns
