"""Triton (CUDA) implementation of the exact lazy AdamW / SGD; runs on CPU under TRITON_INTERPRET=1.

One program per row, one launch per call, no host sync (stamps are read on the device):
* AdamW: the program samples f at the K Chebyshev nodes over the row's window ((K, BJ) tiles,
  K·min(n, W) divisions in fp64), transforms to coefficients (a (K, K) tile), keeps them in a
  per-row scratch line, then sweeps its d elements in blocks: one sqrt + one division + `nterm`
  Clenshaw terms per element, then the real step. Rows whose series does not converge take the
  direct windowed sum (see `chebyshev.py`). Per-row scalar work is redone by each program: no cache.
* SGD: the program multiplies the segment-tree blocks of its gap (≤ 2·levels scalar 2×2 products),
  then applies the 2×2 map and the real step to its d elements.
Element arithmetic is in the row dtype (fp32 or fp64); row scalars are fp64.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from diet_engine.kernels.lazy_optim import chebyshev
from diet_engine.kernels.lazy_optim.schedule_tables import AdamWTables, SGDTables

_BLOCK = 1024  # elements per block of a row sweep
_BJ = 64  # window steps per tile when sampling f


@triton.jit
def _adamw_lazy_kernel(
    w_ptr, m_ptr, v_ptr, g_ptr,  # (M, d) rows and gradient, contiguous
    tau_ptr,  # (M,) int64 stamps
    L_ptr, lr_ptr, a_ptr, c_ptr,  # (T+1,) fp64 schedule tables
    nodes_ptr, dct_ptr,  # (K,), (K, K) fp64 Chebyshev nodes and transform
    coef_ptr,  # (M, K) fp64 scratch: this row's coefficients
    hp_ptr,  # (7,) fp64 [λ, β1, β2, log β1, log β2, ε, tol] (scalar args would be fp32)
    d, e, t, W,  # row length, target step, real step, window
    DO_STEP: tl.constexpr, K: tl.constexpr, BJ: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    tau = tl.load(tau_ptr + r)
    n = e - tau
    J = tl.minimum(n, W)
    Le = tl.load(L_ptr + e)
    dtype = w_ptr.dtype.element_ty
    wd, b1, b2 = tl.load(hp_ptr), tl.load(hp_ptr + 1), tl.load(hp_ptr + 2)
    log_b1, log_b2 = tl.load(hp_ptr + 3), tl.load(hp_ptr + 4)
    eps, tol = tl.load(hp_ptr + 5), tl.load(hp_ptr + 6)
    eps_d, b1_d, b2_d = eps.to(dtype), b1.to(dtype), b2.to(dtype)
    # ---- f at the Chebyshev nodes over the window, then the coefficients (fp64)
    kk = tl.arange(0, K)
    nodes = tl.load(nodes_ptr + kk)  # (K,)
    fv = tl.zeros([K], dtype=tl.float64)
    for j0 in range(0, J, BJ):
        j = j0 + 1 + tl.arange(0, BJ)  # (BJ,)
        ok = j <= J
        s = tl.where(ok, tau + j, 1)
        jf = j.to(tl.float64)
        cs = tl.load(c_ptr + s)
        Cj = tl.exp(Le - tl.load(L_ptr + s)) * tl.load(a_ptr + s) * cs * tl.exp(jf * log_b1)
        Cj = tl.where(ok, Cj, 0.0)
        bj = tl.exp(0.5 * jf * log_b2)
        den = cs[None, :] + (bj - cs)[None, :] * nodes[:, None]  # (K, BJ)
        fv += tl.sum(Cj[None, :] / den, axis=1)
    dct = tl.load(dct_ptr + kk[:, None] * K + kk[None, :])  # (K, K)
    coefs = tl.sum(dct * fv[None, :], axis=1)  # (K,)
    fmax = tl.max(fv, axis=0)
    last = tl.max(tl.where(tl.abs(coefs) > tol * fmax, kk, 0), axis=0)  # chebyshev.series_length
    nterm = tl.where(last + 1 > K - 2, 0, last + 1)
    tl.store(coef_ptr + r * K + kk, coefs)
    tl.debug_barrier()  # the coefficients are read back as scalars below
    # ---- row scalars
    live = n > 0
    P = tl.where(live, tl.exp(Le - tl.load(L_ptr + tl.minimum(tau, e))), 1.0).to(dtype)
    nf = n.to(tl.float64)
    gm = tl.where(live, tl.exp(nf * log_b1), 1.0).to(dtype)
    gv = tl.where(live, tl.exp(nf * log_b2), 1.0).to(dtype)
    series = live & (nterm > 0)
    direct = live & (nterm == 0)
    # ---- sweep the row
    row = r * d
    for i0 in range(0, d, BLOCK):
        cols = i0 + tl.arange(0, BLOCK)
        mask = cols < d
        th = tl.load(w_ptr + row + cols, mask=mask, other=0.0)
        mm = tl.load(m_ptr + row + cols, mask=mask, other=0.0)
        vv = tl.load(v_ptr + row + cols, mask=mask, other=0.0)
        x = tl.sqrt(vv)
        S = tl.zeros([BLOCK], dtype=dtype)
        if series:
            inv = 1.0 / (x + eps_d)
            z = 2.0 * x * inv - 1.0
            bk1 = tl.zeros([BLOCK], dtype=dtype)
            bk2 = tl.zeros([BLOCK], dtype=dtype)
            for q in range(1, nterm):  # Clenshaw, k = nterm − q … 1
                ck = tl.load(coef_ptr + r * K + nterm - q).to(dtype)
                bk = ck + 2.0 * z * bk1 - bk2
                bk2 = bk1
                bk1 = bk
            c0 = tl.load(coef_ptr + r * K).to(dtype)
            S = ((c0 + z * bk1 - bk2) * inv).to(dtype)
        if direct:
            for jj in range(1, J + 1):
                sj = tau + jj
                jf1 = (sj - tau).to(tl.float64)
                csj = tl.load(c_ptr + sj)
                Cs = tl.exp(Le - tl.load(L_ptr + sj)) * tl.load(a_ptr + sj) * csj
                Cs = Cs * tl.exp(jf1 * log_b1)
                bjs = tl.exp(0.5 * jf1 * log_b2)
                S += (Cs / (bjs * x.to(tl.float64) + eps * csj)).to(dtype)
        th = P * th - mm * S
        mm = mm * gm
        vv = vv * gv
        if DO_STEP:
            g = tl.load(g_ptr + row + cols, mask=mask, other=0.0)
            lr_t = tl.load(lr_ptr + t)
            th = th * (1.0 - lr_t * wd).to(dtype)
            mm = b1_d * mm + (1.0 - b1).to(dtype) * g
            vv = b2_d * vv + (1.0 - b2).to(dtype) * g * g
            step_size = tl.load(a_ptr + t).to(dtype)
            inv_c = (1.0 / tl.load(c_ptr + t)).to(dtype)
            th = th - step_size * mm / (tl.sqrt(vv) * inv_c + eps_d)
        tl.store(w_ptr + row + cols, th.to(dtype), mask=mask)
        tl.store(m_ptr + row + cols, mm.to(dtype), mask=mask)
        tl.store(v_ptr + row + cols, vv.to(dtype), mask=mask)


def adamw_lazy(weight, exp_avg, exp_avg_sq, grad, step, e: int, t: int, tables: AdamWTables):
    """Launcher: rows to step e, then (grad given) the real step t. One launch, no host sync."""
    M, d = weight.shape
    dev = weight.device
    tab = tables.device_arrays(dev)
    consts = _chebyshev_on(dev)
    scratch = torch.empty(M, chebyshev.K, dtype=torch.float64, device=dev)
    b1, b2 = tables.beta1, tables.beta2
    hp = _hparams(dev, tables.weight_decay, b1, b2, math.log(b1) if b1 > 0 else -math.inf,
                  math.log(b2), tables.eps, chebyshev.TOL)
    _adamw_lazy_kernel[(M,)](
        weight, exp_avg, exp_avg_sq, grad if grad is not None else weight, step,
        tab["L"], tab["lr"], tab["a"], tab["c"], consts[0], consts[1], scratch, hp,
        d, e, t, tables.window,
        DO_STEP=grad is not None, K=chebyshev.K, BJ=_BJ, BLOCK=sweep_block(d),
    )


@triton.jit
def _sgd_lazy_kernel(
    w_ptr, b_ptr, g_ptr,  # (M, d) rows, momentum buffers, gradient, contiguous
    tau_ptr,  # (M,) int64 stamps
    lr_ptr, blocks_ptr, off_ptr,  # schedule: (T+1,) lr, (≈2T, 4) block maps, (levels,) offsets
    hp_ptr,  # (3,) fp64 [momentum, dampening, λ]
    d, e, t, num_levels,
    DO_STEP: tl.constexpr, HAS_BUF: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    p = tl.load(tau_ptr + r)
    dtype = w_ptr.dtype.element_ty
    momentum = tl.load(hp_ptr).to(dtype)
    damp1 = (1.0 - tl.load(hp_ptr + 1)).to(dtype)
    wd = tl.load(hp_ptr + 2).to(dtype)
    one = tl.full((), 1, tl.int64)
    m00 = tl.full((), 1.0, tl.float64)
    m01 = tl.full((), 0.0, tl.float64)
    m10 = tl.full((), 0.0, tl.float64)
    m11 = tl.full((), 1.0, tl.float64)
    for _ in range(0, 2 * num_levels):  # ≤ 2·levels aligned blocks cover (τ, e]
        live = p < e
        k = tl.full((), 0, tl.int64)
        for q in range(1, num_levels):  # schedule_tables.block_level
            pw = one << q
            k += (((p & (pw - 1)) == 0) & (p + pw <= e)).to(tl.int64)
        base = (tl.load(off_ptr + k) + (p >> k)) * 4
        B0 = tl.load(blocks_ptr + base, mask=live, other=1.0)
        B1 = tl.load(blocks_ptr + base + 1, mask=live, other=0.0)
        B2 = tl.load(blocks_ptr + base + 2, mask=live, other=0.0)
        B3 = tl.load(blocks_ptr + base + 3, mask=live, other=1.0)
        n00 = B0 * m00 + B1 * m10
        n01 = B0 * m01 + B1 * m11
        n10 = B2 * m00 + B3 * m10
        n11 = B2 * m01 + B3 * m11
        m00, m01, m10, m11 = n00, n01, n10, n11
        p = tl.where(live, p + (one << k), p)
    a00, a01, a10, a11 = m00.to(dtype), m01.to(dtype), m10.to(dtype), m11.to(dtype)
    lr_t = tl.load(lr_ptr + t).to(dtype)
    row = r * d
    for i0 in range(0, d, BLOCK):
        cols = i0 + tl.arange(0, BLOCK)
        mask = cols < d
        th = tl.load(w_ptr + row + cols, mask=mask, other=0.0)
        if HAS_BUF:
            b = tl.load(b_ptr + row + cols, mask=mask, other=0.0)
            th, b = a00 * th + a01 * b, a10 * th + a11 * b
        else:
            th = a00 * th
        if DO_STEP:
            d_p = tl.load(g_ptr + row + cols, mask=mask, other=0.0) + wd * th
            if HAS_BUF:
                if t == 1:
                    b = d_p
                else:
                    b = momentum * b + damp1 * d_p
                d_p = b
            th = th - lr_t * d_p
        tl.store(w_ptr + row + cols, th.to(dtype), mask=mask)
        if HAS_BUF:
            tl.store(b_ptr + row + cols, b.to(dtype), mask=mask)


def sgd_lazy(weight, buf, grad, step, e: int, t: int, tables: SGDTables):
    """Launcher: rows (and buffers) to step e, then (grad given) the real step t. One launch."""
    M, d = weight.shape
    tab = tables.device_arrays(weight.device)
    _sgd_lazy_kernel[(M,)](
        weight, buf if buf is not None else weight, grad if grad is not None else weight, step,
        tab["lr"], tab["blocks"], tab["offsets"],
        _hparams(weight.device, tables.momentum, tables.dampening, tables.weight_decay),
        d, e, t, len(tables.offsets),
        DO_STEP=grad is not None, HAS_BUF=buf is not None, BLOCK=sweep_block(d),
    )


_CONSTS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _chebyshev_on(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = str(dev)
    if key not in _CONSTS:
        _CONSTS[key] = (torch.from_numpy(chebyshev.NODES).to(dev),
                        torch.from_numpy(chebyshev.DCT).contiguous().to(dev))
    return _CONSTS[key]


_HPARAMS: dict[tuple, torch.Tensor] = {}


def _hparams(dev: torch.device, *values: float) -> torch.Tensor:
    """fp64 hyper-parameters as a small device tensor, cached (one H2D copy per new set)."""
    key = (str(dev), values)
    if key not in _HPARAMS:
        _HPARAMS[key] = torch.tensor(values, dtype=torch.float64).to(dev)
    return _HPARAMS[key]


def sweep_block(d: int) -> int:
    """Elements per block of a row sweep for rows of length d (the launchers' and the compile test's)."""
    return min(_BLOCK, _pow2(d))


def _pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())
