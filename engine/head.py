"""The DIET head: N rows × d, one per training sample, and how a step uses and updates them.

Two managers with one interface (`loss(z, index, t)` then, after backward, `step(t)`):

* `DenseHead`: the reference. An `nn.Parameter` (N, d) and a dense `torch.optim.AdamW`/`SGD`.
  Loss over all N rows (original DIET, the paper's Algorithm 1) or over the batch's rows (batch
  CE; untouched rows then get an exactly-zero gradient and the dense optimizer still moves them).
* `LazyHead`: s-DIET. Rows live in a `HeadStore` (RAM or a Zarr store on disk); a step gathers only
  its candidate rows, catches them up to step t-1 with the exact lazy optimizer, computes batch CE,
  applies step t to those rows and scatters them back. Accelerator memory is O(B·d), not O(N·d).

Both produce the same head for the same seeds (tests/unit/engine/test_head_equivalence.py).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diet_engine.kernels import LazyAdamW, LazySGD, batch_cross_entropy
from diet_engine.storage.head import HeadMeta, HeadStore, MemoryHeadStore, RowBlock, head_init


def candidate_rows(index: np.ndarray, upcoming: Sequence[np.ndarray] = (), extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unique rows of a batch (plus up to `extra` rows of upcoming batches) and each sample's target.

    Returns (rows (M,) sorted unique int64, target (B,) int64 positions of each sample's row).
    A sample appearing several times in the batch maps to one row.
    """
    rows = np.unique(index)
    if extra > 0 and len(upcoming):
        more = np.unique(np.concatenate([np.asarray(u, dtype=np.int64) for u in upcoming]))
        more = more[~np.isin(more, rows)][:extra]
        rows = np.union1d(rows, more)
    target = np.searchsorted(rows, index)
    return rows.astype(np.int64), target.astype(np.int64)


def make_head_optimizer_meta(optim_cfg, mode: str = "exact") -> dict:
    return {
        "kind": optim_cfg.name, "betas": list(optim_cfg.betas), "eps": optim_cfg.eps,
        "weight_decay": optim_cfg.weight_decay, "momentum": optim_cfg.momentum, "mode": mode,
    }


class Head(abc.ABC):
    """Interface the trainer drives; one instance per rank."""

    num_rows: int
    dim: int

    @abc.abstractmethod
    def loss(self, z: torch.Tensor, index: np.ndarray, t: int,
             upcoming: Sequence[np.ndarray] = ()) -> torch.Tensor:
        """Mean DIET loss of features z (B, d) against sample indices (B,) at optimizer step t."""

    @abc.abstractmethod
    def step(self, t: int) -> None:
        """Apply optimizer step t to the rows used by the last `loss` (after backward)."""

    def prefetch(self, index: np.ndarray) -> None:
        """Hint: the rows of a batch coming soon (out-of-core stores start reading them)."""

    @abc.abstractmethod
    def state_dict(self) -> dict: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def commit(self, step: int) -> None:
        """Checkpoint hook: make the head durable at `step` (disk stores)."""

    def recover(self, step: int) -> None:
        """Resume hook: restore the head as of checkpoint `step` (disk stores)."""

    @abc.abstractmethod
    def export(self, T: int) -> torch.Tensor:
        """The (N, d) weight brought to step T (every row materialised). For small N only."""

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


