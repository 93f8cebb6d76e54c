"""Public classes of the lazy optimizer.

PLACEHOLDER IMPLEMENTATION: a naive per-step loop (cost grows with the gap). It defines the
semantics and the API; the closed-form catch-up replaces the loop behind the same methods.

Conventions
-----------
* Steps are 1-based: step t uses learning rate `lr_at(t)`; an array schedule `lrs` gives
  `lr_at(t) = lrs[t - 1]`.
* `step[n]` (int64) is the last optimizer step applied to row n (0: never stepped).
* `catch_up(..., t)` brings rows to step t-1 (zero-gradient steps), `step(..., grad, t)` catches
  up and applies the real step t, `materialize(..., T)` brings rows to step T.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

Schedule = Sequence[float] | np.ndarray | Callable[[int], float]


def _lr_fn(lr: Schedule | float) -> Callable[[int], float]:
    if callable(lr):
        return lr
    if np.isscalar(lr):
        return lambda t: float(lr)
    arr = np.asarray(lr, dtype=np.float64)
    return lambda t: float(arr[t - 1])


class LazyAdamW:
    """AdamW (PyTorch semantics, amsgrad off) applied lazily to head rows."""

    def __init__(
        self,
        lr: Schedule | float,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        mode: str = "exact",
        backend: str = "auto",
    ) -> None:
        self.lr_at = _lr_fn(lr)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.mode = mode
        self.backend = backend

    def _one(self, w, m, v, g, s: int) -> None:
        lr = self.lr_at(s)
        w.mul_(1 - lr * self.weight_decay)
        m.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        bc1 = 1 - self.beta1**s
        bc2 = 1 - self.beta2**s
        denom = (v.sqrt() / bc2**0.5).add_(self.eps)
        w.addcdiv_(m, denom, value=-lr / bc1)

    @torch.no_grad()
    def catch_up(self, weight, exp_avg, exp_avg_sq, step, t: int) -> None:
        if step.numel() == 0:
            return
        lo = int(step.min()) + 1
        for s in range(lo, t):
            mask = step < s
            if not mask.any():
                continue
            w, m, v = weight[mask], exp_avg[mask], exp_avg_sq[mask]
            self._one(w, m, v, torch.zeros_like(w), s)
            weight[mask], exp_avg[mask], exp_avg_sq[mask] = w, m, v
            step[mask] = s

    @torch.no_grad()
    def step(self, weight, exp_avg, exp_avg_sq, step, grad, t: int) -> None:
        self.catch_up(weight, exp_avg, exp_avg_sq, step, t)
        self._one(weight, exp_avg, exp_avg_sq, grad.to(weight.dtype), t)
        step.fill_(t)

    def materialize(self, weight, exp_avg, exp_avg_sq, step, T: int) -> None:
        self.catch_up(weight, exp_avg, exp_avg_sq, step, T + 1)


class LazySGD:
    """SGD with momentum (PyTorch semantics, nesterov off) applied lazily; exp_avg is the buffer."""

    def __init__(self, lr: Schedule | float, *, momentum: float = 0.9, dampening: float = 0.0,
                 weight_decay: float = 0.0, mode: str = "exact", backend: str = "auto") -> None:
        self.lr_at = _lr_fn(lr)
        self.momentum, self.dampening, self.weight_decay = momentum, dampening, weight_decay
        self.mode, self.backend = mode, backend

    def _one(self, w, buf, g, s: int) -> None:
        g = g + self.weight_decay * w
        if s == 1:
            buf.copy_(g)
        else:
            buf.mul_(self.momentum).add_(g, alpha=1 - self.dampening)
        w.add_(buf, alpha=-self.lr_at(s))

    @torch.no_grad()
    def catch_up(self, weight, exp_avg, exp_avg_sq, step, t: int) -> None:
        if step.numel() == 0:
            return
        for s in range(int(step.min()) + 1, t):
            mask = step < s
            w, b = weight[mask], exp_avg[mask]
            self._one(w, b, torch.zeros_like(w), s)
            weight[mask], exp_avg[mask] = w, b
            step[mask] = s

    @torch.no_grad()
    def step(self, weight, exp_avg, exp_avg_sq, step, grad, t: int) -> None:
        self.catch_up(weight, exp_avg, exp_avg_sq, step, t)
        self._one(weight, exp_avg, grad.to(weight.dtype), t)
        step.fill_(t)

    def materialize(self, weight, exp_avg, exp_avg_sq, step, T: int) -> None:
        self.catch_up(weight, exp_avg, exp_avg_sq, step, T + 1)
