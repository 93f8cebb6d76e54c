"""Public classes of the lazy optimizer: `LazyAdamW`, `LazySGD`.

Conventions
-----------
* Steps are 1-based: step t uses learning rate `lr_at(t)`; an array schedule `lrs` gives
  `lr_at(t) = lrs[t - 1]`; a callable is evaluated lazily (and cached); a float is constant.
* Rows are a `Rows(weight, exp_avg, exp_avg_sq, step)` tuple (`kernels/rows.py`) whose tensors are
  updated in place: weight, exp_avg, exp_avg_sq (M, d), fp32 or fp64, CPU or CUDA, and `step` (M,)
  int64, the last optimizer step applied to each row (0: never stepped). SGD keeps its momentum
  buffer in exp_avg and ignores exp_avg_sq (None is fine).
* `catch_up(rows, t)` brings rows to step t−1 (zero-gradient steps), `step(rows, grad, t)` catches
  up and applies the real step t (step[:] = t), `materialize(rows, T)` brings rows to step T.
* `_LazyOptimizer` holds that protocol, the checks and the one backend dispatch; `LazyAdamW` and
  `LazySGD` supply their state, tables and one function per backend.

Modes
-----
* `exact` (default): equals torch.optim.AdamW / torch.optim.SGD applied densely to the whole head
  (rows out of the batch get g = 0), in closed form: cost per row O(log gap) + O(W) scalars per
  unique stamp, O(1) per element (see `reference.py` for the formulas, `chebyshev.py` for AdamW).
* `paper`: the s-DIET multistep update (`paper.py`): a row is moved only by `step`, which applies
  the real step then `skipped_steps` (default num_rows / batch_size − 1) closed-form steps;
  `catch_up` and `materialize` leave rows as they are.

Backends (`backend=`): "auto" (Triton on CUDA, numba on CPU), "reference" (plain PyTorch),
"numba" (CPU tensors), "triton" (CUDA tensors, or CPU under TRITON_INTERPRET=1). Stamps are checked
(τ ≤ target) on CPU; on CUDA that check would cost a host sync and is skipped.
"""

from __future__ import annotations

import abc
import os

import numpy as np
import torch

from diet_engine.kernels.lazy_optim import chebyshev, paper, reference
from diet_engine.kernels.lazy_optim.schedule_tables import AdamWTables, LrTable, Schedule, SGDTables
from diet_engine.kernels.rows import Rows

_MODES = ("exact", "paper")
_BACKENDS = ("auto", "reference", "numba", "triton")


def _check_options(mode: str, backend: str, num_rows, batch_size, skipped_steps) -> float | None:
    if mode not in _MODES:
        raise ValueError(f"lazy optimizer: mode={mode!r}, expected one of {_MODES}")
    if backend not in _BACKENDS:
        raise ValueError(f"lazy optimizer: backend={backend!r}, expected one of {_BACKENDS}")
    if mode != "paper":
        return None
    if skipped_steps is not None:
        return float(skipped_steps)
    if num_rows is None or batch_size is None:
        raise ValueError("lazy optimizer: mode='paper' needs skipped_steps=, or num_rows= and "
                         "batch_size= (skipped_steps = num_rows / batch_size - 1)")
    return num_rows / batch_size - 1.0


