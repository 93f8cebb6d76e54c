"""Plain PyTorch reference of the exact lazy optimizer: the readable definition.

AdamW catch-up of a row from its stamp τ to step e (steps τ+1 … e with g = 0), per element,
with x = sqrt(v_τ), j = s − τ and gap n = e − τ:

    θ_e = P(τ+1, e)·θ_τ − m_τ · Σ_{j=1}^{min(n, W)} C_j / (b_j·x + ε·c_s)
    m_e = β1^n m_τ,   v_e = β2^n v_τ

    P(a, b) = Π_{r=a}^{b} (1 − η_r λ)           (decoupled weight decay, from the prefix logs)
    C_j     = P(s+1, e) · η_s/(1 − β1^s) · c_s · β1^j,   c_s = sqrt(1 − β2^s),   b_j = β2^{j/2}

which is torch's step  θ ← θ(1−η_sλ) − η_s/(1−β1^s) · m_s / (sqrt(v_s)/c_s + ε)  with
m_s = β1^j m_τ, v_s = β2^j v_τ, summed in closed form; terms past the window W are below fp64
resolution (see `schedule_tables.adamw_window`). ε is kept exactly. SGD: the 2×2 map of the gap
from `SGDTables` applied to (θ, buf).

Cost: O(min(n, W)) per element, computed in fp64 in chunks of rows; the fast backends evaluate the
same sum as a short Chebyshev series (see `chebyshev.py`).
"""

from __future__ import annotations

import torch

from diet_engine.kernels.lazy_optim.schedule_tables import AdamWTables, SGDTables

_CHUNK_ELEMS = 1 << 22  # rows per chunk chosen so a chunk's (rows, d, W) sum stays ≈ 32 MB fp64


@torch.no_grad()
def adamw_catch_up_reference(weight, exp_avg, exp_avg_sq, step, e: int, tables: AdamWTables):
    """Rows (M, d) from their stamps `step` (M,) to step e, in place; step[:] = max(step, e)."""
    dev = weight.device
    tab = tables.device_arrays(dev)
    L, a, c = tab["L"], tab["a"], tab["c"]
    b1, b2, eps, W = tables.beta1, tables.beta2, tables.eps, tables.window
    tau = step.to(torch.int64)
    n = (e - tau).clamp(min=0)  # (M,) gaps
    if not bool((n > 0).any()):  # host sync; nothing to do (e.g. step() right after catch_up())
        return
    j = torch.arange(1, W + 1, device=dev, dtype=torch.int64)  # (W,)
    s = (tau[:, None] + j).clamp(1, max(e, 1))  # (M, W) skipped steps (clamped for indexing)
    in_window = j <= n[:, None]  # (M, W)
    jf = j.double()
    C = torch.exp(L[e] - L[s]) * a[s] * c[s] * torch.pow(b1, jf)  # (M, W)
    C = torch.where(in_window, C, 0.0)
    bj = torch.pow(b2, jf / 2)  # (W,)
    eps_c = eps * c[s]  # (M, W)

    d = weight.shape[1]
    rows = max(1, _CHUNK_ELEMS // max(1, d * W))
    for lo in range(0, weight.shape[0], rows):
        sl = slice(lo, lo + rows)
        th, m, v = weight[sl].double(), exp_avg[sl].double(), exp_avg_sq[sl].double()
        x = v.sqrt()  # (r, d)
        S = (C[sl, None, :] / (bj * x[:, :, None] + eps_c[sl, None, :])).sum(-1)  # (r, d)
        decay = torch.exp(L[e] - L[tau[sl].clamp(max=e)])[:, None]  # (r, 1) P(τ+1, e)
        weight[sl] = (decay * th - m * S).to(weight.dtype)
        exp_avg[sl] = (m * torch.pow(b1, n[sl].double())[:, None]).to(exp_avg.dtype)
        exp_avg_sq[sl] = (v * torch.pow(b2, n[sl].double())[:, None]).to(exp_avg_sq.dtype)
    step.copy_(torch.maximum(step, torch.full_like(step, e)))


@torch.no_grad()
def adamw_step_reference(weight, exp_avg, exp_avg_sq, grad, t: int, tables: AdamWTables):
    """The real AdamW step t on rows already at t−1 (torch.optim.AdamW semantics), in place."""
    lr, a, c = float(tables.lrs.lr[t]), float(tables.a[t]), float(tables.c[t])
    b1, b2 = tables.beta1, tables.beta2
    th, m, v, g = weight.double(), exp_avg.double(), exp_avg_sq.double(), grad.double()
    th = th * (1 - lr * tables.weight_decay)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    th = th - a * m / (v.sqrt() / c + tables.eps)
    weight.copy_(th)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


@torch.no_grad()
def sgd_catch_up_reference(weight, buf, step, e: int, tables: SGDTables):
    """Rows (M, d) and momentum buffers from their stamps to step e, in place (host sync)."""
    maps = tables.maps(step.cpu().numpy(), e)  # (M, 4) product of the gap's 2×2 maps
    A = torch.from_numpy(maps).to(weight.device)[:, :, None]  # (M, 4, 1)
    th = weight.double()
    b = buf.double() if buf is not None else torch.zeros_like(th)
    new_th = A[:, 0] * th + A[:, 1] * b  # (M, d)
    if tables.momentum != 0.0:
        buf.copy_(A[:, 2] * th + A[:, 3] * b)
    weight.copy_(new_th)
    step.copy_(torch.maximum(step, torch.full_like(step, e)))


@torch.no_grad()
def sgd_step_reference(weight, buf, grad, t: int, tables: SGDTables):
    """The real SGD step t on rows at t−1 (torch.optim.SGD, nesterov off), in place."""
    lr, mu, lam = float(tables.lrs.lr[t]), tables.momentum, tables.weight_decay
    th = weight.double()
    d_p = grad.double() + lam * th
    if mu != 0.0:
        d_p = d_p if t == 1 else mu * buf.double() + (1 - tables.dampening) * d_p
        buf.copy_(d_p)
    weight.copy_(th - lr * d_p)


def gaps_ok(step: torch.Tensor, t: int, *, strict: bool) -> None:
    """Stamps must lie behind t (strict: < t, for a real step t; else ≤ t). Host sync on CUDA."""
    if step.numel() == 0:
        return
    hi = int(step.max())
    lo = int(step.min())
    if lo < 0 or hi > t or (strict and hi >= t):
        raise ValueError(
            f"lazy optimizer: row step stamps must be in [0, {t - 1 if strict else t}] for step "
            f"{t}, got [{lo}, {hi}] (a row stepped twice, or stamps from another run?)"
        )


__all__ = [
    "adamw_catch_up_reference",
    "adamw_step_reference",
    "sgd_catch_up_reference",
    "sgd_step_reference",
    "gaps_ok",
]
