"""Opening a head store verifies what it can cheaply: no chunk file of non-zero rows missing, step
stamps within [0, commit], and after a rollback no row left ahead of it (a damaged or truncated
undo log is an error that names it, not a step-stamp failure mid-training)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from head_conformance import Model, assert_rows, make_meta, update

from diet_engine.storage.head import HeadStoreCorruptionError, MemoryHeadStore, ZarrHeadStore
from diet_engine.storage.head.undo_log import HEADER_BYTES


@pytest.fixture
def stepped(tmp_path):
    """A store (N = 300, chunks of 64) whose rows 0..39 were stepped and committed at step 1."""
    s = ZarrHeadStore.create(tmp_path / "head.zarr", make_meta(), seed=1)
    s.write_rows(update(s.read_rows(np.arange(40)), 1))
    s.commit(1)
    s.close()
    return s.path


@pytest.mark.parametrize("array", ["weight", "exp_avg", "exp_avg_sq", "step", "checksum"])
def test_a_deleted_chunk_of_non_zero_rows_is_refused(stepped, array):
    """It used to come back as zeros on resume, and training went on."""
    tail = "c/0" if array == "step" else "c/0/0"
    path = f"{stepped}/{array}/{tail}"
    os.unlink(path)
    for mode in ("r", "r+"):
        with pytest.raises(HeadStoreCorruptionError, match=path.replace(".", r"\.")):
            ZarrHeadStore.open(stepped, mode=mode)
    assert not os.path.exists(path)  # not recreated


@pytest.mark.parametrize("array", ["exp_avg", "exp_avg_sq", "step"])
def test_a_missing_chunk_of_zero_rows_is_legal_zarr(stepped, array):
    """Chunk 2 (rows 128..191) was never stepped: its moments and stamps are zero, which is what a
    missing Zarr chunk reads as (zarr-python drops all-zero chunks)."""
    os.unlink(f"{stepped}/{array}/" + ("c/2" if array == "step" else "c/2/0"))
    s = ZarrHeadStore.open(stepped)
    model = _model_at_1()
    assert_rows(s, model)
    s.close()


def _model_at_1() -> Model:
    """The reference state of `stepped`."""
    model = Model(make_meta(), 1)
    model.write(update(MemoryHeadStore(make_meta(), seed=1).read_rows(np.arange(40)), 1))
    model.commit(1)
    return model


def _set_stamp(store_path, row, value):
    with open(f"{store_path}/step/c/{row // 64}", "r+b") as f:
        f.seek((row % 64) * 8)
        f.write(np.int64(value).tobytes())


@pytest.mark.parametrize("stamp", [10**9, 2, -1])
def test_impossible_step_stamps_are_refused_at_open(stepped, stamp):
    """A stamp beyond the last commit (1) with nothing to roll back, or negative, used to surface
    mid-training as the lazy optimizer's traceback when the row was next read."""
    _set_stamp(stepped, 77, stamp)
    for mode in ("r", "r+"):
        with pytest.raises(HeadStoreCorruptionError, match=r"step stamps outside \[0, 1\].*rows \[77\]"):
            ZarrHeadStore.open(stepped, mode=mode)


def _crash_after_writes(path, rows, t=2):
    """Rows written after the last commit reached the files, then the process died."""
    s = ZarrHeadStore.open(path)
    s.write_rows(update(s.read_rows(rows), t))
    s.close()  # flushed, not committed: what a kill after the OS wrote everything leaves


@pytest.mark.parametrize("damage", ["truncated", "record in the middle flipped"])
def test_a_damaged_undo_log_is_an_error_that_names_it(stepped, damage):
    _crash_after_writes(stepped, np.arange(20, 60))
    seg = f"{stepped}/undo_log/1.log"
    record = (os.path.getsize(seg) - HEADER_BYTES) // 40
    with open(seg, "r+b") as f:
        if damage == "truncated":
            f.truncate(HEADER_BYTES + 25 * record)  # 15 pre-images lost
        else:
            f.seek(HEADER_BYTES + 10 * record + 30)
            b = f.read(1)
            f.seek(HEADER_BYTES + 10 * record + 30)
            f.write(bytes([b[0] ^ 0xFF]))
    s = ZarrHeadStore.open(stepped)
    with pytest.raises(HeadStoreCorruptionError, match="undo log") as e:
        s.recover(1)
    assert "1.log" in str(e.value) and "valid records" in str(e.value)
    s.close()


def test_an_intact_undo_log_rolls_back_cleanly(stepped):
    _crash_after_writes(stepped, np.arange(20, 60))
    s = ZarrHeadStore.open(stepped)
    assert s.uncommitted_records == 40
    s.recover(1)
    model = _model_at_1()
    assert_rows(s, model)
    s.close()


# ---- `diet head verify RUN`: every row's checksum --------------------------------------------------


def _run_folder(tmp_path, store_path):
    from diet_engine.engine.config import RunConfig

    run = tmp_path / "run"
    run.mkdir()
    os.replace(store_path, run / "head.zarr")
    cfg = RunConfig()
    cfg.head.store = "disk"
    cfg.save(run / "config.json")
    return run


def test_head_verify_reads_every_row(stepped, tmp_path, capsys):
    from diet_engine.launch.cli import main
    from diet_engine.launch.head import verify_head

    run = _run_folder(tmp_path, stepped)
    report = verify_head(run, progress=False)
    assert report["rows"] == make_meta().num_rows and report["rows_per_s"] > 0
    assert main(["head", "verify", "--run", str(run), "--no-progress"]) == 0
    assert "ok: 300 rows" in capsys.readouterr().out


@pytest.mark.parametrize("array", ["weight", "exp_avg_sq"])
def test_head_verify_finds_flipped_bytes(stepped, tmp_path, capsys, array):
    """A flipped byte used to be found only when training next read the row, as a traceback."""
    from diet_engine.launch.cli import main

    run = _run_folder(tmp_path, stepped)
    chunk = run / "head.zarr" / array / "c" / "3" / "0"  # rows 192..255, never read since creation
    with open(chunk, "r+b") as f:
        f.seek(5 * 12 * 4 + 7)  # row 197
        b = f.read(1)
        f.seek(5 * 12 * 4 + 7)
        f.write(bytes([b[0] ^ 0x10]))
    assert main(["head", "verify", "--run", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diet head: error:") and "197" in err and "Traceback" not in err
