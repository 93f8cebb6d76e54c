"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from diet_engine.storage.shards import prepare_digits


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """scikit-learn digits as shards of 256: train 1437 (6 shards), test 360 (2 shards)."""
    out = tmp_path_factory.mktemp("digits") / "digits"
    prepare_digits(out)
    return out