class DenseHead(Head, nn.Module):
    """Reference head: nn.Parameter (N, d) + a dense torch optimizer."""

    def __init__(self, num_rows: int, dim: int, lrs: np.ndarray, optim_cfg, *, loss: str = "batch",
                 label_smoothing: float = 0.8, logit_scale: float = 1.0, extra_negatives: int = 0,
                 seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        nn.Module.__init__(self)
        self.num_rows, self.dim = num_rows, dim
        self.weight = nn.Parameter(head_init(seed, 0, num_rows, dim, dtype).to(device))  # (N, d)
        self.lrs = lrs
        self.kind = loss
        self.label_smoothing, self.logit_scale, self.extra = label_smoothing, logit_scale, extra_negatives
        if optim_cfg.name == "adamw":
            self.opt = torch.optim.AdamW([self.weight], lr=float(lrs[0]), betas=tuple(optim_cfg.betas),
                                         eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD([self.weight], lr=float(lrs[0]), momentum=optim_cfg.momentum,
                                       weight_decay=optim_cfg.weight_decay)

    def loss(self, z, index, t, upcoming=()):
        if self.kind == "full":  # original DIET: softmax over all N rows
            target = torch.as_tensor(index, device=z.device)
            return F.cross_entropy(self.logit_scale * z @ self.weight.T, target, label_smoothing=self.label_smoothing)
        rows, target = candidate_rows(index, upcoming, self.extra)
        r = self.weight[torch.as_tensor(rows, device=z.device)]  # (M, d); backward scatters into a dense (N, d) grad
        return batch_cross_entropy(z, r, torch.as_tensor(target, device=z.device),
                                   self.label_smoothing, self.logit_scale)

    def step(self, t):
        for g in self.opt.param_groups:
            g["lr"] = float(self.lrs[t - 1])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self, *args, **kwargs):  # noqa: D102 - nn.Module signature
        return {"weight": self.weight.detach().cpu(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state, strict=True):  # noqa: D102
        with torch.no_grad():
            self.weight.copy_(state["weight"])
        self.opt.load_state_dict(state["optimizer"])

    def export(self, T):
        return self.weight.detach().cpu().clone()


class LazyHead(Head):
    """s-DIET head: rows in a HeadStore, exact lazy optimizer, batch cross-entropy."""

    def __init__(self, store: HeadStore, lrs: np.ndarray, optim_cfg, *, label_smoothing: float = 0.8,
                 logit_scale: float = 1.0, extra_negatives: int = 0, mode: str = "exact",
                 batch_size: int = 256, device: torch.device | str = "cpu") -> None:
        self.store = store
        self.num_rows, self.dim = store.meta.num_rows, store.meta.dim
        self.lrs = lrs
        self.label_smoothing, self.logit_scale, self.extra = label_smoothing, logit_scale, extra_negatives
        self.device = torch.device(device)
        if optim_cfg.name == "adamw":
            self.opt = LazyAdamW(lrs, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                                 weight_decay=optim_cfg.weight_decay, mode=mode,
                                 **_paper_kwargs(mode, self.num_rows, batch_size))
        else:
            self.opt = LazySGD(lrs, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay, mode=mode,
                               **_paper_kwargs(mode, self.num_rows, batch_size))
        self._block: RowBlock | None = None  # the step's rows on `device`
        self._rows: torch.Tensor | None = None  # leaf (M, d) that receives the gradient

    def prefetch(self, index):
        self.store.prefetch(np.unique(index))

    def loss(self, z, index, t, upcoming=()):
        rows, target = candidate_rows(index, upcoming, self.extra)
        block = self.store.read_rows(rows).to(self.device, non_blocking=True)  # host → device copy
        self.opt.catch_up(block.rows, t)  # rows now at t-1
        self._block = block
        self._rows = block.weight.detach().requires_grad_(True)  # (M, d)
        return batch_cross_entropy(z, self._rows, torch.as_tensor(target, device=z.device),
                                   self.label_smoothing, self.logit_scale)

    def step(self, t):
        block, rows = self._block, self._rows
        assert block is not None and rows is not None, "step() without loss()"
        grad = rows.grad if rows.grad is not None else torch.zeros_like(rows)  # (M, d)
        self.opt.step(block.rows, grad, t)
        self.store.write_rows(block.to("cpu"))  # device → host copy; write-behind on disk stores
        self._block = self._rows = None

    def state_dict(self):
        if isinstance(self.store, MemoryHeadStore):
            return {"store": _memory_state(self.store)}
        return {"meta": self.store.meta.to_dict()}  # disk: the store itself is the checkpoint

    def load_state_dict(self, state):
        if isinstance(self.store, MemoryHeadStore):
            _load_memory_state(self.store, state["store"])
        else:
            self.store.meta.check_compatible(HeadMeta.from_dict(state["meta"]), "checkpoint's head store")

    def commit(self, step):
        self.store.commit(step)

    def recover(self, step):
        self.store.recover(step)

    def export(self, T):
        """All rows at step T, in chunks of rows (host memory O(N·d) for the result only)."""
        out = None
        for lo in range(0, self.num_rows, 65536):
            idx = np.arange(lo, min(lo + 65536, self.num_rows), dtype=np.int64)
            b = self.store.read_rows(idx)
            self.opt.materialize(b.rows, T)
            if out is None:
                out = torch.empty(self.num_rows, self.dim, dtype=b.weight.dtype)  # (N, d) host
            out[lo : lo + len(idx)] = b.weight
        return out

    def stats(self):
        fn = getattr(self.store, "stats", None)
        return dict(fn()) if callable(fn) else {}

    def close(self):
        self.store.close()


def _paper_kwargs(mode: str, num_rows: int, batch_size: int) -> dict:
    return {"num_rows": num_rows, "batch_size": batch_size} if mode == "paper" else {}


def _memory_state(store: MemoryHeadStore) -> dict:
    fn = getattr(store, "state_dict", None)
    if callable(fn):
        return fn()
    return {"weight": store.weight, "exp_avg": store.exp_avg, "exp_avg_sq": store.exp_avg_sq,
            "step": torch.from_numpy(store.step_stamps.copy())}


def _load_memory_state(store: MemoryHeadStore, state: dict) -> None:
    fn = getattr(store, "load_state_dict", None)
    if callable(fn):
        fn(state)
        return
    store.weight.copy_(state["weight"])
    store.exp_avg.copy_(state["exp_avg"])
    store.exp_avg_sq.copy_(state["exp_avg_sq"])
    store.step_stamps[:] = state["step"].numpy()
