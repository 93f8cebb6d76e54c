"""Shared shard sets for the shard tests (built once per session, a few hundred KB each); `digits`
is in tests/unit/conftest.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diet_engine.storage.shards import prepare_synthetic


@pytest.fixture(scope="session")
def uneven(tmp_path_factory) -> Path:
    """203 synthetic 8×8 images in shards of 20: ten full shards and one of 3."""
    out = tmp_path_factory.mktemp("uneven") / "data"
    prepare_synthetic(out, 203, shard_size=20, workers=1, progress=False)
    return out


@pytest.fixture
def write_image():
    return _write_image


def _write_image(path: Path, size=(12, 10), color=True, seed=0, fmt=None) -> np.ndarray:
    """Write a random image file (format from the suffix); return its pixels."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if color else (size[1], size[0])
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels
