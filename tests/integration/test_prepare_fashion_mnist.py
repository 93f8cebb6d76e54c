"""`diet prepare torchvision FashionMNIST` on the real data set from Debian's flat folder
(`apt-get install dataset-fashion-mnist`): 60,000 + 10,000 images read back index for index equal
to torchvision's FashionMNIST. Slow (~1 min on 2 busy cores); skipped where the package is absent.

    pytest -m slow tests/integration/test_prepare_fashion_mnist.py
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from torchvision import datasets as tvd

from diet_engine.storage.shards import Manifest, prepare_torchvision
from tests.unit.shards.test_shards_torchvision import assert_round_trip

DEBIAN = Path("/usr/share/datasets/fashion-mnist")

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist package")]


def test_full_fashion_mnist_round_trip(tmp_path):
    ms = prepare_torchvision("FashionMNIST", DEBIAN, tmp_path / "fm", progress=False)
    # the reference: torchvision's class on its own layout, decompressed here independently
    raw = tmp_path / "ref" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in DEBIAN.glob("*.gz"):
        (raw / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
    for split, n in (("train", 60000), ("test", 10000)):
        m = Manifest.load(tmp_path / "fm" / split)
        assert m.num_samples == n == ms[split].num_samples and m.num_shards == n // 1000
        assert m.source["layout"] == "flat folder" and m.source["reader"] == "arrays"
        assert_round_trip(m, tvd.FashionMNIST(str(tmp_path / "ref"), train=split == "train"))

