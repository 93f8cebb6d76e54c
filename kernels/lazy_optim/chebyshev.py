"""The AdamW catch-up sum as a short Chebyshev series per row (shared by numba and Triton).

Design note
-----------
The reference sums, per element, Σ_j C_j / (b_j x + ε c_s) over a window of W ≈ 400 steps: far
too slow for 256 × 2048 elements. Substituting w = x / (x + ε) ∈ [0, 1) turns it into

    Σ_j C_j / (b_j x + ε c_s) = f(w) / (x + ε),      f(w) = Σ_j C_j / (c_s + (b_j − c_s)·w)

where f depends on the row's stamp τ and the target step e only, not on the element. f is a sum of
positive terms whose poles w = c_s / (c_s − b_j) lie far outside [0, 1] once c_s = sqrt(1 − β2^s)
is near 1 (τ ≳ 100 for β2 = 0.999; the far poles of large j are damped by μ^j), so its Chebyshev
series converges geometrically. Per row (per unique τ) we sample f at K Chebyshev nodes (K·W
divisions) and transform; per element the catch-up then costs one sqrt, one division and a
Clenshaw recurrence of `nterm` ≤ K terms (≈ 8 for β2 = 0.999 once τ ≳ 1000, ≈ 25 at τ = 100).
A posteriori check (as in chebfun): the series is cut after its last coefficient above `TOL`·max f;
if one of the last two is still above, the row falls back to the direct windowed sum (first ≈ 50
steps, or betas such as β2 = 0.95 whose far poles come close to w = 1).

For gaps n ≥ W, f = P(τ+W+1, e) · f_τ with f_τ depending on τ alone, so its coefficients are cached
per τ (a row stamped τ shares them with the other B−1 rows of that step's batch).
"""

from __future__ import annotations

import numpy as np

K = 32  # Chebyshev nodes / maximum number of terms
TOL = 1e-14  # relative accuracy of f (fp64 rounding of the transform is ≈ 2e-15 · max f)

K_SMALL = 16  # first try on CPU: enough once τ ≳ 500 (β2 = 0.999), half the divisions


def nodes_and_transform(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(k,) Chebyshev nodes of the first kind in w ∈ (0, 1) and the (k, k) transform:
    a = transform @ f(nodes)."""
    i = np.arange(k) + 0.5
    nodes = 0.5 * (1.0 + np.cos(np.pi * i / k))
    dct = (2.0 / k) * np.cos(np.pi * np.outer(np.arange(k), i) / k)
    dct[0] *= 0.5
    return nodes, dct


NODES, DCT = nodes_and_transform(K)
NODES_SMALL, DCT_SMALL = nodes_and_transform(K_SMALL)


def chebyshev_eval(coefs: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Σ_k a_k T_k(2w − 1) by Clenshaw (the per-element evaluation, for tests and docs)."""
    z = 2.0 * w - 1.0
    b1 = np.zeros_like(w)
    b2 = np.zeros_like(w)
    for a_k in coefs[:0:-1]:
        b1, b2 = a_k + 2.0 * z * b1 - b2, b1
    return coefs[0] + z * b1 - b2


def series_length(coefs: np.ndarray, fmax: float) -> int:
    """Terms to keep: 1 + the last k with |a_k| > TOL·fmax (≥ 1); 0 if one of the last two is
    still above it (no convergence: use the direct sum). Rounding noise of the transform is
    ≈ 2e-15·fmax, below TOL, so it never counts."""
    big = np.nonzero(np.abs(coefs) > TOL * fmax)[0]
    nterm = int(big[-1]) + 1 if len(big) else 1
    return 0 if nterm > len(coefs) - 2 else nterm
