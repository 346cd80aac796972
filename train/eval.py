"""Evaluate SAMA-Shapes editing on a held-out SAMA-Shapes set (train/synthetic.py, split "heldout").

    python -m train.eval --bundle runs/shapes/bundle --data runs/shapes/data/heldout [--out DIR] [--limit N]
                         [--baselines copy,ground_truth,vae] [--extra-dit NAME=FILE ...] [--extra-vae NAME=FILE ...]
                         [--train-data DIR]

Every video edit of the held-out set is run through each "method" (the bundle's model; optional extra DiTs
such as stage 0's export; baselines: `copy` = the unedited source, `ground_truth` = the target itself,
`vae` = the target through the bundle's VAE, the ceiling of any model that decodes latents) and scored
against the known ground truth (ground_truth.jsonl, the masks, and the scenes re-rendered with
`render_scene` for soft object coverage). All pixels are in [0, 1]; L1 distances are per-pixel channel
means.

Edit accuracy (per edit: success or not; `progress` is the continuous part):
    region R: where the edit shows. colour / add: the edited (added) object's interior in the target
    (rendered coverage >= 0.99); remove: the removed object's interior in the source; background: the
    pixels that are pure background (coverage 0 of every object) in both clips.
    progress = 1 - L1(out, target) / L1(source, target) over R: 1 = the target, 0 = unchanged (the copy
    baseline scores exactly 0), negative = further away.
    colour, add: success iff the mean colour of the output over R is nearest (RGB) to the requested colour
        among the 8 object colours, and progress > 0.5.
    remove, background: success iff progress > 0.5 (closer to the revealed / new background than halfway).
    shape: the object's pixels are found by colour (pixels whose nearest palette colour is the object's
        colour and within 0.3 of it) inside the union of its source and target masks dilated by 2 px, in
        the output, the source and the target; success iff IoU(output, target) > IoU(output, source).
        `iou` is IoU(output, target).
Motion preservation: for every object the edit does not touch (present in source and target), in every
    frame where it shows at least 3 pixels in the target, its pixels are found by colour inside its target
    mask dilated by 4 px, in the output and in the target; the error is the distance of the two centroids
    (px). A frame where the output shows none of it is "lost" and counts as 8 px. Ground truth: 0.
    Its parts (a second table, since session 9): the position error over the found frames alone, and the
    same metric over the frames where the object is clearly visible in the target (>= half the pixels of its
    most visible frame). For the session-8 VAE most lost frames of large objects were colour loss (the
    object decoded outside COLOR_TOLERANCE of its colour), and most of the rest slivers.
Background preservation: PSNR (dB) over the pixels outside the edit mask (`<kind>_edit_mask`; outside it
    source and target are identical), capped at 100 dB (the copy baseline is exact there).
Temporal consistency: ratio = mean |frame difference| of the output / that of the target (1 = the same
    amount of change; > 1 flicker, < 1 frozen), and gap = mean over frame pairs of | mean |diff_out| -
    mean |diff_target| | in 1/255 units.

Outputs in --out: results.md (tables), metrics.json, per_edit.jsonl, accuracy.png (bars per kind and
method) and examples.png (source | each method | target, one edit per kind, every 4th frame).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import cv2
import numpy as np
import torch

from sama_core.cli import command_line
from sama_core.errors import SamaFileNotFoundError, SamaInputError

from .synthetic import (
    BACKGROUND_COLORS,
    EDIT_KINDS,
    MANIFEST_NAMES,
    OBJECT_COLORS,
    Scene,
    load_clip,
    read_manifest,
    render_scene,
)

log = logging.getLogger(__name__)

INTERIOR = 0.99            # rendered coverage that counts as an object's interior
MASK_COVERAGE = 0.5        # coverage that counts as an object's pixel (masks for IoU and tracking)
COLOR_TOLERANCE = 0.3      # RGB distance within which a pixel takes an object colour
PROGRESS_NEEDED = 0.5      # "closer to the target than halfway"
SHAPE_DILATE = 2           # px around the edited object's masks where its pixels are searched
TRACK_DILATE = 4           # px around an unedited object's target mask where it is tracked
LOST_ERROR = 8.0           # px charged for a frame where a tracked object is not found
MIN_TRACK_PIXELS = 3
VISIBLE_SHARE = 0.5        # "clearly visible": at least this share of the object's most visible frame's pixels
PSNR_CAP = 100.0
EDIT_MASK_GROW = 2         # px the edit mask is grown by for the "+ edit mask" rows (a user's rough brush)
EDIT_MASK_SUFFIX = " + edit mask"
KEEP_UNCHANGED_SUFFIX = " + keep unchanged"
FLOWEDIT_SUFFIX = " + FlowEdit"
FLOWEDIT_OFF = "off"  # --flowedit off: a row with the released sampler (for bundles that default to FlowEdit)
RELEASED_SAMPLER_SUFFIX = " (released sampler)"
# Baseline row names (train/paired.py and train/shapes_compare.py tell them from the model rows by these).
COPY_ROW = "copy (output = source)"
GROUND_TRUTH_ROW = "ground truth"
VAE_ROW = "VAE(target)"    # "VAE(target) ceiling" for the bundle's VAE, "VAE(target) NAME" for --extra-vae

OBJECT_NAMES = list(OBJECT_COLORS)
_OBJECT_RGB = np.array([OBJECT_COLORS[n] for n in OBJECT_NAMES], np.float32)  # (8, 3)
# Object colours first, then the muted background colours: a pixel takes the label of its nearest entry.
_PALETTE = np.concatenate([_OBJECT_RGB, np.array(list(BACKGROUND_COLORS.values()), np.float32)])  # (16, 3)


# ----------------------------------------------------------------------------------------- the cases

@dataclasses.dataclass
class EditCase:
    """One held-out edit with everything the metrics need. Frames (F, H, W, 3) float32 in [0, 1]."""
    row: dict                     # the ground_truth.jsonl row (paths absolute)
    source: np.ndarray
    target: np.ndarray
    edit_mask: np.ndarray         # (F, H, W) bool: pixels the edit may change
    source_visible: np.ndarray    # (N, F, H, W) float32 rendered visibility of the source objects
    target_visible: np.ndarray    # (N', F, H, W) float32, the target's
    source_background: np.ndarray  # (F, H, W) float32 background weight
    target_background: np.ndarray

    @property
    def kind(self) -> str:
        return self.row["kind"]

    @property
    def instruction(self) -> str:
        return self.row["instruction"]


def read_cases(data_dir, limit: Optional[int] = None, kinds: Iterable[str] = EDIT_KINDS) -> list[dict]:
    """The ground-truth rows of the first `limit` clips (all when None) of the chosen edit kinds."""
    path = Path(data_dir) / MANIFEST_NAMES["ground_truth"]
    if not path.is_file():
        raise SamaFileNotFoundError(f"{data_dir} has no {path.name}: give a folder written by "
                                    "`python -m train.synthetic --split heldout --out FOLDER ...`")
    kinds = set(kinds)
    unknown = kinds - set(EDIT_KINDS)
    if unknown:
        raise SamaInputError(f"unknown edit kinds {sorted(unknown)}; choose from {', '.join(EDIT_KINDS)}")
    rows, clips = [], []
    for row in read_manifest(path):
        if row["clip"] not in clips:
            if limit is not None and len(clips) >= limit:
                break
            clips.append(row["clip"])
        if row["kind"] in kinds:
            rows.append(row)
    if not rows:
        raise SamaInputError(f"{path} has no edits of kinds {sorted(kinds)}")
    return rows


def load_case(row: dict) -> EditCase:
    source_render = render_scene(Scene.from_dict(row["scene"]))
    target_render = render_scene(Scene.from_dict(row["target_scene"]))
    with np.load(row["mask_file"], allow_pickle=False) as masks:
        edit_mask = masks[row["edit_mask_key"]]
    return EditCase(row, load_clip(row["source_video"]).numpy(), load_clip(row["target_video"]).numpy(),
                    edit_mask, source_render.visible.numpy(), target_render.visible.numpy(),
                    source_render.background_weight.numpy(), target_render.background_weight.numpy())


def check_disjoint(heldout_dir, train_dir) -> int:
    """Refuse a held-out set that shares a scene with the training set; returns the held-out scene count."""
    def fingerprints(folder):
        return {row["scene_fingerprint"] for row in read_manifest(Path(folder) / MANIFEST_NAMES["ground_truth"])}
    held, train = fingerprints(heldout_dir), fingerprints(train_dir)
    shared = held & train
    if shared:
        raise SamaInputError(f"{len(shared)} held-out scenes also occur in the training set {train_dir}: "
                             "generate the held-out set with --split heldout")
    return len(held)


# ------------------------------------------------------------------------------------ pixel helpers

def l1(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """Mean over the region's pixels of the per-pixel channel-mean |a - b|. region (F, H, W) bool."""
    return float(np.abs(a[region] - b[region]).mean())


