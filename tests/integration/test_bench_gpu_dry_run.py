"""`diet bench gpu --dry-run` on the CPU: every stage's code path runs and the summary is written,
so a typo cannot cost minutes on a borrowed GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_bench_gpu_dry_run(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "diet_engine.launch.cli", "bench", "gpu", "--dry-run", "--out", str(out),
                        "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    summary = json.loads((out / "gpu_summary.json").read_text())
    assert [s["stage"] for s in summary["rows"]] == ["tests", "ce", "lazy", "memory", "e2e"]
    assert all(s["status"] == "ok" for s in summary["rows"]), summary["rows"]
    st = summary["stages"]
    assert st["lazy"]["lazy_catch_up_step_ms"] > 0 and st["e2e"]["ratio"] > 0 and st["ce"]["rows"]
    assert "| e2e | ok |" in (out / "gpu_summary.md").read_text()


def test_bench_gpu_without_cuda_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "diet_engine.launch.cli", "bench", "gpu", "--stages", "lazy"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr
