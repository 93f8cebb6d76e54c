"""On-disk layout of the head store: a Zarr v3 group any Zarr reader can open.

    <store>/zarr.json                    group; attributes["diet_head"] = {format_version, meta, seed, commits, ...}
    <store>/weight/c/<i>/0               (N, d) dtype, chunk (R, d): raw little-endian rows, no compressor
    <store>/exp_avg/c/<i>/0              same
    <store>/exp_avg_sq/c/<i>/0           same
    <store>/step/c/<i>                   (N,) int64, chunk (R,): optimizer step each row is current at
    <store>/checksum/c/<i>/0             (N, 3) uint32, chunk (R, 3): crc32c of each row of the three arrays
    <store>/undo_log/zarr.json           an empty Zarr group holding the crash-recovery files:
    <store>/undo_log/<S>.log             undo segment: pre-images of rows first written after commit S
    <store>/undo_log/writer.lock         flock'd by the one process that has the store open for writing

A store may hold only some chunks (`chunks` attribute: the chunks of one rank's shards in a
multi-rank run; null = all): the other chunk files do not exist, so Zarr readers see the fill value
0 there, and the store refuses to read or write those rows.

Chunk i holds rows [i·R, (i+1)·R) (R = the dataset's shard size), so row n of array a is at byte
(n mod R)·d·itemsize of file a/c/<n div R>/0. Edge chunks are full size (Zarr pads them with the fill
value 0). Creation writes the metadata with zarr-python, then the chunk files directly: weights from
`head_init(seed)` (written, so every Zarr reader sees them), moments and steps as preallocated zero
extents (posix_fallocate: instant on ext4/xfs, and later in-place writes cannot hit ENOSPC).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from diet_engine.storage.head.base import _INIT_BLOCK, FORMAT_VERSION, HeadMeta, head_init
from diet_engine.storage.head.checksums import block_crcs
from diet_engine.storage.head.errors import HeadStoreCorruptionError, HeadStoreIOError
from diet_engine.storage.head.file_io import FileIO

DATA_ARRAYS = ("weight", "exp_avg", "exp_avg_sq")
STEP_ARRAY = "step"
CHECKSUM_ARRAY = "checksum"
UNDO_GROUP = "undo_log"
LOCK_FILE = "writer.lock"
ATTR_KEY = "diet_head"
DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Where each row lives. Pure arithmetic, no I/O."""

    root: str
    num_rows: int
    dim: int
    chunk_rows: int
    dtype: np.dtype

    @classmethod
    def from_meta(cls, root: str, meta: HeadMeta) -> HeadLayout:
        if meta.dtype not in DTYPES:
            raise ValueError(f"head dtype {meta.dtype!r} is not supported on disk; expected one of {sorted(DTYPES)}")
        if meta.num_rows <= 0 or meta.dim <= 0:
            raise ValueError(f"head needs num_rows > 0 and dim > 0, got {meta.num_rows} and {meta.dim}")
        if meta.chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be > 0 (the dataset's shard size), got {meta.chunk_rows}")
        return cls(os.fspath(root), meta.num_rows, meta.dim, min(meta.chunk_rows, meta.num_rows), DTYPES[meta.dtype])

    @functools.cached_property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_rows)

    def field_bytes(self, name: str) -> int:
        """Bytes one row occupies in array `name`."""
        return {STEP_ARRAY: 8, CHECKSUM_ARRAY: 12}.get(name, self.row_bytes)

    def chunk_path(self, name: str, chunk: int) -> str:
        tail = f"c/{chunk}" if name == STEP_ARRAY else f"c/{chunk}/0"
        return f"{self.root}/{name}/{tail}"

    @property
    def undo_dir(self) -> str:
        return f"{self.root}/{UNDO_GROUP}"

    def total_bytes(self, num_chunks: int | None = None) -> int:
        per_row = sum(self.field_bytes(a) for a in (*DATA_ARRAYS, STEP_ARRAY, CHECKSUM_ARRAY))
        return (self.num_chunks if num_chunks is None else num_chunks) * self.chunk_rows * per_row

    def chunks_of(self, rows: np.ndarray | None) -> list[int]:
        """Sorted chunk ids holding `rows`; all chunks for None."""
        if rows is None:
            return list(range(self.num_chunks))
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise ValueError(f"owned rows must lie in [0, {self.num_rows}), got [{rows.min()}, {rows.max()}]")
        return np.unique(rows // self.chunk_rows).tolist()


def chunk_rows_from_shards(counts: Sequence[int], first_index: Sequence[int]) -> tuple[int, int]:
    """(N, R) from a dataset manifest's per-shard sample counts and first global indices.

    Shards must be contiguous (shard k starts where k-1 ends) and all of size R except the last.
    """
    counts, first = [int(c) for c in counts], [int(f) for f in first_index]
    if not counts or len(counts) != len(first):
        raise ValueError(f"manifest shard layout needs one first index per shard count, got {len(first)} and "
                         f"{len(counts)}")
    expect = 0
    for k, (c, f) in enumerate(zip(counts, first, strict=True)):
        if f != expect:
            raise ValueError(f"manifest shard {k} starts at index {f}, expected {expect} (shards must be contiguous)")
        expect += c
    r = counts[0]
    odd = [k for k, c in enumerate(counts[:-1]) if c != r] + ([len(counts) - 1] if counts[-1] > r else [])
    if odd:
        raise ValueError(
            f"manifest shard {odd[0]} has {counts[odd[0]]} samples but shard 0 has {r}: head chunks need "
            "equal shard sizes (only the last shard may be shorter)"
        )
    return expect, r


# ---- group metadata ---------------------------------------------------------------------------


def read_attrs(root: str) -> dict[str, Any]:
    """The group's `diet_head` attributes; clear errors if `root` is not a head store."""
    path = f"{root}/zarr.json"
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no head store at {root}: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise HeadStoreCorruptionError(f"head store {root}: {path} is not valid JSON ({e})") from None
    attrs = doc.get("attributes", {}).get(ATTR_KEY)
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "group" or attrs is None:
        raise ValueError(f"{root} is not a DIET head store (a Zarr v3 group with attribute {ATTR_KEY!r})")
    return attrs


def write_attrs(root: str, attrs: dict[str, Any], io: FileIO) -> None:
    """Replace the group's `diet_head` attributes atomically (temp file + rename + fsync)."""
    path = f"{root}/zarr.json"
    with open(path, "rb") as f:
        doc = json.load(f)
    doc.setdefault("attributes", {})[ATTR_KEY] = attrs
    io.write_file_atomic(path, json.dumps(doc, indent=2).encode())


def make_attrs(meta: HeadMeta, seed: int, commits: list[int], chunks: list[int] | None) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "meta": meta.to_dict(),
        "seed": seed,
        "commits": list(commits),
        "chunks": chunks,
        "checksum": "crc32c of each row's raw bytes, per data array (columns of 'checksum')",
        "writer": "diet-engine storage.head.ZarrHeadStore",
    }


