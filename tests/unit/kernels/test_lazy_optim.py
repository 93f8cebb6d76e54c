"""Exact lazy AdamW / SGD against torch.optim applied densely to a whole head (CPU).

Exactness bars: fp64 lazy vs fp64 dense, max error ≤ 1e-10 · max|W|; fp32 lazy vs fp64 dense,
≤ 1e-5 · max|W|. Also: `paper` mode against Eq. 18/20 evaluated directly, the numba backend
against the reference on hand-picked stamps, and input checks. Triton: test_lazy_optim_triton.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diet_engine.kernels.lazy_optim import LazyAdamW, LazySGD, Rows
from diet_engine.kernels.lazy_optim.paper import multistep_coefficients

N, D, T, WARMUP = 500, 37, 3000, 300


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tensors here are tiny: one intra-op thread is faster and immune to a busy machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
BAR = {torch.float64: 1e-10, torch.float32: 1e-5}


def warmup_cosine(peak: float, T: int = T, warmup: int = WARMUP) -> np.ndarray:
    """lrs[t-1] for t = 1..T: linear warm-up from peak/warmup, then cosine to 0."""
    s = np.arange(1, T + 1)
    return peak * np.where(s <= warmup, s / warmup,
                           0.5 * (1 + np.cos(np.pi * (s - warmup) / (T - warmup))))


def _batches(seed: int, B: int):
    """Per step the rows of its batch: random, plus rows first touched late (after step 2200) and
    rows touched at steps 1 and 2 and then not before step 2600 (gaps > 2,000 steps)."""
    rng = np.random.default_rng(seed)
    late, rare = np.arange(0, 20), np.arange(20, 40)
    common = np.arange(40, N)
    out = []
    for t in range(1, T + 1):
        pool = common if t <= 2200 else np.concatenate([common, late])
        rows = rng.choice(pool, size=B, replace=False)
        if t in (1, 2, 2600, 2601):
            rows = np.concatenate([rows, rare[(t % 2)::2]])
        out.append(np.sort(rows))
    return out


def _run(make_lazy, make_dense, dtypes, seed: int, B: int, checks=(1, 2, 150, 1000, T)):
    """Train a dense fp64 head and lazy heads (one per dtype) on the same batches; at each check
    step materialize copies of the lazy heads and return the worst error relative to max|W|."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(N, D, generator=g, dtype=torch.float64)
    scale = 10.0 ** torch.empty(N, 1, dtype=torch.float64).uniform_(-7, 0, generator=g)
    param = torch.nn.Parameter(W0.clone())
    dense = make_dense(param)
    heads = {}
    for dt in dtypes:
        w = W0.to(dt)
        heads[dt] = (make_lazy(), w, torch.zeros_like(w), torch.zeros_like(w),
                     torch.zeros(N, dtype=torch.int64))
    worst = {dt: 0.0 for dt in dtypes}
    for t, rows in enumerate(_batches(seed, B), start=1):
        grad = torch.randn(len(rows), D, generator=g, dtype=torch.float64) * scale[rows]
        grad[torch.rand(grad.shape, generator=g) < 0.1] = 0.0
        dense.param_groups[0]["lr"] = heads[dtypes[0]][0].lr_at(t)
        full = torch.zeros(N, D, dtype=torch.float64)
        full[rows] = grad
        param.grad = full
        dense.step()
        idx = torch.from_numpy(rows)
        for dt, (opt, w, m, v, step) in heads.items():
            rw, rm, rv, rs = w[idx], m[idx], v[idx], step[idx]
            opt.catch_up(Rows(rw, rm, rv, rs), t)  # the engine's order: catch up, forward, step
            assert (rs == t - 1).all()
            opt.step(Rows(rw, rm, rv, rs), grad.to(dt), t)
            w[idx], m[idx], v[idx], step[idx] = rw, rm, rv, rs
            if t in checks:
                cw, cm, cv, cs = w.clone(), m.clone(), v.clone(), step.clone()
                opt.materialize(Rows(cw, cm, cv, cs), t)
                assert (cs == t).all()
                ref = param.detach()
                err = float((cw.double() - ref).abs().max() / ref.abs().max())
                worst[dt] = max(worst[dt], err)
    return worst


