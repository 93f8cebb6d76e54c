"""What the lazy catch-up needs from the learning-rate schedule, precomputed once (fp64, host).

Design note
-----------
Every scalar of the catch-up depends only on the schedule and the hyper-parameters, never on a row,
so it is tabulated per step s = 0..T and shared by all rows and all backends:

* `LrTable`        lr[s] = lr_at(s) (lr[0] = 0 unused); an array schedule is fixed, a callable or a
                   constant one is evaluated lazily into a table that doubles when a step beyond it
                   is asked for (so a callable is called ahead, up to 2× the largest step used,
                   and must accept any step ≥ 1).
* `AdamWTables`    L[s] = Σ_{r≤s} log1p(−η_r λ) (so Π_{r=a}^{b}(1 − η_r λ) = exp(L[b] − L[a−1]) in
                   O(1)), a[s] = η_s / (1 − β1^s) and c[s] = sqrt(1 − β2^s) (bias corrections),
                   and the window W after which a skipped step's update is below fp64 resolution.
* `SGDTables`      the 2×2 map A_s of one zero-gradient SGD step on (θ, buf), and products of A over
                   aligned blocks of 2^k steps (a segment tree), so the map of any gap is a
                   product of ≤ 2·log2(T) block maps: O(log gap) per row instead of O(gap), no matrix inverse.

Memory: AdamW 3 arrays of T+1 fp64; SGD ≈ 2T blocks × 4 fp64 (64 MB for T = 10⁶ steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

Schedule = Sequence[float] | np.ndarray | Callable[[int], float] | float


class LrTable:
    """Learning rate per step, fp64: `lr[s]` for s = 1..T, `lr[0] = 0` (steps are 1-based)."""

    def __init__(self, lr: Schedule) -> None:
        self._fn: Callable[[int], float] | None = None
        if callable(lr):
            self._fn = lr
            self.lr = np.zeros(1)
        elif np.isscalar(lr):
            value = float(lr)  # type: ignore[arg-type]
            self._fn = lambda s: value
            self.lr = np.zeros(1)
        else:
            arr = np.asarray(lr, dtype=np.float64).reshape(-1)
            if not np.all(np.isfinite(arr)):
                raise ValueError("lr schedule: every learning rate must be finite")
            self.lr = np.concatenate([[0.0], arr])
        self.version = 0  # bumped on every growth (device copies key on it)

    @property
    def num_steps(self) -> int:
        return len(self.lr) - 1

    def ensure(self, T: int) -> bool:
        """Make lr[1..T] available; returns True if the table grew. Cost O(T) on growth only."""
        if T <= self.num_steps:
            return False
        if self._fn is None:
            raise ValueError(
                f"lr schedule: step {T} asked for, but the schedule array has only "
                f"{self.num_steps} entries (step t uses lrs[t-1])"
            )
        new_T = max(T, 2 * self.num_steps, 1024)
        fresh = np.array([float(self._fn(s)) for s in range(self.num_steps + 1, new_T + 1)])
        if not np.all(np.isfinite(fresh)):
            raise ValueError("lr schedule: the callable returned a non-finite learning rate")
        self.lr = np.concatenate([self.lr, fresh])
        self.version += 1
        return True


def adamw_window(beta1: float, beta2: float, tol: float = 1e-17) -> int:
    """Steps after which a skipped AdamW update is negligible.

    With g = 0 the update of the j-th skipped step is at most μ^j times the first (μ = β1/√β2,
    the ε term only makes it smaller), so the tail beyond W is ≤ μ^W / (1 − μ) ≤ tol of it.
    """
    if beta1 == 0.0:
        return 1
    mu = beta1 / math.sqrt(beta2)
    if mu >= 1.0:
        raise ValueError(
            f"LazyAdamW exact mode: betas={beta1, beta2} give beta1/sqrt(beta2) = {mu:.4f} >= 1, "
            "so skipped updates do not decay; use beta1 < sqrt(beta2)"
        )
    return max(1, math.ceil((math.log(tol) + math.log1p(-mu)) / math.log(mu)))


class AdamWTables:
    """Schedule tables for AdamW (see module note); arrays are fp64 of length T+1."""

    def __init__(self, lr: Schedule, beta1: float, beta2: float, eps: float, weight_decay: float):
        self.lrs = LrTable(lr)
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.window = adamw_window(beta1, beta2)
        self._build()
        self._device: dict[tuple, dict[str, torch.Tensor]] = {}

    def _build(self) -> None:
        lr = self.lrs.lr
        s = np.arange(len(lr), dtype=np.float64)
        shrink = lr * self.weight_decay  # (T+1,) η_s λ
        if np.any(shrink >= 1.0):
            bad = int(np.argmax(shrink >= 1.0))
            raise ValueError(f"AdamW: lr·weight_decay = {shrink[bad]} >= 1 at step {bad}")
        self.L = np.cumsum(np.log1p(-shrink))  # L[0] = log1p(0) = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            self.a = np.where(s > 0, lr / -np.expm1(s * math.log(self.beta1)) if self.beta1 > 0
                              else lr, 0.0)
        self.c = np.sqrt(-np.expm1(s * math.log(self.beta2)))
        self.a[0] = 0.0

    def ensure(self, T: int) -> None:
        if self.lrs.ensure(T):
            self._build()

    def device_arrays(self, device: torch.device) -> dict[str, torch.Tensor]:
        """fp64 copies of (lr, L, a, c) on `device`, refreshed when the table grew (H2D copy)."""
        key = (str(device), self.lrs.version)
        if key not in self._device:
            arrays = {"lr": self.lrs.lr, "L": self.L, "a": self.a, "c": self.c}
            self._device = {key: {n: torch.from_numpy(x).to(device) for n, x in arrays.items()}}
        return self._device[key]


class SGDTables:
    """Zero-gradient SGD maps and their products over aligned blocks of 2^k steps.

    One zero-gradient step s on the pair (θ, buf) (torch semantics, κ = (1 − dampening)·λ):
        s = 1 (buffer created): buf ← λθ,                θ ← (1 − η_1 λ)θ
        s > 1:                  buf ← μ buf + κθ,        θ ← (1 − η_s κ)θ − η_s μ buf
        momentum = 0:           θ ← (1 − η_s λ)θ,        buf untouched
    `blocks[off[k] + i]` = A_{(i+1)2^k} ⋯ A_{i 2^k + 1}, stored row-major (m00, m01, m10, m11).
    """

    def __init__(self, lr: Schedule, momentum: float, dampening: float, weight_decay: float):
        self.lrs = LrTable(lr)
        self.momentum, self.dampening, self.weight_decay = momentum, dampening, weight_decay
        self._build()
        self._device: dict[tuple, dict[str, torch.Tensor]] = {}

    def step_maps(self, lr: np.ndarray, s: np.ndarray) -> np.ndarray:
        """(n, 4) maps A_s for steps `s` with learning rates `lr`."""
        mu, lam = self.momentum, self.weight_decay
        out = np.zeros((len(s), 4))
        if mu == 0.0:
            out[:, 0] = 1.0 - lr * lam
            out[:, 3] = 1.0
            return out
        kappa = np.where(s == 1, lam, (1.0 - self.dampening) * lam)
        out[:, 0] = 1.0 - lr * kappa
        out[:, 1] = np.where(s == 1, 0.0, -lr * mu)
        out[:, 2] = kappa
        out[:, 3] = np.where(s == 1, 0.0, mu)
        return out

    def _build(self) -> None:
        T = self.lrs.num_steps
        level = self.step_maps(self.lrs.lr[1:], np.arange(1, T + 1))  # (T, 4) level 0
        levels, offsets = [level], [0]
        while len(level) >= 2:
            n = len(level) // 2
            lo, hi = level[0 : 2 * n : 2], level[1 : 2 * n : 2]  # later step on the left: hi @ lo
            level = np.stack([hi[:, 0] * lo[:, 0] + hi[:, 1] * lo[:, 2],
                              hi[:, 0] * lo[:, 1] + hi[:, 1] * lo[:, 3],
                              hi[:, 2] * lo[:, 0] + hi[:, 3] * lo[:, 2],
                              hi[:, 2] * lo[:, 1] + hi[:, 3] * lo[:, 3]], axis=1)
            offsets.append(offsets[-1] + len(levels[-1]))
            levels.append(level)
        self.blocks = np.ascontiguousarray(np.concatenate(levels))  # (≈2T, 4)
        self.offsets = np.asarray(offsets, dtype=np.int64)  # (levels,)

    def ensure(self, T: int) -> None:
        if self.lrs.ensure(T):
            self._build()

    def maps(self, tau: np.ndarray, e: int) -> np.ndarray:
        """(M, 4) map of steps tau+1 … e for each row (identity where tau >= e). O(M log gap)."""
        M = np.tile(np.array([1.0, 0.0, 0.0, 1.0]), (len(tau), 1))
        p = np.asarray(tau, dtype=np.int64).copy()
        while True:
            live = p < e
            if not live.any():
                return M
            k = block_level(p, e, len(self.offsets))
            B = self.blocks[self.offsets[k] + (p >> k)]  # (M, 4), rows not live get masked below
            new = np.stack([B[:, 0] * M[:, 0] + B[:, 1] * M[:, 2],
                            B[:, 0] * M[:, 1] + B[:, 1] * M[:, 3],
                            B[:, 2] * M[:, 0] + B[:, 3] * M[:, 2],
                            B[:, 2] * M[:, 1] + B[:, 3] * M[:, 3]], axis=1)
            M = np.where(live[:, None], new, M)
            p = np.where(live, p + (1 << k), p)

    def device_arrays(self, device: torch.device) -> dict[str, torch.Tensor]:
        """fp64 copies of (lr, blocks, offsets) on `device`, refreshed when the table grew."""
        key = (str(device), self.lrs.version)
        if key not in self._device:
            self._device = {key: {"lr": torch.from_numpy(self.lrs.lr).to(device),
                                  "blocks": torch.from_numpy(self.blocks).to(device),
                                  "offsets": torch.from_numpy(self.offsets).to(device)}}
        return self._device[key]


def block_level(p: np.ndarray, e: int, num_levels: int) -> np.ndarray:
    """Largest k < num_levels with p % 2^k == 0 and p + 2^k <= e (0 where none): the next block."""
    k = np.zeros_like(p)
    for kk in range(1, num_levels):
        ok = ((p & ((1 << kk) - 1)) == 0) & (p + (1 << kk) <= e)
        k += ok  # both conditions are monotone in kk, so the count is the largest k
    return k
