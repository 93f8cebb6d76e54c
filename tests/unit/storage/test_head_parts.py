"""Units of the on-disk head store: index contract, run coalescing, bitset, undo log, row cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diet_engine.storage.head import FileIO, check_index
from diet_engine.storage.head.file_io import IOV_MAX, FdCache
from diet_engine.storage.head.row_cache import RowCache, SlotPool
from diet_engine.storage.head.row_io import runs
from diet_engine.storage.head.undo_log import HEADER_BYTES, Bitset, UndoLog
from diet_engine.storage.head.zarr_layout import HeadLayout


def test_check_index():
    np.testing.assert_array_equal(check_index([1, 4, 9], 10), [1, 4, 9])
    assert check_index(np.array([], np.int32), 10).dtype == np.int64
    with pytest.raises(ValueError, match="np.unique"):
        check_index([4, 4], 10)
    with pytest.raises(ValueError, match="out of range"):
        check_index([9, 10], 10)


def test_runs_coalesce_consecutive_rows_within_a_chunk():
    rows = np.array([0, 1, 2, 5, 6, 7, 8, 20])
    assert runs(rows, 8) == [(0, 3), (3, 6), (6, 7), (7, 8)]  # 7|8 is a chunk boundary
    assert runs(np.arange(IOV_MAX + 5), 10**9) == [(0, IOV_MAX), (IOV_MAX, IOV_MAX + 5)]
    assert runs(np.array([], np.int64), 8) == []


@settings(max_examples=50, deadline=None)
@given(st.sets(st.integers(0, 999), max_size=200), st.sets(st.integers(0, 999), max_size=200))
def test_bitset_matches_a_python_set(first, second):
    b = Bitset(1000)
    b.set(np.array(sorted(first), dtype=np.int64))
    probe = np.array(sorted(first | second), dtype=np.int64)
    np.testing.assert_array_equal(b.test(probe), [p in first for p in probe.tolist()])
    b.clear()
    assert not b.test(probe).any()


def test_row_cache_evicts_lru_and_never_pinned():
    cache = RowCache(SlotPool(4, 3, np.dtype("float32"), pin=False))
    s = cache.allocate(np.array([10, 11, 12, 13]))
    cache.pin(s[:1])  # row 10 busy
    cache.touch(np.array([11]))
    new = cache.allocate(np.array([20, 21]))  # evicts 12, 13 (LRU), not 10 (pinned), not 11 (recent)
    assert sorted(cache.slot_of) == [10, 11, 20, 21] and new.size == 2
    assert cache.evictable() == 3
    assert cache.allocate(np.array([30, 31, 32, 33]), partial=True).size == 3
    with pytest.raises(RuntimeError, match="row cache full"):
        cache.allocate(np.array([40, 41, 42, 43, 44]))


@pytest.fixture
def undo(tmp_path):
    (tmp_path / "undo_log").mkdir()
    lay = HeadLayout(str(tmp_path), num_rows=100, dim=4, chunk_rows=10, dtype=np.dtype("<f4"))
    log = UndoLog(lay, FileIO())
    yield log
    log.close()


def _arrays(rows, base):
    return [np.full((len(rows), 4), base + k, np.float32) + np.asarray(rows, np.float32)[:, None] for k in range(3)]


def test_undo_replay_earliest_pre_image_wins(undo):
    undo.start(5)
    undo.append(np.array([3, 7]), np.array([1, 2]), _arrays([3, 7], 0), np.arange(2))
    undo.append(np.array([7, 9]), np.array([4, 5]), _arrays([7, 9], 100), np.arange(2))  # 7 twice (reopen case)
    undo.sync()
    got = {}

    def apply(rows, steps, src, pos):
        for r, s_, p in zip(rows.tolist(), steps.tolist(), pos.tolist(), strict=True):
            got.setdefault(r, (s_, src[0][p].copy()))  # first application per row (blocks newest first)

    assert undo.replay(5, apply) == 3
    assert got[7][0] == 2 and got[7][1][0] == 7.0  # the earlier record's pre-image
    assert got[9][0] == 5 and got[3][0] == 1


def test_undo_torn_and_foreign_segments(undo, tmp_path):
    undo.start(2)
    undo.append(np.array([1, 2, 3]), np.zeros(3, np.int64), _arrays([1, 2, 3], 0), np.arange(3))
    undo.close()
    path = undo.path(2)
    rec = undo.record_bytes
    with open(path, "r+b") as f:  # tear the last record
        f.truncate(HEADER_BYTES + 2 * rec + rec // 2)
    assert undo.count_valid(2) == 2
    with open(path, "r+b") as f:  # corrupt the second record's payload
        f.seek(HEADER_BYTES + rec + 30)
        f.write(b"\xff\xff")
    assert undo.count_valid(2) == 1
    assert undo.reopen(2) == 1 and (tmp_path / "undo_log" / "2.log").stat().st_size == HEADER_BYTES + rec
    with open(undo.path(9), "wb") as f:  # a header torn at creation holds no records
        f.write(b"\0" * 10)
    assert undo.count_valid(9) == 0
    undo.remove_except([2])
    assert sorted(p.name for p in (tmp_path / "undo_log").iterdir()) == ["2.log"]


def test_fd_cache_fast_path_and_eviction(tmp_path):
    paths = []
    for i in range(12):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * 10)
        paths.append(str(p))
    fast = FdCache(FileIO(), writable=False, max_open=64, expected_files=12)
    assert not fast.evicting
    with fast.use(paths[0]) as a, fast.use(paths[0]) as b:
        assert a == b
    fast.close_all()
    lru = FdCache(FileIO(), writable=False, max_open=8, expected_files=12)
    assert lru.evicting
    with lru.use(paths[0]) as held:
        for p in paths[1:]:
            with lru.use(p):
                pass
        assert len(lru._fds) == 8 and paths[0] in lru._fds  # in use: never closed underneath
        assert os.pread(held, 1, 0) == b"x"
    lru.close_all()
