"""`data.train_shards`: training on the first K shards keeps indices contiguous (0..n-1)."""

from __future__ import annotations

import pytest

from diet_engine.engine.config import RunConfig
from diet_engine.engine.data import load_manifest
from diet_engine.storage.shards import ShardLoader, prepare_synthetic


def test_first_shards_is_a_contiguous_training_subset(tmp_path):
    m = prepare_synthetic(tmp_path / "s", 250, 64, size=4, workers=1)
    cfg = RunConfig()
    cfg.data.manifest = str(tmp_path / "s")
    cfg.data.train_shards = 2
    sub = load_manifest(cfg.data)
    assert sub.num_samples == 128 and sub.num_shards == 2 and m.num_samples == 250
    loader = ShardLoader(sub, 32, seed=0)
    seen = sorted(int(i) for b in loader.epoch(0) for i in b[1])
    assert seen == list(range(128))
    cfg.data.eval_train_manifest = str(tmp_path / "s")
    assert load_manifest(cfg.data, "eval_train_manifest").num_samples == 250  # the bank stays whole
    with pytest.raises(ValueError, match="first 9 of 4 shards"):
        m.first_shards(9)
