"""The memory store's checkpoint files (storage/head/rows_file.py): bit-exact round trip, damaged
files refused, and no copy of the rows while saving or loading."""

from __future__ import annotations

import io
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from head_conformance import Model, assert_rows, make_meta, update

from diet_engine.storage.head import HeadStoreCorruptionError, MemoryHeadStore
from diet_engine.storage.head.rows_file import read_rows_file, write_rows_file


def _through_torch_save(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what the checkpoint loader does with the client state


def _trained(meta, seed: int = 2) -> tuple[MemoryHeadStore, Model]:
    store, model = MemoryHeadStore(meta, seed=seed), Model(meta, seed)
    for t, rows in enumerate(([1, 50, 299], [0, 1, 2, 64, 65], [7, 299]), start=1):
        b = update(store.read_rows(np.array(rows)), t)
        store.write_rows(b)
        model.write(b)
    store.commit(3)
    return store, model


def _arrays(rng: np.random.Generator, n: int = 37, d: int = 29, dtype=np.float32) -> dict[str, np.ndarray]:
    return {"weight": rng.standard_normal((n, d)).astype(dtype), "exp_avg": rng.standard_normal((n, d)).astype(dtype),
            "exp_avg_sq": rng.random((n, d)).astype(dtype), "step": rng.integers(0, 1 << 40, n)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("block_bytes", [1000, 8 << 20])  # blocks that cut rows and elements; one block
def test_rows_file_round_trip_bit_exact(tmp_path, dtype, block_bytes):
    src = _arrays(np.random.default_rng(0), dtype=dtype)
    record = _through_torch_save(write_rows_file(tmp_path, "head_rank0", src, {"k": "v"}, block_bytes=block_bytes))
    assert record["file"] == "head_rank0.safetensors" and sorted(p.name for p in tmp_path.iterdir()) == [record["file"]]
    dst = {k: np.full_like(v, 7) for k, v in src.items()}
    meta = read_rows_file(tmp_path, record, dst, block_bytes=block_bytes)
    assert meta["k"] == "v"
    for k in src:
        assert dst[k].tobytes() == src[k].tobytes(), k

    from safetensors.numpy import load_file  # any safetensors reader opens the file

    loaded = load_file(str(tmp_path / record["file"]))
    assert set(loaded) == set(src) and all(np.array_equal(loaded[k], src[k]) for k in src)


def test_memory_store_checkpoint_files_round_trip(tmp_path):
    meta = make_meta()
    store, model = _trained(meta)
    state = _through_torch_save(store.save_files(tmp_path, "head_rank0"))
    assert "weight" not in state and state["rows"]["file"] == "head_rank0.safetensors"  # rows in the file only
    store.write_rows(update(store.read_rows(np.array([1])), 4))  # the file is a snapshot
    new = MemoryHeadStore(meta)
    new.load_files(tmp_path, state)
    assert_rows(new, model)
    assert new.commits == [3] and new.meta.global_step == 3
    view = MemoryHeadStore.from_files(tmp_path, state, read_only=True)
    assert_rows(view, model)
    assert view.read_only
    with pytest.raises(ValueError, match="load_files"):  # a files state is not a full state dict
        MemoryHeadStore(meta).load_state_dict(state)


def test_memory_store_refuses_another_head(tmp_path):
    store, _ = _trained(make_meta())
    state = store.save_files(tmp_path, "head_rank0")
    with pytest.raises(ValueError, match="num_rows"):
        MemoryHeadStore(make_meta(num_rows=301)).load_files(tmp_path, state)
    state["format_version"] = 7
    with pytest.raises(ValueError, match="format version 7"):
        MemoryHeadStore(make_meta()).load_files(tmp_path, state)


def test_truncated_or_longer_rows_file_is_refused(tmp_path):
    store, _ = _trained(make_meta())
    state = store.save_files(tmp_path, "head_rank0")
    path = tmp_path / state["rows"]["file"]
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(HeadStoreCorruptionError, match=r"head_rank0\.safetensors has .* bytes.*truncated"):
        MemoryHeadStore(make_meta()).load_files(tmp_path, state)
    path.write_bytes(data + b"\0")
    with pytest.raises(HeadStoreCorruptionError, match="longer than written"):
        MemoryHeadStore(make_meta()).load_files(tmp_path, state)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="rows file of this checkpoint is missing"):
        MemoryHeadStore(make_meta()).load_files(tmp_path, state)


@pytest.mark.parametrize("where", ["exp_avg_sq", "step", "header"])
def test_corrupt_rows_file_is_refused(tmp_path, where):
    store, _ = _trained(make_meta())
    state = store.save_files(tmp_path, "head_rank0")
    path = tmp_path / state["rows"]["file"]
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if where == "header":  # same size, another shape: the layout no longer matches this head
        pos = data.index(b"[300, 12]")
        data[pos : pos + 9] = b"[12, 300]"
        match = "do not match this head"
    else:
        begin, end = header[where]["data_offsets"]
        data[8 + n + (begin + end) // 2] ^= 0x10  # one bit in the middle of the array
        match = f"array '{where}' fails its checksum"
    path.write_bytes(bytes(data))
    with pytest.raises(HeadStoreCorruptionError, match=match):
        MemoryHeadStore(make_meta()).load_files(tmp_path, state)


def test_record_naming_a_path_is_refused(tmp_path):
    store, _ = _trained(make_meta())
    (tmp_path / "a").mkdir()
    state = store.save_files(tmp_path / "a", "head_rank0")
    state["rows"]["file"] = "../a/head_rank0.safetensors"
    with pytest.raises(HeadStoreCorruptionError, match="expected a file name"):
        MemoryHeadStore(make_meta()).load_files(tmp_path / "a", state)


def test_failed_write_leaves_nothing(tmp_path):
    arrays = _arrays(np.random.default_rng(1))
    arrays["exp_avg"] = arrays["exp_avg"][:, ::2]  # not contiguous: refused before any byte is written
    with pytest.raises(ValueError, match="C-contiguous"):
        write_rows_file(tmp_path, "head_rank0", arrays)
    assert list(tmp_path.iterdir()) == []


def test_save_and_load_allocate_no_copy_of_the_rows(tmp_path):
    """Python-level allocations (numpy arrays, bytes) while saving and loading stay far below the
    rows' size: the bytes move between the tensors and the file through views."""
    meta = make_meta(num_rows=4096, dim=256)  # 12.6 MB of rows
    store = MemoryHeadStore(meta, seed=1)
    rows_bytes = 3 * store.weight.nbytes + store.step_stamps.nbytes
    new = MemoryHeadStore(meta)
    tracemalloc.start()
    try:
        state = store.save_files(tmp_path, "head_rank0")
        new.load_files(tmp_path, state)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(new.weight, store.weight)
    assert peak < 256 << 10, f"{peak} bytes allocated for {rows_bytes} bytes of rows"


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) << 10
    raise KeyError(field)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and resets VmHWM")
def test_peak_rss_while_saving_and_loading_stays_within_a_tenth_of_the_rows(tmp_path):
    """The process's peak RSS (VmHWM, reset just before) grows by less than 10% of the rows' size
    while the rows are saved and loaded back into another store (torch allocations included, which
    tracemalloc does not see). The page cache the file goes through is not RSS."""
    meta = make_meta(num_rows=32768, dim=256)  # 101 MB of rows
    store, new = MemoryHeadStore(meta, seed=1), MemoryHeadStore(meta)
    store.exp_avg.normal_()  # touch every page of both stores (zeros may not be resident)
    store.exp_avg_sq.uniform_()
    for t in (new.weight, new.exp_avg, new.exp_avg_sq):
        t.fill_(1.0)
    rows_bytes = 3 * store.weight.nbytes + store.step_stamps.nbytes
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError as e:
        pytest.skip(f"cannot reset the peak RSS here ({e})")
    before = _vm("VmRSS")
    state = store.save_files(tmp_path, "head_rank0")
    new.load_files(tmp_path, state)
    grown = _vm("VmHWM") - before
    assert torch.equal(new.exp_avg_sq, store.exp_avg_sq)
    assert grown < rows_bytes // 10, f"peak RSS grew by {grown} bytes for {rows_bytes} bytes of rows"