def nearest_object_color(mean_rgb: np.ndarray) -> str:
    return OBJECT_NAMES[int(np.argmin(np.linalg.norm(_OBJECT_RGB - mean_rgb, axis=1)))]


def color_pixels(frames: np.ndarray, color: str) -> np.ndarray:
    """(F, H, W) bool: pixels whose nearest palette colour is the object colour `color`, within tolerance."""
    distances = np.linalg.norm(frames[..., None, :] - _PALETTE, axis=-1)  # (F, H, W, 16)
    index = OBJECT_NAMES.index(color)
    return (distances.argmin(-1) == index) & (distances[..., index] < COLOR_TOLERANCE)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """(F, H, W) bool, every frame dilated by a (2r+1) square."""
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in mask])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    if not region.any():
        return PSNR_CAP
    mse = float(((a[region] - b[region]) ** 2).mean())
    return PSNR_CAP if mse <= 0 else min(PSNR_CAP, 10.0 * math.log10(1.0 / mse))


# ------------------------------------------------------------------------------------------ metrics

def edit_region(case: EditCase) -> np.ndarray:
    """(F, H, W) bool: where the edit's success is judged (see the module docstring)."""
    i = case.row["object_index"]
    if case.kind in ("color", "add"):
        return case.target_visible[i] >= INTERIOR
    if case.kind == "remove":
        return case.source_visible[i] >= INTERIOR
    if case.kind == "background":
        return (case.source_background >= INTERIOR) & (case.target_background >= INTERIOR)
    # shape: the union of the object's masks before and after
    return (case.source_visible[i] >= MASK_COVERAGE) | (case.target_visible[i] >= MASK_COVERAGE)


