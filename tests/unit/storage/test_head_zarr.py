"""ZarrHeadStore: the conformance suite (normal, and tiny budget on a slow disk) plus the on-disk format."""

from __future__ import annotations

import json
import os
import warnings

import google_crc32c
import numpy as np
import pytest
import torch
import zarr
from head_conformance import HeadStoreConformance, Model, assert_rows, make_meta, update
from head_faults import FaultyIO

from diet_engine.storage.head import (
    FORMAT_VERSION,
    FileIO,
    HeadStoreError,
    ZarrHeadStore,
    ZarrHeadStoreConfig,
    chunk_rows_from_shards,
    open_or_create_store,
)

ROW_SLOT = 3 * 12 * 4  # bytes of one cached row at d = 12, float32


class TestZarrHeadStore(HeadStoreConformance):
    config = ZarrHeadStoreConfig()

    def io(self) -> FileIO:
        return FileIO()

    @pytest.fixture
    def make_store(self, tmp_path):
        made = []

        def make(meta, seed=0):
            s = ZarrHeadStore.create(tmp_path / f"head{len(made)}.zarr", meta, seed, config=self.config, io=self.io())
            made.append(s)
            return s

        yield make
        for s in made:
            s.close()

    @pytest.fixture
    def open_as(self):
        opened = []

        def reopen(store, meta, read_only=False):
            store.close()
            s = ZarrHeadStore.open(store.path, meta, mode="r" if read_only else "r+", config=self.config, io=self.io())
            opened.append(s)
            return s

        yield reopen
        for s in opened:
            s.close()


class TestZarrHeadStoreTinyBudgetSlowDisk(TestZarrHeadStore):
    """Cache and staging of 220 rows (< N = 300): eviction, the cache bypass of big reads and
    write back-pressure all happen; slow writes keep rows in flight while they are read again;
    8 open descriptors for 25 chunk files exercise the descriptor cache's eviction path."""

    config = ZarrHeadStoreConfig(memory_budget_bytes=2 * 220 * ROW_SLOT, io_threads=4, max_open_files=8)

    def io(self) -> FileIO:
        return FaultyIO(write_delay=1e-4, read_delay=2e-5)


# ---- the on-disk format ---------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    s = ZarrHeadStore.create(tmp_path / "head.zarr", make_meta(), seed=1)
    yield s
    s.close()


def test_zarr_python_reads_what_the_store_wrote(store):
    model = Model(make_meta(), 1)
    rng = np.random.default_rng(0)
    for t in range(1, 8):
        b = update(store.read_rows(np.unique(rng.integers(0, 300, 60))), t)
        store.write_rows(b)
        model.write(b)
    store.commit(7)
    store.close()
    g = zarr.open_group(store.path, mode="r")
    np.testing.assert_array_equal(g["weight"][:], model.w)
    np.testing.assert_array_equal(g["exp_avg"][:], model.m)
    np.testing.assert_array_equal(g["exp_avg_sq"][:], model.v)
    np.testing.assert_array_equal(g["step"][:], model.s)
    crc = g["checksum"][:]
    for n in (0, 150, 299):
        assert crc[n, 0] == google_crc32c.value(model.w[n].tobytes())
        assert crc[n, 2] == google_crc32c.value(model.v[n].tobytes())
    attrs = g.attrs["diet_head"]
    assert attrs["format_version"] == FORMAT_VERSION and attrs["commits"] == [0, 7]
    assert attrs["meta"]["global_step"] == 7 and attrs["meta"]["num_rows"] == 300
    w = g["weight"]
    assert w.chunks == (64, 12) and w.compressors == () and w.filters == ()
    assert [type(c).__name__ for c in w.metadata.codecs] == ["BytesCodec"]
    assert sorted(g.array_keys()) == ["checksum", "exp_avg", "exp_avg_sq", "step", "weight"]


def test_streaming_subsets_of_chunks_move_only_their_rows(tmp_path):
    """Dense and sparse subsets of chunks (the streaming order's batches) are written and read back,
    warm and cold (checksums verified); rows between them keep their bytes."""
    meta = make_meta()
    store = ZarrHeadStore.create(tmp_path / "head.zarr", meta, seed=1, config=ZarrHeadStoreConfig(io_threads=2))
    model = Model(meta, 1)
    writes = [np.arange(0, 64, 2), np.arange(65, 128, 3), np.r_[np.arange(130, 190, 2), 250, 299],
              np.arange(1, 64, 2), np.arange(0, 300, 7)]
    for t, rows in enumerate(writes, start=1):
        store.prefetch(rows)
        b = update(store.read_rows(rows), t)
        store.write_rows(b)
        model.write(b)
        assert_rows(store, model)
    store.commit(len(writes))
    store.close()
    g = zarr.open_group(store.path, mode="r")
    np.testing.assert_array_equal(g["weight"][:], model.w)
    np.testing.assert_array_equal(g["exp_avg_sq"][:], model.v)
    np.testing.assert_array_equal(g["step"][:], model.s)
    ro = ZarrHeadStore.open(store.path, meta, mode="r", config=ZarrHeadStoreConfig(memory_budget_bytes=1 << 20))
    try:  # every row read back from disk (cold), checksums verified
        assert_rows(ro, model)
        for rows in writes:
            assert_rows(ro, model, rows)
    finally:
        ro.close()


