"""`diet prepare index`: manifests for existing shards, their checks, and no unpickling."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import webdataset as wds

from diet_engine.storage.shards import Manifest, ShardLoader, index_shards
from diet_engine.storage.shards.sources import encode_png


class _Payload:
    """Unpickling this creates the file `marker` (via builtins.open)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _foreign_shards(folder, counts, *, key=lambda n: f"{n:06d}", index=False, pyd_marker=None, start=0):
    """Shards as another tool would write them: webdataset.TarWriter, `.png` + `.cls` (+ extras)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = start
    for j, c in enumerate(counts):
        with wds.TarWriter(str(folder / f"part-{j:03d}.tar"), encoder=False) as tw:
            for _ in range(c):
                rec = {"__key__": key(n), "png": encode_png(np.full((4, 5), n % 256, np.uint8)),
                       "cls": str(n % 3).encode()}
                if index:
                    rec["idx"] = str(n).encode()
                if pyd_marker is not None:
                    rec["pyd"] = pickle.dumps(_Payload(pyd_marker))
                tw.write(rec)
                n += 1


def test_index_our_shards_matches_prepare(digits, tmp_path):
    shutil.copytree(digits / "test", tmp_path / "t")
    (tmp_path / "t" / "manifest.json").unlink()
    m = index_shards(tmp_path / "t", progress=False)
    ref = Manifest.load(digits / "test")
    assert m.num_samples == ref.num_samples and m.shards == ref.shards
    assert m.index_field == "index" and m.num_classes == 10 and m.image.channels == 1
    assert (m.image.height, m.image.width) == (8, 8)
    np.testing.assert_allclose(m.mean, ref.mean, atol=1e-6)  # all 360 < stats_samples: exact
    assert Manifest.load(tmp_path / "t") == m
    with pytest.raises(FileExistsError, match="overwrite"):
        index_shards(tmp_path / "t", progress=False)
    index_shards(tmp_path / "t", overwrite=True, progress=False)


def test_index_foreign_shards_numeric_keys_and_fields(tmp_path):
    _foreign_shards(tmp_path / "a", [5, 5, 2])
    m = index_shards(tmp_path / "a", progress=False)
    assert m.index_field == "__key__" and m.num_samples == 12 and m.shard_size == 5
    assert [s.file for s in m.shards] == ["part-000.tar", "part-001.tar", "part-002.tar"]
    _foreign_shards(tmp_path / "b", [3, 4], key=lambda n: f"img_{n}", index=True)
    m = index_shards(tmp_path / "b", progress=False)
    assert m.index_field == "idx"
    batches = list(ShardLoader(m, 7, shuffle=False, with_labels=True).epoch(0))
    assert [b[1].tolist() for b in batches] == [list(range(7))]
    assert batches[0][2].tolist() == [n % 3 for n in range(7)]
    np.testing.assert_allclose(batches[0][0][:, 0, 0, 0].numpy(), np.arange(7) / 255)


def test_index_shard_list_in_any_order_and_manifest_elsewhere(tmp_path):
    _foreign_shards(tmp_path / "s", [4, 4, 4])
    paths = sorted((tmp_path / "s").glob("*.tar"))[::-1]
    m = index_shards(paths, tmp_path / "meta" / "m.json", progress=False)
    assert [s.file for s in m.shards] == [f"../s/part-00{j}.tar" for j in range(3)]
    assert Manifest.load(tmp_path / "meta" / "m.json").num_samples == 12


def test_index_rejects_gaps_overlaps_and_non_contiguous(tmp_path):
    _foreign_shards(tmp_path / "gap", [3])
    _foreign_shards(tmp_path / "gap2", [3], start=5)
    with pytest.raises(ValueError, match="gap: indices 3..4 are missing"):
        index_shards([tmp_path / "gap", tmp_path / "gap2"], tmp_path / "x.json", progress=False)
    _foreign_shards(tmp_path / "ov", [3])
    _foreign_shards(tmp_path / "ov2", [3], start=2)
    with pytest.raises(ValueError, match="overlaps"):
        index_shards([tmp_path / "ov", tmp_path / "ov2"], tmp_path / "y.json", progress=False)
    _foreign_shards(tmp_path / "nc", [3], key=lambda n: f"{2 * n:06d}")
    with pytest.raises(ValueError, match="part-000.tar.*not one contiguous range"):
        index_shards(tmp_path / "nc", progress=False)


def test_non_numeric_keys_need_by_position(tmp_path):
    _foreign_shards(tmp_path / "k", [3, 2], key=lambda n: f"n0144_{n}x")
    with pytest.raises(ValueError, match=r"part-000\.tar.*'n0144_0x' is not numeric"):
        index_shards(tmp_path / "k", progress=False)
    m = index_shards(tmp_path / "k", by_position=True, progress=False)
    assert m.index_field is None and m.num_samples == 5
    got = np.concatenate([b[1].numpy() for b in ShardLoader(m, 2, seed=3).epoch(0)])
    assert sorted(got.tolist()) == list(range(5))


def test_no_pickle_is_ever_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    assert pickle.loads(pickle.dumps(_Payload(tmp_path / "probe"))) and (tmp_path / "probe").exists()  # payload works
    _foreign_shards(tmp_path / "p", [4, 4], pyd_marker=marker)
    m = index_shards(tmp_path / "p", progress=False)
    for workers in (0, 2):
        for _ in ShardLoader(m, 3, num_workers=workers, with_labels=True, cache_mb=0).epoch(0):
            pass
        for _ in ShardLoader(m, 3, num_workers=workers, with_labels=True).epoch(0):
            pass
    assert not marker.exists()
