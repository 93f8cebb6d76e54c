"""Smoke runs of the training benchmarks at toy size: the scripts run end to end and report what they claim.

The numbers are meaningless at this size; what is checked is the plumbing: both head stores train,
the SIGKILL lands between checkpoints and the resume starts at the last one and reaches the end.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_bench_train_head_store_smoke(tmp_path):
    from benchmarks.train import head_store as bench

    rc = bench.main(["--num-samples", "3000", "--batch-size", "32", "--steps", "8", "--log-every", "2",
                     "--rounds", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert rc == 0
    rows = json.loads((tmp_path / "out" / "train_head_store.json").read_text())["rows"]
    assert [r["head"] for r in rows] == ["memory", "disk"]
    assert all(r["img_per_s"] > 0 for r in rows) and rows[0]["step_time_vs_memory"] == 1.0
    assert "Disk head vs memory head" in (tmp_path / "out" / "train_head_store.md").read_text()
    assert all(r["peak_rss_checkpoint_GB"] > 0 and r["peak_rss_steps_GB"] > 0 for r in rows)  # split at the last step
    assert "Memory head at the final checkpoint" in (tmp_path / "out" / "train_head_store.md").read_text()


def test_bench_train_scale_smoke(tmp_path):
    from benchmarks.train import scale as bench

    rc = bench.main(["--num-samples", "3000", "--dim", "64", "--batch-size", "32", "--steps", "8",
                     "--checkpoint-every", "4", "--log-every", "1", "--workers", "0",
                     "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out" / "train_scale.json").read_text())["rows"]
    killed, resumed = rows
    assert killed["killed"] and killed["last_step"] >= 10  # killed once step 8 + 4/2 was logged
    assert resumed["first_step"] == 9 and resumed["last_step"] == 12  # resumed from step_8
    assert rc == 0, (tmp_path / "out" / "train_scale.md").read_text()
    assert not (tmp_path / "work" / "train_scale-run").exists()  # cleaned up without --keep