def edit_accuracy(case: EditCase, output: np.ndarray) -> dict:
    region = edit_region(case)
    change = l1(case.source, case.target, region) if region.any() else 0.0
    if change <= 0.0:
        return {"success": None, "progress": None}  # nothing to judge (e.g. a fully hidden object)
    progress = 1.0 - l1(output, case.target, region) / change
    result = {"progress": progress}
    if case.kind in ("color", "add"):
        i = case.row["object_index"]
        wanted = Scene.from_dict(case.row["target_scene"]).objects[i].color
        got = nearest_object_color(output[region].mean(0))
        result.update(color=got, wanted=wanted, success=bool(got == wanted and progress > PROGRESS_NEEDED))
    elif case.kind == "shape":
        i = case.row["object_index"]
        color = Scene.from_dict(case.row["scene"]).objects[i].color
        search = dilate(region, SHAPE_DILATE)
        masks = [color_pixels(frames, color) & search for frames in (output, case.target, case.source)]
        to_target, to_source = iou(masks[0], masks[1]), iou(masks[0], masks[2])
        result.update(iou=to_target, iou_source=to_source, success=bool(to_target > to_source))
    else:
        result["success"] = bool(progress > PROGRESS_NEEDED)
    return result


def unedited_objects(case: EditCase) -> list[tuple[int, str]]:
    """(target index, colour) of every object the edit leaves alone."""
    scene = Scene.from_dict(case.row["scene"])
    i = case.row["object_index"]
    if case.kind in ("color", "shape"):
        return [(j, o.color) for j, o in enumerate(scene.objects) if j != i]
    if case.kind == "remove":  # the objects after the removed one move down one place in the target
        return [(j - (j > i), o.color) for j, o in enumerate(scene.objects) if j != i]
    return [(j, o.color) for j, o in enumerate(scene.objects)]  # add (appended in front), background


def motion_error(case: EditCase, output: np.ndarray) -> dict:
    """The motion metric (module docstring), and its parts: `motion_position_error`, the centroid distance
    over the frames where the object was found (position alone); `motion_visible_*`, the metric over the
    frames where the object is clearly visible in the target (at least VISIBLE_SHARE of the pixels of its
    most visible frame), which leaves out the slivers of objects entering the frame or half hidden."""
    errors, lost, found_errors, visible_errors, visible_lost = [], 0, [], [], 0
    for j, color in unedited_objects(case):
        window = dilate(case.target_visible[j] >= MASK_COVERAGE, TRACK_DILATE)
        reference = color_pixels(case.target, color) & window
        found = color_pixels(output, color) & window
        counts = reference.sum(axis=(1, 2))  # (F,)
        clearly = max(MIN_TRACK_PIXELS, VISIBLE_SHARE * counts.max())
        for k in range(output.shape[0]):
            if counts[k] < MIN_TRACK_PIXELS:
                continue  # hidden in the target: nothing to compare
            if not found[k].any():
                error = LOST_ERROR
                lost += 1
                visible_lost += int(counts[k] >= clearly)
            else:
                ref = np.argwhere(reference[k]).mean(0)  # (y, x)
                got = np.argwhere(found[k]).mean(0)
                error = float(np.linalg.norm(got - ref))
                found_errors.append(error)
            errors.append(error)
            if counts[k] >= clearly:
                visible_errors.append(error)
    return {"motion_error": float(np.mean(errors)) if errors else None, "motion_frames": len(errors),
            "motion_lost": lost,
            "motion_position_error": float(np.mean(found_errors)) if found_errors else None,
            "motion_visible_error": float(np.mean(visible_errors)) if visible_errors else None,
            "motion_visible_frames": len(visible_errors), "motion_visible_lost": visible_lost}


def temporal_consistency(case: EditCase, output: np.ndarray) -> dict:
    out_diff = np.abs(np.diff(output, axis=0)).mean(axis=(1, 2, 3))  # (F-1,)
    tgt_diff = np.abs(np.diff(case.target, axis=0)).mean(axis=(1, 2, 3))
    ratio = float(out_diff.mean() / tgt_diff.mean()) if tgt_diff.mean() > 0 else None
    return {"temporal_ratio": ratio, "temporal_gap": float(np.abs(out_diff - tgt_diff).mean() * 255.0)}


def background_style(case: EditCase) -> str:
    """The source scene's background style (plain, stripes, checker, noise): accuracy differs 2-3x between
    them for a blurry VAE (docs/sama_shapes.md, session 7), so the tables split it out."""
    return case.row["scene"]["background"]["style"]


def score(case: EditCase, output: np.ndarray) -> dict:
    """Every metric of one edit's output (F, H, W, 3) in [0, 1]."""
    if output.shape != case.target.shape:
        raise SamaInputError(f"edit {case.row['id']}: the output has shape {output.shape}, the target "
                             f"{case.target.shape}; the method must return the source's frames and size")
    output = np.clip(output.astype(np.float32), 0.0, 1.0)
    outside = ~case.edit_mask
    result = {"id": case.row["id"], "kind": case.kind, "background_style": background_style(case),
              **edit_accuracy(case, output),
              "background_psnr": psnr(output, case.target, outside),
              "psnr": psnr(output, case.target, np.ones_like(outside))}
    result.update(motion_error(case, output))
    result.update(temporal_consistency(case, output))
    return result


