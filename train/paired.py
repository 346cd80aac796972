"""Paired comparison of two SAMA-Shapes evaluations: which model is better on the same edits, and by how much.

    python -m train.paired runs/eval_old runs/eval_new [--base-method NAME] [--new-method NAME] [--out paired.md]

Each argument is a `python -m train.eval` output folder (or its per_edit.jsonl). Both must have scored the same
held-out edits; the comparison uses the edits both have (matched by id) and says how many that is.

Why paired: two models evaluated on the same 100-200 edits differ far less from each other than either
differs across edits, so the unpaired tables (each mean with its own spread) hide real differences that the
per-edit differences show. For each metric this reports the mean of (new - base) over the edits and its
standard error (sd / sqrt(n)): a difference of two or more standard errors is unlikely to be noise of this
edit sample (it says nothing about the noise of training: one seed per model).

Metrics, per edit (train/eval.py defines them): edit accuracy (judged edits, 0/1, in points), edit progress,
motion error (px, edits with kept objects), motion error on clearly visible frames, the share of kept-object
frames lost, background PSNR (dB; 100 = identical).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from sama_core.errors import SamaInputError

from .eval import COPY_ROW, GROUND_TRUTH_ROW, VAE_ROW
from .synthetic import EDIT_KINDS

PER_EDIT = "per_edit.jsonl"
# Rows train.eval adds next to the models: never the one to compare unless asked for by name.
BASELINE_PREFIXES = (COPY_ROW, GROUND_TRUTH_ROW, VAE_ROW)


@dataclass(frozen=True)
class Metric:
    name: str
    value: Callable[[dict], Optional[float]]   # one edit's value, None where it has none
    higher_is_better: bool
    unit: str
    scale: float = 1.0                         # shown as value x scale (accuracy 0/1 in points)


def _lost_share(row: dict) -> Optional[float]:
    frames = row.get("motion_frames") or 0
    return row["motion_lost"] / frames if frames else None


def _success(row: dict) -> Optional[float]:
    return None if row.get("success") is None else float(row["success"])


METRICS = (
    Metric("edit accuracy", _success, True, "points", 100.0),
    Metric("edit progress", lambda r: r.get("progress"), True, ""),
    Metric("motion error", lambda r: r.get("motion_error"), False, "px"),
    Metric("motion error, clearly visible", lambda r: r.get("motion_visible_error"), False, "px"),
    Metric("kept-object frames lost", _lost_share, False, "%", 100.0),
    Metric("background PSNR", lambda r: r.get("background_psnr"), True, "dB"),
)


@dataclass
class Difference:
    metric: Metric
    edits: int
    base: float                # mean over the paired edits
    new: float
    mean: float                # mean of new - base
    stderr: Optional[float]    # None with fewer than 2 edits
    better: int                # edits where new is better than base
    worse: int


def read_per_edit(path) -> dict[str, list[dict]]:
    """{method: [per-edit rows]} from an eval folder or its per_edit.jsonl."""
    path = Path(path)
    file = path / PER_EDIT if path.is_dir() else path
    if not file.is_file():
        raise SamaInputError(f"{path}: no {PER_EDIT} there; give a `python -m train.eval --out` folder "
                             f"(it writes {PER_EDIT}) or the file itself")
    methods: dict[str, list[dict]] = {}
    for n, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            method, _ = row["method"], row["id"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SamaInputError(f"{file}:{n}: not a train.eval per-edit row ({e}); was the file written by "
                                 "`python -m train.eval`?") from None
        methods.setdefault(method, []).append(row)
    if not methods:
        raise SamaInputError(f"{file} is empty: the evaluation wrote no edits")
    return methods


def pick_method(methods: dict[str, list[dict]], wanted: Optional[str], where, option: str) -> str:
    """The method named `wanted`, or the only one that is not a baseline row."""
    if wanted is not None:
        if wanted not in methods:
            raise SamaInputError(f"{where} has no method {wanted!r} ({option}); it has {sorted(methods)}")
        return wanted
    models = [m for m in methods if not m.startswith(BASELINE_PREFIXES)]
    if len(models) != 1:
        raise SamaInputError(f"{where} holds {len(models)} model rows {models} (baselines aside: "
                             f"{sorted(set(methods) - set(models))}); say which with {option} NAME")
    return models[0]


def paired_differences(base_rows: list[dict], new_rows: list[dict]) -> tuple[list[Difference], int]:
    """Each metric's paired difference over the edits both have; also the number of edits both have."""
    base = {r["id"]: r for r in base_rows}
    new = {r["id"]: r for r in new_rows}
    ids = [i for i in base if i in new]
    if not ids:
        raise SamaInputError("the two evaluations share no edit (ids differ): evaluate both models on the same "
                             "--data, with the same --limit and --kinds")
    out = []
    for metric in METRICS:
        pairs = [(metric.value(base[i]), metric.value(new[i])) for i in ids]
        pairs = [(b, n) for b, n in pairs if b is not None and n is not None]
        if not pairs:
            continue
        deltas = [n - b for b, n in pairs]
        mean = sum(deltas) / len(deltas)
        stderr = (math.sqrt(sum((d - mean) ** 2 for d in deltas) / (len(deltas) - 1) / len(deltas))
                  if len(deltas) > 1 else None)
        sign = 1 if metric.higher_is_better else -1
        out.append(Difference(metric, len(pairs), sum(b for b, _ in pairs) / len(pairs),
                              sum(n for _, n in pairs) / len(pairs), mean, stderr,
                              sum(1 for d in deltas if sign * d > 0), sum(1 for d in deltas if sign * d < 0)))
    return out, len(ids)


