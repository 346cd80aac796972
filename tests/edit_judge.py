"""How close an edited clip came to its ground-truth edit: the one judge for the SAMA-Shapes bundle tests
(tests/test_sama_shapes_bundle.py) and its ComfyUI workflow test (tests/test_comfy_sama_nodes.py)."""

import torch


def edit_region(source: torch.Tensor, target: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """(F, H, W) True where the ground-truth edit changes a pixel by more than `threshold` in some channel."""
    return (target - source).abs().amax(dim=-1) > threshold


def judge(output: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> dict:
    """How far the output went from the source towards the target inside the edit region (0 = copy,
    1 = the target), and its mean absolute error against the source outside it. Clips: (F, H, W, 3) in [0, 1]."""
    assert output.shape == source.shape == target.shape, (output.shape, source.shape, target.shape)
    region = edit_region(source, target)
    assert region.float().mean() > 0.005, "the edit changes almost nothing: not a useful demo clip"
    inside_source = (source - target).abs()[region].mean()
    inside_output = (output - target).abs()[region].mean()
    outside = (output - source).abs()[~region].mean()
    return {"progress": float(1 - inside_output / inside_source), "outside_error": float(outside)}
