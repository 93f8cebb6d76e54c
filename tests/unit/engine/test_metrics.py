"""metrics.csv: a column that appears later (the online kNN) widens the file, keeping every row."""

from __future__ import annotations

import csv

from diet_engine.engine.metrics import MetricsLogger


def test_a_new_column_widens_the_csv(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(1, {"loss": 2.0})
    log.log(2, {"loss": 1.5})
    log.log(2, {"eval/knn": 0.75})
    log.log(3, {"loss": 1.0, "eval/knn": 0.8})
    log.close()
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "eval/knn"]
    assert [(r["step"], r["loss"], r["eval/knn"]) for r in rows] == [
        ("1", "2.0", ""), ("2", "1.5", ""), ("2", "", "0.75"), ("3", "1.0", "0.8")]
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_resumed_logger_keeps_the_widened_header(tmp_path):
    first = MetricsLogger(tmp_path, tensorboard=False)
    first.log(1, {"loss": 2.0})
    first.log(1, {"eval/knn": 0.5})
    again = MetricsLogger(tmp_path, tensorboard=False)
    again.log(2, {"loss": 1.0})
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[-1] == {"step": "2", "loss": "1.0", "eval/knn": ""}
