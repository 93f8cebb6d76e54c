"""`diet bench real-data --quick`: the study's smoke test on the digits (no Fashion-MNIST needed)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_real_data_quick_writes_the_table_curves_and_plots(tmp_path):
    from benchmarks.train.real_data import main

    out = tmp_path / "out"
    assert main(["--quick", "--work", str(tmp_path / "work"), "--out", str(out), "--threads", "1"]) == 0
    md = (out / "real_data.md").read_text()
    for row in ("raw pixels", "random init", "diet", "diet-dense", "ls-0.1", "supervised"):
        assert f"| {row} |" in md
    assert "disk head vs dense head" in md and "DIET vs raw pixels" in md
    report = json.loads((out / "real_data.json").read_text())
    assert report["stamp"] and report["config"]["quick"] is True
    curves = report["curves"]
    assert [round(e) for e, _ in curves["diet"]] == [0, 1, 2]  # online kNN: random init, then every epoch
    assert all(0.0 < acc <= 1.0 for _, acc in curves["diet"])
    assert (out / "real_data_curves.png").stat().st_size > 0 and (out / "real_data_label_smoothing.png").exists()
    assert (out / "real_data.csv").read_text().startswith("run,")
