"""Bringing rows into the row cache: gathers queued on the I/O pool, pins, waiting for them.

The residency protocol of the on-disk store (all under the store's condition `cv`):

* a row absent from the cache gets a slot (evicting unpinned LRU rows) and a gather task on the
  pool; the slot carries a "loading" pin and `cache.loading[row]` holds the task's future until it
  completes (a failed future stays there, so the next read of the row raises, then retries);
* rows a caller is about to copy or overwrite are pinned (`pin_resident`) so that no eviction can
  reuse their slots meanwhile; rows with writes in flight stay pinned by the write-behind jobs,
  so a disk read never races an in-place write of the same row;
* a read larger than the cache bypasses it (`direct`): absent rows go straight into the caller's
  output, which is safe because absent rows have no write in flight.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Executor, Future

import numpy as np

from diet_engine.storage.head.row_cache import RowCache
from diet_engine.storage.head.row_io import RowIO


class Gatherer:
    """Fills row-cache slots from disk: one task per chunk in the streaming order, else tasks of
    about rows/io_threads rows each."""

    def __init__(self, cache: RowCache, row_io: RowIO, pool: Executor, cv: threading.Condition,
                 counters: dict[str, float], io_threads: int, readahead_rows: int, budget_hint: str) -> None:
        self.cache, self.row_io, self.pool, self.cv = cache, row_io, pool, cv
        self.counters = counters  # the store's, updated in place
        self.io_threads, self.readahead_rows = io_threads, readahead_rows
        self.budget_hint = budget_hint  # how to raise the budget, for error messages
        self.inflight = 0  # gather tasks queued or running (the I/O queue depth)

    def submit(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Queue reads of rows (K,) into cache slots (K,). Caller holds cv; slots get a loading pin."""
        if rows.size == 0:
            return
        self.cache.pin(slots)
        chunk = rows // self.row_io.layout.chunk_rows
        starts = np.flatnonzero(np.r_[True, chunk[1:] != chunk[:-1]])  # rows are sorted
        clustered = self.readahead_rows and np.diff(np.r_[starts, rows.size]).max() >= self.readahead_rows
        if clustered:
            # streaming order: the kernel reads these chunks ahead sequentially, so one task per
            # chunk beats a deep queue of small tasks (measured: about half the gather CPU per step)
            self.pool.submit(self.row_io.readahead, rows)
            bounds = [*starts.tolist(), rows.size]
        else:  # random order: ~rows/io_threads rows per task, io_threads reads outstanding
            per = max(8, math.ceil(rows.size / self.io_threads))
            bounds = [*range(0, rows.size, per), rows.size]
        for i, j in zip(bounds[:-1], bounds[1:], strict=True):
            r, s = rows[i:j], slots[i:j]
            fut = self.pool.submit(self._task, r, s)
            for row in r.tolist():
                self.cache.loading[row] = fut
            self.inflight += 1
        c = self.counters
        c["io_queue_peak"] = max(c["io_queue_peak"], self.inflight)

    def _task(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Runs on a gather thread: fill slots from disk, then release the loading pins."""
        err, c0 = None, time.thread_time()
        try:
            self.row_io.gather(rows, self.cache.pool.arrays, slots)
        except BaseException as e:  # noqa: BLE001 - kept in the future; read_rows raises it
            err = e
        with self.cv:
            self.cache.unpin(slots)
            self.inflight -= 1
            if err is None:
                for r in rows.tolist():
                    self.cache.loading.pop(r, None)
                self.counters["rows_gathered"] += rows.size
                self.counters["bytes_read"] += rows.size * 3 * self.row_io.layout.row_bytes
            self.counters["gather_cpu_s"] += time.thread_time() - c0
            self.cv.notify_all()
        if err is not None:
            raise err

    def pin_resident(self, idx: np.ndarray, bypass: bool = False) -> tuple[np.ndarray, set[Future], np.ndarray, int]:
        """Pin rows idx (M,) in the cache, queueing reads of absent ones.

        Returns (slots (M,), gathers to wait for, direct (M,) bool, rows absent). With `bypass`, absent rows
        that do not fit the cache right now (a read larger than the cache, e.g. an export) are
        not cached: `direct` marks them (slot -1) for the caller to read straight into its output.
        Absent rows have no write in flight (those are pinned resident), so reading them from
        disk is never stale.
        """
        with self.cv:
            slots = self.cache.lookup(idx)
            for r in idx[slots >= 0].tolist():  # a failed prefetch is retried, not reported twice
                f = self.cache.loading.get(r)
                if (f is not None and f.done() and f.exception() is not None
                        and not self.cache.pins[self.cache.slot_of[r]]):
                    self.cache.drop(np.array([r]))
            slots = self.cache.lookup(idx)
            present = slots >= 0
            self.cache.pin(slots[present])
            missing = idx[~present]
            direct = np.zeros(idx.size, dtype=bool)
            if missing.size:
                if bypass and missing.size > min(self.cache.evictable(), self.cache.pool.capacity // 2):
                    direct = ~present
                else:
                    if missing.size > self.cache.pool.capacity - int(present.sum()):
                        self.cache.unpin(slots[present])
                        raise ValueError(
                            f"a batch of {idx.size} rows does not fit the row cache ({self.cache.pool.capacity} "
                            f"rows): {self.budget_hint}"
                        )
                    while self.cache.evictable() < missing.size:  # rows pinned by writes in flight
                        self.cv.wait()
                    new = self.cache.allocate(missing)
                    self.submit(missing, new)
                    self.cache.pin(new)
                    slots[~present] = new
            loads = {self.cache.loading[r] for r in idx.tolist() if r in self.cache.loading}
        return slots, loads, direct, int(missing.size)

    def wait(self, idx: np.ndarray, slots: np.ndarray, loads: set[Future]) -> None:
        """Wait for the gathers filling `slots`; on failure unpin, forget the failed rows, raise."""
        err = None
        for f in loads:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001
                err = err or e
        if err is None:
            return
        with self.cv:
            self.cache.unpin(slots)
            failed = [
                r for r in idx.tolist()
                if (f := self.cache.loading.get(r)) is not None and f.done() and f.exception() is not None
                and self.cache.pins[self.cache.slot_of[r]] == 0
            ]  # fmt: skip
            self.cache.drop(np.array(failed, dtype=np.int64))
        raise err
