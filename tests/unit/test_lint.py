"""`ruff check` passes on the whole repository, with the rules and per-file exceptions of pyproject.toml.

The rules include every code a `# noqa:` comment names, and RUF100 reports a `noqa` that suppresses
nothing or names a rule that is not selected, so the comments stay true. Skipped where ruff is not
installed (it is in the `test` extra).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is not None:  # the wheel: python -m ruff runs its binary
        return [sys.executable, "-m", "ruff"]
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    return [exe]


def test_ruff_check_passes():
    r = subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", "."], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"ruff check found problems (fix them, or `ruff check --fix`):\n{r.stdout}{r.stderr}"