# -------------------------------------------------------------------------------------------- methods

Method = Callable[[EditCase], np.ndarray]


def copy_method(case: EditCase) -> np.ndarray:
    return case.source


def ground_truth_method(case: EditCase) -> np.ndarray:
    return case.target


def vae_method(vae) -> Method:
    """The target through the VAE: what a perfect DiT would give after decoding."""
    def run(case: EditCase) -> np.ndarray:
        from sama_core import video as vio
        x = vio.frames_to_vae_input(torch.from_numpy(case.target))
        return vio.vae_output_to_frames(vae.decode(vae.encode(x))).numpy()
    return run


def pipeline_method(pipe, options, edit_mask: bool = False, keep_unchanged: Optional[float] = None) -> Method:
    """The pipeline's edit. edit_mask: the user also paints the region to change (the case's edit mask grown
    by EDIT_MASK_GROW px, like a rough brush); outside it the output is the source (sama_core/region.py).
    keep_unchanged: the pipeline's threshold (EditSettings.keep_unchanged): what the edit left alone is the
    source's own pixels, found from the edit alone (no ground truth)."""
    def run(case: EditCase) -> np.ndarray:
        from sama_core.pipeline import EditSettings
        mask = None
        if edit_mask:
            grown = dilate(case.edit_mask, EDIT_MASK_GROW)
            if not grown.any():
                return case.source  # nothing may change
            mask = torch.from_numpy(grown).float()
        settings = EditSettings(keep_unchanged=keep_unchanged)
        edited, _ = pipe.edit_frames(torch.from_numpy(case.source), case.instruction, settings, options, mask=mask)
        return edited.numpy()
    return run


# ---------------------------------------------------------------------------------------- aggregation

def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(results: list[dict]) -> dict:
    """Means per edit kind and over all edits (accuracy over the judged edits only)."""
    def block(rows):
        judged = [r["success"] for r in rows if r.get("success") is not None]
        total_frames = sum(r["motion_frames"] for r in rows)
        visible_frames = sum(r.get("motion_visible_frames", 0) for r in rows)
        return {"edits": len(rows), "judged": len(judged),
                "accuracy": float(np.mean(judged)) if judged else None,
                "progress": _mean(r.get("progress") for r in rows),
                "iou": _mean(r.get("iou") for r in rows),
                "background_psnr": _mean(r["background_psnr"] for r in rows),
                "psnr": _mean(r["psnr"] for r in rows),
                "motion_error": _mean(r["motion_error"] for r in rows),
                "motion_lost": (sum(r["motion_lost"] for r in rows) / total_frames) if total_frames else None,
                "motion_position_error": _mean(r.get("motion_position_error") for r in rows),
                "motion_visible_error": _mean(r.get("motion_visible_error") for r in rows),
                "motion_visible_lost": (sum(r.get("motion_visible_lost", 0) for r in rows) / visible_frames)
                if visible_frames else None,
                "temporal_ratio": _mean(r["temporal_ratio"] for r in rows),
                "temporal_gap": _mean(r["temporal_gap"] for r in rows)}
    kinds = [k for k in EDIT_KINDS if any(r["kind"] == k for r in results)]
    styles = sorted({r["background_style"] for r in results if r.get("background_style")})
    by_style = {}
    for style in styles:
        judged = [r["success"] for r in results if r.get("background_style") == style and r.get("success") is not None]
        by_style[style] = {"judged": len(judged), "accuracy": float(np.mean(judged)) if judged else None}
    return {"all": block(results), **{k: block([r for r in results if r["kind"] == k]) for k in kinds},
            "by_background": by_style}


def _fmt(value, digits=2, percent=False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.{max(0, digits - 2)}f}%" if percent else f"{value:.{digits}f}"


