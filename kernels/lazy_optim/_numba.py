"""numba (CPU, parallel) implementation of the exact lazy AdamW / SGD.

One call = one fused pass over the rows: catch-up to e (closed form) and, if asked, the real step t.
AdamW per call: unique stamps (numpy, O(M log M)); per unique τ the Chebyshev coefficients of f
(`chebyshev.py`, K·min(n, W) divisions, cached per τ when n ≥ W); per element one sqrt + one
division + `nterm` Clenshaw terms, then the real step, in the row dtype (fp32 rows compute in fp32
as torch does; row scalars are fp64). SGD: per row the 2×2 gap map from the segment tree
(O(log gap)), per element 4 multiply-adds, in fp64.

Parallelism: the kernels are serial `nogil` functions over a range of rows (or stamps), split over
a small thread pool (`_parallel`). numba's own `parallel=True` was measured 10× slower inside a
training loop here: its OpenMP workers spin between regions and starve PyTorch's threads on a
2-core machine. Calls under `_PARALLEL_MIN` elements run on the calling thread.
Compiled on first use and cached on disk (`cache=True`).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit

from diet_engine.kernels.lazy_optim import chebyshev

# ---------------------------------------------------------------------------------------- AdamW


_NODES_S, _DCT_S = chebyshev.NODES_SMALL, chebyshev.DCT_SMALL  # compile-time constants


@njit(cache=True, error_model="numpy")
def _cheb_coefs(tau, e_ref, J, L, lr, a, c, wd, b1, b2, nodes, dct, tol, window_c, out):
    """Chebyshev coefficients of f for skipped steps τ+1 … τ+J, decay referenced to e_ref.

    out (K,) receives the coefficients; window_c (≥ J,) the term weights C_j. Returns nterm
    (0: series did not converge, use the direct sum). Tries K_SMALL nodes, then K.
    Cost: K_SMALL·J (or (K_SMALL + K)·J) divisions.
    """
    p1 = 1.0
    for j in range(1, J + 1):  # forward: β1^j
        p1 *= b1
        window_c[j - 1] = p1 * a[tau + j] * c[tau + j]
    P = math.exp(L[e_ref] - L[tau + J])  # P(τ+J+1, e_ref)
    for j in range(J, 0, -1):  # backward: running product of the decoupled decay
        window_c[j - 1] *= P
        P *= 1.0 - lr[tau + j] * wd
    out[:] = 0.0
    nterm = _fit(tau, J, c, b2, window_c, _NODES_S, _DCT_S, tol, out)
    if nterm > 0:
        return nterm
    return _fit(tau, J, c, b2, window_c, nodes, dct, tol, out)


@njit(cache=True, error_model="numpy")
def _fit(tau, J, c, b2, window_c, nodes, dct, tol, out):
    """f at the nodes (K·J divisions), its coefficients into out[:K], and their length."""
    K = nodes.shape[0]
    sb2 = math.sqrt(b2)
    fv = np.zeros(K)
    bj = 1.0
    for j in range(1, J + 1):
        bj *= sb2
        cs = c[tau + j]
        slope = bj - cs
        Cj = window_c[j - 1]
        for i in range(K):
            fv[i] += Cj / (cs + slope * nodes[i])
    fmax = 0.0
    for i in range(K):
        fmax = max(fmax, fv[i])
    for k in range(K):
        acc = 0.0
        for i in range(K):
            acc += dct[k, i] * fv[i]
        out[k] = acc
    nterm = 1
    for k in range(K):  # same rule as chebyshev.series_length
        if abs(out[k]) > tol * fmax:
            nterm = k + 1
    return 0 if nterm > K - 2 else nterm


@njit(cache=True, nogil=True, error_model="numpy")
def _adamw_coefs(u0, u1, uniq, e, W, L, lr, a, c, wd, b1, b2, nodes, dct, tol, ckeys, cvals,
                 cnterm, coefs, nterm, decay, fresh):
    """Stamps uniq[u0:u1]: coefs (U, K), nterm (U,), decay P(τ+1, e) (U,) and fresh (U,) (computed
    here, to be stored in the τ-cache by `_cache_store`). Reads the cache only."""
    C = ckeys.shape[0]
    buf = np.empty(W)
    for u in range(u0, u1):
        tau = uniq[u]
        n = e - tau
        if n <= 0:
            nterm[u] = 1
            decay[u] = 1.0
            continue
        decay[u] = math.exp(L[e] - L[tau])
        if n >= W:  # coefficients depend on τ only, times P(τ+W+1, e)
            slot = tau % C
            if ckeys[slot] == tau:
                coefs[u] = cvals[slot]
                nterm[u] = cnterm[slot]
            else:
                nterm[u] = _cheb_coefs(tau, tau + W, W, L, lr, a, c, wd, b1, b2, nodes, dct,
                                       tol, buf, coefs[u])
                fresh[u] = True
            coefs[u] *= math.exp(L[e] - L[tau + W])
        else:
            nterm[u] = _cheb_coefs(tau, e, n, L, lr, a, c, wd, b1, b2, nodes, dct, tol, buf,
                                   coefs[u])


@njit(cache=True, error_model="numpy")
def _cache_store(uniq, e, W, L, coefs, nterm, fresh, ckeys, cvals, cnterm):
    """Store fresh coefficients per τ (undoing the P(τ+W+1, e) factor). Serial: two stamps of one
    call may share a slot."""
    C = ckeys.shape[0]
    for u in range(uniq.shape[0]):
        if fresh[u]:
            slot = uniq[u] % C
            ckeys[slot] = uniq[u]
            cvals[slot] = coefs[u] / math.exp(L[e] - L[uniq[u] + W])
            cnterm[slot] = nterm[u]


_BLK = 256  # elements per block of the per-row loops (temporaries stay in L1)

# slots of the per-row scalar vector `hp` (row dtype: fp32 rows compute in fp32, as torch does)
(_P, _GM, _GV, _SHRINK, _STEP, _INVC, _B1, _1B1, _B2, _1B2,
 _EPS, _ZERO, _HALF, _ONE, _TWO, _FOUR) = range(16)


@njit(cache=True, error_model="numpy")
def _adamw_row(w, m, v, g, n, nt, cf, Cw, bw, ew, hp, do_step, tmp):
    """One row (d,): catch-up over n skipped steps (series of nt terms with coefficients cf, or
    the direct sum over the window weights Cw/bw/ew when nt == 0), then optionally the real step.
    Arithmetic in the row dtype (hp, cf carry its scalars); loops are blocked and branch-free
    inside so LLVM vectorizes them. tmp (5, _BLK) is scratch in the row dtype."""
    d = w.shape[0]
    one, half = hp[_ONE], hp[_HALF]
    inv, z2, bk1, bk2, S = tmp[0], tmp[1], tmp[2], tmp[3], tmp[4]
    eps, two, four = hp[_EPS], hp[_TWO], hp[_FOUR]
    for i0 in range(0, d, _BLK):
        nb = min(_BLK, d - i0)
        if n > 0 and nt > 0:
            for i in range(nb):
                x = np.sqrt(v[i0 + i])
                q = one / (x + eps)
                inv[i] = q
                z2[i] = four * x * q - two  # 2z, z = 2w − 1, w = x / (x + ε)
            if nt == 1:
                for i in range(nb):
                    S[i] = cf[0] * inv[i]
            else:  # Clenshaw, vectorized across the block: b_k = a_k + 2z b_{k+1} − b_{k+2}
                top, zero = cf[nt - 1], hp[_ZERO]
                for i in range(nb):
                    bk1[i] = top  # b_{nt-1}
                    bk2[i] = zero  # b_{nt}
                for k in range(nt - 2, 0, -1):
                    ck = cf[k]
                    for i in range(nb):
                        bk = ck + z2[i] * bk1[i] - bk2[i]
                        bk2[i] = bk1[i]
                        bk1[i] = bk
                c0 = cf[0]  # f = a_0 + z b_1 − b_2
                for i in range(nb):
                    S[i] = (c0 + half * z2[i] * bk1[i] - bk2[i]) * inv[i]
        elif n > 0:
            for i in range(nb):  # rare: direct windowed sum in fp64
                x = math.sqrt(np.float64(v[i0 + i]))
                acc = 0.0
                for j in range(Cw.shape[0]):
                    acc += Cw[j] / (bw[j] * x + ew[j])
                S[i] = acc
        if n > 0:
            P, gm, gv = hp[_P], hp[_GM], hp[_GV]
            for i in range(nb):
                w[i0 + i] = P * w[i0 + i] - m[i0 + i] * S[i]
                m[i0 + i] = m[i0 + i] * gm
                v[i0 + i] = v[i0 + i] * gv
        if do_step:  # its own loop: few arrays, so LLVM's alias checks pass and it vectorizes
            _adamw_step_block(w[i0 : i0 + nb], m[i0 : i0 + nb], v[i0 : i0 + nb],
                              g[i0 : i0 + nb], hp)


@njit(cache=True, error_model="numpy")
def _adamw_step_block(w, m, v, g, hp):
    """torch.optim.AdamW's step on a block: θ(1 − ηλ) − η/(1−β1^t) · m / (sqrt(v)/c_t + ε)."""
    shrink, step_size, inv_c = hp[_SHRINK], hp[_STEP], hp[_INVC]
    b1, c1, b2, c2, eps = hp[_B1], hp[_1B1], hp[_B2], hp[_1B2], hp[_EPS]
    for i in range(w.shape[0]):
        gi = g[i]
        mm = b1 * m[i] + c1 * gi
        vv = b2 * v[i] + c2 * gi * gi
        w[i] = w[i] * shrink - step_size * mm / (np.sqrt(vv) * inv_c + eps)
        m[i] = mm
        v[i] = vv


