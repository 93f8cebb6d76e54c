"""Host buffers of the on-disk head store: fixed slot pools and the row cache built on one.

Memory is allocated once, up front, and never grows with N: a `SlotPool` of S slots is three
(S, d) tensors (weight, exp_avg, exp_avg_sq), 3·S·d·itemsize bytes, page-locked (pinned) when
CUDA is present so host->device copies of gathered rows are asynchronous DMA. The store owns two
pools: the row cache (gathered and recently written rows) and the write-behind staging (rows in
flight to disk plus their undo pre-images); together they are the memory budget.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future

import numpy as np
import torch

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SlotPool:
    """`capacity` row slots with a free list."""

    def __init__(self, capacity: int, dim: int, dtype: np.dtype, pin: bool) -> None:
        tdt = TORCH_DTYPES[np.dtype(dtype).name]
        # PINNED when `pin`: 3·capacity·d·itemsize bytes of page-locked host memory, held until close
        self.tensors = tuple(torch.empty((capacity, dim), dtype=tdt, pin_memory=pin) for _ in range(3))  # 3 × (S, d)
        self.arrays = tuple(t.numpy() for t in self.tensors)  # numpy views for os.preadv/pwritev
        self.capacity = capacity
        self.nbytes = 3 * capacity * dim * self.arrays[0].itemsize
        self._free = list(range(capacity - 1, -1, -1))  # stack of free slot ids

    @property
    def n_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> np.ndarray:
        if n > len(self._free):
            raise RuntimeError(f"slot pool exhausted: {n} slots wanted, {len(self._free)} free")
        out = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        return np.asarray(out[::-1], dtype=np.int64)

    def give(self, slots: np.ndarray) -> None:
        self._free.extend(np.asarray(slots).tolist())

    def release(self) -> None:
        """Free the buffers now (memory freed; PINNED memory unpinned) rather than at garbage collection."""
        self.tensors = tuple(t.new_empty((0, t.shape[1])) for t in self.tensors)
        self.arrays = tuple(t.numpy() for t in self.tensors)
        self.capacity, self._free = 0, []


class RowCache:
    """row -> slot holding the row's LATEST value (as on disk, or newer if a write is in flight).

    Not thread-safe: the store calls it with its lock held. A slot with pins > 0 is never evicted:
    pins are held while a gather fills it (`loading`), while read_rows copies out of it, and by
    every queued write of its row until that write is on disk, so a row in flight to disk is
    always served from here and never re-read stale. Unpinned rows are evicted least recently
    used first.
    """

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # row -> slot, least recently used first
        self.pins = np.zeros(pool.capacity, dtype=np.int32)  # (S,)
        self.loading: dict[int, Future] = {}  # row -> gather filling its slot (done with error = failed)

    def __len__(self) -> int:
        return len(self.slot_of)

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        """Slots of rows (M,), -1 where not resident."""
        get = self.slot_of.get
        return np.fromiter((get(r, -1) for r in rows.tolist()), dtype=np.int64, count=rows.size)

    def touch(self, rows: np.ndarray) -> None:
        for r in rows.tolist():
            if r in self.slot_of:
                self.slot_of.move_to_end(r)

    def evictable(self) -> int:
        """Slots free or holding an unpinned row (free slots are never pinned)."""
        return self.pool.capacity - int(np.count_nonzero(self.pins))

    def allocate(self, rows: np.ndarray, partial: bool = False) -> np.ndarray:
        """Slots for rows (M,) not resident, evicting unpinned LRU rows. Returns (K,) slots for rows[:K].

        K = M, or fewer if `partial` and not enough slots can be freed (else RuntimeError: check
        `evictable()` first).
        """
        need = rows.size - self.pool.n_free
        scanned, limit = 0, len(self.slot_of)
        while need > 0 and scanned < limit:
            row, slot = next(iter(self.slot_of.items()))
            scanned += 1
            if self.pins[slot]:
                self.slot_of.move_to_end(row)  # busy rows are recent anyway; keep scanning
                continue
            del self.slot_of[row]
            self.loading.pop(row, None)
            self.pool.give(np.array([slot]))
            need -= 1
        k = min(rows.size, self.pool.n_free)
        if k < rows.size and not partial:
            raise RuntimeError(f"row cache full: {rows.size} slots wanted, {k} can be freed")
        slots = self.pool.take(k)
        for r, s in zip(rows[:k].tolist(), slots.tolist(), strict=True):
            self.slot_of[r] = s
        return slots

    def pin(self, slots: np.ndarray) -> None:
        """+1 on each slot; `slots` are unique (the slots of unique rows)."""
        self.pins[slots] += 1

    def unpin(self, slots: np.ndarray) -> None:
        self.pins[slots] -= 1

    def drop(self, rows: np.ndarray) -> None:
        """Forget rows (their slots must be unpinned)."""
        for r in rows.tolist():
            s = self.slot_of.pop(r, None)
            self.loading.pop(r, None)
            if s is not None:
                self.pool.give(np.array([s]))

    def clear(self) -> None:
        self.drop(np.fromiter(self.slot_of.keys(), dtype=np.int64, count=len(self.slot_of)))
