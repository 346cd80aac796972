"""Periodic validation edits: a few fixed held-out samples sampled with the current (EMA) weights.

Writes output_dir/validation/step-<step>/sample-<i>.mp4 (a png for images): source | edit | target side by
side when the VAE is available, else the sampled latents as safetensors. Runs on every process (a sharded
model needs all of them for a forward), only the main process writes.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from sama_core import video as vio
from sama_core.sampler import SamplerOptions, sample

from .data import RAW_VIDEO, RawMediaDataset, build_index, derive_seed
from .features import negative_rows

log = logging.getLogger(__name__)

# Raw videos are validated on one fixed restoration task (plain generation would have no source to show).
VALIDATION_PRETEXT = "cube"


def prepare_validation(cfg, train_dataset, encoders, cached_dataset=None) -> list[dict]:
    """The held-out inputs, encoded once: [{source, cond, uncond, target, num_semantic, name}]."""
    vc = cfg.validation
    if vc.every <= 0:
        return []
    if cached_dataset is not None and vc.manifest is None:
        return _from_cache(cfg, cached_dataset)
    if encoders is None or encoders.text_encoder is None:
        log.warning("validation needs the encoders (encoders.vae / text_encoder) when it reads a manifest; skipped")
        return []
    if vc.manifest is not None:
        from .config import ManifestSpec
        index = build_index(cfg, manifests=[ManifestSpec(str(cfg.resolve_path(vc.manifest)))])
        dataset = RawMediaDataset(index, cfg.data)
    else:
        dataset = train_dataset
    out = []
    negative = negative_rows(cfg, encoders)
    for i in range(min(vc.num_samples, len(dataset.index.samples))):
        kind = dataset.index.samples[i].row.kind
        loaded = dataset.load(i, VALIDATION_PRETEXT if kind == RAW_VIDEO else "-", derive_seed(vc.seed, "val", i))
        frames = torch.stack([loaded["target"], loaded["source"]]).permute(0, 4, 1, 2, 3) * 2 - 1
        latents = encoders.latents(frames)
        out.append({"name": f"sample-{i}", "source": latents[1:2], "target": latents[0:1],
                    "cond": encoders.text_rows([loaded["prompt"]])[0][None], "uncond": negative[None],
                    "num_semantic": 65 * cfg.data.num_anchors if cfg.data.semantic_anchoring else 0,
                    "valid_frames": loaded["valid_frames"]})
    return out


def _from_cache(cfg, dataset) -> list[dict]:
    from .data import BatchItem
    out = []
    negative = negative_rows(cfg, cached=dataset)
    for i in range(min(cfg.validation.num_samples, len(dataset))):
        meta = dataset.samples[i]
        pretext = "-"
        if meta["kind"] == RAW_VIDEO:  # the cube source if cached, else any perturbed one
            perturbed = [p for p in meta["pretexts"] if p != "none"]
            if not perturbed:
                continue
            pretext = VALIDATION_PRETEXT if VALIDATION_PRETEXT in perturbed else perturbed[0]
        item = dataset[BatchItem(i, pretext, 0)]
        out.append({"name": f"sample-{i}", "source": item["source"][None], "target": item["target"][None],
                    "cond": item["text"][None], "uncond": negative[None],
                    "num_semantic": item["semantic"].shape[0] if item["semantic"] is not None else 0,
                    "valid_frames": None})
    return out


@torch.no_grad()
def run_validation(cfg, accelerator, model, ema, samples: list[dict], step: int, vae=None) -> list[Path]:
    if not samples:
        return []
    vc = cfg.validation
    folder = cfg.output_path / "validation" / f"step-{step:07d}"
    written = []
    swap = ema.swapped_in(model.named_parameters) if (ema is not None and vc.use_ema) else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with swap, accelerator.autocast():
            for s in samples:
                device = accelerator.device
                options = SamplerOptions(steps=vc.steps, guidance=vc.guidance, shift=vc.shift, seed=vc.seed,
                                         num_semantic_tokens=s["num_semantic"] or 65)
                result = sample(model, s["cond"].to(device), s["uncond"].to(device), source=s["source"].to(device),
                                options=options)
                if accelerator.is_main_process:
                    written.append(_write(folder, s, result.latents.float().cpu(), vae))
    finally:
        model.train(was_training)
    accelerator.wait_for_everyone()
    if written:
        log.info("validation samples written to %s", folder)
    return written


def _write(folder: Path, s: dict, latents: torch.Tensor, vae) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if vae is None:
        from safetensors.torch import save_file
        path = folder / f"{s['name']}.safetensors"
        save_file({"edited": latents.contiguous(), "source": s["source"].float().cpu().contiguous(),
                   "target": s["target"].float().cpu().contiguous()}, str(path))
        return path
    decoded = [vio.vae_output_to_frames(vae.decode(x.to(vae.device)).cpu())
               for x in (s["source"].float(), latents, s["target"].float())]
    if s.get("valid_frames"):
        decoded = [vio.trim(d, min(s["valid_frames"], d.shape[0])) for d in decoded]
    grid = vio.side_by_side(vio.side_by_side(decoded[0], decoded[1], gap=2), decoded[2], gap=2)
    side = max(grid.shape[1:3])
    if side < 256:  # tiny runs: enlarge with crisp pixels so the result can be looked at
        grid = torch.nn.functional.interpolate(grid.permute(0, 3, 1, 2), scale_factor=float(256 // side),
                                               mode="nearest-exact").permute(0, 2, 3, 1).contiguous()
    if grid.shape[0] == 1:
        from PIL import Image
        path = folder / f"{s['name']}.png"
        Image.fromarray((grid[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(path)
        return path
    path = folder / f"{s['name']}.mp4"
    vio.write_video(path, grid, 16)
    return path
