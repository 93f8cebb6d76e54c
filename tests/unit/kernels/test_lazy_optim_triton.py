"""The Triton lazy AdamW / SGD against the PyTorch reference (and so against torch.optim).

The cases run on CUDA in this process (gpu-marked, skipped without a GPU) and on CPU under
TRITON_INTERPRET=1 in a subprocess (`test_cases_under_triton_interpreter`), because Triton reads
that variable when a kernel module is imported and it must not leak into the rest of the suite.
Small shapes only: the interpreter runs the kernels in numpy.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diet_engine.kernels.lazy_optim import LazyAdamW, LazySGD, Rows

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
ROOT = Path(__file__).resolve().parents[3]
TOL = {torch.float64: 1e-13, torch.float32: 2e-6}  # relative to max|reference|


def case(fn):
    """A kernel case: runs here on CUDA, or in the interpreter subprocess on CPU."""
    if INTERPRETED:
        return fn
    skip = pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs CUDA; on CPU these cases run in test_cases_under_triton_interpreter",
    )
    return pytest.mark.gpu(skip(fn))


@pytest.mark.skipif(INTERPRETED, reason="already under the interpreter")
def test_cases_under_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
           "-m", "not slow"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]


# ---------------------------------------------------------------------------------------------

# stamps: never stepped, step 1, early (direct-sum fallback), inside and beyond the window
STAMPS = [0, 1, 3, 30, 120, 500, 1400, 1780, 1799]


def _schedule(peak, T=3000, warmup=200):
    s = np.arange(1, T + 1)
    return peak * np.where(s <= warmup, s / warmup, 0.5 * (1 + np.cos(np.pi * s / T)))


def _state(d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = len(STAMPS)
    w = torch.randn(M, d, generator=g, dtype=torch.float64)
    m = torch.randn(M, d, generator=g, dtype=torch.float64) * 1e-3
    v = (m / 3e-2) ** 2 * torch.rand(M, d, generator=g, dtype=torch.float64)
    v[:, :3] = 0.0  # ε-dominated elements
    grad = torch.randn(M, d, generator=g, dtype=torch.float64) * 1e-2
    return [x.to(dtype) for x in (w, m, v, grad)]


def _compare(got, want, dtype):
    for g_, w_ in zip(got, want, strict=True):
        err = float((g_.cpu().double() - w_.double()).abs().max() / w_.double().abs().max())
        assert err <= TOL[dtype], err


@case
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", [37, 1100])  # 1100: more than one block per row
def test_adamw_triton_equals_reference(dtype, d):
    lrs = _schedule(3e-3)
    w, m, v, grad = _state(d, dtype)
    out = {}
    for backend, dev in (("reference", "cpu"), ("triton", DEVICE)):
        opt = LazyAdamW(lrs, weight_decay=0.1, backend=backend)
        rows = [x.clone().to(dev) for x in (w, m, v)]
        s = torch.tensor(STAMPS, device=dev)
        opt.catch_up(Rows(*rows, s), 1800)
        opt.step(Rows(*rows, s), grad.to(dev), 1800)
        opt.materialize(Rows(*rows, s), 2600)
        assert (s.cpu() == 2600).all()
        out[backend] = rows
    _compare(out["triton"], out["reference"], dtype)


@case
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_triton_equals_reference(dtype, momentum):
    lrs = _schedule(0.1)
    w, m, _, grad = _state(37, dtype)
    out = {}
    for backend, dev in (("reference", "cpu"), ("triton", DEVICE)):
        opt = LazySGD(lrs, momentum=momentum, dampening=0.1, weight_decay=0.01, backend=backend)
        rows = [w.clone().to(dev), m.clone().to(dev) if momentum else None]
        s = torch.tensor(STAMPS, device=dev)
        opt.step(Rows(rows[0], rows[1], None, s), grad.to(dev), 1800)
        opt.materialize(Rows(rows[0], rows[1], None, s), 2999)
        out[backend] = [x for x in rows if x is not None]
    _compare(out["triton"], out["reference"], dtype)


@case
def test_sgd_triton_first_step_equals_torch():
    """Step 1 creates torch's momentum buffer without dampening, for touched and untouched rows.

    Tolerance as in `_compare`, relative to max|reference|: the catch-up is a closed form, so an
    entry that cancels to near zero differs from torch's iterated steps by an ulp of the row's scale.
    """
    gen = torch.Generator().manual_seed(11)
    p = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64, generator=gen))
    w0 = p.detach().clone()
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.2)
    grad = torch.zeros(6, 5, dtype=torch.float64)
    grad[:2] = torch.randn(2, 5, dtype=torch.float64, generator=gen)
    for _ in range(3):
        p.grad = grad.clone() if _ == 0 else torch.zeros_like(grad)
        sgd.step()
    opt = LazySGD(0.1, momentum=0.9, dampening=0.5, weight_decay=0.2, backend="triton")
    w, b = w0.clone().to(DEVICE), torch.zeros(6, 5, dtype=torch.float64, device=DEVICE)
    s = torch.zeros(6, dtype=torch.int64, device=DEVICE)
    opt.step(Rows(w[:2], b[:2], None, s[:2]), grad[:2].to(DEVICE), 1)  # views: written in place
    opt.materialize(Rows(w, b, None, s), 3)
    for got, want in ((w, p.detach()), (b, sgd.state[p]["momentum_buffer"])):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-14, atol=1e-14 * want.abs().max().item())