def test_chunk_files_are_raw_little_endian_rows(store):
    b = update(store.read_rows(np.array([64, 65, 130])), 1)
    store.write_rows(b)
    store.flush()
    raw = np.fromfile(f"{store.path}/exp_avg/c/1/0", dtype="<f4").reshape(64, 12)
    np.testing.assert_array_equal(raw[:2], b.exp_avg[:2].numpy())
    assert os.path.getsize(f"{store.path}/weight/c/4/0") == 64 * 12 * 4  # edge chunk at full size
    steps = np.fromfile(f"{store.path}/step/c/2", dtype="<i8")
    assert steps[130 - 128] == 1


def test_zarr_group_lists_cleanly(store):
    store.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # undo files must not confuse zarr's member listing
        g = zarr.open_group(store.path, mode="r")
        names = sorted(k for k, _ in g.members())
    assert names == ["checksum", "exp_avg", "exp_avg_sq", "step", "undo_log", "weight"]


def test_create_refuses_existing_path(store):
    with pytest.raises(FileExistsError, match="already exists"):
        ZarrHeadStore.create(store.path, make_meta())


def test_moments_are_preallocated_not_written(tmp_path):
    s = ZarrHeadStore.create(tmp_path / "h.zarr", make_meta(num_rows=4096, dim=256, chunk_rows=1024))
    st = os.stat(f"{s.path}/exp_avg/c/0/0")
    assert st.st_size == 1024 * 256 * 4 and st.st_blocks * 512 >= st.st_size  # blocks reserved
    s.close()


def test_chunk_rows_from_manifest_layout():
    assert chunk_rows_from_shards([100, 100, 37], [0, 100, 200]) == (237, 100)
    with pytest.raises(ValueError, match="contiguous"):
        chunk_rows_from_shards([100, 100], [0, 101])
    with pytest.raises(ValueError, match="equal shard sizes"):
        chunk_rows_from_shards([100, 90, 100], [0, 100, 190])


def test_owned_rows_only_materialise_their_chunks(tmp_path):
    owned = np.arange(64, 192)  # chunks 1 and 2 of 5
    s = ZarrHeadStore.create(tmp_path / "rank.zarr", make_meta(), seed=2, owned_rows=owned)
    assert not os.path.exists(f"{s.path}/weight/c/0/0") and os.path.exists(f"{s.path}/weight/c/2/0")
    model = Model(make_meta(), 2)
    assert_rows(s, model, owned)
    b = update(s.read_rows(np.array([70, 190])), 1)
    s.write_rows(b)
    with pytest.raises(ValueError, match="not held by head store"):
        s.read_rows(np.array([5, 70]))
    s.commit(1)
    s.close()
    g = zarr.open_group(s.path, mode="r")
    assert not g["weight"][:64].any()  # absent chunks read as the fill value
    np.testing.assert_array_equal(g["weight"][70], b.weight[0].numpy())
    again = ZarrHeadStore.open(s.path, make_meta())
    np.testing.assert_array_equal(again.read_rows(np.array([190])).weight[0].numpy(), b.weight[1].numpy())
    again.close()


def test_open_or_create_store(tmp_path):
    path = tmp_path / "run" / "head.zarr"
    s = open_or_create_store(path, make_meta(), seed=3, memory_budget_bytes=1 << 20)
    assert s.config.memory_budget_bytes == 1 << 20
    s.commit(0)
    s.close()
    with pytest.raises(FileExistsError, match="earlier run"):
        open_or_create_store(path, make_meta())
    s = open_or_create_store(path, make_meta(), resume=True)
    assert s.commits == [0]
    s.close()
    with pytest.raises(ValueError, match="dim"):
        open_or_create_store(path, make_meta(dim=13), resume=True)
    open_or_create_store(path, make_meta(), overwrite=True).close()


def test_second_writer_is_refused_readers_are_not(store):
    with pytest.raises(HeadStoreError, match="already open for writing"):
        ZarrHeadStore.open(store.path)
    ro = ZarrHeadStore.open(store.path, mode="r")
    ro.read_rows(np.array([0]))
    ro.close()