@njit(cache=True, nogil=True, error_model="numpy")
def _adamw_rows(r0, r1, weight, exp_avg, exp_avg_sq, grad, tau, ui, coefs, nterm, decay, e, t,
                do_step, L, lr, a, c, wd, b1, b2, eps, W, nodes, dct, tol):
    """Rows r0:r1 of (M, d) from stamps tau to step e, then (do_step) the real step t = e + 1."""
    # real-step scalars (torch.optim.AdamW): θ(1 − ηλ) − η/(1−β1^t) · m / (sqrt(v)/c_t + ε)
    shrink = 1.0 - lr[t] * wd if do_step else 1.0
    step_size = a[t] if do_step else 0.0
    inv_c = 1.0 / c[t] if do_step else 1.0
    sb2 = math.sqrt(b2)
    K = nodes.shape[0]
    cf = np.empty(K, dtype=weight.dtype)
    hp = np.empty(16, dtype=weight.dtype)
    tmp = np.empty((5, _BLK), dtype=weight.dtype)  # per-chunk scratch, not per row
    win = np.empty((3, W))
    spare = np.empty(K)
    for r in range(r0, r1):
        n = e - tau[r]
        u = ui[r]
        nt = nterm[u]
        J = min(n, W) if (n > 0 and nt == 0) else 0
        Cw, bw, ew = win[0, :J], win[1, :J], win[2, :J]  # direct-sum window (rare fallback)
        if J > 0:
            _cheb_coefs(tau[r], e, J, L, lr, a, c, wd, b1, b2, nodes, dct, tol, Cw, spare)
            bj = 1.0
            for j in range(J):
                bj *= sb2
                bw[j] = bj
                ew[j] = eps * c[tau[r] + j + 1]
        for k in range(K):
            cf[k] = coefs[u, k]
        hp[_P] = decay[u]
        hp[_GM] = b1**n if n > 0 else 1.0
        hp[_GV] = b2**n if n > 0 else 1.0
        hp[_SHRINK], hp[_STEP], hp[_INVC] = shrink, step_size, inv_c
        hp[_B1], hp[_1B1], hp[_B2], hp[_1B2] = b1, 1.0 - b1, b2, 1.0 - b2
        hp[_EPS], hp[_ZERO], hp[_HALF], hp[_ONE], hp[_TWO], hp[_FOUR] = eps, 0.0, 0.5, 1.0, 2.0, 4.0
        g = grad[r] if do_step else grad[0:0].ravel()
        _adamw_row(weight[r], exp_avg[r], exp_avg_sq[r], g, n, nt, cf, Cw, bw, ew, hp, do_step,
                   tmp)