def _create_metadata(root: str, meta: HeadMeta, seed: int, chunks: list[int] | None) -> None:
    import zarr  # noqa: PLC0415 - only creating a store needs zarr; `diet` starts without it
    from zarr.codecs import BytesCodec  # noqa: PLC0415

    n, d, r = meta.num_rows, meta.dim, min(meta.chunk_rows, meta.num_rows)
    attrs = {ATTR_KEY: make_attrs(meta, seed, [meta.global_step], chunks)}
    group = zarr.create_group(store=root, zarr_format=3, attributes=attrs)
    plain = {"compressors": None, "filters": None, "serializer": BytesCodec(endian="little"), "fill_value": 0}
    for name in DATA_ARRAYS:
        group.create_array(name, shape=(n, d), chunks=(r, d), dtype=DTYPES[meta.dtype],
                           dimension_names=("row", "feature"), **plain)
    group.create_array(STEP_ARRAY, shape=(n,), chunks=(r,), dtype="<i8", dimension_names=("row",), **plain)
    group.create_array(CHECKSUM_ARRAY, shape=(n, 3), chunks=(r, 3), dtype="<u4", dimension_names=("row", "array"),
                       **plain)
    group.create_group(UNDO_GROUP,
                       attributes={"description": "undo log of the head store (crash recovery); not array data"})