def test_forked_child_does_not_hold_the_writer_lock(tmp_path):
    """A loader worker forked by the trainer must not keep the store locked once the trainer dies."""
    import signal
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "head.zarr"
    ZarrHeadStore.create(path, make_meta()).close()
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from diet_engine.storage.head import ZarrHeadStore
        s = ZarrHeadStore.open({str(path)!r})
        pid = os.fork()
        if pid == 0:            # the 'worker': outlives its parent
            time.sleep(60)
            os._exit(0)
        print(pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # the trainer is killed, no cleanup
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    assert out.returncode == -signal.SIGKILL, out.stderr
    child = int(out.stdout.split()[0])
    try:
        os.kill(child, 0)  # still alive
        ZarrHeadStore.open(path).close()  # ... yet the store is free for the resumed trainer
    finally:
        os.kill(child, signal.SIGKILL)


def test_reopen_after_unclean_stop_then_recover(store):
    """Rows flushed but not committed survive a close; recover() rolls them back."""
    model = Model(make_meta(), 1)
    b = update(store.read_rows(np.arange(10)), 1)
    store.write_rows(b)
    model.write(b)
    store.commit(1)
    model.commit(1)
    store.write_rows(update(store.read_rows(np.arange(5, 40)), 2))
    store.close()  # flushed, not committed: like a crash after the OS wrote everything
    with pytest.warns(UserWarning, match="recover"):
        ZarrHeadStore.open(store.path, mode="r").close()
    again = ZarrHeadStore.open(store.path, make_meta())
    assert again.uncommitted_records == 35
    again.recover(1)
    assert_rows(again, model)
    again.close()


def test_torn_undo_tail_is_cut_on_open(store):
    store.write_rows(update(store.read_rows(np.arange(8)), 1))
    store.close()
    seg = f"{store.path}/undo_log/0.log"
    size = os.path.getsize(seg)
    with open(seg, "ab") as f:
        f.write(b"\x01" * 1000)  # half a record, as a crash mid-append leaves it
    again = ZarrHeadStore.open(store.path)
    assert again.uncommitted_records == 8 and os.path.getsize(seg) == size
    again.recover(0)
    assert_rows(again, Model(make_meta(), 1))
    again.close()


def test_memory_budget_bounds_the_buffers(tmp_path):
    cfg = ZarrHeadStoreConfig(memory_budget_bytes=100 * ROW_SLOT)
    s = ZarrHeadStore.create(tmp_path / "h.zarr", make_meta(), config=cfg)
    st = s.stats()
    assert st["cache_rows"] == 50 and st["staging_rows"] == 50 and st["buffer_bytes"] <= 100 * ROW_SLOT
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        s.write_rows(s.read_rows(np.arange(30)))  # 30 rows + 30 pre-images > 50 staging slots
    b = s.read_rows(np.arange(300))  # bigger than the cache: read around it
    assert_rows(s, Model(make_meta(), 0))
    assert b.weight.shape == (300, 12) and s.stats()["cache_resident_rows"] <= 50
    s.close()


def test_back_pressure_blocks_writes_and_bounds_the_queue(tmp_path):
    cfg = ZarrHeadStoreConfig(memory_budget_bytes=2 * 80 * ROW_SLOT)
    s = ZarrHeadStore.create(tmp_path / "h.zarr", make_meta(), config=cfg, io=FaultyIO(write_delay=2e-3))
    model = Model(make_meta(), 0)
    for t in range(1, 13):
        b = update(s.read_rows(np.arange(20 * (t % 10), 20 * (t % 10) + 20)), t)
        s.write_rows(b)
        model.write(b)
    st = s.stats()
    assert st["write_stall_s"] > 0 and st["write_queue_peak_rows"] <= st["staging_rows"]
    assert_rows(s, model)
    s.close()


def test_stats_report_rates_and_stalls(store):
    store.prefetch(np.arange(64))
    store.read_rows(np.arange(64))
    store.read_rows(np.arange(64, 96))  # not prefetched
    st = store.stats(reset=True)
    assert st["cache_misses"] == 32 and st["cache_hits"] == 64 and st["rows_gathered"] == 96
    assert st["bytes_read"] == 96 * 3 * 12 * 4 and st["rows_per_s"] > 0
    assert store.stats()["rows_read"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_buffers_with_cuda(tmp_path):
    s = ZarrHeadStore.create(tmp_path / "h.zarr", make_meta())
    b = s.read_rows(np.arange(10))
    assert b.weight.is_pinned() and s.cache.pool.tensors[0].is_pinned()
    s.write_rows(b.to("cuda", non_blocking=True))
    s.close()


def test_format_version_mismatch_on_disk(store):
    store.close()
    path = f"{store.path}/zarr.json"
    doc = json.load(open(path))
    doc["attributes"]["diet_head"]["format_version"] = 2
    json.dump(doc, open(path, "w"))
    with pytest.raises(ValueError, match="format version 2"):
        ZarrHeadStore.open(store.path)


def test_chunks_a_zarr_writer_dropped_read_as_zeros(store):
    """zarr-python deletes a chunk it writes as all fill value (legal Zarr); the store copes."""
    model = Model(make_meta(), 1)
    store.close()
    g = zarr.open_group(store.path, mode="r+")
    g["exp_avg"][:64] = g["exp_avg"][:64]  # all zeros: zarr removes the chunk file
    assert not os.path.exists(f"{store.path}/exp_avg/c/0/0")
    ro = ZarrHeadStore.open(store.path, mode="r")
    assert_rows(ro, model)
    ro.close()
    rw = ZarrHeadStore.open(store.path)  # recreated as zeros for in-place writes
    assert os.path.getsize(f"{store.path}/exp_avg/c/0/0") == 64 * 12 * 4
    b = update(rw.read_rows(np.arange(3)), 1)
    rw.write_rows(b)
    model.write(b)
    assert_rows(rw, model)
    rw.close()
