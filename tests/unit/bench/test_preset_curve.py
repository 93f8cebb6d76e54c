"""`diet bench preset-curve --collect-only`: the curve, the kNN by each mark and the report, from a
run folder's metrics.csv and final_report.json (no training here)."""

from __future__ import annotations

import csv
import json

from benchmarks.train.preset_curve import at_minutes, main
from benchmarks.train.runs import knn_curve


def _fake_run(run):
    run.mkdir()
    cols = ["step", "epoch", "eval/knn", "loss", "img_per_s", "head/elapsed_s"]
    rows = [{"step": 0, "epoch": 0, "eval/knn": 0.78}]
    for e in range(1, 6):  # 10 steps an epoch, 12 minutes an epoch on the store's clock
        rows.append({"step": 10 * e, "epoch": e, "loss": 5 - e / 10, "img_per_s": 100, "head/elapsed_s": 720 * e})
        rows.append({"step": 10 * e, "epoch": e, "eval/knn": 0.75 + e / 100})
    with (run / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    (run / "final_report.json").write_text(json.dumps({
        "eval": {"DIET resnet18 (trained, 50 steps)": {"knn": 0.8, "probe": 0.82, "rankme": 200.0},
                 "resnet18 at random init": {"knn": 0.825, "probe": 0.83, "rankme": 85.0}},
        "wall_time_s": {"train": 3600.0, "eval": 200.0, "total": 3850.0}, "steps": 50}))


def test_curve_and_marks(tmp_path):
    run = tmp_path / "run"
    _fake_run(run)
    pts = knn_curve(run)
    assert [p["epoch"] for p in pts] == [0, 1, 2, 3, 4, 5]
    assert [round(p["minutes"]) for p in pts] == [0, 12, 24, 36, 48, 60]
    assert at_minutes(pts, 30)["epoch"] == 2 and at_minutes(pts, 120)["epoch"] == 5


def test_collect_only_writes_the_report(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    _fake_run(run)
    assert main(["--collect-only", "--run-dir", str(run), "--out", str(out), "--name", "c"]) == 0
    md = (out / "c.md").read_text()
    assert "by 30 min: 77.00% (epoch 2, at 24.0 min)" in md
    assert "by 120 min: 80.00% (epoch 5, at 60.0 min) (the run trained 60.0 min in all)" in md
    assert "**kNN 80.00%**" in md and "random init: kNN 82.50%" in md
    assert (out / "c.png").stat().st_size > 0 and (out / "c.csv").exists() and (out / "c.json").exists()