def check_array_metadata(layout: HeadLayout) -> None:
    """Refuse arrays whose shape, chunking, dtype or codecs differ from what the hot path assumes."""
    expect = {name: ((layout.num_rows, layout.dim), (layout.chunk_rows, layout.dim), layout.dtype.name)
              for name in DATA_ARRAYS}
    expect[STEP_ARRAY] = ((layout.num_rows,), (layout.chunk_rows,), "int64")
    expect[CHECKSUM_ARRAY] = ((layout.num_rows, 3), (layout.chunk_rows, 3), "uint32")
    for name, (shape, chunks, dtype) in expect.items():
        path = f"{layout.root}/{name}/zarr.json"
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            raise HeadStoreCorruptionError(f"head store {layout.root}: array {name!r} is missing ({path})") from None
        got_chunks = tuple(doc.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", ()))
        codecs = [c.get("name") for c in doc.get("codecs", [])]
        endian = (doc.get("codecs") or [{}])[0].get("configuration", {}).get("endian", "little")
        sep = doc.get("chunk_key_encoding", {}).get("configuration", {}).get("separator", "/")
        problems = []
        if tuple(doc.get("shape", ())) != shape:
            problems.append(f"shape {tuple(doc.get('shape', ()))} != {shape}")
        if got_chunks != chunks:
            problems.append(f"chunks {got_chunks} != {chunks}")
        if doc.get("data_type") != dtype:
            problems.append(f"data_type {doc.get('data_type')!r} != {dtype!r}")
        if codecs != ["bytes"] or endian != "little" or sep != "/":
            problems.append(f"codecs {codecs} (endian {endian}, separator {sep!r}) != ['bytes'] little-endian '/'")
        if problems:
            raise HeadStoreCorruptionError(
                f"head store {layout.root}: array {name!r} does not have the layout the head store writes: "
                + "; ".join(problems)
            )


def check_chunk_files(layout: HeadLayout, chunks: Sequence[int]) -> list[str]:
    """Chunk files of `chunks` that are missing; raise if one exists at the wrong size.

    A missing chunk file is legal Zarr (every value is the fill value 0): zarr-python deletes a
    chunk it writes as all zeros. A wrong-sized one would be read as garbage.
    """
    missing = []
    for name in (*DATA_ARRAYS, STEP_ARRAY, CHECKSUM_ARRAY):
        want = layout.chunk_rows * layout.field_bytes(name)
        for c in chunks:
            path = layout.chunk_path(name, c)
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                missing.append(path)
                continue
            if size != want:
                raise HeadStoreCorruptionError(
                    f"head store {layout.root}: chunk file {path} has {size} bytes, expected {want}"
                )
    return missing


def _chunk_of_path(layout: HeadLayout, path: str) -> tuple[str, int]:
    """(array name, chunk id) of a chunk file path of this layout."""
    name, rest = path[len(layout.root) + 1 :].split("/", 1)
    return name, int(rest.split("/")[1])


def check_missing_chunks(layout: HeadLayout, missing: Sequence[str]) -> None:
    """Refuse missing chunk files whose rows are not all zero, by the rows' checksums.

    Zarr reads a missing chunk as its fill value 0, and zarr-python drops a chunk it writes as all
    zeros, so a missing file is legal only where zeros are the content: a data chunk whose rows'
    checksums are those of a zero row, a step chunk whose rows have zero moments (never stepped).
    Anything else is a deleted file that would silently come back as zeros. Cost: one read of the
    checksum chunk (12 B/row) per missing file; nothing when no file is missing.
    """
    if not missing:
        return
    zero_crc = int(block_crcs(np.zeros((1, layout.dim), layout.dtype))[0])
    for path in missing:
        name, c = _chunk_of_path(layout, path)
        if name == CHECKSUM_ARRAY:
            raise HeadStoreCorruptionError(
                f"head store {layout.root}: checksum chunk file {path} is missing: the store was damaged; "
                "restore it from a backup or start the run again")
    for path in missing:
        name, c = _chunk_of_path(layout, path)
        rows = min(layout.chunk_rows, layout.num_rows - c * layout.chunk_rows)
        crcs = np.fromfile(layout.chunk_path(CHECKSUM_ARRAY, c), dtype="<u4", count=3 * rows).reshape(rows, 3)
        cols = [DATA_ARRAYS.index(name)] if name in DATA_ARRAYS else [1, 2]  # step: moments must be zero
        nonzero = np.flatnonzero((crcs[:, cols] != zero_crc).any(axis=1))
        if nonzero.size:
            lo = c * layout.chunk_rows
            raise HeadStoreCorruptionError(
                f"head store {layout.root}: chunk file {path} is missing, but {nonzero.size} of its {rows} rows "
                f"(first: {(lo + nonzero[:3]).tolist()}) are not zero by their checksums: the file was deleted; "
                "restore it from a backup or start the run again (it would have come back as zeros)")


def materialize_missing(layout: HeadLayout, paths: Sequence[str], io: FileIO) -> None:
    """Recreate missing chunk files as preallocated zeros (their Zarr value), durable."""
    for path in paths:
        name = path[len(layout.root) + 1 :].split("/", 1)[0]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = io.open(path, os.O_RDWR | os.O_CREAT)
        try:
            io.fallocate(fd, 0, layout.chunk_rows * layout.field_bytes(name))
            io.fdatasync(fd)
        finally:
            io.close(fd)
        io.fsync_dir(os.path.dirname(path))


# ---- creation -----------------------------------------------------------------------------------


def _init_block(layout: HeadLayout, seed: int, block: int, io: FileIO, owned: set[int]) -> None:
    """Write init block `block` (rows [block·4096, ...)) of `weight` and the checksums of its rows.

    Memory: one (4096, d) float64 block from head_init plus its cast, ~100 MB at d = 2048.
    """
    lo, hi = block * _INIT_BLOCK, min((block + 1) * _INIT_BLOCK, layout.num_rows)
    w = head_init(seed, lo, hi, layout.dim, torch.float32 if layout.dtype.itemsize == 4 else torch.float64)
    w = np.ascontiguousarray(w.numpy(), dtype=layout.dtype)  # (rows, d)
    zero_crc = block_crcs(np.zeros((1, layout.dim), layout.dtype))[0]
    crcs = np.empty((hi - lo, 3), dtype="<u4")
    crcs[:, 0] = block_crcs(w)
    crcs[:, 1:] = zero_crc
    r = layout.chunk_rows
    for c in range(lo // r, (hi - 1) // r + 1):
        if c not in owned:
            continue
        s, e = max(lo, c * r), min(hi, (c + 1) * r)
        for name, data, fb in (("weight", w, layout.row_bytes), (CHECKSUM_ARRAY, crcs, 12)):
            fd = io.open(layout.chunk_path(name, c), os.O_WRONLY)
            try:
                io.pwritev(fd, [memoryview(data[s - lo : e - lo]).cast("B")], (s - c * r) * fb)
            finally:
                io.close(fd)


def create_files(layout: HeadLayout, seed: int, io: FileIO, chunks: Sequence[int], threads: int = 4) -> None:
    """Preallocate the chunk files of `chunks`, write initial weights + checksums, fdatasync all."""
    for name in (*DATA_ARRAYS, STEP_ARRAY, CHECKSUM_ARRAY):
        size = layout.chunk_rows * layout.field_bytes(name)
        for c in chunks:
            path = layout.chunk_path(name, c)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = io.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            try:
                io.fallocate(fd, 0, size)  # zeros; blocks reserved now, so training writes never ENOSPC
            finally:
                io.close(fd)
    owned, r = set(chunks), layout.chunk_rows
    blocks = sorted({b for c in chunks
                     for b in range(c * r // _INIT_BLOCK, (min((c + 1) * r, layout.num_rows) - 1) // _INIT_BLOCK + 1)})
    with ThreadPoolExecutor(max(1, threads)) as pool:  # torch RNG and pwrite release the GIL
        for f in [pool.submit(_init_block, layout, seed, b, io, owned) for b in blocks]:
            f.result()
        paths = [layout.chunk_path(n, c) for n in (*DATA_ARRAYS, STEP_ARRAY, CHECKSUM_ARRAY) for c in chunks]
        list(pool.map(lambda p: _fdatasync_path(io, p), paths))


def _fdatasync_path(io: FileIO, path: str) -> None:
    """fdatasync, then drop the file's pages from the page cache: the large folios a sequential
    write leaves there make later 8 KiB in-place row writes ~25× slower (measured: 100 µs vs 4 µs)."""
    fd = io.open(path, os.O_RDONLY)
    try:
        io.fdatasync(fd)
        io.fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        io.close(fd)


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def create_store(
    root: str, meta: HeadMeta, seed: int, io: FileIO, overwrite: bool = False, threads: int = 4,
    owned_rows: np.ndarray | None = None,
) -> HeadLayout:
    """Create a head store at `root`; built in a temp folder and renamed, so a failure leaves nothing.

    `owned_rows`: only the chunks holding these rows get files (one rank's shards); None: all.
    """
    if sys.byteorder != "little":
        raise RuntimeError("the head store's raw chunk I/O assumes a little-endian machine")
    root = os.path.abspath(os.fspath(root))
    if os.path.exists(root):
        if not overwrite:
            raise FileExistsError(f"head store {root} already exists: open it, or pass overwrite=True to replace it")
        shutil.rmtree(root)
    layout = HeadLayout.from_meta(root, meta)
    chunks = layout.chunks_of(owned_rows)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    need, free = layout.total_bytes(len(chunks)), shutil.disk_usage(parent).free
    if need > free:
        raise HeadStoreIOError(
            errno.ENOSPC,
            f"not enough free disk for head store {root}: it needs {_human(need)} "
            f"(N={layout.num_rows}, d={layout.dim}, 3 arrays of {layout.dtype.name} + steps + checksums), "
            f"{_human(free)} are free; the undo log needs more during training",
        )
    tmp = f"{root}.creating-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _create_metadata(tmp, meta, seed, None if owned_rows is None else chunks)
        create_files(dataclasses.replace(layout, root=tmp), seed, io, chunks, threads)
        io.fsync_dir(tmp)
        os.replace(tmp, root)
        io.fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return layout
