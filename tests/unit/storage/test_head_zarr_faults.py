"""ZarrHeadStore under faults: corrupt chunks, full disk, read-only file systems, bad layouts.

Each test checks the error is clear (names the file/array/row and what to do) and that the last
commit stays intact and recoverable.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from head_conformance import Model, assert_rows, make_meta, update
from head_faults import FaultyIO

from diet_engine.storage.head import (
    HeadStoreCorruptionError,
    HeadStoreIOError,
    HeadStoreReadOnlyError,
    ZarrHeadStore,
    ZarrHeadStoreConfig,
    zarr_layout,
)


def _committed_store(path, io=None):
    """A store with rows written and committed at step 3; returns (store, model at 3)."""
    s = ZarrHeadStore.create(path, make_meta(), seed=4, io=io)
    model = Model(make_meta(), 4)
    for t in (1, 2, 3):
        b = update(s.read_rows(np.arange(30 * t, 30 * t + 50)), t)
        s.write_rows(b)
        model.write(b)
    s.commit(3)
    model.commit(3)
    return s, model


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


# ---- corruption --------------------------------------------------------------------------------------


def test_corrupt_row_is_reported_with_array_chunk_and_row(tmp_path):
    s, _ = _committed_store(tmp_path / "h.zarr")
    s.close()
    row = 70  # chunk 1, row 6 of the chunk
    _flip(f"{s.path}/exp_avg/c/1/0", (row - 64) * 12 * 4 + 5)
    s = ZarrHeadStore.open(s.path)
    s.read_rows(np.array([69, 71]))  # neighbours are fine
    with pytest.raises(HeadStoreCorruptionError, match=r"'exp_avg', chunk 1 .*row 70 \(row 6 of the chunk\)"):
        s.read_rows(np.array([60, 70]))
    s.prefetch(np.array([70]))  # a failed prefetch surfaces at the read, every time
    with pytest.raises(HeadStoreCorruptionError, match="row 70"):
        s.read_rows(np.array([70]))
    s.close()
    off = ZarrHeadStore.open(s.path, mode="r", config=ZarrHeadStoreConfig(verify_checksums=False))
    off.read_rows(np.array([70]))  # verification can be switched off
    off.close()


def test_corrupt_checksum_file_is_reported(tmp_path):
    s, _ = _committed_store(tmp_path / "h.zarr")
    s.close()
    _flip(f"{s.path}/checksum/c/0/0", 10 * 12 + 1)
    s = ZarrHeadStore.open(s.path, mode="r")
    with pytest.raises(HeadStoreCorruptionError, match="'weight', chunk 0 .*row 10 "):
        s.read_rows(np.array([10]))
    s.close()


def test_truncated_chunk_file_is_refused_at_open(tmp_path):
    s, _ = _committed_store(tmp_path / "h.zarr")
    s.close()
    os.truncate(f"{s.path}/exp_avg_sq/c/2/0", 100)
    with pytest.raises(HeadStoreCorruptionError, match=r"exp_avg_sq/c/2/0 has 100 bytes, expected 3072"):
        ZarrHeadStore.open(s.path)


def test_compressed_or_rechunked_array_is_refused(tmp_path):
    s, _ = _committed_store(tmp_path / "h.zarr")
    s.close()
    meta_path = f"{s.path}/weight/zarr.json"
    doc = json.load(open(meta_path))
    doc["codecs"].append({"name": "zstd", "configuration": {"level": 1}})
    doc["chunk_grid"]["configuration"]["chunk_shape"] = [32, 12]
    json.dump(doc, open(meta_path, "w"))
    with pytest.raises(HeadStoreCorruptionError, match=r"array 'weight'.*chunks \(32, 12\) != \(64, 12\).*zstd"):
        ZarrHeadStore.open(s.path, mode="r")


def test_not_a_head_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no head store"):
        ZarrHeadStore.open(tmp_path / "missing.zarr")
    import zarr

    zarr.create_group(store=str(tmp_path / "plain.zarr"))
    with pytest.raises(ValueError, match="not a DIET head store"):
        ZarrHeadStore.open(tmp_path / "plain.zarr")


# ---- full disk ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["undo_log", "/exp_avg/", "/step/"], ids=["undo-log", "data", "steps"])
def test_enospc_on_write_is_clear_and_last_commit_recoverable(tmp_path, where):
    io = FaultyIO()
    s, model = _committed_store(tmp_path / "h.zarr", io=io)
    io.space[where] = 2000  # the disk fills up during the next writes
    with pytest.raises(HeadStoreIOError, match=r"No space left on device.*recover\(3\)") as exc:
        for t in range(4, 12):
            s.write_rows(update(s.read_rows(np.arange(100 + 10 * t, 140 + 10 * t)), t))
        s.flush()
    assert exc.value.errno == errno.ENOSPC
    with pytest.raises(HeadStoreIOError):
        s.commit(20)  # the store stays failed until recovered
    s.close()  # already reported: close does not raise again
    again = ZarrHeadStore.open(s.path, make_meta())
    again.recover(3)
    assert_rows(again, model)
    again.close()


def test_enospc_recovered_in_process(tmp_path):
    io = FaultyIO()
    s, model = _committed_store(tmp_path / "h.zarr", io=io)
    io.space["undo_log"] = 5000
    with pytest.raises(HeadStoreIOError):
        for t in range(4, 10):
            s.write_rows(update(s.read_rows(np.arange(10 * t, 10 * t + 40)), t))
        s.flush()
    io.space.clear()  # space freed
    s.recover(3)
    assert_rows(s, model)
    b = update(s.read_rows(np.arange(5)), 4)  # training continues
    s.write_rows(b)
    model.write(b)
    s.commit(4)
    assert_rows(s, model)
    s.close()


def test_enospc_during_commit_keeps_previous_commit(tmp_path):
    io = FaultyIO()
    s, model = _committed_store(tmp_path / "h.zarr", io=io)
    for t in (4, 5):
        s.write_rows(update(s.read_rows(np.arange(t, 200, 7)), t))
    io.space["zarr.json"] = 10  # the attribute rewrite of commit(5) fails
    with pytest.raises(HeadStoreIOError, match=r"commit of step 5 failed.*recover\(3\)"):
        s.commit(5)
    s.close()
    again = ZarrHeadStore.open(s.path, make_meta())
    assert again.commits == [0, 3]
    again.recover(3)
    assert_rows(again, model)
    again.close()


def test_unreported_writer_failure_raises_at_close(tmp_path):
    io = FaultyIO()
    s, _ = _committed_store(tmp_path / "h.zarr", io=io)
    io.space["/weight/"] = 0
    s.write_rows(update(s.read_rows(np.arange(5)), 4))
    with pytest.raises(HeadStoreIOError, match="No space left"):
        s.close()


def test_creation_needs_free_disk_and_leaves_nothing(tmp_path, monkeypatch):
    class Usage:
        free = 1000

    monkeypatch.setattr(zarr_layout.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(HeadStoreIOError, match=r"not enough free disk .* needs 52.5 kB .* 1 kB are free"):
        ZarrHeadStore.create(tmp_path / "h.zarr", make_meta())
    assert os.listdir(tmp_path) == []


def test_failed_creation_leaves_nothing(tmp_path):
    with pytest.raises(OSError, match="No space left"):
        ZarrHeadStore.create(tmp_path / "h.zarr", make_meta(), io=FaultyIO(space={"/weight/": 5000}))
    assert os.listdir(tmp_path) == []


# ---- read-only --------------------------------------------------------------------------------------


def test_read_only_file_system_refused_for_training_fine_for_export(tmp_path):
    s, model = _committed_store(tmp_path / "h.zarr")
    s.close()
    with pytest.raises(HeadStoreReadOnlyError, match="not writable .*mode='r'"):
        ZarrHeadStore.open(s.path, io=FaultyIO(read_only_fs=True))
    ro = ZarrHeadStore.open(s.path, make_meta(), mode="r", io=FaultyIO(read_only_fs=True))
    assert_rows(ro, model)
    ro.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_files_refused_for_training(tmp_path):
    s, _ = _committed_store(tmp_path / "h.zarr")
    s.close()
    os.chmod(f"{s.path}/weight/c/0/0", 0o444)
    with pytest.raises(HeadStoreReadOnlyError, match="not writable"):
        ZarrHeadStore.open(s.path)


@pytest.mark.skipif(os.geteuid() != 0, reason="drops root privileges (as another user, the test above covers it)")
def test_read_only_store_for_an_unprivileged_user(tmp_path):
    """A store the user may read but not write (root bypasses permissions, so a forked child drops
    to `nobody`): training is refused with a message that says how to open it; reading works; the
    store is untouched."""
    import shutil
    import tempfile

    import diet_engine.storage.head.zarr_store  # noqa: F401 - imported before the fork: /root is closed to nobody

    base = tempfile.mkdtemp(prefix="diet-ro-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        s, model = _committed_store(f"{base}/h.zarr")
        s.close()
        before = {p: os.path.getmtime(p) for p in map(str, Path(base).rglob("*"))}
        want = model.snaps[3][0][:80].copy()
        pid = os.fork()
        if pid == 0:  # child: become nobody, try to train, then read
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    ZarrHeadStore.open(s.path, make_meta())
                    code = 3  # opened for writing: wrong
                except HeadStoreReadOnlyError as e:
                    code = 4 if "mode='r'" not in str(e) else 0
                if code == 0:
                    ro = ZarrHeadStore.open(s.path, make_meta(), mode="r")
                    ok = np.array_equal(ro.read_rows(np.arange(80)).weight.numpy(), want)
                    ro.close()
                    code = 0 if ok else 5
            except BaseException:  # noqa: BLE001 - any failure is a non-zero exit of the child
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"child as nobody exited {os.waitstatus_to_exitcode(status)}"
        assert {p: os.path.getmtime(p) for p in map(str, Path(base).rglob("*"))} == before
    finally:
        shutil.rmtree(base, ignore_errors=True)