def accuracy_per_kind(base_rows: list[dict], new_rows: list[dict]) -> list[tuple[str, int, int, int]]:
    """(kind, judged edits both have, base successes, new successes) per edit kind."""
    new = {r["id"]: r for r in new_rows}
    counts = {}
    for b in base_rows:
        n = new.get(b["id"])
        if n is None or b.get("success") is None or n.get("success") is None:
            continue
        c = counts.setdefault(b["kind"], [0, 0, 0])
        c[0] += 1
        c[1] += int(b["success"])
        c[2] += int(n["success"])
    order = [k for k in EDIT_KINDS if k in counts] + sorted(set(counts) - set(EDIT_KINDS))
    return [(k, *counts[k]) for k in order]


def _num(value: float, metric: Metric, signed: bool = False) -> str:
    v = value * metric.scale
    digits = 1 if metric.scale != 1.0 or metric.unit == "dB" else 2
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def markdown(base_name: str, new_name: str, diffs: list[Difference], shared: int,
             per_kind: list[tuple[str, int, int, int]]) -> str:
    lines = [f"# Paired comparison: {new_name} against {base_name}", "",
             f"{shared} edits scored by both. Difference = new - base, mean over the edits that have the metric, "
             "+- its standard error.", "",
             "| metric | edits | base | new | difference | new better / worse |",
             "|---|---|---|---|---|---|"]
    for d in diffs:
        m = d.metric
        unit = f" {m.unit}" if m.unit else ""
        err = "" if d.stderr is None else f" +- {_num(d.stderr, m)}"
        lines.append(f"| {m.name} | {d.edits} | {_num(d.base, m)} | {_num(d.new, m)} | "
                     f"{_num(d.mean, m, signed=True)}{err}{unit} | {d.better} / {d.worse} |")
    if per_kind:
        lines += ["", "Edit accuracy per kind (successes / judged edits):", "",
                  "| kind | base | new |", "|---|---|---|"]
        lines += [f"| {k} | {b} / {n} | {w} / {n} |" for k, n, b, w in per_kind]
    return "\n".join(lines) + "\n"


def compare(base_path, new_path, base_method: Optional[str] = None, new_method: Optional[str] = None) -> str:
    """The markdown report of `python -m train.paired`."""
    base_methods, new_methods = read_per_edit(base_path), read_per_edit(new_path)
    b = pick_method(base_methods, base_method, base_path, "--base-method")
    n = pick_method(new_methods, new_method, new_path, "--new-method")
    diffs, shared = paired_differences(base_methods[b], new_methods[n])
    return markdown(b, n, diffs, shared, accuracy_per_kind(base_methods[b], new_methods[n]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.paired", description=__doc__.split("\n")[0])
    parser.add_argument("base", help="the reference: a train.eval output folder or its per_edit.jsonl")
    parser.add_argument("new", help="the model to judge against it, on the same edits")
    parser.add_argument("--base-method", default=None, help="row name in BASE (default: its only model row)")
    parser.add_argument("--new-method", default=None, help="row name in NEW (default: its only model row)")
    parser.add_argument("--out", default=None, help="also write the report to this markdown file")
    args = parser.parse_args(argv)
    try:
        text = compare(args.base, args.new, args.base_method, args.new_method)
    except SamaInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
