"""Exactness: our loader + DiT reproduce the released SAMA code's outputs on ../shared/golden."""

import pytest
import torch
from safetensors.torch import load_file

from sama_core.loading import load_dit

CASES = {
    "full": ("source", "semantic"),
    "no_source": ("semantic",),
    "no_semantic": ("source",),
    "plain": (),
}


@pytest.fixture(scope="module")
def golden(golden_dir):
    model = load_dit(golden_dir / "tiny_sama.safetensors", dtype=torch.float32)
    return model, load_file(str(golden_dir / "forward.safetensors"))


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_released_code(golden, case):
    model, g = golden
    inputs = CASES[case]
    with torch.no_grad():
        out = model(g["in.target_latents"], g["in.timestep"], g["in.context"],
                    source=g["in.source_latents"] if "source" in inputs else None,
                    semantic_tokens=g["in.semantic_tokens"] if "semantic" in inputs else None)
    expected = g[f"out.{case}.video"]
    assert out.video.shape == expected.shape == (1, 16, 3, 8, 8)
    assert (out.video - expected).abs().max().item() <= 1e-5
    if "semantic" in inputs:
        expected_sem = g[f"out.{case}.semantic"]
        assert out.semantic.shape == expected_sem.shape == (1, 65, 1152)
        assert (out.semantic - expected_sem).abs().max().item() <= 1e-5
    else:
        assert out.semantic is None


def test_golden_context_is_the_padded_form(golden):
    """The golden context is 23 real rows + zeros: passing only the real rows must give the same result,
    since the DiT pads to exactly 512 rows itself."""
    model, g = golden
    real = g["in.context"][:, :23]
    assert torch.count_nonzero(g["in.context"][:, 23:]) == 0
    with torch.no_grad():
        out = model(g["in.target_latents"], g["in.timestep"], real, source=g["in.source_latents"],
                    semantic_tokens=g["in.semantic_tokens"])
    assert (out.video - g["out.full.video"]).abs().max().item() <= 1e-5