def adamw_lazy(weight, exp_avg, exp_avg_sq, grad, tau, e, t, do_step, L, lr, a, c, wd, b1, b2,
               eps, W, nodes, dct, tol, ckeys, cvals, cnterm):
    """Rows (M, d) (numpy) from stamps tau (M,) to step e, then (do_step) the step t = e + 1."""
    M, d = weight.shape
    uniq, ui = np.unique(tau, return_inverse=True)  # (U,), (M,) row → unique stamp
    U, K = len(uniq), len(nodes)
    coefs = np.zeros((U, K))
    nterm = np.zeros(U, dtype=np.int64)
    decay = np.ones(U)
    fresh = np.zeros(U, dtype=np.bool_)
    big = M * d >= _PARALLEL_MIN
    _parallel(_adamw_coefs, U, big, uniq, e, W, L, lr, a, c, wd, b1, b2, nodes, dct, tol, ckeys,
              cvals, cnterm, coefs, nterm, decay, fresh)
    if fresh.any():
        _cache_store(uniq, e, W, L, coefs, nterm, fresh, ckeys, cvals, cnterm)
    _parallel(_adamw_rows, M, big, weight, exp_avg, exp_avg_sq, grad, tau, ui.reshape(-1),
              coefs.astype(weight.dtype), nterm, decay, e, t, do_step, L, lr, a, c, wd, b1, b2,
              eps, W, nodes, dct, tol)


