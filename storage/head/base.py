"""The head-store contract.

A head store holds, for each of N rows, `weight[n]`, `exp_avg[n]`, `exp_avg_sq[n]` (d values each)
and `step[n]` (int64: the optimizer step the row is current at), plus run-level metadata
(`HeadMeta`). Backends: `MemoryHeadStore` (tensors in RAM, small N, tests) and the on-disk Zarr
store. Both pass the conformance suite in `tests/unit/storage/`.

Contract
--------
* `read_rows(index)` takes sorted, unique int64 row ids (the engine passes `np.unique(batch)`;
  anything else raises ValueError, see `check_index`) and returns a `RowBlock` of copies; the
  caller may modify them freely (the lazy optimizer does, in place, through `block.rows`).
* `write_rows(block)` stores the block's rows (all four fields) and may return before they reach
  disk; the store copies the block, so the caller may reuse it. A later `read_rows` of any of
  those rows returns the written values, even while the write is still in flight to disk.
* `prefetch(index)` is a hint that `read_rows(index)` will follow; backends may start I/O.
* `flush()` makes every accepted write durable; `close()` flushes and releases resources.
* `commit(S)` / `recover(S)`: recovery points, see their docstrings. `commits` lists the steps
  `recover` can restore (the newest and the one-but-newest commit).
* `save_files(folder, name)` / `load_files(folder, state)`: the store's part of a training
  checkpoint. A store durable by itself writes no file (its `state_dict()`: metadata); the
  in-memory store writes its rows to one file of the checkpoint folder, block by block.
* `step_stamps` is the in-memory (N,) int64 vector of step stamps (the only O(N) host array).
* A store opened read-only (`read_only`) serves reads; writes, commit and recover raise
  `HeadStoreReadOnlyError`.
* `stats()` returns a flat dict of counters (rows and bytes moved, stall seconds, queue depth);
  backends without I/O return what applies.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diet_engine.kernels.rows import Rows

FORMAT_VERSION = 1
_INIT_BLOCK = 4096  # rows per deterministic init block, independent of any store's chunking


@dataclasses.dataclass
class HeadMeta:
    num_rows: int
    """N: one row per training sample."""
    dim: int
    """d: feature dimension."""
    dtype: str = "float32"
    """dtype of weight and moments."""
    optimizer: dict[str, Any] = dataclasses.field(default_factory=dict)
    """optimizer kind and hyper-parameters, e.g. {"kind": "adamw", "betas": [0.9, 0.999], ...}."""
    chunk_rows: int = 0
    """rows per on-disk chunk (the dataset's shard size); 0 for in-memory."""
    global_step: int = 0
    """last optimizer step the store is consistent with (at the last checkpoint/flush)."""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def check_compatible(self, other: HeadMeta, what: str = "head store") -> None:
        """Raise ValueError naming every field that differs (N, d, dtype, optimizer, version)."""
        diffs = []
        for name in ("num_rows", "dim", "dtype", "format_version"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                diffs.append(f"{name}: store has {a!r}, expected {b!r}")
        if self.optimizer.get("kind") != other.optimizer.get("kind"):
            diffs.append(
                f"optimizer: store has {self.optimizer.get('kind')!r}, "
                f"expected {other.optimizer.get('kind')!r}"
            )
        if diffs:
            raise ValueError(f"{what} does not match this run: " + "; ".join(diffs))


@dataclasses.dataclass
class RowBlock:
    """A set of head rows in host (or device) memory: their ids and their `rows` state."""

    index: np.ndarray  # (M,) int64, sorted, unique
    weight: torch.Tensor  # (M, d)
    exp_avg: torch.Tensor  # (M, d)
    exp_avg_sq: torch.Tensor  # (M, d)
    step: torch.Tensor  # (M,) int64

    @property
    def rows(self) -> Rows:
        """The four tensors as the lazy optimizer takes them (the same tensors, no copy):
        `opt.step(block.rows, grad, t)` updates this block in place."""
        return Rows(self.weight, self.exp_avg, self.exp_avg_sq, self.step)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> RowBlock:
        mv = lambda x: x.to(device, non_blocking=non_blocking)  # noqa: E731
        return RowBlock(self.index, mv(self.weight), mv(self.exp_avg), mv(self.exp_avg_sq), mv(self.step))


def head_init(seed: int, start: int, stop: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic initial weights of rows [start, stop): U(-1/sqrt(d), 1/sqrt(d)), like nn.Linear.

    Generated in fixed blocks of `_INIT_BLOCK` rows seeded by (seed, block), so any backend and
    any chunking produce the same head for the same seed.
    """
    bound = 1.0 / dim**0.5
    out = torch.empty(stop - start, dim, dtype=dtype)
    b0, b1 = start // _INIT_BLOCK, (stop - 1) // _INIT_BLOCK
    for b in range(b0, b1 + 1):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        lo, hi = b * _INIT_BLOCK, (b + 1) * _INIT_BLOCK
        block = torch.empty(_INIT_BLOCK, dim, dtype=torch.float64).uniform_(-bound, bound, generator=g)
        s, e = max(lo, start), min(hi, stop)
        out[s - start : e - start] = block[s - lo : e - lo].to(dtype)
    return out


def check_index(index: np.ndarray, num_rows: int) -> np.ndarray:
    """Validate a row-id vector against the contract: 1-D integers, strictly increasing, in [0, N).

    Returns it as a contiguous (M,) int64 array. Cost: O(M), vectorised.
    """
    idx = np.asarray(index)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"row index must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    if idx.size == 0:
        return idx
    if idx[0] < 0 or idx[-1] >= num_rows or (idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1]))):
        bad = idx[(idx < 0) | (idx >= num_rows)]
        if bad.size:
            raise ValueError(f"row index {int(bad[0])} is out of range [0, {num_rows})")
        raise ValueError("row index must be sorted and free of duplicates: pass np.unique(batch_indices)")
    return idx


def check_commit_step(step: int, last: int, written_since: bool, what: str = "head store") -> None:
    """Commit steps increase; re-committing the last step is allowed only when nothing was written since."""
    if step < last or (step == last and written_since):
        raise ValueError(
            f"cannot commit {what} at step {step}: its last commit is step {last} and commit steps must "
            "increase (re-committing the same step is allowed only when no row was written since)"
        )


def check_recover_target(step: int, commits: list[int], what: str = "head store") -> None:
    """Raise ValueError unless `step` is one of the restorable commits."""
    if step not in commits:
        raise ValueError(
            f"cannot recover {what} to step {step}: it can restore only steps {commits} (its newest and "
            "one-but-newest commits); resume from the checkpoint of one of those steps"
        )


class HeadStore(abc.ABC):
    """Abstract head store (see the module docstring for the contract)."""

    meta: HeadMeta
    read_only: bool = False

    @abc.abstractmethod
    def read_rows(self, index: np.ndarray) -> RowBlock: ...

    @abc.abstractmethod
    def write_rows(self, block: RowBlock) -> None: ...

    @property
    @abc.abstractmethod
    def step_stamps(self) -> np.ndarray: ...

    @property
    def commits(self) -> list[int]:
        """Steps `recover` can restore, oldest first (at most two: one-but-newest and newest)."""
        return [self.meta.global_step]

    def owned_rows(self) -> np.ndarray:
        """(K,) int64 rows this store holds: all N, unless it was created for one rank's shards."""
        return np.arange(self.meta.num_rows, dtype=np.int64)

    def stats(self) -> dict[str, float]:
        """Flat dict of counters (see the backend); empty where nothing is measured."""
        return {}

    def prefetch(self, index: np.ndarray) -> None:  # noqa: B027 - optional hint
        """Hint that `read_rows(index)` follows soon."""

    def flush(self) -> None:  # noqa: B027
        """Make every accepted write durable."""

    def commit(self, step: int) -> None:
        """Make every write durable and record `step` as a recovery point (see `recover`).

        The trainer checkpoints step S as: `store.commit(S)`, then the backbone checkpoint written
        atomically (temp name + rename). After a crash it resumes from the newest finished backbone
        checkpoint S' and calls `store.recover(S')`; S' is the newest or the one-but-newest commit,
        so a store must be able to restore both. No row written after S' may survive recovery and
        none may be torn.
        """
        self.flush()
        self.meta.global_step = step

    def recover(self, step: int) -> None:
        """Restore the state recorded by `commit(step)`; `step` must be in `commits`."""
        check_recover_target(step, self.commits)

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a training checkpoint must hold to restore this store at its last commit.

        A store durable by itself (on disk) keeps its rows: the checkpoint holds only its metadata,
        checked on load, and `recover(S)` restores the rows. An in-memory store returns its rows.
        """
        return {"meta": self.meta.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check a `state_dict()` against this store (N, d, dtype, optimizer); a memory store loads rows."""
        self.meta.check_compatible(HeadMeta.from_dict(state["meta"]), "checkpoint's head store")

    def save_files(self, folder: Path, name: str) -> dict[str, Any]:
        """A training checkpoint of the store (after `commit(S)`): large state written as files into
        `folder` (the checkpoint's folder, not yet renamed into place; file names start with `name`,
        one per rank), the rest returned to be kept in the checkpoint's client state. A store durable
        by itself writes nothing and returns its `state_dict()`."""
        return self.state_dict()

    def load_files(self, folder: Path, state: dict[str, Any]) -> None:
        """Restore a `save_files(folder, ...)` result (then the checkpoint calls `recover(S)`)."""
        self.load_state_dict(state)

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> HeadStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

