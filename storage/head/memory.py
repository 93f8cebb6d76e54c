"""In-memory head store: the reference backend (small N, tests, full-DIET comparisons).

Commit/recover keep an in-memory undo map per commit interval (row -> its values at the interval's
start), the same protocol as the on-disk store's undo log: memory grows with the rows written in
the last two intervals, never with N beyond the (N, d) tensors themselves.

Checkpoints go through `save_files(folder, name)` / `load_files(folder, state)`: the rows are
written to and read from one file of the checkpoint folder block by block (storage/head/rows_file.py),
straight from and into the (N, d) tensors, so a checkpoint never holds a second copy of the head.
`state_dict()` / `load_state_dict()` remain for in-process copies (tests, small heads).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

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
    head_init,
)
from diet_engine.storage.head.errors import HeadStoreReadOnlyError
from diet_engine.storage.head.rows_file import read_rows_file, write_rows_file

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# row -> (weight (d,), exp_avg (d,), exp_avg_sq (d,), step) at the start of a commit interval
_Undo = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]


class MemoryHeadStore(HeadStore):
    """All rows held as (N, d) tensors."""

    def __init__(self, meta: HeadMeta, seed: int = 0, read_only: bool = False) -> None:
        if meta.dtype not in _DTYPES:
            raise ValueError(f"dtype {meta.dtype!r} is not supported; expected one of {sorted(_DTYPES)}")
        self.meta = copy.deepcopy(meta)  # commits advance meta.global_step: never the caller's object
        self.seed = seed
        self.read_only = read_only
        dt = _DTYPES[meta.dtype]
        n, d = meta.num_rows, meta.dim
        self.weight = head_init(seed, 0, n, d, dt)  # (N, d)
        self.exp_avg = torch.zeros(n, d, dtype=dt)  # (N, d)
        self.exp_avg_sq = torch.zeros(n, d, dtype=dt)  # (N, d)
        self._step = np.zeros(n, dtype=np.int64)  # (N,)
        self._commits = [meta.global_step]
        self._undo: _Undo = {}  # rows first written after the newest commit
        self._undo_prev: _Undo = {}  # rows first written between the two newest commits
        self._rows_read = 0
        self._rows_written = 0

    @property
    def step_stamps(self) -> np.ndarray:
        return self._step

    @property
    def commits(self) -> list[int]:
        return list(self._commits)

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise HeadStoreReadOnlyError(f"cannot {what}: this in-memory head store was opened read-only")

    def read_rows(self, index: np.ndarray) -> RowBlock:
        index = check_index(index, self.meta.num_rows)
        idx = torch.from_numpy(index)
        self._rows_read += index.size
        return RowBlock(
            index=index,
            weight=self.weight[idx].clone(),
            exp_avg=self.exp_avg[idx].clone(),
            exp_avg_sq=self.exp_avg_sq[idx].clone(),
            step=torch.from_numpy(self._step[index].copy()),
        )

    def write_rows(self, block: RowBlock) -> None:
        self._check_writable("write rows")
        index = check_index(block.index, self.meta.num_rows)
        for r in index.tolist():  # pre-images of rows first written in this interval
            if r not in self._undo:
                self._undo[r] = (
                    self.weight[r].clone(), self.exp_avg[r].clone(), self.exp_avg_sq[r].clone(), int(self._step[r])
                )
        idx = torch.from_numpy(index)
        self.weight[idx] = block.weight.detach().to("cpu", self.weight.dtype)
        self.exp_avg[idx] = block.exp_avg.detach().to("cpu", self.weight.dtype)
        self.exp_avg_sq[idx] = block.exp_avg_sq.detach().to("cpu", self.weight.dtype)
        self._step[index] = block.step.cpu().numpy()
        self._rows_written += index.size

    def commit(self, step: int) -> None:
        self._check_writable("commit")
        check_commit_step(step, self._commits[-1], bool(self._undo), "in-memory head store")
        if step == self._commits[-1]:
            return
        self._undo_prev, self._undo = self._undo, {}
        self._commits = [self._commits[-1], step]
        self.meta.global_step = step

    def _replay(self, undo: _Undo) -> None:
        for r, (w, m, v, s) in undo.items():
            self.weight[r], self.exp_avg[r], self.exp_avg_sq[r] = w, m, v
            self._step[r] = s

    def recover(self, step: int) -> None:
        self._check_writable("recover")
        check_recover_target(step, self._commits, "in-memory head store")
        self._replay(self._undo)  # rows written after the newest commit
        self._undo = {}
        if step != self._commits[-1]:  # one-but-newest: also undo the newest interval
            self._replay(self._undo_prev)
            self._undo_prev = {}
            self._commits = [step]
        self.meta.global_step = step

    def stats(self) -> dict[str, float]:
        return {"rows_read": float(self._rows_read), "rows_written": float(self._rows_written)}

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The head as tensors (copies: 3·N·d·itemsize + 8·N bytes) plus metadata.

        Call `commit(S)` first so that `meta.global_step` is S; `load_state_dict` restores that point.
        Loadable with `torch.load(weights_only=True)`.
        """
        return {
            "format_version": FORMAT_VERSION,
            "meta": self.meta.to_dict(),
            "seed": self.seed,
            "weight": self.weight.clone(),
            "exp_avg": self.exp_avg.clone(),
            "exp_avg_sq": self.exp_avg_sq.clone(),
            "step": torch.from_numpy(self._step.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`; refuses one of another format, N, d, dtype or optimizer."""
        self._check_writable("load a state dict")
        if "rows" in state:
            raise ValueError("head state: its rows are in a checkpoint file; load it with load_files(folder, state)")
        other = self._check_state(state, "head state dict")
        n, d = self.meta.num_rows, self.meta.dim
        for name in ("weight", "exp_avg", "exp_avg_sq"):
            t = state[name]
            if tuple(t.shape) != (n, d):
                raise ValueError(f"head state dict: {name} has shape {tuple(t.shape)}, expected {(n, d)}")
            getattr(self, name).copy_(t)
        self._step[:] = np.asarray(state["step"], dtype=np.int64)
        self._restored_at(other.global_step)

    def save_files(self, folder: str | Path, name: str) -> dict[str, Any]:
        """Checkpoint into `folder`: the rows to `<name>.safetensors`, block by block straight from the
        tensors (no copy of the head: 3·N·d·itemsize + 8·N bytes of file, O(1) extra memory), under a
        temp name, fsynced, renamed. Returns what the checkpoint keeps beside it: metadata and the
        file's record (name, size, crc32c per array). Call `commit(S)` first, as for `state_dict`."""
        rows = write_rows_file(folder, name, self._arrays(), {"head_meta": json.dumps(self.meta.to_dict())})
        return {"format_version": FORMAT_VERSION, "meta": self.meta.to_dict(), "seed": self.seed, "rows": rows}

    def load_files(self, folder: str | Path, state: dict[str, Any]) -> None:
        """Restore a `save_files(folder, ...)` result, reading the rows block by block into the
        tensors (no second copy). Refuses another format, N, d, dtype or optimizer (ValueError) and a
        missing, truncated or corrupt file (FileNotFoundError, HeadStoreCorruptionError naming it)."""
        self._check_writable("load a checkpoint")
        other = self._check_state(state, "head checkpoint")
        read_rows_file(folder, state["rows"], self._arrays())
        self._restored_at(other.global_step)

    def _arrays(self) -> dict[str, np.ndarray]:
        """The store's arrays as numpy views (no copy), in the rows file's order."""
        return {"weight": self.weight.numpy(), "exp_avg": self.exp_avg.numpy(), "exp_avg_sq": self.exp_avg_sq.numpy(),
                "step": self._step}

    def _check_state(self, state: dict[str, Any], what: str) -> HeadMeta:
        version = state.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{what} has format version {version!r}, expected {FORMAT_VERSION}")
        other = HeadMeta.from_dict(state["meta"])
        other.check_compatible(self.meta, what)
        return other

    def _restored_at(self, step: int) -> None:
        self.meta.global_step = step
        self._commits = [step]
        self._undo, self._undo_prev = {}, {}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], read_only: bool = False) -> MemoryHeadStore:
        """A store holding `state` (a `state_dict()`)."""
        meta = HeadMeta.from_dict(state["meta"])
        store = cls(meta, seed=int(state.get("seed", 0)))
        store.load_state_dict(state)
        store.read_only = read_only
        return store

    @classmethod
    def from_files(cls, folder: str | Path, state: dict[str, Any], read_only: bool = False) -> MemoryHeadStore:
        """A store holding a checkpoint's head (a `save_files` result and its folder), e.g. opened
        read-only for export or evaluation."""
        meta = HeadMeta.from_dict(state["meta"])
        store = cls(meta, seed=int(state.get("seed", 0)))
        store.load_files(folder, state)
        store.read_only = read_only
        return store
