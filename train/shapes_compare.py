"""The toy reproduction's table and plot: several SAMA-Shapes runs (the full recipe and its ablations) side by
side, from what each run's eval and curve stages wrote.

    python -m train.shapes compare --runs runs/shapes runs/shapes_no_sa runs/shapes_no_ma --out docs/sama_shapes_results

Reads per run: run.json (variant), eval/metrics.json (the bundle's row, its stage-0-only row, and the
baselines where that run evaluated them), curves/curves.json (edit accuracy per kept checkpoint, optional) and
stage0|stage1/logs/metrics.jsonl (training losses). Writes OUT/results.md, OUT/compare.json and
OUT/convergence.png. Nothing is recomputed here: the numbers are the runs' own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from sama_core.errors import SamaFileNotFoundError, SamaInputError

from .eval import COPY_ROW, GROUND_TRUTH_ROW, VAE_ROW

ARMS = {"full": "(a) full SAMA", "no_sa": "(b) without semantic anchoring", "no_ma": "(c) without motion alignment"}
STAGE0_ARMS = {"full": "(d) stage 0 only (zero-shot)", "no_sa": "(b) stage 0 only", "no_ma": "(c) stage 0 only"}
MODEL_ROW = "SAMA-Shapes"
STAGE0_ROW = "stage 0 only (zero-shot)"
BASELINE_ROWS = (COPY_ROW, f"{VAE_ROW} ceiling", GROUND_TRUTH_ROW)


def read_run(folder: Path) -> dict:
    """A run's variant, evaluation summaries, checkpoint curve and training losses."""
    folder = Path(folder)
    state_file, metrics_file = folder / "run.json", folder / "eval" / "metrics.json"
    if not state_file.exists():
        raise SamaFileNotFoundError(f"{folder} is not a SAMA-Shapes run (no run.json)")
    if not metrics_file.exists():
        raise SamaFileNotFoundError(f"{folder} has no evaluation yet ({metrics_file} is missing): finish it with "
                                    f"`python -m train.shapes run --out {folder}`")
    state = json.loads(state_file.read_text())
    curves_file = folder / "curves" / "curves.json"
    losses = {}
    for stage in ("stage0", "stage1"):
        path = folder / stage / "logs" / "metrics.jsonl"
        if path.exists():
            losses[stage] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"folder": str(folder), "variant": state["variant"], "budget": state["budget"],
            "summaries": json.loads(metrics_file.read_text())["summaries"],
            "curve": json.loads(curves_file.read_text())["points"] if curves_file.exists() else [],
            "losses": losses}


def arm_rows(runs: list[dict]) -> dict[str, dict]:
    """Summaries renamed to the reproduction's arms, in the order (a), (b), (c), (d), then the baselines."""
    variants = [r["variant"] for r in runs]
    if len(set(variants)) != len(variants):
        raise SamaInputError(f"--runs: each variant once, got {variants}")
    if len({r["budget"] for r in runs}) != 1:
        raise SamaInputError(f"--runs: the arms must share one budget, got {sorted({r['budget'] for r in runs})}")
    rows, stage0_rows = {}, {}
    for run in sorted(runs, key=lambda r: list(ARMS).index(r["variant"])):
        rows[ARMS[run["variant"]]] = run["summaries"][MODEL_ROW]
        if STAGE0_ROW in run["summaries"]:
            stage0_rows[STAGE0_ARMS[run["variant"]]] = run["summaries"][STAGE0_ROW]
    rows.update(stage0_rows)  # in the arms' order, so (d), the full run's, comes first
    for name in BASELINE_ROWS:
        for run in runs:
            if name in run["summaries"]:
                rows[name] = run["summaries"][name]
                break
    return rows


def steps_to_reach(curve: list[dict], stage: str, accuracy: float) -> Optional[int]:
    """The first kept checkpoint of `stage` whose edit accuracy is at least `accuracy` (None: never)."""
    for point in sorted((p for p in curve if p["stage"] == stage), key=lambda p: p["step"]):
        if point["accuracy"] >= accuracy:
            return point["step"]
    return None


def smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing mean over `window` logged values (the logged losses are single batches: noisy)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot_convergence(runs: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for i, run in enumerate(runs):
        label, color = ARMS[run["variant"]], f"C{i}"
        for ax, stage in ((axes[0], "stage0"), (axes[1], "stage1")):
            rows = run["losses"].get(stage, [])
            ax.plot([r["step"] for r in rows], smooth([r["loss_video"] for r in rows]), color=color, label=label)
        for stage, style in (("stage0", "--"), ("stage1", "-")):
            pts = sorted((p for p in run["curve"] if p["stage"] == stage), key=lambda p: p["step"])
            if pts:
                axes[2].plot([p["step"] for p in pts], [p["accuracy"] for p in pts], style, marker="o", color=color,
                             label=f"{label}, {stage}")
    for ax, title in ((axes[0], "stage 0 video loss"), (axes[1], "stage 1 video loss")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    axes[2].set_title("held-out edit accuracy of the kept checkpoints")
    axes[2].set_xlabel("step of the stage")
    axes[2].set_ylim(0, 1)
    if any(run["curve"] for run in runs):
        axes[2].legend(fontsize=7)
    else:
        axes[2].text(0.5, 0.5, "no curves yet:\npython -m train.shapes curve --out RUN", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def claims(runs: list[dict], rows: dict[str, dict]) -> list[str]:
    """The paper's three claims as measured numbers (stated, not judged: the docs say what they mean)."""
    by_variant = {r["variant"]: r for r in runs}
    out = []
    d, copy = rows.get(STAGE0_ARMS["full"]), rows.get(BASELINE_ROWS[0])
    if d is not None:
        out.append(f"- zero-shot editing after stage 0: (d) edit accuracy {100 * d['all']['accuracy']:.1f}%, edit "
                   f"progress {d['all']['progress']:.2f}"
                   + (f" (copy: {100 * copy['all']['accuracy']:.1f}%, {copy['all']['progress']:.2f})" if copy else ""))
    if "full" in by_variant and "no_sa" in by_variant:
        a, b = by_variant["full"], by_variant["no_sa"]
        line = (f"- semantic anchoring and convergence: final stage-1 accuracy (a) "
                f"{100 * rows[ARMS['full']]['all']['accuracy']:.1f}% vs (b) {100 * rows[ARMS['no_sa']]['all']['accuracy']:.1f}%")
        if a["curve"] and b["curve"]:
            best_b = max((p["accuracy"] for p in b["curve"] if p["stage"] == "stage1"), default=0.0)
            target = 0.9 * best_b
            line += (f"; stage-1 steps to reach {100 * target:.0f}% (90% of (b)'s best): (a) "
                     f"{steps_to_reach(a['curve'], 'stage1', target)}, (b) {steps_to_reach(b['curve'], 'stage1', target)}")
        out.append(line)
    if "full" in by_variant and "no_ma" in by_variant:
        a, c = rows[ARMS["full"]]["all"], rows[ARMS["no_ma"]]["all"]
        out.append(f"- motion alignment and motion: motion error (a) {a['motion_error']:.2f} px vs (c) "
                   f"{c['motion_error']:.2f} px; temporal gap (a) {a['temporal_gap']:.2f} vs (c) {c['temporal_gap']:.2f}; "
                   f"edit accuracy (a) {100 * a['accuracy']:.1f}% vs (c) {100 * c['accuracy']:.1f}%")
    return out


def compare(run_folders: list, out: Path) -> Path:
    from .eval import markdown_tables
    if not run_folders:
        raise SamaInputError("--runs: give at least one run folder")
    runs = [read_run(Path(f)) for f in run_folders]
    rows = arm_rows(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_convergence(runs, out / "convergence.png")
    lines = ["# SAMA-Shapes toy reproduction", "",
             f"Runs: {', '.join(r['folder'] for r in runs)} (budget {runs[0]['budget']}).", "",
             markdown_tables(rows), "## The claims, measured", "", *claims(runs, rows), "",
             "![convergence](convergence.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    (out / "compare.json").write_text(json.dumps({"runs": [r["folder"] for r in runs], "rows": rows,
                                                  "curves": {r["variant"]: r["curve"] for r in runs}}, indent=1) + "\n")
    return out / "results.md"