def _assert_bars(worst):
    for dt, err in worst.items():
        assert err <= BAR[dt], f"{dt}: max error {err:.3e} · max|W| > {BAR[dt]}"


SETTINGS = settings(max_examples=2, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(seed=st.integers(0, 2**16), B=st.integers(8, 48))
def test_adamw_equals_dense_torch_adamw(seed, B):
    lrs = warmup_cosine(1e-2)
    worst = _run(lambda: LazyAdamW(lrs, weight_decay=0.05, backend="numba"),
                 lambda p: torch.optim.AdamW([p], lr=lrs[0], weight_decay=0.05, foreach=False),
                 [torch.float64, torch.float32], seed, B)
    _assert_bars(worst)


@SETTINGS
@given(seed=st.integers(0, 2**16), B=st.integers(8, 48), dampening=st.sampled_from([0.0, 0.1]))
def test_sgd_equals_dense_torch_sgd(seed, B, dampening):
    lrs = warmup_cosine(0.05)
    kw = dict(momentum=0.9, dampening=dampening, weight_decay=0.05)
    worst = _run(lambda: LazySGD(lrs, **kw, backend="numba"),
                 lambda p: torch.optim.SGD([p], lr=lrs[0], **kw, foreach=False),
                 [torch.float64, torch.float32], seed, B)
    _assert_bars(worst)


def test_reference_backend_equals_dense_torch():
    """The readable definition itself holds the fp64 bar (one run each, callable schedule)."""
    lrs = warmup_cosine(1e-2)
    def lr_fn(t):  # evaluated ahead in chunks, so defined past T too
        return float(lrs[min(t, T) - 1])

    worst = _run(lambda: LazyAdamW(lr_fn, weight_decay=0.05, backend="reference"),
                 lambda p: torch.optim.AdamW([p], lr=lrs[0], weight_decay=0.05, foreach=False),
                 [torch.float64], seed=7, B=8, checks=(1, 150, T))
    _assert_bars(worst)
    kw = dict(momentum=0.9, dampening=0.1, weight_decay=0.05)
    worst = _run(lambda: LazySGD(lrs * 5, **kw, backend="reference"),
                 lambda p: torch.optim.SGD([p], lr=lrs[0], **kw, foreach=False),
                 [torch.float64], seed=8, B=24)
    _assert_bars(worst)


# ------------------------------------------------------------------------ backends and fallbacks


def _state(M, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(M, d, generator=g, dtype=torch.float64)
    m = torch.randn(M, d, generator=g, dtype=torch.float64) * 1e-3
    v = (m / 3e-2) ** 2 * torch.rand(M, d, generator=g, dtype=torch.float64)
    v[:, :4] = 0.0  # ε-dominated elements
    v[:, 4:8] = 1e-17
    grad = torch.randn(M, d, generator=g, dtype=torch.float64) * 1e-2
    return [x.to(dtype) for x in (w, m, v, grad)]


STAMPS = [0, 0, 1, 2, 7, 40, 90, 200, 899, 1000, 1300, 1700, 2350, 2398, 2399]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.95)])  # (0.9, 0.95): direct-sum fallback
def test_numba_equals_reference_adamw(dtype, betas):
    lrs = warmup_cosine(3e-3)
    w, m, v, grad = _state(len(STAMPS), 33, dtype)
    out = {}
    for backend in ("reference", "numba"):
        opt = LazyAdamW(lrs, betas=betas, weight_decay=0.1, backend=backend)
        s = torch.tensor(STAMPS)
        rows = [x.clone() for x in (w, m, v)]
        opt.catch_up(Rows(*rows, s), 2400)
        opt.step(Rows(*rows, s), grad, 2400)
        opt.materialize(Rows(*rows, s), 2900)
        out[backend] = rows
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    for got, want in zip(out["numba"], out["reference"], strict=True):
        assert float((got - want).abs().max() / want.abs().max()) <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_numba_equals_reference_sgd(dtype, momentum):
    lrs = warmup_cosine(0.1)
    w, m, _, grad = _state(len(STAMPS), 33, dtype)
    out = {}
    for backend in ("reference", "numba"):
        opt = LazySGD(lrs, momentum=momentum, dampening=0.1, weight_decay=0.01, backend=backend)
        s = torch.tensor(STAMPS)
        rows = [w.clone(), m.clone() if momentum else None]
        opt.step(Rows(rows[0], rows[1], None, s), grad, 2400)
        opt.materialize(Rows(rows[0], rows[1], None, s), 2999)
        out[backend] = [x for x in rows if x is not None]
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    for got, want in zip(out["numba"], out["reference"], strict=True):
        assert float((got - want).abs().max() / want.abs().max()) <= tol


