"""`python -m train.paired`: paired differences of two train.eval runs, against numpy on the per-edit scores."""

import json

import numpy as np
import pytest

from sama_core.errors import SamaInputError
from train import eval as ev
from train import paired
from train.synthetic import write_dataset


@pytest.fixture(scope="module")
def two_evals(tmp_path_factory):
    """Two eval folders over the same 10 held-out edits: 'old' copies the source (next to the copy baseline
    row), 'new' gives the ground truth for colour and removal edits and the source for the others."""
    data = tmp_path_factory.mktemp("heldout")
    write_dataset(data, 2, seed=3, split="heldout", video_format="npz", image_pairs=False)
    rows = ev.read_cases(data)
    old_dir, new_dir = tmp_path_factory.mktemp("old"), tmp_path_factory.mktemp("new")

    def partly_right(case):
        return case.target if case.kind in ("color", "remove") else case.source
    old = ev.evaluate({"old": ev.copy_method, "copy (output = source)": ev.copy_method}, rows, old_dir, examples=0)
    new = ev.evaluate({"new": partly_right}, rows, new_dir, examples=0)
    return old_dir, new_dir, old.results["old"], new.results["new"]


def _expected(old_rows, new_rows, value, scale=1.0):
    pairs = [(value(a), value(b)) for a, b in zip(old_rows, new_rows, strict=True)]
    d = np.array([b - a for a, b in pairs if a is not None and b is not None], dtype=np.float64) * scale
    return len(d), d.mean(), d.std(ddof=1) / np.sqrt(len(d))


def test_paired_report_matches_numpy_on_the_per_edit_scores(two_evals, tmp_path, capsys):
    old_dir, new_dir, old_rows, new_rows = two_evals
    out = tmp_path / "paired.md"
    assert paired.main([str(old_dir), str(new_dir), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    assert text.startswith("# Paired comparison: new against old")
    assert f"{len(old_rows)} edits scored by both" in text

    n, mean, se = _expected(old_rows, new_rows, lambda r: None if r.get("success") is None else float(r["success"]),
                            100.0)
    assert mean > 0  # the colour and removal edits succeed now
    assert f"| edit accuracy | {n} |" in text and f"| {mean:+.1f} +- {se:.1f} points |" in text
    n, mean, se = _expected(old_rows, new_rows, lambda r: r.get("motion_error"))
    assert f"| motion error | {n} |" in text and f"| {mean:+.2f} +- {se:.2f} px |" in text
    n, mean, se = _expected(old_rows, new_rows, lambda r: r["background_psnr"])
    assert f"| {mean:+.1f} +- {se:.1f} dB |" in text
    # wins and losses of accuracy: every colour/removal edit the copy failed and the target passed
    won = sum(1 for a, b in zip(old_rows, new_rows) if b.get("success") and a.get("success") is False)
    assert f"| {won} / 0 |" in text.split("| edit accuracy |")[1].split("\n")[0]
    kinds = text.split("Edit accuracy per kind")[1]
    color = [r for r in new_rows if r["kind"] == "color" and r.get("success") is not None]
    assert f"| color | 0 / {len(color)} | {sum(r['success'] for r in color)} / {len(color)} |" in kinds
    # the same folders the other way round: the differences change sign
    assert paired.main([str(new_dir), str(old_dir), "--base-method", "new", "--new-method", "old"]) == 0
    n, mean, se = _expected(new_rows, old_rows, lambda r: r.get("motion_error"))
    assert f"| {mean:+.2f} +- {se:.2f} px |" in capsys.readouterr().out


def test_only_shared_edits_are_paired(two_evals, tmp_path):
    old_dir, new_dir, old_rows, new_rows = two_evals
    lines = (new_dir / "per_edit.jsonl").read_text().splitlines()
    (tmp_path / "per_edit.jsonl").write_text("\n".join(lines[:4]) + "\n")
    text = paired.compare(old_dir, tmp_path / "per_edit.jsonl")
    assert "4 edits scored by both" in text
    n, mean, se = _expected(old_rows[:4], new_rows[:4], lambda r: r["background_psnr"])
    assert f"| background PSNR | {n} |" in text and f"| {mean:+.1f} +- {se:.1f} dB |" in text


def test_paired_refuses_bad_inputs_with_the_fix(two_evals, tmp_path, capsys):
    old_dir, new_dir, _, _ = two_evals
    with pytest.raises(SamaInputError, match="no per_edit.jsonl there"):
        paired.compare(tmp_path, new_dir)
    both = tmp_path / "both.jsonl"
    both.write_text((old_dir / "per_edit.jsonl").read_text() + (new_dir / "per_edit.jsonl").read_text())
    with pytest.raises(SamaInputError, match=r"holds 2 model rows \['old', 'new'\].*--base-method NAME"):
        paired.compare(both, new_dir)
    with pytest.raises(SamaInputError, match="no method 'newer' \\(--new-method\\)"):
        paired.compare(old_dir, new_dir, new_method="newer")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"method": "x", "id": "a"}\nnot json\n')
    with pytest.raises(SamaInputError, match="bad.jsonl:2: not a train.eval per-edit row"):
        paired.compare(old_dir, bad)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"method": "x", "id": "elsewhere_000000_color", "kind": "color",
                                 "success": True}) + "\n")
    with pytest.raises(SamaInputError, match="share no edit"):
        paired.compare(old_dir, other)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SamaInputError, match="is empty"):
        paired.compare(old_dir, tmp_path / "empty.jsonl")
    assert paired.main([str(old_dir), str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