def _resolve_backend(backend: str, weight: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if weight.is_cuda else "numba"
    if backend == "numba" and weight.is_cuda:
        raise ValueError("lazy optimizer: backend='numba' needs CPU tensors, got CUDA ones")
    if backend == "triton" and not weight.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("lazy optimizer: backend='triton' needs CUDA tensors (or CPU tensors "
                         "under TRITON_INTERPRET=1)")
    return backend


def _check_rows(rows: Rows, grad: torch.Tensor | None) -> None:
    """Shapes, dtypes and devices of the tensors set in `rows` (None fields are not checked)."""
    weight, step = rows.weight, rows.step
    if weight.dim() != 2 or weight.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"lazy optimizer: weight must be (M, d) fp32/fp64, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    named = [("exp_avg", rows.exp_avg), ("exp_avg_sq", rows.exp_avg_sq), ("grad", grad)]
    for name, x in named:
        if x is not None and (x.shape != weight.shape or x.device != weight.device):
            raise ValueError(f"lazy optimizer: {name} {tuple(x.shape)} on {x.device} does not "
                             f"match weight {tuple(weight.shape)} on {weight.device}")
    for name, x in named[:2]:
        if x is not None and x.dtype != weight.dtype:
            raise ValueError(f"lazy optimizer: {name} is {x.dtype}, weight is {weight.dtype}")
    if step.shape != weight.shape[:1] or step.dtype != torch.int64:
        raise ValueError(f"lazy optimizer: step must be ({weight.shape[0]},) int64, got "
                         f"{tuple(step.shape)} {step.dtype}")


def _as_rows(rows) -> Rows:
    """`rows` as a `Rows`; a plain 4-tuple is accepted, anything else raises TypeError."""
    if isinstance(rows, Rows):
        return rows
    if isinstance(rows, tuple) and len(rows) == 4:
        return Rows(*rows)
    raise TypeError(f"lazy optimizer: rows must be Rows(weight, exp_avg, exp_avg_sq, step), got "
                    f"{type(rows).__name__}")


class _Contiguous:
    """Hands kernels contiguous tensors and copies results back into non-contiguous originals."""

    def __init__(self, *tensors):
        self.orig = tensors
        self.work = tuple(None if x is None else x.contiguous() for x in tensors)

    def finish(self):
        for o, w in zip(self.orig, self.work, strict=True):
            if o is not None and o.data_ptr() != w.data_ptr():
                o.copy_(w)


class _LazyOptimizer(abc.ABC):
    """What LazyAdamW and LazySGD share: catch_up / step / materialize, the checks, the dispatch.

    A subclass sets `mode`, `backend`, `skipped_steps` and `tables` in its constructor and
    supplies `lr_at`, `_state` (the rows it updates, checked), `_paper_step` and one method per
    backend: `_reference`, `_numba` (contiguous CPU rows), `_triton` (contiguous rows).
    """

    mode: str
    backend: str
    skipped_steps: float | None
    tables: AdamWTables | SGDTables | None

    @abc.abstractmethod
    def lr_at(self, t: int) -> float:
        """Learning rate of step t."""

    @torch.no_grad()
    def catch_up(self, rows: Rows, t: int) -> None:
        """Bring rows to step t−1 (before the forward pass of step t)."""
        self._run(_as_rows(rows), None, t - 1, t)

    @torch.no_grad()
    def step(self, rows: Rows, grad: torch.Tensor, t: int) -> None:
        """Catch rows up to t−1, then apply step t with their gradient (M, d); step[:] = t."""
        rows = _as_rows(rows)
        if self.mode == "paper":
            self._paper_step(rows, grad.to(rows.weight.dtype), self.lr_at(t))
            rows.step.fill_(t)
            return
        self._run(rows, grad, t - 1, t)

    @torch.no_grad()
    def materialize(self, rows: Rows, T: int) -> None:
        """Bring rows to step T (export, evaluation, checkpoints)."""
        self._run(_as_rows(rows), None, T, T + 1)

    def _run(self, rows: Rows, grad: torch.Tensor | None, e: int, t: int) -> None:
        """Rows to step e, then (grad given) the real step t; stamps to max(stamp, e or t)."""
        rows = self._state(rows, grad)
        if self.mode == "paper" or rows.weight.shape[0] == 0:
            return
        if not rows.step.is_cuda:
            reference.gaps_ok(rows.step, e, strict=False)
        self.tables.ensure(max(t, 1) if grad is not None else max(e, 1))
        if grad is not None:
            grad = grad.to(rows.weight.dtype)
        backend = _resolve_backend(self.backend, rows.weight)
        if backend == "reference":
            self._reference(rows, grad, e, t)
        else:
            c = _Contiguous(rows.weight, rows.exp_avg, rows.exp_avg_sq, grad)
            w, m, v, g = c.work
            kernel = self._numba if backend == "numba" else self._triton
            kernel(Rows(w, m, v, rows.step), g, e, t)
            c.finish()
        rows.step.copy_(torch.clamp(rows.step, min=t if grad is not None else e))

    @abc.abstractmethod
    def _state(self, rows: Rows, grad: torch.Tensor | None) -> Rows:
        """The rows this optimizer updates (fields it does not use set to None), checked."""

    @abc.abstractmethod
    def _paper_step(self, rows: Rows, grad: torch.Tensor, lr: float) -> None:
        """Paper mode: the real step with `grad`, then `skipped_steps` closed-form steps."""

    @abc.abstractmethod
    def _reference(self, rows: Rows, grad: torch.Tensor | None, e: int, t: int) -> None:
        """Plain PyTorch: rows to step e, then (grad given) step t."""

    @abc.abstractmethod
    def _numba(self, rows: Rows, grad: torch.Tensor | None, e: int, t: int) -> None:
        """The numba kernel on contiguous CPU rows; same contract as `_reference`."""

    @abc.abstractmethod
    def _triton(self, rows: Rows, grad: torch.Tensor | None, e: int, t: int) -> None:
        """The Triton kernel on contiguous rows; same contract as `_reference`."""


class LazyAdamW(_LazyOptimizer):
    """AdamW (PyTorch semantics, amsgrad off) applied lazily to head rows.

    Rows need all four fields. Extra keyword options: `num_rows`, `batch_size` or `skipped_steps`
    (paper mode), `cache_size` (stamps whose Chebyshev coefficients the numba backend keeps;
    32·8 bytes each).
    """

    def __init__(self, lr: Schedule, *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, mode: str = "exact",
                 backend: str = "auto", num_rows: int | None = None,
                 batch_size: int | None = None, skipped_steps: float | None = None,
                 cache_size: int = 1 << 15) -> None:
        self.skipped_steps = _check_options(mode, backend, num_rows, batch_size, skipped_steps)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.mode, self.backend = mode, backend
        if mode == "exact":
            self.tables = AdamWTables(lr, self.beta1, self.beta2, self.eps, self.weight_decay)
        else:
            self.tables = None
            self._lrs = LrTable(lr)
        # numba τ-cache of Chebyshev coefficients (direct-mapped, slot = τ mod cache_size)
        self._ckeys = np.full(cache_size, -1, dtype=np.int64)
        self._cvals = np.zeros((cache_size, chebyshev.K))
        self._cnterm = np.zeros(cache_size, dtype=np.int64)

    def lr_at(self, t: int) -> float:
        if self.tables is None:
            self._lrs.ensure(t)
            return float(self._lrs.lr[t])
        self.tables.ensure(t)  # grows the derived tables with the learning rates
        return float(self.tables.lrs.lr[t])

    def _state(self, rows, grad):
        if rows.exp_avg is None or rows.exp_avg_sq is None:
            raise ValueError("LazyAdamW: rows need exp_avg and exp_avg_sq (the AdamW moments), "
                             "got None")
        _check_rows(rows, grad)
        return rows

    def _paper_step(self, rows, grad, lr):
        paper.adamw_paper_step(rows.weight, rows.exp_avg, rows.exp_avg_sq, grad, lr=lr,
                               weight_decay=self.weight_decay, betas=(self.beta1, self.beta2),
                               eps=self.eps, n=self.skipped_steps)

    def _reference(self, rows, grad, e, t):
        w, m, v, s = rows
        reference.adamw_catch_up_reference(w, m, v, s, e, self.tables)
        if grad is not None:
            reference.adamw_step_reference(w, m, v, grad, t, self.tables)

    def _numba(self, rows, grad, e, t):
        from diet_engine.kernels.lazy_optim import _numba  # noqa: PLC0415

        w, m, v, s = rows
        tab = self.tables
        _numba.adamw_lazy(w.numpy(), m.numpy(), v.numpy(),
                          (grad if grad is not None else w[:0]).numpy(), s.numpy(), e, t,
                          grad is not None, tab.L, tab.lrs.lr, tab.a, tab.c,
                          self.weight_decay, self.beta1, self.beta2, self.eps, tab.window,
                          chebyshev.NODES, chebyshev.DCT, chebyshev.TOL,
                          self._ckeys, self._cvals, self._cnterm)

    def _triton(self, rows, grad, e, t):
        from diet_engine.kernels.lazy_optim import _triton  # noqa: PLC0415

        w, m, v, s = rows
        _triton.adamw_lazy(w, m, v, grad, s, e, t, self.tables)


class LazySGD(_LazyOptimizer):
    """SGD with momentum (PyTorch semantics, nesterov off) applied lazily; exp_avg is the buffer.

    Rows: exp_avg_sq is never read (pass None); exp_avg may be None when momentum == 0.
    Extra keyword options: `num_rows`, `batch_size` or `skipped_steps` (paper mode).
    """

    def __init__(self, lr: Schedule, *, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, mode: str = "exact", backend: str = "auto",
                 num_rows: int | None = None, batch_size: int | None = None,
                 skipped_steps: float | None = None) -> None:
        self.skipped_steps = _check_options(mode, backend, num_rows, batch_size, skipped_steps)
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.weight_decay = float(weight_decay)
        self.mode, self.backend = mode, backend
        self.tables = SGDTables(lr, self.momentum, self.dampening, self.weight_decay)

    def lr_at(self, t: int) -> float:
        self.tables.ensure(t)
        return float(self.tables.lrs.lr[t])

    def _state(self, rows, grad):
        """The rows SGD updates: weight, the buffer (None when momentum == 0) and the stamps."""
        has_buf = self.momentum != 0.0
        if has_buf and rows.exp_avg is None:
            raise ValueError("LazySGD: momentum != 0 needs the momentum buffer as rows.exp_avg")
        rows = Rows(rows.weight, rows.exp_avg if has_buf else None, None, rows.step)
        _check_rows(rows, grad)
        return rows

    def _paper_step(self, rows, grad, lr):
        paper.sgd_paper_step(rows.weight, rows.exp_avg, grad, lr=lr,
                             weight_decay=self.weight_decay, momentum=self.momentum,
                             dampening=self.dampening, n=self.skipped_steps)

    def _reference(self, rows, grad, e, t):
        w, b, _, s = rows
        reference.sgd_catch_up_reference(w, b, s, e, self.tables)
        if grad is not None:
            reference.sgd_step_reference(w, b, grad, t, self.tables)

    def _numba(self, rows, grad, e, t):
        from diet_engine.kernels.lazy_optim import _numba  # noqa: PLC0415

        w, b, _, s = rows
        tab = self.tables
        _numba.sgd_lazy(w.numpy(), (b if b is not None else w[:0]).numpy(),
                        (grad if grad is not None else w[:0]).numpy(), s.numpy(), e, t,
                        grad is not None, b is not None, tab.lrs.lr, tab.blocks, tab.offsets,
                        self.momentum, self.dampening, self.weight_decay)

    def _triton(self, rows, grad, e, t):
        from diet_engine.kernels.lazy_optim import _triton  # noqa: PLC0415

        w, b, _, s = rows
        _triton.sgd_lazy(w, b, grad, s, e, t, self.tables)
