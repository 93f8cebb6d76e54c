"""Row-granular reads and writes of the head's chunk files, bypassing zarr-python.

A row of array a lives at a fixed byte offset of one chunk file (see zarr_layout), so reading or
writing B rows is B·3 `preadv`/`pwritev` calls straight into (or from) slots of a reusable buffer:
no chunk decode, no read-modify-write of a 40 MB chunk. Consecutive row ids of one chunk are
coalesced into one vectored call (the streaming order produces such runs). Per row and direction:
3 data calls of d·itemsize bytes, 1 checksum call of 12 bytes, and on writes 1 step call of 8
bytes. Callers run these from a thread pool; every call releases the GIL in the kernel.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from diet_engine.storage.faults import fault_point
from diet_engine.storage.head.checksums import row_crcs, verify_rows
from diet_engine.storage.head.file_io import IOV_MAX, FdCache, FileIO
from diet_engine.storage.head.zarr_layout import CHECKSUM_ARRAY, DATA_ARRAYS, STEP_ARRAY, HeadLayout


def runs(rows: np.ndarray, chunk_rows: int) -> list[tuple[int, int]]:
    """[start, stop) positions of maximal runs of consecutive rows inside one chunk (rows sorted)."""
    if rows.size == 0:
        return []
    chunk = rows // chunk_rows
    brk = np.flatnonzero((np.diff(rows) != 1) | (np.diff(chunk) != 0)) + 1
    edges = [0, *brk.tolist(), rows.size]
    out = []
    for s, e in zip(edges[:-1], edges[1:], strict=True):
        while e - s > IOV_MAX:
            out.append((s, s + IOV_MAX))
            s += IOV_MAX
        out.append((s, e))
    return out


def chunk_groups(rows: np.ndarray, chunk_rows: int) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """[(chunk, [(start, stop, first row within the chunk), ...]), ...]: the runs of each chunk.

    One descriptor acquisition per chunk and array instead of one per run (Python overhead
    dominates a buffered 8 KiB pread: ~2 µs of syscall against ~5 µs of bookkeeping).
    """
    out: list[tuple[int, list[tuple[int, int, int]]]] = []
    first = (rows % chunk_rows).tolist()
    chunk = (rows // chunk_rows).tolist()
    for s, e in runs(rows, chunk_rows):
        if not out or out[-1][0] != chunk[s]:
            out.append((chunk[s], []))
        out[-1][1].append((s, e, first[s]))
    return out


class RowIO:
    """Gather / scatter rows between chunk files and (S, d) slot arrays.

    `verify` checks every row read against the `checksum` array (CorruptionError on mismatch).
    `readahead_rows`: when a batch touches at least this many rows of a chunk (the streaming,
    shard-clustered order), `readahead` advises the whole chunk of each data array WILLNEED once,
    so the kernel reads it sequentially in the background instead of row by row (0 disables).
    """

    def __init__(
        self, layout: HeadLayout, fds: FdCache, io: FileIO, verify: bool = True, readahead_rows: int = 32,
        zero_files: Sequence[str] = (),
    ) -> None:
        self.layout = layout
        self.zero_files = frozenset(zero_files)  # absent chunk files (read-only store): read as zeros
        self.fds = fds
        self.io = io
        self.verify = verify
        self.readahead_rows = readahead_rows
        self._advised: OrderedDict[int, None] = OrderedDict()  # chunks recently advised WILLNEED
        self._advised_lock = threading.Lock()  # gathers run on several pool threads

    # ---- reads ----------------------------------------------------------------------------------

    def readahead(self, rows: np.ndarray) -> None:
        """Advise WILLNEED on whole chunks touched by >= readahead_rows of `rows` (once per chunk)."""
        chunks, counts = np.unique(rows // self.layout.chunk_rows, return_counts=True)
        for c in chunks[counts >= self.readahead_rows].tolist():
            with self._advised_lock:
                if c in self._advised:
                    continue
                self._advised[c] = None
                if len(self._advised) > 64:
                    self._advised.popitem(last=False)
            size = self.layout.chunk_rows * self.layout.row_bytes
            for name in DATA_ARRAYS:
                path = self.layout.chunk_path(name, c)
                if path in self.zero_files:
                    continue
                with self.fds.use(path) as fd:
                    self.io.fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)

    def gather(self, rows: np.ndarray, dst: Sequence[np.ndarray], pos: np.ndarray) -> None:
        """Read rows (M,) sorted into dst[k][pos[i]] for the three data arrays; verify checksums.

        dst: three (S, d) arrays of the layout's dtype (slot buffers, pinned when CUDA is present).
        """
        lay, rb = self.layout, self.layout.row_bytes
        stored = np.empty((rows.size, 3), dtype="<u4") if self.verify else None
        slots = pos.tolist()
        for chunk, group in chunk_groups(rows, lay.chunk_rows):
            for name, arr in zip(DATA_ARRAYS, dst, strict=True):
                path = lay.chunk_path(name, chunk)
                if path in self.zero_files:
                    arr[pos[group[0][0] : group[-1][1]]] = 0
                    continue
                with self.fds.use(path) as fd:
                    for s, e, first in group:
                        self.io.preadv(fd, [memoryview(arr[p]).cast("B") for p in slots[s:e]], first * rb)
            if stored is not None:
                path = lay.chunk_path(CHECKSUM_ARRAY, chunk)
                if path in self.zero_files:
                    stored[group[0][0] : group[-1][1]] = 0
                    continue
                with self.fds.use(path) as fd:
                    self._span_io(fd, stored, group, 12, write=False)
        if stored is not None:
            verify_rows(stored, row_crcs(dst, pos), rows, DATA_ARRAYS, lay.chunk_rows, lay.root)

    SPAN_BYTES = 64 << 10  # step/checksum rows of one chunk moved as one span when it is this small

    def _span_io(self, fd: int, data: np.ndarray, group: list[tuple[int, int, int]], width: int, write: bool) -> None:
        """Move the small per-row fields (steps: 8 B, checksums: 12 B) of one chunk's runs.

        data: (M, ...) rows in `rows` order. When the runs span <= SPAN_BYTES of the file, one pread
        (+ patch + one pwrite) of the whole span replaces one call per run: ~2 calls instead of ~2 per
        row in the random order. The rewritten bytes of rows between the runs are the ones just read;
        only the write-behind thread (or recovery) writes these files, so nothing races with it.
        """
        lo, hi = group[0][2], group[-1][2] + group[-1][1] - group[-1][0]  # rows [lo, hi) of the chunk
        if len(group) == 1 or (hi - lo) * width > self.SPAN_BYTES:
            for s, e, first in group:
                if write:
                    self.io.pwritev(fd, [memoryview(data[s:e]).cast("B")], first * width)
                else:
                    self.io.preadv(fd, [memoryview(data[s:e]).cast("B")], first * width)
            return
        span = np.empty((hi - lo, *data.shape[1:]), dtype=data.dtype)
        self.io.preadv(fd, [memoryview(span).cast("B")], lo * width)
        for s, e, first in group:
            if write:
                span[first - lo : first - lo + e - s] = data[s:e]
            else:
                data[s:e] = span[first - lo : first - lo + e - s]
        if write:
            self.io.pwritev(fd, [memoryview(span).cast("B")], lo * width)

    def warm_checksums(self, chunks: Sequence[int]) -> None:
        """Ask the kernel to read the checksum files (N·12 bytes, 15 MB for ImageNet) in the
        background, so the per-row checksum reads of a random-order gather are cache hits."""
        for c in chunks:
            path = self.layout.chunk_path(CHECKSUM_ARRAY, c)
            if path not in self.zero_files:
                with self.fds.use(path) as fd:
                    self.io.fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)

    def read_steps(self, chunks: Sequence[int]) -> np.ndarray:
        """The (N,) int64 step array (one sequential read per chunk file; 0 outside `chunks`)."""
        lay = self.layout
        out = np.zeros(lay.num_chunks * lay.chunk_rows, dtype="<i8")
        for c in chunks:
            if lay.chunk_path(STEP_ARRAY, c) in self.zero_files:
                continue
            with self.fds.use(lay.chunk_path(STEP_ARRAY, c)) as fd:
                view = out[c * lay.chunk_rows : (c + 1) * lay.chunk_rows]
                self.io.preadv(fd, [memoryview(view).cast("B")], 0)
        return out[: lay.num_rows].astype(np.int64)

    # ---- writes ---------------------------------------------------------------------------------

    def scatter(self, rows: np.ndarray, src: Sequence[np.ndarray], pos: np.ndarray, steps: np.ndarray) -> None:
        """Write rows (M,) sorted from src[k][pos[i]], their step stamps (M,) and fresh checksums.

        Writes land in the page cache; the files are marked dirty for the next fdatasync (commit).
        """
        lay, rb = self.layout, self.layout.row_bytes
        crcs = row_crcs(src, pos)  # (M, 3) uint32
        steps = np.ascontiguousarray(steps, dtype="<i8")
        slots = pos.tolist()
        dirty = []
        for chunk, group in chunk_groups(rows, lay.chunk_rows):
            for name, arr in zip(DATA_ARRAYS, src, strict=True):
                path = lay.chunk_path(name, chunk)
                with self.fds.use(path) as fd:
                    for s, e, first in group:
                        self.io.pwritev(fd, [memoryview(arr[p]).cast("B") for p in slots[s:e]], first * rb)
                dirty.append(path)
                if name == DATA_ARRAYS[0]:
                    fault_point("scatter")  # tests only (storage/faults.py): rows torn here
            for name, data, width in ((STEP_ARRAY, steps, 8), (CHECKSUM_ARRAY, crcs, 12)):
                path = lay.chunk_path(name, chunk)
                with self.fds.use(path) as fd:
                    self._span_io(fd, data, group, width, write=True)
                dirty.append(path)
        self.fds.mark_dirty(dirty)
