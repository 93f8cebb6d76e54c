"""Batch cross-entropy: the reference's definition, the dispatcher and its input checks (CPU).

The Triton kernels are tested in test_batch_ce_triton.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diet_engine.kernels.batch_ce import batch_cross_entropy, batch_cross_entropy_reference


def _inputs(B=9, M=13, d=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    z, rows = torch.randn(B, d, generator=g), torch.randn(M, d, generator=g)
    return z, rows, torch.randint(0, M, (B,), generator=g)


@pytest.mark.parametrize("eps", [0.0, 0.3, 0.8])
def test_reference_is_the_smoothed_loss_the_kernels_compute(eps):
    # loss_i = (1 − ε)(lse_i − s_i,t) + ε(lse_i − mean_j s_ij), s = scale · Z Rᵀ
    z, rows, t = (x.double() if x.is_floating_point() else x for x in _inputs())
    s = 2.0 * z @ rows.T
    lse = s.logsumexp(1)
    want = ((1 - eps) * (lse - s[torch.arange(len(t)), t]) + eps * (lse - s.mean(1))).mean()
    got = batch_cross_entropy_reference(z, rows, t, eps, 2.0)  # fp64 in, fp64 softmax (the truth of the kernel tests)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    half = batch_cross_entropy_reference(z.bfloat16(), rows.bfloat16(), t, eps, 2.0)  # bf16: softmax in fp32
    assert half.dtype == torch.float32


def test_dispatcher_uses_the_reference_on_cpu(monkeypatch):
    z, rows, t = _inputs()
    z.requires_grad_()
    want = batch_cross_entropy_reference(z, rows, t, 0.8, 3.0)
    for mode in (None, "auto", "reference"):
        if mode is None:
            monkeypatch.delenv("DIET_BATCH_CE", raising=False)
        else:
            monkeypatch.setenv("DIET_BATCH_CE", mode)
        got = batch_cross_entropy(z, rows, t, 0.8, 3.0)
        torch.testing.assert_close(got, want)
        assert got.grad_fn is not None


def test_backend_argument_and_the_environment_override(monkeypatch):
    z, rows, t = _inputs()
    want = batch_cross_entropy_reference(z, rows, t, 0.8, 3.0)
    monkeypatch.delenv("DIET_BATCH_CE", raising=False)
    for backend in ("auto", "reference"):
        torch.testing.assert_close(batch_cross_entropy(z, rows, t, 0.8, 3.0, backend=backend), want)
    monkeypatch.setenv("DIET_BATCH_CE", "triton")  # overrides "auto" only: an explicit backend wins
    torch.testing.assert_close(batch_cross_entropy(z, rows, t, 0.8, 3.0, backend="reference"), want)
    with pytest.raises(ValueError, match="backend='fast'"):
        batch_cross_entropy(z, rows, t, 0.8, 3.0, backend="fast")


def test_default_label_smoothing_is_zero():
    """Plain cross-entropy unless asked: DIET's ε = 0.8 is the config's, not the kernel's."""
    z, rows, t = _inputs()
    want = torch.nn.functional.cross_entropy(z @ rows.T, t)
    torch.testing.assert_close(batch_cross_entropy(z, rows, t), want)
    torch.testing.assert_close(batch_cross_entropy_reference(z, rows, t), want)


def test_unknown_mode_is_named(monkeypatch):
    monkeypatch.setenv("DIET_BATCH_CE", "fast")
    with pytest.raises(ValueError, match="DIET_BATCH_CE='fast'"):
        batch_cross_entropy(*_inputs())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(4, 3), torch.randn(5, 2), torch.zeros(4, dtype=torch.long)), "same d"),
        ((torch.randn(0, 3), torch.randn(5, 3), torch.zeros(0, dtype=torch.long)), "B >= 1"),
        ((torch.randn(4, 3), torch.randn(5, 3), torch.zeros(3, dtype=torch.long)), r"shape \(4,\)"),
        ((torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4)), "integer"),
    ],
)
def test_bad_inputs_fail_early(args, match):
    with pytest.raises(ValueError, match=match):
        batch_cross_entropy(*args)


def test_label_smoothing_out_of_range():
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        batch_cross_entropy(*_inputs(), label_smoothing=1.5)


@settings(max_examples=200, deadline=None)
@given(
    B=st.integers(1, 1 << 16),
    M=st.integers(1, 1 << 24),
    d=st.integers(1, 4096),
    elt=st.sampled_from([2, 4]),
)
def test_logits_chunk_is_bounded_by_the_inputs(B, M, d, elt):
    from diet_engine.kernels._batch_ce_triton import _MIN_WORKSPACE_BYTES, _chunk_rows

    rows = _chunk_rows(B, M, d, elt)
    assert 1 <= rows <= B
    budget = max(_MIN_WORKSPACE_BYTES, (B + M) * d * elt // 4)
    assert rows == 1 or rows * M * elt <= budget  # O((B + M)·d), never B × M
