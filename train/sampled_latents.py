"""The DiT's own latents for SAMA-Shapes edits, kept to train a decoder that renders them well.

    python -m train.sampled_latents --bundle sama_core/assets/sama-shapes --data runs/shapes/data/train_s7 \\
        --out runs/shapes/sampled --limit 200 [--shard 0/2]
    python -m train.sampled_latents --bundle sama_core/assets/sama-shapes --out runs/shapes/sampled --gap \\
        --data runs/shapes/data/train_s7 [--limit FILES]

Why: the decoder is trained on the encoder's latents, but at edit time it decodes what the DiT sampled, which
is ~0.5 RMS (normalised units) away from the encoded target (measured, session 9). Gaussian noise
(`loss.latent_noise`) is one guess at that gap; these files are the gap itself. `train.vae_train` reads
them with `data.sampled_latents` (and `trainable: decoder`, so the latents, and the DiT, stay valid) and
learns to decode each one to its ground-truth target, outside the edit region: the kept objects and the
background, which the DiT is asked to copy.

Use a split the DiT never trained on (another train-split seed): its latents there have the errors it makes
on new clips. Never a held-out evaluation split (the command refuses data whose split is 'heldout').

One file per edit, `latents/<edit id>.npz`: `latents` (16, T, h, w) float32, normalised as the pipeline gives
them to the VAE, and `meta` (JSON: the ground-truth row's target video, mask file and key, the sampler's
seed/steps/guidance, the DiT file's SHA-256). Written atomically; a rerun skips edits already written, so
an interrupted run resumes, and `--shard K/N` splits the edits between N processes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sama_core.cli import command_line
from sama_core.errors import SamaInputError
from sama_core.region import latent_grid

log = logging.getLogger("train.sampled_latents")

LATENTS_DIR = "latents"
SEED_OFFSET = 1_000_003  # the sampler seed of edit i is seed + i * this: distinct noise per edit


def parse_shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise SamaInputError(f"--shard must look like K/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= k < n:
        raise SamaInputError(f"--shard {text}: K must be in 0..N-1")
    return k, n


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_not_heldout(data: Path) -> None:
    info = json.loads((data / "dataset.json").read_text()) if (data / "dataset.json").is_file() else {}
    if info.get("split") == "heldout":
        raise SamaInputError(f"{data} is a held-out split: evaluation data must never train the decoder; give "
                             "a train-split folder the DiT has not trained on (python -m train.synthetic "
                             "--split train --seed 7 ...)")


def write_sampled_latents(bundle, data, out, limit: Optional[int] = None, shard: tuple[int, int] = (0, 1),
                          seed: int = 0, guidance: Optional[float] = None) -> int:
    """Sample the bundle's DiT on the video edits of `data` (the first `limit` clips) and write their latents
    to `out`/latents. Returns how many files this call wrote."""
    from sama_core.pipeline import EditSettings, SamaPipeline

    from .eval import read_cases
    from .synthetic import load_clip

    data, out = Path(data), Path(out)
    check_not_heldout(data)
    rows = read_cases(data, limit)
    mine = [(i, row) for i, row in enumerate(rows) if i % shard[1] == shard[0]]
    folder = out / LATENTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(i, row) for i, row in mine if not (folder / f"{row['id']}.npz").is_file()]
    log.info("%d video edits in %s; shard %d/%d has %d, %d already written", len(rows), data, *shard, len(mine),
             len(mine) - len(todo))
    if not todo:
        return 0
    pipe = SamaPipeline.from_bundle(bundle, device="cpu", dtype="fp32")
    dit_file = Path(bundle) / json.loads((Path(bundle) / "bundle.json").read_text())["dit"]
    dit_sha = file_sha256(dit_file)
    written, t0 = 0, time.perf_counter()
    for i, row in todo:
        options = pipe.sampler_options(seed=seed + i * SEED_OFFSET, guidance=guidance)
        source = load_clip(row["source_video"])  # (F, H, W, 3) in [0, 1]
        result, count, _ = pipe.sample_edit(source, row["instruction"], EditSettings(), options)
        latents = result.latents[0].float().cpu().numpy()  # (16, T, h, w)
        if count != source.shape[0] or 1 + 4 * (latents.shape[1] - 1) != source.shape[0]:
            raise SamaInputError(f"{row['source_video']}: {source.shape[0]} frames were resized or padded for "
                                 "the DiT; sampled latents need clips of 4k+1 frames at the bundle's size")
        meta = {"id": row["id"], "kind": row["kind"], "instruction": row["instruction"],
                "target_video": str(row["target_video"]), "mask_file": str(row["mask_file"]),
                "edit_mask_key": row["edit_mask_key"], "seed": options.seed, "steps": options.steps,
                "guidance": options.guidance, "dit_sha256": dit_sha, "data": str(data)}
        path = folder / f"{row['id']}.npz"
        tmp = folder / f".{row['id']}.tmp{os.getpid()}.npz"
        np.savez(tmp, latents=latents, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
        written += 1
        if written % 10 == 0 or written == len(todo):
            rate = written / (time.perf_counter() - t0)
            log.info("%d / %d written (%.2f edits/s, %.0f s left)", written, len(todo), rate,
                     (len(todo) - written) / rate)
    return written


def read_sampled_latent(path: Path) -> tuple[np.ndarray, dict]:
    with np.load(path, allow_pickle=False) as f:
        return f["latents"], json.loads(str(f["meta"]))


def sampled_latent_files(folders) -> list[Path]:
    """Every latents/*.npz of the folders, sorted (a training pool's order must not depend on the disk)."""
    files = []
    for folder in folders:
        found = sorted((Path(folder) / LATENTS_DIR).glob("[!.]*.npz"))
        if not found:
            raise SamaInputError(f"{folder} has no {LATENTS_DIR}/*.npz: write them with `python -m "
                                 "train.sampled_latents --bundle BUNDLE --data FOLDER --out "
                                 f"{folder}`")
        files.extend(found)
    return files


def latent_cells(mask: np.ndarray) -> np.ndarray:
    """A pixel mask (F, H, W), F = 4k+1, -> the latent cells (1 + k, H/8, W/8) it touches
    (sama_core.region.latent_grid)."""
    frames, height, width = mask.shape
    m = torch.from_numpy(np.ascontiguousarray(mask))
    return (latent_grid(m, ((frames - 1) // 4 + 1, height // 8, width // 8)) > 0).numpy()


def latent_gap(bundle, folders, limit: Optional[int] = None) -> dict:
    """How far the sampled latents are from the targets' encoded latents (RMS, normalised units) outside the
    edit region, on cells touching an object the edit leaves alone and on background-only cells; the same for
    the sources' latents (a copy) for scale. A decoder can only render what the latent holds: a large gap on the
    kept objects is the DiT's (session 14, 200 edits: 0.55 against a copy's 0.32). The ground truth is read again from
    each file's data folder."""
    from sama_core.pipeline import SamaPipeline
    from sama_core import video as vio

    from .eval import load_case, read_cases, unedited_objects
    files = sampled_latent_files(folders)[:limit]
    pipe = SamaPipeline.from_bundle(bundle, device="cpu", dtype="fp32")
    rows = {}
    squares = {"dit_kept": [], "copy_kept": [], "dit_background": [], "copy_background": []}
    for path in files:
        latents, meta = read_sampled_latent(path)
        if meta["data"] not in rows:
            rows[meta["data"]] = {r["id"]: r for r in read_cases(meta["data"])}
        case = load_case(rows[meta["data"]][meta["id"]])
        target, source = (pipe.vae.encode(vio.frames_to_vae_input(torch.from_numpy(x)))[0].numpy()
                          for x in (case.target, case.source))  # (16, T, h, w)
        edit = latent_cells(case.edit_mask)
        kept = np.zeros_like(edit)
        for index, _ in unedited_objects(case):
            kept |= latent_cells(case.target_visible[index] > 0.5)
        for name, cells in (("kept", kept & ~edit), ("background", ~kept & ~edit)):
            if cells.any():
                squares[f"dit_{name}"].append(float(((latents - target) ** 2)[:, cells].mean()))
                squares[f"copy_{name}"].append(float(((source - target) ** 2)[:, cells].mean()))
    return {name: {"edits": len(v), "rms": math.sqrt(sum(v) / len(v)) if v else None} for name, v in squares.items()}


@command_line("interrupted: rerun the same command to resume")
def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m train.sampled_latents", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, help="a SAMA bundle folder (bundle.json)")
    parser.add_argument("--data", default=None, help="a train-split SAMA-Shapes folder the DiT has not seen "
                        "(not needed with --gap: each file names its own)")
    parser.add_argument("--out", required=True, help="output folder (latents/ inside; reruns resume)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N clips (5 edits each); with --gap the first N files")
    parser.add_argument("--shard", default="0/1", help="K/N: this process's share of the edits")
    parser.add_argument("--seed", type=int, default=0, help="base sampler seed (edit i: seed + i * 1000003)")
    parser.add_argument("--guidance", type=float, default=None, help="default: the bundle's")
    parser.add_argument("--gap", action="store_true",
                        help="write nothing: report how far --out's latents are from their targets' (latent_gap)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.gap:
        gap = latent_gap(args.bundle, [args.out], args.limit)
        print("RMS from the targets' latents, outside the edit region (normalised units):")
        for name, value in gap.items():
            rms = "-" if value["rms"] is None else f"{value['rms']:.3f}"
            print(f"  {name:16s} {rms} over {value['edits']} edits")
        return 0
    if args.data is None:
        raise SamaInputError("--data is needed to sample: a train-split SAMA-Shapes folder")
    count = write_sampled_latents(args.bundle, args.data, args.out, args.limit, parse_shard(args.shard),
                                  args.seed, args.guidance)
    print(f"wrote {count} sampled latents to {Path(args.out) / LATENTS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
