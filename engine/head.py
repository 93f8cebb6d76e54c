"""The DIET head: N rows × d, one per training sample, and how a step uses and updates them.

A head is built once by `build_head(cfg, ...)` with everything it calls: its store, its optimizer
and its batch cross-entropy (`ce`: the local fused kernel, or the global batch CE of
`engine/global_ce.py` bound to a process group). The trainer then drives it per epoch and per step:

    head.start_epoch(plan, start_batch)   # opens the prefetch window over the epoch's batches
    loss = head.loss(z, index, t)         # window advances; rows gathered, caught up to t-1; batch CE
    ... backward ...
    head.step(t)                          # optimizer step t on the used rows; scatter back

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
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diet_engine.engine.optim import build_lazy_optimizer, build_optimizer, head_optimizer_meta
from diet_engine.kernels import batch_cross_entropy
from diet_engine.storage.head import HeadMeta, HeadStore, Lookahead, MemoryHeadStore, RowBlock, head_init

BatchCE = Callable[..., torch.Tensor]
"""`batch_cross_entropy(z (B, d), rows (M, d), target (B,), label_smoothing, scale) -> mean loss`."""

_EXPORT_BLOCK = 65536  # rows materialised at a time by `export`


def candidate_rows(index: np.ndarray, upcoming: Sequence[np.ndarray] = (),
                   extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
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


class Head(abc.ABC):
    """Interface the trainer drives; one instance per rank. Owns the prefetch window of its epoch."""

    num_rows: int
    dim: int
    lookahead: int = 0  # batches prefetched ahead (and the pool of extra negatives)
    extra: int = 0  # extra negatives per step (batch CE)
    _window: Lookahead | None = None

    def start_epoch(self, plan: Sequence[np.ndarray], start_batch: int = 0) -> None:
        """Open the prefetch window over an epoch's batches; the next `loss` is for `plan[start_batch]`."""
        self._window = Lookahead(self.prefetch, plan, self.lookahead, start_batch)

    def _upcoming(self) -> Sequence[np.ndarray]:
        """Advance the window by the batch in use; the batches after it (extra negatives)."""
        return self._window.advance() if self._window is not None else ()

    def prefetch(self, index: np.ndarray) -> None:  # noqa: B027 - optional hint
        """Hint: the rows of a batch coming soon (out-of-core stores start reading them)."""

    @abc.abstractmethod
    def loss(self, z: torch.Tensor, index: np.ndarray, t: int) -> torch.Tensor:
        """Mean DIET loss of features z (B, d) against sample indices (B,) at optimizer step t."""

    @abc.abstractmethod
    def step(self, t: int) -> None:
        """Apply optimizer step t to the rows used by the last `loss` (after backward)."""

    @abc.abstractmethod
    def grads(self) -> list[torch.Tensor]:
        """The gradients the last `loss` produced (after backward), e.g. to check they are finite."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Drop the last `loss` without a step: rows, moments and stamps stay as they were."""

    @abc.abstractmethod
    def state_dict(self) -> dict: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def save_files(self, folder: Path, name: str) -> dict:
        """Checkpoint hook: the head's state, its large parts written as files into `folder` (names
        starting with `name`), the rest returned for the checkpoint's client state. Default: all of
        `state_dict()` returned (a dense head; a disk store's metadata)."""
        return self.state_dict()

    def load_files(self, folder: Path, state: dict) -> None:
        """Resume hook: restore a `save_files(folder, ...)` result."""
        self.load_state_dict(state)

    def commit(self, step: int) -> None:  # noqa: B027 - durable heads only
        """Checkpoint hook: make the head durable at `step` (disk stores)."""

    def recover(self, step: int) -> None:  # noqa: B027 - durable heads only
        """Resume hook: restore the head as of checkpoint `step` (disk stores)."""

    @abc.abstractmethod
    def rows_at(self, index: np.ndarray, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `index` (sorted, unique) brought to step T: (weight (M, d) on the host, the step
        each row was last stepped at (M,) int64, before materialising)."""

    def export(self, T: int) -> torch.Tensor:
        """The (N, d) weight brought to step T (every row materialised), block by block."""
        out = None
        for lo in range(0, self.num_rows, _EXPORT_BLOCK):
            idx = np.arange(lo, min(lo + _EXPORT_BLOCK, self.num_rows), dtype=np.int64)
            w, _ = self.rows_at(idx, T)
            if out is None:
                out = torch.empty(self.num_rows, self.dim, dtype=w.dtype)  # (N, d) host
            out[lo : lo + len(idx)] = w
        return out

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:  # noqa: B027
        pass


class DenseHead(Head, nn.Module):
    """Reference head: nn.Parameter (N, d) + a dense torch optimizer."""

    def __init__(self, num_rows: int, dim: int, lrs: np.ndarray, optim_cfg, *, loss: str = "batch",
                 label_smoothing: float = 0.8, logit_scale: float = 1.0, extra_negatives: int = 0,
                 lookahead: int = 0, seed: int = 0, init: str = "random", ce: BatchCE = batch_cross_entropy,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        nn.Module.__init__(self)
        self.num_rows, self.dim = num_rows, dim
        self.weight = nn.Parameter(head_init(seed, 0, num_rows, dim, dtype).to(device))  # (N, d)
        # init='feature': rows not yet visited (a row is "visited" once its sample was in a batch)
        self.fresh = torch.ones(num_rows, dtype=torch.bool, device=device) if init == "feature" else None
        self._undo: tuple[torch.Tensor, torch.Tensor] | None = None  # rows replaced by features this step
        self.lrs = lrs
        self.kind = loss
        self.label_smoothing, self.logit_scale, self.extra = label_smoothing, logit_scale, extra_negatives
        self.lookahead, self.ce = lookahead, ce
        self.opt = build_optimizer([self.weight], optim_cfg, float(lrs[0]))

    def loss(self, z, index, t):
        upcoming = self._upcoming()
        if self.fresh is not None:
            self._init_from_features(z, index)
        if self.kind == "full":  # original DIET: softmax over all N rows
            target = torch.as_tensor(index, device=z.device)
            return F.cross_entropy(self.logit_scale * z @ self.weight.T, target, label_smoothing=self.label_smoothing)
        rows, target = candidate_rows(index, upcoming, self.extra)
        r = self.weight[torch.as_tensor(rows, device=z.device)]  # (M, d); backward scatters into a dense (N, d) grad
        return self.ce(z, r, torch.as_tensor(target, device=z.device), self.label_smoothing, self.logit_scale)

    def _init_from_features(self, z: torch.Tensor, index: np.ndarray) -> None:
        """Rows of samples seen for the first time become their feature (first occurrence in the batch)."""
        rows, first = np.unique(index, return_index=True)
        idx = torch.as_tensor(rows, device=self.weight.device)
        new = self.fresh[idx]
        if not bool(new.any()):
            self._undo = None
            return
        idx = idx[new]
        with torch.no_grad():
            self._undo = (idx, self.weight[idx].clone())
            self.weight[idx] = z.detach()[torch.as_tensor(first, device=z.device)[new.to(z.device)]].to(self.weight)
            self.fresh[idx] = False

    def step(self, t):
        for g in self.opt.param_groups:
            g["lr"] = float(self.lrs[t - 1])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._undo = None

    def grads(self):
        return [self.weight.grad] if self.weight.grad is not None else []

    def discard(self):
        self.opt.zero_grad(set_to_none=True)
        if self._undo is not None:  # rows set from this step's features go back to what they were
            idx, old = self._undo
            with torch.no_grad():
                self.weight[idx] = old
            self.fresh[idx] = True
            self._undo = None

    def state_dict(self, *args, **kwargs):  # nn.Module's signature
        state = {"weight": self.weight.detach().cpu(), "optimizer": self.opt.state_dict()}
        if self.fresh is not None:
            state["fresh"] = self.fresh.cpu()
        return state

    def load_state_dict(self, state, strict=True):
        with torch.no_grad():
            self.weight.copy_(state["weight"])
        self.opt.load_state_dict(state["optimizer"])
        if self.fresh is not None:
            self.fresh.copy_(state["fresh"])

    def rows_at(self, index, T):
        w = self.weight.detach()[torch.as_tensor(index, device=self.weight.device)].cpu()  # (M, d)
        return w, torch.full((len(index),), T, dtype=torch.int64)  # a dense head is always current

    def export(self, T):
        return self.weight.detach().cpu().clone()


class LazyHead(Head):
    """s-DIET head: rows in a HeadStore, exact lazy optimizer, batch cross-entropy."""

    def __init__(self, store: HeadStore, lrs: np.ndarray, optim_cfg, *, label_smoothing: float = 0.8,
                 logit_scale: float = 1.0, extra_negatives: int = 0, lookahead: int = 0, mode: str = "exact",
                 batch_size: int = 256, init: str = "random", ce: BatchCE = batch_cross_entropy,
                 device: torch.device | str = "cpu") -> None:
        self.store = store
        self.init_from_features = init == "feature"
        self.num_rows, self.dim = store.meta.num_rows, store.meta.dim
        self.lrs = lrs
        self.label_smoothing, self.logit_scale, self.extra = label_smoothing, logit_scale, extra_negatives
        self.lookahead, self.ce = lookahead, ce
        self.device = torch.device(device)
        self.opt = build_lazy_optimizer(optim_cfg, lrs, mode, num_rows=self.num_rows, batch_size=batch_size)
        self._block: RowBlock | None = None  # the step's rows on `device`
        self._rows: torch.Tensor | None = None  # leaf (M, d) that receives the gradient

    def prefetch(self, index):
        self.store.prefetch(np.unique(index))

    def loss(self, z, index, t):
        rows, target = candidate_rows(index, self._upcoming(), self.extra)
        block = self.store.read_rows(rows).to(self.device, non_blocking=True)  # host → device copy
        fresh = block.step == 0  # (M,) rows never stepped: still as created
        self.opt.catch_up(block.rows, t)  # rows now at t-1
        if self.init_from_features:
            _init_from_features(block, fresh, z, index, target)
        self._block = block
        self._rows = block.weight.detach().requires_grad_(True)  # (M, d)
        return self.ce(z, self._rows, torch.as_tensor(target, device=z.device), self.label_smoothing, self.logit_scale)

    def step(self, t):
        block, rows = self._block, self._rows
        assert block is not None and rows is not None, "step() without loss()"
        grad = rows.grad if rows.grad is not None else torch.zeros_like(rows)  # (M, d)
        self.opt.step(block.rows, grad, t)
        self.store.write_rows(block.to("cpu"))  # device → host copy; write-behind on disk stores
        self._block = self._rows = None

    def grads(self):
        return [self._rows.grad] if self._rows is not None and self._rows.grad is not None else []

    def discard(self):
        self._block = self._rows = None  # the gathered copies are dropped; the store never saw them change

    def state_dict(self):
        return {"store": self.store.state_dict()}  # a disk store: its metadata only (it is its own checkpoint)

    def load_state_dict(self, state):
        self.store.load_state_dict(state["store"])

    def save_files(self, folder, name):
        return {"store": self.store.save_files(folder, name)}  # a memory store: its rows file, block by block

    def load_files(self, folder, state):
        self.store.load_files(folder, state["store"])

    def commit(self, step):
        self.store.commit(step)

    def recover(self, step):
        self.store.recover(step)

    def rows_at(self, index, T):
        b = self.store.read_rows(index)
        stamps = b.step.clone()
        self.opt.materialize(b.rows, T)
        return b.weight, stamps

    def stats(self):
        return self.store.stats()

    def close(self):
        self.store.close()


def _init_from_features(block: RowBlock, fresh: torch.Tensor, z: torch.Tensor, index: np.ndarray,
                        target: np.ndarray) -> None:
    """head.init='feature': a fresh row (never stepped) of a batch sample becomes the sample's feature.

    The sample's first occurrence in the batch gives it; moments stay zero (as created). The dense
    head does the same with its own first-visit mask, so both stay equal."""
    in_batch = torch.zeros_like(fresh)
    first = np.unique(index, return_index=True)[1]  # first occurrence of each distinct sample
    pos = torch.as_tensor(target[first], device=fresh.device)  # their rows' positions in the block
    in_batch[pos] = True
    take = fresh & in_batch
    if bool(take.any()):
        src = torch.full((len(fresh),), -1, dtype=torch.int64, device=fresh.device)
        src[pos] = torch.as_tensor(first, device=fresh.device)
        block.weight[take] = z.detach()[src[take].to(z.device)].to(block.weight)


# ---------------------------------------------------------------------------------------- factory


def head_optim_config(cfg):
    """The optim section the head's optimizer uses: the run's, with head.weight_decay when set."""
    if cfg.head.weight_decay < 0:
        return cfg.optim
    return dataclasses.replace(cfg.optim, weight_decay=cfg.head.weight_decay)


def head_meta(cfg, num_rows: int, dim: int, dtype: torch.dtype, chunk_rows: int) -> HeadMeta:
    """The metadata a run's head store is created with (and checked against when reopened)."""
    return HeadMeta(num_rows=num_rows, dim=dim, dtype=str(dtype).removeprefix("torch."),
                    optimizer=head_optimizer_meta(head_optim_config(cfg), cfg.head.optimizer_mode),
                    chunk_rows=int(chunk_rows))


def open_train_store(cfg, meta: HeadMeta, *, run_dir: str | Path, rank: int = 0, world: int = 1,
                     owned_rows: np.ndarray | None = None) -> HeadStore:
    """The store a training rank writes: rows in RAM (`memory`) or this rank's Zarr store (`disk`),
    created, or reopened and verified on resume."""
    if cfg.head.store == "memory":
        return MemoryHeadStore(meta, seed=cfg.head.seed)
    from diet_engine.engine.distributed import rank_store_path  # noqa: PLC0415
    from diet_engine.storage.head import open_or_create_store  # noqa: PLC0415

    path = rank_store_path(cfg.head.store_path, run_dir, rank, world)  # distributed: one store per rank
    return open_or_create_store(path, meta, seed=cfg.head.seed, resume=cfg.train.resume == "true",
                                memory_budget_bytes=cfg.head.memory_budget_mb << 20, owned_rows=owned_rows)


def build_head(cfg, lrs: np.ndarray, *, num_rows: int, dim: int, store: HeadStore | None = None,
               ce: BatchCE = batch_cross_entropy, world: int = 1, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Head:
    """The head `cfg.head` describes: a `DenseHead` (store='dense'), else a `LazyHead` over `store`.

    Used by the trainer and by `diet head export` alike. `ce` is the batch cross-entropy the head
    calls (the global one of engine/global_ce.py on several ranks with train.batch_ce=global);
    `world` scales the batch size the paper-mode optimizer assumes.
    """
    h = cfg.head
    if ce is not batch_cross_entropy and h.loss != "batch":
        raise ValueError(f"train.batch_ce={cfg.train.batch_ce}: a global batch cross-entropy needs head.loss=batch "
                         f"(got head.loss={h.loss!r})")
    common = dict(label_smoothing=h.label_smoothing, logit_scale=h.logit_scale, extra_negatives=h.extra_negatives,
                  lookahead=h.lookahead, init=h.init, ce=ce, device=device)
    lrs = np.asarray(lrs) * h.lr_scale if h.lr_scale != 1.0 else lrs  # the backbone's schedule, scaled
    optim = head_optim_config(cfg)
    if h.store == "dense":
        return DenseHead(num_rows, dim, lrs, optim, loss=h.loss, seed=h.seed, dtype=dtype, **common)
    if store is None:
        raise ValueError(f"head.store={h.store!r} needs a head store")
    return LazyHead(store, lrs, optim, mode=h.optimizer_mode, batch_size=cfg.train.batch_size * world, **common)
