"""Undo log: pre-images of head rows, so a crash can be rolled back to the last two commits.

Protocol (the write-behind thread and ZarrHeadStore.commit/recover follow it):

* Segment `<S>.log` holds, for every row first written after commit S, its bytes at S (weight,
  exp_avg, exp_avg_sq, step stamp). A row gets one record per segment; the store remembers which
  rows it logged since the last commit in a bitset (N/8 bytes).
* Write-ahead rule: a row's record is appended and the segment fdatasync'ed BEFORE the row is
  overwritten in place. A crash can then tear only rows that have a durable pre-image.
* commit(S): fdatasync the data files, start segment `<S>.log`, record S in the group attributes
  (atomic rename), delete segments older than the previous commit. Segments of the last two commit
  intervals stay, so both the newest and the one-but-newest commit can be restored.
* recover(S): replay the segments of every commit >= S, newest first, each from its end to its
  start (the earliest pre-image of a row wins), fdatasync, then truncate. Replay is idempotent, so
  a crash during recovery is recovered by recovering again.

Record: [row int64][step int64][crc32c uint32][pad uint32][weight | exp_avg | exp_avg_sq raw bytes];
the crc covers row, step and payload, so a record torn by a crash ends the valid log. Disk cost:
3·d·itemsize + 24 bytes per row written in the last two commit intervals (at most ~2× the head).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Sequence

import google_crc32c
import numpy as np

from diet_engine.storage.head.errors import HeadStoreCorruptionError
from diet_engine.storage.head.file_io import FileIO
from diet_engine.storage.head.zarr_layout import HeadLayout

_MAGIC = b"DIETUNDO"
_VERSION = 1
_HEADER = struct.Struct("<8sIIqqqI")  # magic, version, header bytes, base step, N, d, itemsize
HEADER_BYTES = 64
_PREFIX = 24  # row, step, crc, pad
_SCAN_BYTES = 64 << 20  # records read per block during scan/replay

# apply(rows (K,) sorted, steps (K,), src: three (K', d) arrays, pos (K,) positions into src)
ApplyFn = Callable[[np.ndarray, np.ndarray, Sequence[np.ndarray], np.ndarray], None]


class Bitset:
    """N bits: which rows already have a pre-image in the current segment. Memory: N/8 bytes."""

    def __init__(self, n: int) -> None:
        self.bits = np.zeros((n + 7) // 8, dtype=np.uint8)

    def test(self, rows: np.ndarray) -> np.ndarray:
        return ((self.bits[rows >> 3] >> (rows & 7).astype(np.uint8)) & 1).astype(bool)

    def set(self, rows: np.ndarray) -> None:
        """Set the bits of rows (sorted, unique)."""
        if rows.size == 0:
            return
        byte = rows >> 3
        starts = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])  # one group per touched byte
        masks = np.bitwise_or.reduceat((1 << (rows & 7)).astype(np.uint8), starts)
        self.bits[byte[starts]] |= masks

    def clear(self) -> None:
        self.bits[:] = 0


class UndoLog:
    """Segments in `<store>/undo_log/`; one is open for appending (the write-behind thread's)."""

    def __init__(self, layout: HeadLayout, io: FileIO) -> None:
        self.layout = layout
        self.io = io
        self.dir = layout.undo_dir
        self.record_bytes = _PREFIX + 3 * layout.row_bytes
        self.step: int | None = None  # base step of the open segment
        self._fd: int | None = None
        self._end = 0
        self.bytes_appended = 0
        self._scans: dict[int, tuple[int, int]] = {}  # step -> (valid records, record slots) of the last scan

    def path(self, step: int) -> str:
        return f"{self.dir}/{step}.log"

    def _header(self, step: int) -> bytes:
        lay = self.layout
        head = _HEADER.pack(_MAGIC, _VERSION, HEADER_BYTES, step, lay.num_rows, lay.dim, lay.dtype.itemsize)
        return head.ljust(HEADER_BYTES, b"\0")

    # ---- the open segment -----------------------------------------------------------------------

    def start(self, step: int) -> None:
        """Make an empty `<step>.log` (replacing any) the open segment; durable before returning."""
        self.close()
        fd = self.io.open(self.path(step), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        try:
            self.io.pwritev(fd, [memoryview(self._header(step))], 0)
            self.io.fdatasync(fd)
            self.io.fsync_dir(self.dir)
        except BaseException:
            self.io.close(fd)
            raise
        self._fd, self._end, self.step = fd, HEADER_BYTES, step

    def reopen(self, step: int) -> int:
        """Open `<step>.log` for appending after its valid records (cutting a torn tail); returns their count."""
        if not os.path.exists(self.path(step)):
            self.start(step)
            return 0
        n = self.count_valid(step)
        self.close()
        fd = self.io.open(self.path(step), os.O_RDWR)
        end = HEADER_BYTES + n * self.record_bytes
        if os.fstat(fd).st_size != end:
            self.io.ftruncate(fd, end)
            self.io.fdatasync(fd)
        self._fd, self._end, self.step = fd, end, step
        return n

    def append(self, rows: np.ndarray, steps: np.ndarray, src: Sequence[np.ndarray], pos: np.ndarray) -> None:
        """Append records for rows (U,) with pre-images src[k][pos[i]] and step stamps (U,). Not synced.

        Memory: a transient (U, 24 + 3·d·itemsize) byte buffer (6.3 MB for U = 256, d = 2048).
        """
        if self._fd is None:
            raise RuntimeError("undo log has no open segment")
        u, rb = rows.size, self.layout.row_bytes
        buf = np.empty((u, self.record_bytes), dtype=np.uint8)
        buf[:, 0:8] = rows.astype("<i8").view(np.uint8).reshape(u, 8)
        buf[:, 8:16] = np.asarray(steps, dtype="<i8").view(np.uint8).reshape(u, 8)
        buf[:, 20:24] = 0
        for k, arr in enumerate(src):
            buf[:, _PREFIX + k * rb : _PREFIX + (k + 1) * rb] = arr[pos].view(np.uint8).reshape(u, rb)
        crcs = np.fromiter((_record_crc(r) for r in buf), dtype="<u4", count=u)
        buf[:, 16:20] = crcs.view(np.uint8).reshape(u, 4)
        self.io.pwritev(self._fd, [memoryview(buf).cast("B")], self._end)
        self._end += buf.nbytes
        self.bytes_appended += buf.nbytes

    def sync(self) -> None:
        if self._fd is not None:
            self.io.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.io.close(self._fd)
            self._fd = None

    # ---- reading segments -----------------------------------------------------------------------

    def _open_checked(self, step: int) -> tuple[int, bool]:
        """(fd, header_ok); a header torn at creation means the segment holds no records."""
        path = self.path(step)
        fd = self.io.open(path, os.O_RDONLY)
        head = bytearray(HEADER_BYTES)
        try:
            self.io.preadv(fd, [memoryview(head)], 0)
        except EOFError:
            head = bytearray(HEADER_BYTES)  # torn at creation: no records can follow
        magic, version, hbytes, base, n, d, isz = _HEADER.unpack_from(head)
        lay = self.layout
        expected = (_VERSION, HEADER_BYTES, step, lay.num_rows, lay.dim, lay.dtype.itemsize)
        if magic == _MAGIC and (version, hbytes, base, n, d, isz) != expected:
            self.io.close(fd)
            raise HeadStoreCorruptionError(
                f"undo segment {path} belongs to another store or format (version {version}, step {base}, "
                f"N {n}, d {d}, itemsize {isz}); expected step {step}, N {lay.num_rows}, d {lay.dim}"
            )
        return fd, magic == _MAGIC

    def _blocks(self, n: int) -> list[tuple[int, int]]:
        per = max(1, _SCAN_BYTES // self.record_bytes)
        return [(i, min(n, i + per)) for i in range(0, n, per)]

    def _read(self, fd: int, i0: int, i1: int) -> np.ndarray:
        buf = np.empty((i1 - i0, self.record_bytes), dtype=np.uint8)
        self.io.preadv(fd, [memoryview(buf).cast("B")], HEADER_BYTES + i0 * self.record_bytes)
        return buf

    def count_valid(self, step: int) -> int:
        """Records of `<step>.log` before the first torn or invalid one (reads the whole segment)."""
        fd, ok = self._open_checked(step)
        if not ok:
            self.io.close(fd)
            return 0
        try:
            n_all = max(0, (os.fstat(fd).st_size - HEADER_BYTES) // self.record_bytes)
            for i0, i1 in self._blocks(n_all):
                buf = self._read(fd, i0, i1)
                rows = buf[:, 0:8].copy().view("<i8")[:, 0]
                for j, rec in enumerate(buf):
                    ok = 0 <= rows[j] < self.layout.num_rows and _record_crc(rec) == int(rec[16:20].view("<u4")[0])
                    if not ok:
                        self._scans[step] = (i0 + j, n_all)
                        return i0 + j
            self._scans[step] = (n_all, n_all)
            return n_all
        finally:
            self.io.close(fd)

    def replay(self, step: int, apply: ApplyFn) -> int:
        """Apply the pre-images of `<step>.log` from its end to its start; returns rows restored."""
        if not os.path.exists(self.path(step)):
            return 0
        n = self.count_valid(step)
        fd, ok = self._open_checked(step)
        if not ok:
            self.io.close(fd)
            return 0
        rb, restored = self.layout.row_bytes, 0
        try:
            for i0, i1 in reversed(self._blocks(n)):
                buf = self._read(fd, i0, i1)
                rows = buf[:, 0:8].copy().view("<i8")[:, 0]
                steps = buf[:, 8:16].copy().view("<i8")[:, 0]
                # a row logged twice in one block (store reopened without recover): earliest wins
                uniq, first = np.unique(rows, return_index=True)
                src = [buf[:, _PREFIX + k * rb : _PREFIX + (k + 1) * rb].view(self.layout.dtype) for k in range(3)]
                apply(uniq, steps[first], src, first)
                restored += uniq.size
        finally:
            self.io.close(fd)
        return restored

    def scan_note(self) -> str:
        """What the last scans found, for error messages: valid records of each segment's slots."""
        return "; ".join(f"{self.path(s)}: {v} valid records of {n}" for s, (v, n) in sorted(self._scans.items())) \
            or "no segment scanned"

    def has_records(self, step: int) -> bool:
        """Cheap check (file size only) used when opening read-only."""
        try:
            return os.stat(self.path(step)).st_size > HEADER_BYTES
        except FileNotFoundError:
            return False

    def remove_except(self, keep: Sequence[int]) -> None:
        """Delete segment files of steps not in `keep` (stale after a commit or recovery)."""
        names = {f"{s}.log" for s in keep}
        for name in os.listdir(self.dir):
            if name.endswith(".log") and name not in names:
                os.unlink(f"{self.dir}/{name}")


def _record_crc(rec: np.ndarray) -> int:
    """crc32c of a record's row, step and payload (bytes 0:16 and 24:)."""
    return google_crc32c.extend(google_crc32c.value(rec[0:16].tobytes()), rec[_PREFIX:].tobytes())
