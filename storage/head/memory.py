"""In-memory head store: the reference backend (small N, tests, full-DIET comparisons)."""

from __future__ import annotations

import numpy as np
import torch

from storage.head.base import HeadMeta, HeadStore, RowBlock, head_init

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class MemoryHeadStore(HeadStore):
    """All rows held as (N, d) tensors."""

    def __init__(self, meta: HeadMeta, seed: int = 0) -> None:
        self.meta = meta
        dt = _DTYPES[meta.dtype]
        n, d = meta.num_rows, meta.dim
        self.weight = head_init(seed, 0, n, d, dt)  # (N, d)
        self.exp_avg = torch.zeros(n, d, dtype=dt)  # (N, d)
        self.exp_avg_sq = torch.zeros(n, d, dtype=dt)  # (N, d)
        self._step = np.zeros(n, dtype=np.int64)  # (N,)

    @property
    def step_stamps(self) -> np.ndarray:
        return self._step

    def read_rows(self, index: np.ndarray) -> RowBlock:
        idx = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
        return RowBlock(
            index=np.asarray(index, dtype=np.int64),
            weight=self.weight[idx].clone(),
            exp_avg=self.exp_avg[idx].clone(),
            exp_avg_sq=self.exp_avg_sq[idx].clone(),
            step=torch.from_numpy(self._step[index].copy()),
        )

    def write_rows(self, block: RowBlock) -> None:
        idx = torch.from_numpy(np.ascontiguousarray(block.index, dtype=np.int64))
        self.weight[idx] = block.weight.detach().to("cpu", self.weight.dtype)
        self.exp_avg[idx] = block.exp_avg.detach().to("cpu", self.weight.dtype)
        self.exp_avg_sq[idx] = block.exp_avg_sq.detach().to("cpu", self.weight.dtype)
        self._step[block.index] = block.step.cpu().numpy()