def markdown_tables(summaries: dict[str, dict], header: str = "") -> str:
    methods = list(summaries)
    kinds = [k for k in EDIT_KINDS if any(k in s for s in summaries.values())]
    lines = [header] if header else []
    lines += ["| method | edit accuracy | " + " | ".join(kinds) + " | edit progress | shape IoU "
              "| background PSNR (dB) | motion error (px) | lost | temporal ratio | temporal gap (1/255) "
              "| PSNR (dB) |",
              "|---" * (len(kinds) + 10) + "|"]
    for m in methods:
        s = summaries[m]
        a = s["all"]
        lines.append(f"| {m} | {_fmt(a['accuracy'], 3, True)} | "
                     + " | ".join(_fmt(s.get(k, {}).get("accuracy"), 3, True) for k in kinds)
                     + f" | {_fmt(a['progress'])} | {_fmt(s.get('shape', {}).get('iou'))} | "
                       f"{_fmt(a['background_psnr'], 1)} | {_fmt(a['motion_error'])} | "
                       f"{_fmt(a['motion_lost'], 3, True)} | {_fmt(a['temporal_ratio'])} | "
                       f"{_fmt(a['temporal_gap'])} | {_fmt(a['psnr'], 1)} |")
    n = next(iter(summaries.values()))["all"]
    lines.append("")
    lines.append(f"{n['edits']} edits ({n['judged']} judged for accuracy). Edit accuracy per kind is the share "
                 "of successful edits; see train/eval.py for the definitions.")
    lines += ["", "Motion in parts: the motion error over all tracked frames (a lost frame counts "
              f"{LOST_ERROR:g} px), the position error where the object was found, and the motion error over "
              f"the frames where the object is clearly visible in the target (at least {VISIBLE_SHARE:.0%} of "
              "its most visible frame's pixels: no slivers of objects entering the frame or half hidden):", "",
              "| method | motion error (px) | lost | position error where found (px) | motion error, clearly "
              "visible (px) | lost, clearly visible |", "|---" * 6 + "|"]
    for m in methods:
        a = summaries[m]["all"]
        lines.append(f"| {m} | {_fmt(a['motion_error'])} | {_fmt(a['motion_lost'], 3, True)} | "
                     f"{_fmt(a.get('motion_position_error'))} | {_fmt(a.get('motion_visible_error'))} | "
                     f"{_fmt(a.get('motion_visible_lost'), 3, True)} |")
    lines += ["", "Motion error per edit kind (px; session 11: shape changes at the VAE's ceiling, the kinds "
              "that lose kept objects far above it):", "",
              "| method | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for m in methods:
        s = summaries[m]
        lines.append(f"| {m} | " + " | ".join(_fmt(s.get(k, {}).get("motion_error")) for k in kinds) + " |")
    lines += ["", "Kept objects lost where clearly visible, per edit kind (which edits lose the objects they "
              "should leave alone; session 10: recolourings and removals far more than shape changes):", "",
              "| method | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for m in methods:
        s = summaries[m]
        lines.append(f"| {m} | " + " | ".join(_fmt(s.get(k, {}).get("motion_visible_lost"), 3, True) for k in kinds)
                     + " |")
    styles = sorted({st for s in summaries.values() for st in s.get("by_background", {})})
    if styles:
        first = next(iter(summaries.values())).get("by_background", {})
        lines += ["", "Edit accuracy by the source's background style (judged edits per style: "
                  + ", ".join(f"{st} {first.get(st, {}).get('judged', 0)}" for st in styles) + "):", "",
                  "| method | " + " | ".join(styles) + " |", "|---" * (len(styles) + 1) + "|"]
        for m in methods:
            by = summaries[m].get("by_background", {})
            lines.append(f"| {m} | " + " | ".join(_fmt(by.get(st, {}).get("accuracy"), 3, True) for st in styles)
                         + " |")
    return "\n".join(lines) + "\n"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SamaInputError("train.eval draws its plots with matplotlib, which is not installed: "
                             "pip install -r requirements.txt (or pip install matplotlib)") from None


def plot(summaries: dict[str, dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(summaries)
    kinds = [k for k in EDIT_KINDS if any(k in s for s in summaries.values())] + ["all"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [3, 1, 1]})
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        values = [summaries[m].get(k, {}).get("accuracy") or 0.0 for k in kinds]
        axes[0].bar(np.arange(len(kinds)) + i * width, values, width, label=m)
    axes[0].set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_ylabel("edit accuracy")
    axes[0].legend(fontsize=8)
    for ax, key, label in ((axes[1], "background_psnr", "background PSNR (dB)"),
                           (axes[2], "motion_error", "motion error (px)")):
        ax.bar(range(len(methods)), [summaries[m]["all"][key] or 0.0 for m in methods],
               color=[f"C{i}" for i in range(len(methods))])
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def examples_image(cases: list[EditCase], outputs: dict[str, list[np.ndarray]], path: Path,
                   scale: int = 3) -> Path:
    """One row per case: source | each method | target, every 4th frame, upscaled with crisp pixels."""
    from PIL import Image
    rows = []
    for c, case in enumerate(cases):
        strips = [case.source] + [outputs[m][c] for m in outputs] + [case.target]
        frames = [np.concatenate([s[k] for k in range(0, s.shape[0], 4)], axis=1) for s in strips]  # (H, W*, 3)
        gap = np.ones((frames[0].shape[0], 2, 3), np.float32)
        rows.append(np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1))
    sep = np.ones((2, rows[0].shape[1], 3), np.float32)
    grid = np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0)
    image = Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path


# --------------------------------------------------------------------------------------------- driver

@dataclasses.dataclass
class EvalReport:
    summaries: dict            # method -> summarize(...)
    results: dict              # method -> [per-edit dicts]
    seconds: dict              # method -> wall seconds spent producing its outputs
    files: dict                # name -> path


def evaluate(methods: dict[str, Method], rows: list[dict], out_dir=None, examples: int = 1,
             progress: bool = False) -> EvalReport:
    """Run every method on every case and score it; with out_dir, write the tables, plots and examples."""
    results = {m: [] for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    shown: dict[str, int] = {}
    example_cases, example_outputs = [], {m: [] for m in methods}
    for n, row in enumerate(rows):
        case = load_case(row)
        keep = shown.get(case.kind, 0) < examples
        if keep:
            shown[case.kind] = shown.get(case.kind, 0) + 1
            example_cases.append(case)
        for name, method in methods.items():
            t0 = time.perf_counter()
            output = np.asarray(method(case), dtype=np.float32)
            seconds[name] += time.perf_counter() - t0
            results[name].append(score(case, output))
            if keep:
                example_outputs[name].append(output)
        if progress and (n + 1) % 25 == 0:
            log.info("%d / %d edits evaluated", n + 1, len(rows))
    summaries = {m: summarize(r) for m, r in results.items()}
    files = {}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if example_cases:
            files["examples"] = examples_image(example_cases, example_outputs, out / "examples.png")
        files.update(write_report(out, results, seconds, summaries))
    return EvalReport(summaries, results, seconds, files)


def write_report(out: Path, results: dict, seconds: dict, summaries: dict) -> dict[str, Path]:
    """per_edit.jsonl, metrics.json, accuracy.png and results.md of an evaluation into `out`."""
    with (out / "per_edit.jsonl").open("w") as f:
        for m, rs in results.items():
            for r in rs:
                f.write(json.dumps({"method": m, **r}) + "\n")
    metrics = {"summaries": summaries, "seconds": seconds}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    files = {"plot": plot(summaries, out / "accuracy.png")}
    # results.md last: its presence marks a complete evaluation (the orchestrator skips on it).
    text = markdown_tables(summaries, "# SAMA-Shapes evaluation\n")
    text += "\n" + "\n".join(f"- {m}: {seconds[m]:.1f} s for {len(results[m])} edits" for m in results) + "\n"
    tmp = out / ".results.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "results.md")
    return files | {"metrics": out / "metrics.json", "table": out / "results.md", "per_edit": out / "per_edit.jsonl"}


def merge_evaluations(parts: list, out) -> EvalReport:
    """Evaluations of disjoint parts of one held-out set (e.g. two processes with --kinds color,shape,remove
    and --kinds add,background) -> one report over all their edits, as if evaluated at once (the tables and
    metrics are recomputed from the per-edit scores; examples.png is not, since the outputs are not kept)."""
    results: dict[str, list] = {}
    seconds: dict[str, float] = {}
    methods_of_first, seen = None, set()
    for part in map(Path, parts):
        if not (part / "results.md").is_file():
            raise SamaInputError(f"--merge {part}: not a finished evaluation (no results.md): let it finish first")
        rows = [json.loads(line) for line in (part / "per_edit.jsonl").read_text().splitlines() if line]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        if methods_of_first is None:
            methods_of_first = methods
        elif sorted(methods) != sorted(methods_of_first):
            raise SamaInputError(f"--merge {part} has the rows {methods}, the first part {methods_of_first}: "
                                 "merge evaluations of the same methods")
        for r in rows:
            key = (r["method"], r["id"])
            if key in seen:
                raise SamaInputError(f"--merge: edit {r['id']} of {r['method']!r} is in two parts; give parts "
                                     "with disjoint edits (e.g. different --kinds)")
            seen.add(key)
            results.setdefault(r.pop("method"), []).append(r)
        for m, value in json.loads((part / "metrics.json").read_text()).get("seconds", {}).items():
            seconds[m] = seconds.get(m, 0.0) + value
    if not results:
        raise SamaInputError("--merge: the parts hold no scored edits")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {m: summarize(r) for m, r in results.items()}
    return EvalReport(summaries, results, seconds, write_report(out, results, seconds, summaries))


def row_name(name: str, guidance: Optional[float], sweep: bool,
             denoise: Optional[float] = None, denoise_sweep: bool = False) -> str:
    """The row name: "NAME", "NAME (guidance G)", "NAME (denoise D)" or "NAME (guidance G, denoise D)"
    (a value is named only when that setting is swept)."""
    parts = ([f"guidance {guidance:g}"] if sweep else []) + ([f"denoise {denoise:g}"] if denoise_sweep else [])
    return f"{name} ({', '.join(parts)})" if parts else name


def bundle_methods(bundle, extra_dits: dict[str, str], steps: Optional[int], seed: int, name: str,
                   baselines: list[str], guidances: tuple = (None,),
                   extra_vaes: Optional[dict[str, str]] = None, shift: Optional[float] = None,
                   denoises: tuple = (None,), edit_mask: bool = False,
                   flowedit_skips: tuple = (), keep_unchanged: tuple = ()) -> dict[str, Method]:
    """The methods to evaluate. guidances: the bundle's default (None) or given values; with more than one,
    every model gets a row per value ("NAME (guidance G)"), e.g. to choose the bundle's default on a
    validation set (a held-out split drawn with another seed) rather than on the test set.
    extra_vaes: other VAE files for the bundle's DiT (e.g. a decoder from train.vae_train's trainable:
    decoder): a row "NAME" each, and with the 'vae' baseline a "VAE(target) NAME" row each.
    steps / shift: the sampler's (None: the bundle's defaults). denoises: like guidances, for the sampler's
    denoise (< 1 starts from the source latents noised to that point of the schedule instead of pure noise).
    edit_mask: every model row also gets a "ROW + edit mask" row, the same edit with the ground-truth edit
    region given as the user's mask. flowedit_skips: every model row also gets a "ROW + FlowEdit (skip K)"
    row per value, the same edit sampled with FlowEdit (sama_core/flowedit.py) skipping the first K sigmas,
    and for "off" a "ROW (released sampler)" row, FlowEdit off whatever the bundle's default. keep_unchanged:
    every model row also gets a "ROW + keep unchanged T" row per threshold T (EditSettings.keep_unchanged)."""
    from sama_core.pipeline import SamaPipeline
    methods: dict[str, Method] = {}
    pipe = None
    sweep, denoise_sweep = len(guidances) > 1, len(denoises) > 1
    extra_vaes = extra_vaes or {}
    if bundle is not None:
        pipe = SamaPipeline.from_bundle(bundle, device="cpu", dtype="fp32")
        models = {name: pipe}
        for extra, dit in extra_dits.items():
            models[extra] = SamaPipeline.from_bundle(bundle, device="cpu", dtype="fp32", dit=dit)
        for extra, vae in extra_vaes.items():
            if extra in models:
                raise SamaInputError(f"--extra-vae {extra!r}: that name is already a row (the bundle's --name or "
                                     "an --extra-dit); give the VAE another name")
            models[extra] = SamaPipeline.from_bundle(bundle, device="cpu", dtype="fp32", vae=vae)
        for row, model in models.items():
            for guidance in guidances:
                for denoise in denoises:
                    options = model.sampler_options(steps=steps, seed=seed, guidance=guidance, shift=shift,
                                                    denoise=denoise)
                    name = row_name(row, guidance, sweep, denoise, denoise_sweep)
                    methods[name] = pipeline_method(model, options)
                    if edit_mask:
                        methods[name + EDIT_MASK_SUFFIX] = pipeline_method(model, options, edit_mask=True)
                    for threshold in keep_unchanged:
                        methods[f"{name}{KEEP_UNCHANGED_SUFFIX} {threshold:g}"] = pipeline_method(
                            model, options, keep_unchanged=threshold)
                    for skip in flowedit_skips:
                        if skip == FLOWEDIT_OFF:
                            released = dataclasses.replace(options, flowedit=False)
                            methods[name + RELEASED_SAMPLER_SUFFIX] = pipeline_method(model, released)
                            continue
                        flow = dataclasses.replace(options, flowedit=True, flowedit_skip=skip)
                        methods[f"{name}{FLOWEDIT_SUFFIX} (skip {skip})"] = pipeline_method(model, flow)
    elif extra_dits or extra_vaes:
        raise SamaInputError("--extra-dit / --extra-vae need --bundle (for the other components)")
    for baseline in baselines:
        if baseline == "copy":
            methods[COPY_ROW] = copy_method
        elif baseline == "ground_truth":
            methods[GROUND_TRUTH_ROW] = ground_truth_method
        elif baseline == "vae":
            if pipe is None:
                raise SamaInputError("the 'vae' baseline needs --bundle (its VAE)")
            methods[f"{VAE_ROW} ceiling"] = vae_method(pipe.vae)
            for extra in extra_vaes:
                methods[f"{VAE_ROW} {extra}"] = vae_method(models[extra].vae)
        else:
            raise SamaInputError(f"unknown baseline {baseline!r}; choose from copy, ground_truth, vae")
    if not methods:
        raise SamaInputError("nothing to evaluate: give --bundle and/or --baselines")
    return methods


def parse_named_files(items: list[str], option: str) -> dict[str, str]:
    """["NAME=FILE", ...] -> {NAME: FILE}; a name may not repeat (its rows would overwrite each other)."""
    named = {}
    for item in items:
        if "=" not in item:
            raise SamaInputError(f"{option} {item!r} must look like NAME=FILE")
        key, value = item.split("=", 1)
        if key in named:
            raise SamaInputError(f"{option}: the name {key!r} is given twice; give each file its own name")
        named[key] = value
    return named


def parse_values(text: Optional[str], option: str, valid: Callable[[float], bool], rule: str, example: str) -> tuple:
    """A comma list of numbers for a sweep option -> a tuple; None -> (None,) (the bundle's default)."""
    if text is None:
        return (None,)
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and valid(value)):
            raise SamaInputError(f"{option} takes {rule} separated by commas, e.g. {example}; got {text!r}")
        values.append(value)
    if len(set(values)) != len(values):
        raise SamaInputError(f"{option} lists a value twice: {text!r}")
    return tuple(values)


def parse_guidances(text: Optional[str]) -> tuple:
    """--guidance "2" or "1.5,2,3" -> (2.0,) / (1.5, 2.0, 3.0); None -> (None,) (the bundle's default)."""
    return parse_values(text, "--guidance", lambda v: v >= 0, "numbers >= 0", "1.5,2,3")


def parse_flowedit_skips(text: Optional[str]) -> tuple:
    """--flowedit "off,2,4" -> ("off", 2, 4): a row per value ("off": the released sampler); None -> ()."""
    if text is None:
        return ()
    items = [item.strip() for item in text.split(",")]
    off = (FLOWEDIT_OFF,) if FLOWEDIT_OFF in items else ()
    numbers = ",".join(item for item in items if item != FLOWEDIT_OFF)
    values = parse_values(numbers, "--flowedit", lambda v: v >= 0 and v == int(v),
                          f"'{FLOWEDIT_OFF}' and/or whole numbers >= 0", "off,2,4") if numbers else ()
    if items.count(FLOWEDIT_OFF) > 1:
        raise SamaInputError(f"--flowedit lists a value twice: {text!r}")
    return off + tuple(int(v) for v in values)


def parse_keep_unchanged(text: Optional[str]) -> tuple:
    """--keep-unchanged "0,0.2" -> (0.0, 0.2); None -> () (no such rows). 0 is off: the row without it when the
    bundle keeps unchanged pixels by default (SAMA-Shapes)."""
    if text is None:
        return ()
    return parse_values(text, "--keep-unchanged", lambda v: 0 <= v <= 1, "numbers in [0, 1] (0 = off)", "0,0.2,0.3")


def parse_denoises(text: Optional[str]) -> tuple:
    """--denoise "1,0.5,0.3" -> (1.0, 0.5, 0.3); None -> (None,) (the bundle's default, 1 unless it sets one)."""
    return parse_values(text, "--denoise", lambda v: 0 < v <= 1, "numbers in (0, 1]", "1,0.5,0.3")


@command_line("interrupted: nothing was written; run the same command again (an evaluation starts over)")
def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="model bundle folder (bundle.json)")
    parser.add_argument("--data", default=None, help="held-out SAMA-Shapes folder (ground_truth.jsonl)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="EVAL",
                        help="instead of evaluating: merge finished evaluations of disjoint parts of one set "
                             "(e.g. two processes with different --kinds) into --out")
    parser.add_argument("--out", default=None, help="output folder (default: DATA/../eval)")
    parser.add_argument("--name", default="SAMA-Shapes", help="the bundle's row name")
    parser.add_argument("--extra-dit", action="append", default=[], metavar="NAME=FILE",
                        help="another DiT with the bundle's encoders (e.g. 'stage 0 only=runs/shapes/stage0/"
                             "final/sama_dit.safetensors'); repeatable")
    parser.add_argument("--extra-vae", action="append", default=[], metavar="NAME=FILE",
                        help="another VAE file for the bundle's DiT (a decoder trained behind the bundle's "
                             "frozen encoder: train/configs/shapes_vae_decoder.yaml); repeatable")
    parser.add_argument("--baselines", default="copy,ground_truth", help="comma list of copy, ground_truth, vae")
    parser.add_argument("--limit", type=int, default=None, help="first N held-out clips (each has 5 edits)")
    parser.add_argument("--kinds", default=",".join(EDIT_KINDS), help="edit kinds to evaluate")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the bundle's)")
    parser.add_argument("--shift", type=float, default=None,
                        help="the flow-matching schedule's shift (default: the bundle's); lower spends more of "
                             "the steps at low noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", default=None, metavar="G[,G...]",
                        help="guidance scale (default: the bundle's); several values give a row per value")
    parser.add_argument("--denoise", default=None, metavar="D[,D...]",
                        help="sampler denoise in (0, 1] (default: the bundle's, else 1 = from pure noise; lower "
                             "starts from the noised source); several values give a row per value")
    parser.add_argument("--edit-mask", action="store_true",
                        help="also evaluate every model row with the edit region given as the user's mask (the "
                             "ground-truth edit mask grown by 2 px): rows 'NAME + edit mask'")
    parser.add_argument("--keep-unchanged", default=None, metavar="T[,T...]",
                        help="also evaluate every model row with the pipeline's keep-unchanged threshold T (what "
                             "the edit changed by less than T/2 is the source's own pixels; no ground truth; 0 = "
                             "off, where the bundle has it on by default): rows 'NAME + keep unchanged T'")
    parser.add_argument("--flowedit", default=None, metavar="K[,K...]",
                        help="also evaluate every model row sampled with FlowEdit, skipping the first K sigmas "
                             "(2 is the sampler's default): rows 'NAME + FlowEdit (skip K)'; 'off': a row with "
                             "the released sampler, 'NAME (released sampler)' (SAMA-Shapes defaults to FlowEdit)")
    parser.add_argument("--train-data", default=None, help="training folder: check no held-out scene is in it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    require_matplotlib()  # before minutes of sampling, not at the end when the plots are drawn
    if args.merge:
        if not args.out:
            raise SamaInputError("--merge needs --out: the folder for the merged evaluation")
        report = merge_evaluations(args.merge, args.out)
        print(markdown_tables(report.summaries))
        print(f"merged {len(args.merge)} evaluations into {args.out}")
        return 0
    if args.data is None:
        raise SamaInputError("--data is needed: a held-out SAMA-Shapes folder (ground_truth.jsonl)")
    if args.limit is not None and args.limit < 1:
        raise SamaInputError(f"--limit must be at least 1, got {args.limit}")
    if args.steps is not None and args.steps < 1:
        raise SamaInputError(f"--steps must be at least 1, got {args.steps}")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise SamaInputError(f"--shift must be a positive number (the bundle uses 5), got {args.shift}")
    extra, extra_vaes = parse_named_files(args.extra_dit, "--extra-dit"), parse_named_files(args.extra_vae,
                                                                                          "--extra-vae")
    if args.train_data:
        print(f"held-out scenes: {check_disjoint(args.data, args.train_data)}, none in {args.train_data}")
    rows = read_cases(args.data, args.limit, [k.strip() for k in args.kinds.split(",") if k.strip()])
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    methods = bundle_methods(args.bundle, extra, args.steps, args.seed, args.name, baselines,
                             parse_guidances(args.guidance), extra_vaes, args.shift,
                             parse_denoises(args.denoise), args.edit_mask, parse_flowedit_skips(args.flowedit),
                             parse_keep_unchanged(args.keep_unchanged))
    out = Path(args.out) if args.out else Path(args.data).resolve().parent / "eval"
    report = evaluate(methods, rows, out, progress=True)
    print(markdown_tables(report.summaries))
    for name, path in report.files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