# ------------------------------------------------------------------------------------------ SGD


@njit(cache=True, error_model="numpy")
def _sgd_map(p, e, blocks, offsets):
    """2×2 map of steps p+1 … e as a product of aligned segment-tree blocks. O(log gap)."""
    m00, m01, m10, m11 = 1.0, 0.0, 0.0, 1.0
    nl = offsets.shape[0]
    while p < e:
        k = 0
        for kk in range(1, nl):
            if (p & ((1 << kk) - 1)) == 0 and p + (1 << kk) <= e:
                k = kk
            else:
                break
        B = blocks[offsets[k] + (p >> k)]
        m00, m01, m10, m11 = (B[0] * m00 + B[1] * m10, B[0] * m01 + B[1] * m11,
                              B[2] * m00 + B[3] * m10, B[2] * m01 + B[3] * m11)
        p += 1 << k
    return m00, m01, m10, m11


@njit(cache=True, nogil=True, error_model="numpy")
def _sgd_rows(r0, r1, weight, buf, grad, tau, e, t, do_step, has_buf, lr, blocks, offsets,
              momentum, dampening, wd):
    """Rows r0:r1 and their momentum buffers from stamps tau to step e, then the real step t."""
    d = weight.shape[1]
    eta = lr[t] if do_step else 0.0
    for r in range(r0, r1):
        m00, m01, m10, m11 = _sgd_map(tau[r], e, blocks, offsets)
        for i in range(d):
            th = np.float64(weight[r, i])
            b = np.float64(buf[r, i]) if has_buf else 0.0
            th, b = m00 * th + m01 * b, m10 * th + m11 * b
            if do_step:
                d_p = np.float64(grad[r, i]) + wd * th
                if has_buf:
                    b = d_p if t == 1 else momentum * b + (1.0 - dampening) * d_p
                    d_p = b
                th -= eta * d_p
            weight[r, i] = th
            if has_buf:
                buf[r, i] = b


def sgd_lazy(weight, buf, grad, tau, e, t, do_step, has_buf, lr, blocks, offsets, momentum,
             dampening, wd):
    """Rows and momentum buffers (numpy) from stamps tau to step e, then (do_step) step t."""
    M, d = weight.shape
    _parallel(_sgd_rows, M, M * d >= _PARALLEL_MIN, weight, buf, grad, tau, e, t, do_step,
              has_buf, lr, blocks, offsets, momentum, dampening, wd)


# ------------------------------------------------------------------------------------ threads

_PARALLEL_MIN = 1 << 16  # elements below which a call runs on the calling thread
THREADS = numba.config.NUMBA_NUM_THREADS  # worker threads of a large call (set NUMBA_NUM_THREADS)
_POOL: ThreadPoolExecutor | None = None


def _parallel(kernel, n: int, big: bool, *args) -> None:
    """kernel(lo, hi, *args) over [0, n) split in contiguous chunks, one per worker thread
    (`THREADS`); the calling thread takes the first chunk. nogil kernels."""
    global _POOL
    workers = min(THREADS, n) if big else 1
    if workers <= 1:
        kernel(0, n, *args)
        return
    if _POOL is None or _POOL._max_workers < workers - 1:
        _POOL = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="lazy_optim")
    bounds = [n * i // workers for i in range(workers + 1)]
    futures = [_POOL.submit(kernel, bounds[i], bounds[i + 1], *args) for i in range(1, workers)]
    kernel(bounds[0], bounds[1], *args)
    for f in futures:
        f.result()
