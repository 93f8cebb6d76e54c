"""The on-disk head store: a Zarr v3 group on disk, rows moved by raw pread/pwrite.

Design (numbers measured by benchmarks/head/, `diet bench head-*`):

* Layout (zarr_layout): weight / exp_avg / exp_avg_sq as (N, d) arrays, uncompressed, one chunk per
  dataset shard (R rows × full d), plus step stamps (N,) and per-row crc32c checksums (N, 3).
  zarr-python, TensorStore or any Zarr v3 reader opens it for export and evaluation.
* Hot path (row_io): zarr-python is bypassed; a row is d·itemsize bytes at a fixed offset of one
  chunk file, so rows are read/written with os.preadv/pwritev from a bounded thread pool
  (`io_threads`, the disk queue depth) straight into slots of preallocated, pinned buffers.
* Gather ahead (`prefetch`, prefetcher) and write behind (`write_rows` returns after a memcpy,
  write_behind), through a row cache (row_cache) that always holds the latest value of resident
  rows: a row in flight to disk is pinned there, so it is served from memory, never re-read stale.
  `read_rows` waits only when the disk cannot keep up (`stats()["read_stall_s"]`); `write_rows`
  blocks when the write-behind staging is full (back-pressure, `write_stall_s`). Host memory =
  `memory_budget_bytes` (cache + staging, allocated once) + the (N,) int64 step vector + an
  N/8-byte bitset.
* Crash consistency (undo_log): before a row is first overwritten after a commit its pre-image is
  appended to an undo segment and fdatasync'ed; `commit(S)` fdatasyncs the data and records S in
  the group attributes atomically; `recover(S)` replays the undo segments newer than S.
* Checksums (checksums): every row read is verified against its crc32c (`verify_checksums`).

Threads: the caller's (all public methods; one at a time), `io_threads` gather workers, and one
write-behind thread. `_cv` (a condition on one lock) guards the cache, pools and counters.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch

from diet_engine.storage.head.base import (
    FORMAT_VERSION,
    HeadMeta,
    HeadStore,
    RowBlock,
    check_commit_step,
    check_index,
    check_recover_target,
)
from diet_engine.storage.head.config import ZarrHeadStoreConfig
from diet_engine.storage.head.errors import (
    HeadStoreCorruptionError,
    HeadStoreError,
    HeadStoreIOError,
    HeadStoreReadOnlyError,
)
from diet_engine.storage.head.file_io import FdCache, FileIO
from diet_engine.storage.head.prefetcher import Gatherer
from diet_engine.storage.head.row_cache import TORCH_DTYPES, RowCache, SlotPool
from diet_engine.storage.head.row_io import RowIO
from diet_engine.storage.head.undo_log import Bitset, UndoLog
from diet_engine.storage.head.write_behind import WriteBehind, WriteJob
from diet_engine.storage.head.writer_lock import acquire_writer_lock, check_writable, release_writer_lock
from diet_engine.storage.head.zarr_layout import (
    DATA_ARRAYS,
    HeadLayout,
    check_array_metadata,
    check_chunk_files,
    check_missing_chunks,
    create_store,
    make_attrs,
    materialize_missing,
    read_attrs,
    write_attrs,
)

_COUNTERS = (
    "rows_read", "rows_gathered", "rows_written", "bytes_read", "bytes_written", "cache_hits",
    "cache_misses", "prefetch_dropped", "read_stall_s", "write_stall_s", "write_queue_peak_rows",
    "io_queue_peak", "commits", "commit_s", "recover_s", "gather_cpu_s",
)  # fmt: skip


class ZarrHeadStore(HeadStore):
    """On-disk head store. Use `ZarrHeadStore.create(...)` or `ZarrHeadStore.open(...)`."""

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | os.PathLike, meta: HeadMeta, seed: int = 0, *, overwrite: bool = False,
        config: ZarrHeadStoreConfig | None = None, io: FileIO | None = None, owned_rows: np.ndarray | None = None,
    ) -> ZarrHeadStore:
        """Create a store (weights = head_init(seed), zero moments and steps) and open it for writing.

        `meta.chunk_rows` must be the dataset's shard size R (see `chunk_rows_from_shards`).
        `owned_rows`: rows this process will ever touch (a rank's shards); only their chunks get
        files, the others stay absent (fill value 0 for Zarr readers). None: all N rows.
        """
        config = config or ZarrHeadStoreConfig()
        config.validate()
        io = io or FileIO()
        create_store(os.fspath(path), meta, seed, io, overwrite=overwrite, threads=config.init_threads,
                     owned_rows=owned_rows)
        return cls(path, meta, mode="r+", config=config, io=io)

    @classmethod
    def open(
        cls, path: str | os.PathLike, meta: HeadMeta | None = None, *, mode: str = "r+",
        config: ZarrHeadStoreConfig | None = None, io: FileIO | None = None,
    ) -> ZarrHeadStore:
        """Open an existing store; mode "r+" for training, "r" for export/evaluation.

        With `meta`, refuse a store whose N, d, dtype, optimizer kind or format version differ.
        """
        return cls(path, meta, mode=mode, config=config, io=io)

    def __init__(
        self, path: str | os.PathLike, meta: HeadMeta | None = None, *, mode: str = "r+",
        config: ZarrHeadStoreConfig | None = None, io: FileIO | None = None,
    ) -> None:
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' (read-only) or 'r+' (training), got {mode!r}")
        self.config = config = config or ZarrHeadStoreConfig()
        config.validate()
        self.io = io = io or FileIO()
        self.path = root = os.path.abspath(os.fspath(path))
        self.read_only = mode == "r"
        self._closed = True  # until fully open
        attrs = read_attrs(root)
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"head store {root} has format version {version!r}; this code reads version {FORMAT_VERSION}"
            )
        self.meta = HeadMeta.from_dict(attrs["meta"])
        if meta is not None:
            self.meta.check_compatible(meta, f"head store {root}")
        self.seed = int(attrs.get("seed", 0))
        self._commits = [int(s) for s in attrs.get("commits", [self.meta.global_step])]
        self.layout = lay = HeadLayout.from_meta(root, self.meta)
        self._attr_chunks = attrs.get("chunks")  # None: every chunk has files
        chunks = list(range(lay.num_chunks)) if self._attr_chunks is None else [int(c) for c in self._attr_chunks]
        self._owned = np.zeros(lay.num_chunks, dtype=bool)  # (num_chunks,) chunks with files
        self._owned[chunks] = True
        check_array_metadata(lay)
        missing = check_chunk_files(lay, chunks)  # all-zero chunks a Zarr writer dropped
        check_missing_chunks(lay, missing)  # ... and not a deleted file of non-zero rows

        self._lock_fd: int | None = None
        self.uncommitted_records = 0  # undo records found at open: rows written after the last commit
        if not self.read_only:
            self._lock_fd = acquire_writer_lock(lay, io)
        self.fds = FdCache(io, writable=not self.read_only, max_open=config.max_open_files,
                           expected_files=5 * len(chunks))
        self.row_io = RowIO(lay, self.fds, io, verify=config.verify_checksums, readahead_rows=config.readahead_rows,
                            zero_files=missing if self.read_only else ())
        self.undo = UndoLog(lay, io)
        try:
            if self.read_only:
                if self.undo.has_records(self._commits[-1]):
                    warnings.warn(
                        f"head store {root} holds rows written after its last commit (step {self._commits[-1]}): "
                        f"the writing run did not stop cleanly. Open it with mode='r+' and call "
                        f"recover({self._commits[-1]}) to roll them back before exporting.",
                        stacklevel=3,
                    )
            else:
                materialize_missing(lay, missing, io)
                check_writable(lay, chunks[0], io)
                self.undo.remove_except(self._commits)
                self.uncommitted_records = self.undo.reopen(self._commits[-1])
            self._step = self.row_io.read_steps(chunks)  # (N,) int64: the one O(N) host array
            # rows written after the last commit may be ahead of it until recover() rolls them back
            ahead_ok = self.uncommitted_records > 0 or (self.read_only and self.undo.has_records(self._commits[-1]))
            self._check_steps(self._commits[-1], "opening it", allow_ahead=ahead_ok)
            self.row_io.warm_checksums(chunks)  # 12 B/row, read by every gather: keep them cached
        except BaseException:
            self._release_files()
            raise

        # ---- buffers (the memory budget), threads -------------------------------------------
        self._pin = torch.cuda.is_available() if config.pin_memory is None else config.pin_memory
        self._tdtype = TORCH_DTYPES[self.meta.dtype]
        slot_bytes = 3 * lay.row_bytes
        half = config.memory_budget_bytes // 2
        cache_slots = max(1, min(lay.num_rows, half // slot_bytes))
        stage_slots = 0 if self.read_only else max(2, min(2 * lay.num_rows, half // slot_bytes))
        self.cache = RowCache(SlotPool(cache_slots, lay.dim, lay.dtype, self._pin))
        self.staging = SlotPool(stage_slots, lay.dim, lay.dtype, self._pin) if stage_slots else None
        self._written = Bitset(lay.num_rows)  # rows with a pre-image in the open undo segment
        self._written_since_commit = self.uncommitted_records > 0
        self._cv = threading.Condition(threading.Lock())
        self._api = threading.RLock()
        self._pool = ThreadPoolExecutor(config.io_threads, thread_name_prefix="head-gather")
        self._pending_jobs = 0
        self._queue_rows = 0
        self._failure: BaseException | None = None
        self._failure_reported = False
        self._writer = None
        if not self.read_only:
            self._writer = WriteBehind(self.row_io, self.undo, self.staging.arrays, self._jobs_done)
        self._counters = dict.fromkeys(_COUNTERS, 0.0)
        self._gather = Gatherer(
            self.cache, self.row_io, self._pool, self._cv, self._counters, config.io_threads, config.readahead_rows,
            f"raise ZarrHeadStoreConfig.memory_budget_bytes (now {config.memory_budget_bytes})",
        )
        self._t_open = time.perf_counter()
        self._closed = False

    def _check_steps(self, step: int, doing: str, allow_ahead: bool = False, after_rollback: bool = False) -> None:
        """Every row's step stamp in [0, step] (rows ahead of it: only while undo records exist)."""
        bad = np.flatnonzero(self._step < 0) if allow_ahead else np.flatnonzero((self._step < 0) | (self._step > step))
        if not bad.size:
            return
        rows = bad[:5].tolist()
        if after_rollback and (self._step[bad] > step).all():
            cause = (f"their pre-images are missing from the undo log {self.undo.dir} ({self.undo.scan_note()}): "
                     "the log was damaged or truncated")
        else:
            cause = "the step stamps were damaged or the store was modified outside the engine"
        raise HeadStoreCorruptionError(
            f"head store {self.path}: {bad.size} rows have step stamps outside [0, {step}] after {doing} "
            f"(rows {rows}, stamps {self._step[bad[:5]].tolist()}): {cause}; restore the store from a backup "
            "or start the run again")

    def _release_files(self) -> None:
        self.fds.close_all()
        self.undo.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                release_writer_lock(self._lock_fd)
            self._lock_fd = None

    # ---- small helpers --------------------------------------------------------------------------

    @property
    def step_stamps(self) -> np.ndarray:
        return self._step

    @property
    def commits(self) -> list[int]:
        return list(self._commits)

    def owned_rows(self) -> np.ndarray:
        """(K,) int64 rows of the chunks this store holds files for (all rows for a one-rank store)."""
        r, n = self.layout.chunk_rows, self.layout.num_rows
        return np.concatenate([np.arange(c * r, min((c + 1) * r, n), dtype=np.int64)
                               for c in np.flatnonzero(self._owned)] or [np.zeros(0, np.int64)])

    def _check_open(self) -> None:
        if self._closed:
            raise HeadStoreError(f"head store {self.path} is closed")

    def _check_writable(self, what: str) -> None:
        self._check_open()
        if self.read_only:
            raise HeadStoreReadOnlyError(
                f"cannot {what}: head store {self.path} was opened read-only (mode='r'); open it with "
                "mode='r+' to train"
            )

    def _index(self, index: np.ndarray) -> np.ndarray:
        """check_index plus: every row lies in a chunk this store holds."""
        idx = check_index(index, self.meta.num_rows)
        if idx.size and not self._owned.all():
            chunk = idx // self.layout.chunk_rows
            bad = ~self._owned[chunk]
            if bad.any():
                r = int(idx[bad][0])
                raise ValueError(
                    f"row {r} (chunk {r // self.layout.chunk_rows}) is not held by head store {self.path}: "
                    "it was created for another rank's shards (owned_rows)"
                )
        return idx

    def _raise_failure(self) -> None:
        if self._failure is not None:
            self._failure_reported = True
            raise self._failure

    def _fail(self, e: BaseException, doing: str, raised: bool = True) -> HeadStoreError:
        """Wrap an I/O failure in an actionable error and put the store in the failed state.

        `raised`: the caller raises it now (else the next API call or close() reports it)."""
        if isinstance(e, HeadStoreError):
            err = e
        else:
            msg = (
                f"head store {self.path}: {doing} failed: {e}. The last commit (step {self._commits[-1]}) "
                f"is intact: reopen the store and call recover({self._commits[-1]}), then resume from "
                "that step's checkpoint"
            )
            err = HeadStoreIOError(e.errno, msg) if isinstance(e, OSError) and e.errno else HeadStoreError(msg)
            err.__cause__ = e
        if self._failure is None:
            self._failure, self._failure_reported = err, raised
        return err

    # ---- the contract -----------------------------------------------------------------------------

    def prefetch(self, index: np.ndarray) -> None:
        """Start reading rows `index` (sorted unique) that are not resident; never blocks on I/O.

        Rows that do not fit the cache (all slots pinned) are skipped (`prefetch_dropped`).
        """
        with self._api:
            if self._closed:
                return
            idx = self._index(index)
            with self._cv:
                slots = self.cache.lookup(idx)
                self.cache.touch(idx[slots >= 0])
                missing = idx[slots < 0]
                new = self.cache.allocate(missing, partial=True)
                self._gather.submit(missing[: new.size], new)
                self._counters["prefetch_dropped"] += missing.size - new.size

    def read_rows(self, index: np.ndarray) -> RowBlock:
        with self._api:
            self._check_open()
            idx = self._index(index)
            slots, loads, direct, misses = self._gather.pin_resident(idx, bypass=True)
            cached = ~direct
            m, d = idx.size, self.meta.dim
            # PINNED when CUDA is present: outputs are page-locked, so block.to("cuda", non_blocking=True) is async
            out = [torch.empty((m, d), dtype=self._tdtype, pin_memory=self._pin) for _ in range(3)]  # 3 × (M, d)
            t0 = time.perf_counter()
            direct_reads = []
            if direct.any():  # straight into `out`, in parallel, no cache slots
                rows, pos = idx[direct], np.flatnonzero(direct)
                per = max(64, math.ceil(rows.size / self.config.io_threads))
                arrays = [t.numpy() for t in out]
                direct_reads = [
                    self._pool.submit(self.row_io.gather, rows[i : i + per], arrays, pos[i : i + per])
                    for i in range(0, rows.size, per)
                ]
            try:
                self._gather.wait(idx[cached], slots[cached], loads)
            except BaseException:
                for f in direct_reads:
                    f.cancel()
                wait(direct_reads)
                raise
            err = None
            for f in direct_reads:
                try:
                    f.result()
                except BaseException as e:  # noqa: BLE001
                    err = err or e
            stall = time.perf_counter() - t0
            with self._cv:  # numpy fancy indexing: memcpy per row (torch's CPU index ops are ~50× slower)
                pool = self.cache.pool.arrays
                if cached.all():
                    for k in range(3):
                        np.take(pool[k], slots, axis=0, out=out[k].numpy())  # (M, d)
                elif cached.any():
                    pos = np.flatnonzero(cached)
                    for k in range(3):
                        out[k].numpy()[pos] = pool[k][slots[cached]]
                steps = torch.from_numpy(self._step[idx].copy())  # (M,)
                self.cache.unpin(slots[cached])
                self.cache.touch(idx)
                c = self._counters
                c["rows_read"] += m
                c["cache_misses"] += misses
                c["cache_hits"] += m - misses
                c["read_stall_s"] += stall
                if direct.any() and err is None:
                    c["rows_gathered"] += int(direct.sum())
                    c["bytes_read"] += int(direct.sum()) * 3 * self.layout.row_bytes
            if err is not None:
                raise err
            return RowBlock(idx, out[0], out[1], out[2], steps)

    def write_rows(self, block: RowBlock) -> None:
        """Queue rows for writing and return; blocks only while the write-behind staging is full."""
        with self._api:
            self._check_writable("write rows")
            self._raise_failure()
            idx = self._index(block.index)
            m, d = idx.size, self.meta.dim
            if m == 0:
                return
            # D2H sync if on GPU
            src = [t.detach().to("cpu", self._tdtype).numpy() for t in (block.weight, block.exp_avg, block.exp_avg_sq)]
            steps = block.step.detach().cpu().numpy().astype(np.int64).reshape(-1)
            for name, t in zip(DATA_ARRAYS, src, strict=True):
                if tuple(t.shape) != (m, d):
                    raise ValueError(f"RowBlock.{name} has shape {tuple(t.shape)}, expected {(m, d)}")
            if steps.shape != (m,):
                raise ValueError(f"RowBlock.step has shape {steps.shape}, expected {(m,)}")
            if 2 * m > self.staging.capacity:
                raise ValueError(
                    f"a batch of {m} rows needs {2 * m} write-behind slots, the budget holds "
                    f"{self.staging.capacity}: raise ZarrHeadStoreConfig.memory_budget_bytes "
                    f"(now {self.config.memory_budget_bytes})"
                )
            slots, loads, _, _ = self._gather.pin_resident(idx)  # pre-images of rows not resident
            self._gather.wait(idx, slots, loads)
            with self._cv:
                first = ~self._written.test(idx)  # (M,) rows needing an undo record
                u = int(first.sum())
                t0 = time.perf_counter()
                while self.staging.n_free < m + u and self._failure is None:
                    self._cv.wait()  # back-pressure: the disk is behind by a full budget
                self._counters["write_stall_s"] += time.perf_counter() - t0
                if self._failure is not None:
                    self.cache.unpin(slots)
                    self._raise_failure()
                stage = self.staging.take(m + u)
                new_st, undo_st = stage[:m], stage[m:]
                for k in range(3):  # numpy fancy indexing: one memcpy per row
                    cache_k, stage_k = self.cache.pool.arrays[k], self.staging.arrays[k]
                    if u:  # pre-images: the cache holds the value at the last commit for these rows
                        stage_k[undo_st] = cache_k[slots[first]]
                    cache_k[slots] = src[k]  # latest value, served to later reads
                    stage_k[new_st] = src[k]  # snapshot for the writer
                undo_rows = idx[first]
                job = WriteJob(idx, stage[:m], steps, undo_rows, stage[m:], self._step[undo_rows].copy(), slots)
                self._step[idx] = steps
                self._written.set(undo_rows)
                self._written_since_commit = True
                self._pending_jobs += 1
                self._queue_rows += m
                c = self._counters
                c["write_queue_peak_rows"] = max(c["write_queue_peak_rows"], self._queue_rows)
                self.cache.touch(idx)
            self._writer.submit(job)  # the cache pins in `slots` are released when it is on disk

    def _jobs_done(self, jobs: list[WriteJob], err: BaseException | None) -> None:
        """Write-behind callback (its thread): release staging and cache pins."""
        with self._cv:
            for job in jobs:
                self.staging.give(job.stage)
                self.staging.give(job.undo_stage)
                self.cache.unpin(job.cache_slots)
                self._pending_jobs -= 1
                self._queue_rows -= job.rows.size
                if err is None:
                    self._counters["rows_written"] += job.rows.size
                    self._counters["bytes_written"] += job.rows.size * 3 * self.layout.row_bytes
            if err is not None:
                self._fail(err, "writing head rows", raised=False)
            self._cv.notify_all()

    def _drain(self) -> None:
        """Wait until every queued write has been handed back by the writer."""
        with self._cv:
            while self._pending_jobs:
                self._cv.wait()

    def drain(self) -> None:
        """Wait until every queued write has reached the OS (page cache); no fdatasync (see flush)."""
        with self._api:
            self._drain()
            self._raise_failure()

    def flush(self) -> None:
        with self._api:
            if self._closed or self.read_only:
                return
            self._drain()
            self._raise_failure()
            try:
                self.fds.sync_dirty(self._pool)
            except OSError as e:
                raise self._fail(e, "fdatasync of the head's chunk files") from e

    def commit(self, step: int) -> None:
        with self._api:
            self._check_writable("commit")
            self._raise_failure()
            written = self._written_since_commit or self._pending_jobs > 0
            check_commit_step(step, self._commits[-1], written, f"head store {self.path}")
            if step == self._commits[-1]:
                return
            t0 = time.perf_counter()
            self.flush()
            commits = [self._commits[-1], step]
            try:
                self.undo.start(step)  # the new interval's pre-images go here
                self.meta.global_step = step
                write_attrs(self.path, make_attrs(self.meta, self.seed, commits, self._attr_chunks), self.io)
                self._commits = commits
                self.undo.remove_except(commits)
            except OSError as e:
                self.meta.global_step = self._commits[-1]
                raise self._fail(e, f"commit of step {step}") from e
            self._written.clear()
            self._written_since_commit = False
            self._counters["commits"] += 1
            self._counters["commit_s"] += time.perf_counter() - t0

    def recover(self, step: int) -> None:
        """Roll the store back to commit `step` (the newest or one-but-newest commit)."""
        with self._api:
            self._check_writable("recover")
            check_recover_target(step, self._commits, f"head store {self.path}")
            t0 = time.perf_counter()
            self._drain()
            with self._cv:
                loads = set(self.cache.loading.values())
            for f in loads:
                with contextlib.suppress(BaseException):
                    f.result()
            with self._cv:
                self.cache.clear()

            def apply(rows: np.ndarray, steps: np.ndarray, src: list[np.ndarray], pos: np.ndarray) -> None:
                self.row_io.scatter(rows, src, pos, steps)

            try:
                for c in sorted((c for c in self._commits if c >= step), reverse=True):
                    self.undo.replay(c, apply)
                self.fds.sync_dirty(self._pool)
                # from disk, not patched: writes accepted after a failure never reached the log or disk
                self._step[:] = self.row_io.read_steps(np.flatnonzero(self._owned).tolist())
                self._check_steps(step, f"rolling back to step {step}", after_rollback=True)
                if step != self._commits[-1]:
                    self.meta.global_step = step
                    write_attrs(self.path, make_attrs(self.meta, self.seed, [step], self._attr_chunks), self.io)
                    self._commits = [step]
                    self.undo.remove_except(self._commits)
                self.undo.start(step)  # the state is exactly `step` now: nothing to undo
            except OSError as e:
                raise self._fail(e, f"recovery to step {step}") from e
            self._written.clear()
            self._written_since_commit = False
            self._failure, self._failure_reported = None, False
            self._writer.reset_error()
            self._counters["recover_s"] += time.perf_counter() - t0

    def stats(self, reset: bool = False) -> dict[str, float]:
        """Counters since open (or the last reset): rows/bytes moved, stalls, queue depths, rates.

        rows_read: rows returned by read_rows; rows_gathered / bytes_read: rows read from disk;
        rows_written / bytes_written: rows written in place (data bytes); undo_bytes: undo log
        appends; gather_cpu_s / writer_cpu_s: CPU seconds of the gather tasks / the write-behind
        thread (what the store takes from a CPU-bound training step); cache_hits / cache_misses:
        read_rows rows that were / were not already resident or prefetched; read_stall_s: read_rows
        waiting for disk; write_stall_s: write_rows blocked on back-pressure; write_queue_rows /
        io_queue_depth: now; *_peak: maxima.
        """
        with self._cv:
            out = dict(self._counters)
            elapsed = time.perf_counter() - self._t_open
            out.update(
                elapsed_s=elapsed,
                rows_per_s=out["rows_read"] / elapsed if elapsed > 0 else 0.0,
                bytes_per_s=(out["bytes_read"] + out["bytes_written"]) / elapsed if elapsed > 0 else 0.0,
                undo_bytes=float(self.undo.bytes_appended),
                write_queue_rows=float(self._queue_rows),
                io_queue_depth=float(self._gather.inflight),
                writer_busy_s=self._writer.busy_s if self._writer else 0.0,
                writer_cpu_s=self._writer.cpu_s if self._writer else 0.0,
                cache_rows=float(self.cache.pool.capacity),
                cache_resident_rows=float(len(self.cache)),
                staging_rows=float(self.staging.capacity if self.staging else 0),
                buffer_bytes=float(self.cache.pool.nbytes + (self.staging.nbytes if self.staging else 0)),
            )
            if reset:
                self._counters.update(dict.fromkeys(_COUNTERS, 0.0))
                self.undo.bytes_appended = 0
                if self._writer:
                    self._writer.busy_s = self._writer.cpu_s = 0.0
                self._t_open = time.perf_counter()
        return out

    def close(self) -> None:
        """Flush (not commit) queued writes, stop the threads, release files and the writer lock."""
        with self._api:
            if self._closed:
                return
            try:
                if not self.read_only and self._failure is None:
                    self.flush()
            finally:
                self._closed = True
                if self._writer is not None:
                    self._writer.stop()
                    self._writer = None  # it holds a bound method of self: break the cycle
                self._pool.shutdown(wait=True)
                self._release_files()
                self.cache.clear()
                self.cache.pool.release()  # the memory budget is returned now, not at gc
                if self.staging is not None:
                    self.staging.release()
            if self._failure is not None and not self._failure_reported:
                self._raise_failure()

    def __del__(self) -> None:  # a forgotten close() must not leave threads or the flock behind
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()

