"""nodes/convert.py: the tensor logic behind the frame nodes, without ComfyUI."""

import importlib

import pytest
import torch

from comfy_host import import_pack

import_pack()  # the repo as package "sama_pack", so nodes/ can import ..sama_core as inside ComfyUI
convert = importlib.import_module("sama_pack.nodes.convert")
SamaInputError = importlib.import_module("sama_pack.sama_core.errors").SamaInputError


def _frames(count, height=6, width=5, channels=3, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, height, width, channels, generator=generator).to(dtype)  # (F, H, W, C)


def _next_4k_plus_1(count):
    target = count
    while target % 4 != 1:
        target += 1
    return target


@pytest.mark.parametrize("count", range(1, 12))
def test_pad_repeats_the_last_frame_up_to_4k_plus_1(count):
    images = _frames(count, seed=count)
    padded, original = convert.frames_to_4k_plus_1(images)

    assert original == count
    assert padded.shape == (_next_4k_plus_1(count), 6, 5, 3)
    assert torch.equal(padded[:count], images)
    for index in range(count, padded.shape[0]):
        assert torch.equal(padded[index], images[-1])


def test_pad_keeps_dtype_and_any_channel_count():
    images = _frames(6, channels=4, dtype=torch.float16)  # RGBA, half precision
    padded, original = convert.frames_to_4k_plus_1(images)
    assert padded.dtype == torch.float16 and padded.shape == (9, 6, 5, 4) and original == 6


@pytest.mark.parametrize("count", [1, 2, 6, 9, 10])
def test_trim_undoes_pad_exactly(count):
    images = _frames(count, seed=100 + count)
    padded, original = convert.frames_to_4k_plus_1(images)
    assert torch.equal(convert.trim_frames(padded, original), images)


def test_trim_keeps_the_first_frames():
    images = _frames(9)
    assert torch.equal(convert.trim_frames(images, 4), images[:4])
    assert torch.equal(convert.trim_frames(images, 9), images)


@pytest.mark.parametrize("count", [0, -1, 10])
def test_trim_to_an_impossible_count_names_count_and_the_fix(count):
    with pytest.raises(SamaInputError) as error:
        convert.trim_frames(_frames(9), count)
    message = str(error.value)
    assert f"'count' is {count} but 'images' has 9 frames" in message
    assert "1..9" in message and "original_count" in message


@pytest.mark.parametrize("bad, described", [
    (torch.zeros(6, 5, 3), "got shape (6, 5, 3)"),        # one image without the batch axis
    (torch.zeros(1, 2, 6, 5, 3), "got shape (1, 2, 6, 5, 3)"),
    ([[0.0]], "got list"),
])
def test_non_image_input_is_rejected_with_its_shape(bad, described):
    for call in (lambda: convert.frames_to_4k_plus_1(bad), lambda: convert.trim_frames(bad, 1)):
        with pytest.raises(SamaInputError) as error:
            call()
        assert "'images' must be an IMAGE batch (frames, height, width, channels)" in str(error.value)
        assert described in str(error.value)


def test_empty_batch_is_rejected():
    with pytest.raises(SamaInputError, match="'images' has no frames"):
        convert.frames_to_4k_plus_1(torch.zeros(0, 6, 5, 3))


def test_input_errors_are_value_errors():
    assert issubclass(SamaInputError, ValueError)
