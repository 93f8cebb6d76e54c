"""The write-behind thread: queued row writes go to disk in order, undo records first.

`ZarrHeadStore.write_rows` copies a block into staging slots and returns; this thread then, per
group of queued jobs (group commit: one fdatasync covers every job waiting at that moment):

  1. appends the undo records of the group's first-written rows and fdatasyncs the segment;
  2. pwrites the rows in place (data, step stamps, checksums) into the page cache;
  3. hands the jobs back (`on_done`), which frees their staging slots and unpins their cache rows.

Jobs are processed strictly in submission order, so the last write of a row wins on disk. After a
failure (e.g. ENOSPC) later jobs are handed back unwritten with the same error; the store turns it
into an error on the next call, and the last commit stays recoverable.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from diet_engine.storage.head.row_io import RowIO
from diet_engine.storage.head.undo_log import UndoLog


@dataclasses.dataclass
class WriteJob:
    rows: np.ndarray  # (M,) int64, sorted
    stage: np.ndarray  # (M,) staging slots holding the rows' new values
    steps: np.ndarray  # (M,) int64 new step stamps
    undo_rows: np.ndarray  # (U,) rows first written since the newest commit, U <= M
    undo_stage: np.ndarray  # (U,) staging slots holding their pre-images (values at that commit)
    undo_steps: np.ndarray  # (U,) int64 step stamps at that commit
    cache_slots: np.ndarray  # (M,) row-cache slots pinned until the job is on disk


DoneFn = Callable[[list[WriteJob], BaseException | None], None]


class WriteBehind:
    """One daemon thread draining a FIFO of WriteJobs (see module docstring)."""

    def __init__(self, row_io: RowIO, undo: UndoLog, staging: Sequence[np.ndarray], on_done: DoneFn,
                 group_rows: int = 4096) -> None:
        self.row_io = row_io
        self.undo = undo
        self.staging = staging  # three (S_w, d) staging arrays
        self.on_done = on_done
        self.group_rows = group_rows
        self.busy_s = 0.0  # seconds spent writing (for stats)
        self.cpu_s = 0.0  # CPU seconds of this thread spent writing (time.thread_time)
        self._q: queue.SimpleQueue[WriteJob | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="head-write-behind", daemon=True)
        self._thread.start()

    def submit(self, job: WriteJob) -> None:
        self._q.put(job)

    def stop(self) -> None:
        """Process what is queued, then end the thread."""
        self._q.put(None)
        self._thread.join()

    def _take_group(self) -> tuple[list[WriteJob], bool]:
        first = self._q.get()
        if first is None:
            return [], True
        group, rows = [first], first.rows.size
        while rows < self.group_rows:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return group, True
            group.append(job)
            rows += job.rows.size
        return group, False

    def _write(self, group: list[WriteJob]) -> None:
        logged = False
        for job in group:
            if job.undo_rows.size:
                self.undo.append(job.undo_rows, job.undo_steps, self.staging, job.undo_stage)
                logged = True
        if logged:
            self.undo.sync()  # write-ahead rule: pre-images durable before any in-place overwrite
        for job in group:
            self.row_io.scatter(job.rows, self.staging, job.stage, job.steps)

    def reset_error(self) -> None:
        """Accept writes again (after recover() rolled the store back to a commit)."""
        self._error = None

    def _run(self) -> None:
        stop = False
        while not stop:
            group, stop = self._take_group()
            if not group:
                continue
            t0, c0 = time.perf_counter(), time.thread_time()
            if self._error is None:
                try:
                    self._write(group)
                except BaseException as e:  # noqa: BLE001 - reported to the store, never lost
                    self._error = e
            self.busy_s += time.perf_counter() - t0
            self.cpu_s += time.thread_time() - c0
            self.on_done(group, self._error)