# ---------------------------------------------------------------------------------- row state


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_sgd_takes_no_second_moment(backend):
    """LazySGD never reads exp_avg_sq: None and a store's tensor (left untouched) give the same rows;
    with momentum 0 it needs no buffer either."""
    lrs = warmup_cosine(0.1)
    w, m, v, grad = _state(len(STAMPS), 33, torch.float64)
    out = []
    for sq in (None, v.clone()):
        opt = LazySGD(lrs, momentum=0.9, dampening=0.1, weight_decay=0.01, backend=backend)
        rows = Rows(w.clone(), m.clone(), sq, torch.tensor(STAMPS))
        opt.step(rows, grad, 2400)
        opt.materialize(rows, 2999)
        out.append(rows)
    torch.testing.assert_close(out[0].weight, out[1].weight, rtol=0, atol=0)
    torch.testing.assert_close(out[0].exp_avg, out[1].exp_avg, rtol=0, atol=0)
    torch.testing.assert_close(out[1].exp_avg_sq, v, rtol=0, atol=0)
    plain = Rows(w.clone(), None, None, torch.tensor(STAMPS))
    LazySGD(lrs, momentum=0.0, weight_decay=0.01, backend=backend).step(plain, grad, 2400)
    assert (plain.step == 2400).all() and not torch.equal(plain.weight, w)


def test_rows_argument_is_checked():
    opt = LazyAdamW([1e-3] * 10, backend="numba")
    w, s = torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.catch_up(Rows(w, w.clone(), None, s), 4)
    with pytest.raises(TypeError, match="Rows"):
        opt.step(w, w.clone(), 4)  # a tensor where the Rows go
    with pytest.raises(ValueError, match="momentum buffer"):
        LazySGD(1e-3, momentum=0.9).step(Rows(w, None, None, s), w.clone(), 1)
    opt.materialize((w, w.clone(), w.clone(), s), 4)  # a plain 4-tuple is read as Rows
    assert (s == 4).all()


# --------------------------------------------------------------------------------- paper mode


def test_adamw_paper_mode_is_listing_1():
    n_rows, batch = 1000, 40  # skipped steps n = N/B − 1 = 24
    lr, lam, (b1, b2), eps = 2e-3, 0.05, (0.9, 0.999), 1e-8
    opt = LazyAdamW(lr, weight_decay=lam, mode="paper", num_rows=n_rows, batch_size=batch)
    w, m, v, g = (x.double() for x in _state(5, 11, torch.float64, seed=3))
    v = v + 1e-6
    step = torch.tensor([0, 3, 3, 9, 20])
    rows = [w.clone(), m.clone(), v.clone()]
    opt.catch_up(Rows(*rows, step), 30)  # paper mode moves rows only in step()
    opt.step(Rows(*rows, step), g, 30)
    assert (step == 30).all()
    # Eq. 18 directly, after the real step without bias correction (ψ_t = 1)
    n = n_rows / batch - 1
    w1 = w * (1 - lr * lam)
    m1 = b1 * m + (1 - b1) * g
    v1 = b2 * v + (1 - b2) * g * g
    w1 = w1 - lr * m1 / (v1.sqrt() + eps)
    mu = b1 / math.sqrt(b2)
    D = 1 - lr * lam
    want = D**n * w1 - (D**n * lr * mu - lr * mu ** (n + 1)) / (D - mu) * m1 / (v1.sqrt() + eps)
    torch.testing.assert_close(rows[0], want, rtol=1e-14, atol=0)
    torch.testing.assert_close(rows[1], b1**n * m1, rtol=1e-14, atol=0)
    torch.testing.assert_close(rows[2], b2**n * v1, rtol=1e-14, atol=0)


