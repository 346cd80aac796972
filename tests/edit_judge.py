"""How close an edited clip came to its ground-truth edit: the one judge for the SAMA-Shapes bundle tests
(tests/test_sama_shapes_bundle.py) and its ComfyUI workflow test (tests/test_comfy_sama_nodes.py).

The model can only draw what its VAE decodes, and the tiny VAE blurs: on the demo clip the ground-truth
target passed through it gets only ~0.42 of the way from the source to the target (session 4). So with a
`round_trip` (frames -> the VAE's encode/decode of them) the judge measures in what the VAE can render:
from VAE(source) towards VAE(target), and the error outside the edit against VAE(source).

On a plain background most of "outside the edit" is that background, which even a model that recolours the
other object too keeps well (session 7: turning the demo's orange triangle blue with the star moved the
outside error by ~0.03). So the judge also reports `kept_error`: the same error over the pixels of the
objects the edit leaves alone only (what differs from the background colour, away from the edit region)."""

import torch
import torch.nn.functional as F


def edit_region(source: torch.Tensor, target: torch.Tensor, threshold: float = 0.25) -> torch.Tensor:
    """(F, H, W) True where the ground-truth edit changes a pixel by more than `threshold` in some channel."""
    return (target - source).abs().amax(dim=-1) > threshold


def kept_objects(source: torch.Tensor, region: torch.Tensor, threshold: float = 0.25, margin: int = 2) -> torch.Tensor:
    """(F, H, W) True on the pixels of the objects the edit leaves alone: farther than `threshold` (some
    channel) from the background colour (the per-channel median of the clip, which is the background's on
    a plain background where most pixels are background) and more than `margin` px from the edit region."""
    background = source.reshape(-1, 3).median(dim=0).values
    foreground = (source - background).abs().amax(dim=-1) > threshold
    near_edit = F.max_pool2d(region.float()[:, None], 2 * margin + 1, stride=1, padding=margin)[:, 0] > 0
    return foreground & ~near_edit


def judge(output: torch.Tensor, source: torch.Tensor, target: torch.Tensor, round_trip=None) -> dict:
    """How far the output went from the source towards the target inside the edit region (0 = copy,
    1 = the target), its mean absolute error against the source outside it, and that error over the kept
    objects only (kept_objects; None when the clip has none). Clips: (F, H, W, 3) in [0, 1].
    round_trip: when given, both references are first passed through it (see the module docstring)."""
    assert output.shape == source.shape == target.shape, (output.shape, source.shape, target.shape)
    region = edit_region(source, target)
    assert region.float().mean() > 0.005, "the edit changes almost nothing: not a useful demo clip"
    kept = kept_objects(source, region)
    if round_trip is not None:
        source, target = round_trip(source), round_trip(target)
        assert source.shape == output.shape and target.shape == output.shape
    inside_source = (source - target).abs()[region].mean()
    inside_output = (output - target).abs()[region].mean()
    outside = (output - source).abs()[~region].mean()
    kept_error = float((output - source).abs()[kept].mean()) if kept.any() else None
    return {"progress": float(1 - inside_output / inside_source), "outside_error": float(outside),
            "kept_error": kept_error}


def vae_round_trip(pipe):
    """frames (F, H, W, 3) -> the pipeline VAE's decode of their encoding, trimmed to F frames."""
    from sama_core import video as vio

    def round_trip(frames):
        with torch.no_grad():
            latents = pipe.vae.encode(vio.frames_to_vae_input(frames))
            return vio.vae_output_to_frames(pipe.vae.decode(latents))[: frames.shape[0]].clamp(0, 1)
    return round_trip