def test_sgd_paper_mode_is_eq_19_20():
    lr, lam, mu, damp, n = 0.03, 0.01, 0.9, 0.1, 17
    opt = LazySGD(lr, momentum=mu, dampening=damp, weight_decay=lam, mode="paper",
                  skipped_steps=n)
    w, m, _, g = _state(4, 9, torch.float64, seed=4)
    rows = [w.clone(), m.clone()]
    step = torch.zeros(4, dtype=torch.int64)
    opt.step(Rows(rows[0], rows[1], None, step), g, 5)
    m1 = mu * m + (1 - damp) * g  # Eq. 19
    w1 = (1 - lr * lam) * w - lr * m1
    D = 1 - lr * lam  # Eq. 20
    want = D**n * w1 - (D**n * lr * mu - lr * mu ** (n + 1)) / (D - mu) * m1
    torch.testing.assert_close(rows[0], want, rtol=1e-14, atol=0)
    torch.testing.assert_close(rows[1], mu**n * m1, rtol=1e-14, atol=0)
    # Eq. 20 is the closed form of n momentum steps with g = 0 (sign as in Listing 1)
    wk, mk = w1.clone(), m1.clone()
    for _ in range(n):
        mk = mu * mk
        wk = D * wk - lr * mk
    torch.testing.assert_close(rows[0], wk, rtol=1e-12, atol=0)


def test_multistep_coefficients_limit():
    a1, a2 = multistep_coefficients(0.1, 1.0, 0.9, 5)  # 1 − ηλ = μ: the limit n η μ^n
    assert a1 == pytest.approx(0.9**5) and a2 == pytest.approx(5 * 0.1 * 0.9**5)


# ----------------------------------------------------------------------------------- contracts


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="mode"):
        LazyAdamW(1e-3, mode="fast")
    with pytest.raises(ValueError, match="backend"):
        LazySGD(1e-3, backend="cuda")
    with pytest.raises(ValueError, match="num_rows"):
        LazyAdamW(1e-3, mode="paper")
    with pytest.raises(ValueError, match="beta1/sqrt"):
        LazyAdamW(1e-3, betas=(0.99, 0.9))
    opt = LazyAdamW([1e-3] * 10, backend="numba")
    w = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="10 entries"):
        opt.catch_up(Rows(w, w.clone(), w.clone(), torch.zeros(2, dtype=torch.int64)), 12)
    with pytest.raises(ValueError, match="stamps"):
        opt.catch_up(Rows(w, w.clone(), w.clone(), torch.tensor([0, 5])), 4)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.catch_up(Rows(w, torch.zeros(2, 4), w.clone(), torch.zeros(2, dtype=torch.int64)), 4)


def test_never_touched_rows_and_empty_calls():
    """A row never stepped only decays (AdamW) or follows torch's first-step buffer (SGD)."""
    lrs = np.full(50, 0.1)
    opt = LazyAdamW(lrs, weight_decay=0.5, backend="numba")
    w = torch.ones(1, 3, dtype=torch.float64)
    z = torch.zeros_like(w)
    opt.materialize(Rows(w, z, z.clone(), torch.zeros(1, dtype=torch.int64)), 50)
    torch.testing.assert_close(w, torch.full_like(w, 0.95**50), rtol=1e-13, atol=0)
    e = torch.zeros(0, 3)
    opt.step(Rows(e, e, e, torch.zeros(0, dtype=torch.int64)), e, 5)
    p = torch.nn.Parameter(torch.ones(1, 3, dtype=torch.float64))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.5)
    for _ in range(7):
        p.grad = torch.zeros_like(p)
        sgd.step()
    w, b = torch.ones(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
    LazySGD(0.1, momentum=0.9, dampening=0.3, weight_decay=0.5).materialize(
        Rows(w, b, None, torch.zeros(1, dtype=torch.int64)), 7)
    torch.testing.assert_close(w, p.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(b, sgd.state[p]["momentum_buffer"], rtol=1e-14, atol=0)
