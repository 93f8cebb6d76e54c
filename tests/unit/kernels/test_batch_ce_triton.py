"""The Triton batch cross-entropy against fp64 truth and PyTorch, forward and both gradients.

The cases run twice over: on CUDA in this process (gpu-marked, skipped without a GPU), and on
CPU under TRITON_INTERPRET=1 in a subprocess (`test_cases_under_triton_interpreter`), because
Triton reads that variable when a kernel module is imported and the flag must not leak into
the rest of the suite. Bar (Cut Cross-Entropy's): |fp64 truth − ours| ≤ |fp64 truth − PyTorch
in the same dtype| + tol, element by element.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diet_engine.kernels.batch_ce import batch_cross_entropy, batch_cross_entropy_reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
ROOT = Path(__file__).resolve().parents[3]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOL)


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
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    env.pop("DIET_BATCH_CE", None)
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not slow"]
    # ~1 min on 2 cores
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]


# ---------------------------------------------------------------------------------------------


def _fused():
    from diet_engine.kernels._batch_ce_triton import batch_cross_entropy_fused

    return batch_cross_entropy_fused


def _make(B, M, d, dtype, *, targets=None, spread=1.0, seed=0):
    """Inputs rounded to `dtype` (so input rounding is nobody's error) and their fp64 copies."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, d, generator=g) * spread / d**0.25).to(dtype)
    rows = (torch.randn(M, d, generator=g) * spread / d**0.25).to(dtype)
    t = torch.randint(0, M, (B,), generator=g) if targets is None else targets
    return z.to(DEVICE), rows.to(DEVICE), t.to(DEVICE)


def _loss_and_grads(fn, z, rows, t, eps, scale, dtype=None):
    z = z.detach().to(dtype or z.dtype).requires_grad_()
    rows = rows.detach().to(dtype or rows.dtype).requires_grad_()
    loss = fn(z, rows, t, eps, scale)
    loss.backward()
    return loss.detach(), z.grad, rows.grad


def _assert_bar(ours, torch_same, truth, tol, what):
    err = (ours.double() - truth).abs()
    err_torch = (torch_same.double() - truth).abs()
    excess = err - err_torch - tol
    assert ours.isfinite().all(), f"{what}: non-finite values"
    assert (excess <= 0).all(), (
        f"{what}: {(excess > 0).sum().item()} of {excess.numel()} elements beyond the bar, "
        f"worst error {err.max().item():.3e} vs PyTorch's {err_torch.max().item():.3e} + tol {tol}"
    )


def _check_bar(B, M, d, dtype, eps, scale=2.0, **kw):
    z, rows, t = _make(B, M, d, dtype, **kw)
    truth = _loss_and_grads(batch_cross_entropy_reference, z, rows, t, eps, scale, torch.float64)
    same = _loss_and_grads(batch_cross_entropy_reference, z, rows, t, eps, scale)
    ours = _loss_and_grads(_fused(), z, rows, t, eps, scale)
    for name, o, s, tr in zip(("loss", "dz", "drows"), ours, same, truth, strict=True):
        assert o.dtype == s.dtype and o.shape == s.shape, name
        _assert_bar(o, s, tr, TOL[dtype], f"{name} {dtype} B={B} M={M} d={d} eps={eps}")
    with torch.no_grad():  # the loss-only kernel: no logits in memory at all
        loss_only = _fused()(z, rows, t, eps, scale)
    _assert_bar(loss_only, same[0], truth[0], TOL[dtype], f"loss-only {dtype} B={B} M={M} d={d}")


SMALL = {
    "m_lt_b": (29, 5, 33),  # M < B: many samples share a target
    "m_gg_b": (3, 300, 20),  # M ≫ B
    "tiny": (1, 1, 1),
    "d4096": (4, 9, 4096),  # the largest d, several BLOCK_D steps
}


@case
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [0.0, 0.8])
@pytest.mark.parametrize("shape", list(SMALL.values()), ids=list(SMALL))
def test_small_shapes_meet_the_bar(shape, eps, dtype):
    _check_bar(*shape, dtype, eps)


def _small_workspace(monkeypatch):
    """Shrink the logits chunk so the gradients accumulate over several chunks."""
    import diet_engine.kernels._batch_ce_triton as backend

    monkeypatch.setattr(backend, "_MIN_WORKSPACE_BYTES", 0)
    monkeypatch.setattr(backend, "_WORKSPACE_DIVISOR", 32)


@case
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_irregular_shape_meets_the_bar(dtype, monkeypatch):
    _small_workspace(monkeypatch)  # 37 rows in chunks of 4
    _check_bar(37, 1823, 129, dtype, 0.8)


@case
def test_views_of_one_sample_share_a_row():
    M = 11
    targets = torch.arange(M).repeat(2)  # two views per sample, as in a DIET batch
    _check_bar(2 * M, M, 24, torch.float32, 0.8, targets=targets)


@case
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits_stay_finite(dtype):
    # Logits in the thousands: naive exp overflows; fp16 PyTorch overflows on scale · (z Rᵀ).
    z, rows, t = _make(7, 40, 16, dtype, spread=6.0)
    eps, scale = 0.8, 100.0
    truth = _loss_and_grads(batch_cross_entropy_reference, z, rows, t, eps, scale, torch.float64)
    same = _loss_and_grads(batch_cross_entropy_reference, z, rows, t, eps, scale)
    ours = _loss_and_grads(_fused(), z, rows, t, eps, scale)
    with torch.no_grad():
        loss_only = _fused()(z, rows, t, eps, scale)
    assert truth[0] > 100, "the logits are not extreme"
    for name, o, s, tr in zip(("loss", "dz", "drows"), ours, same, truth, strict=True):
        tol = TOL[dtype] * max(1.0, tr.abs().max().item())  # relative: values are large
        if s.isfinite().all():
            _assert_bar(o, s, tr, tol, f"{name} {dtype}")
        else:  # PyTorch itself overflowed; ask for its error-free accuracy instead
            assert o.isfinite().all() and ((o.double() - tr).abs() <= tol).all(), name
    assert loss_only.isfinite() and (loss_only.double() - truth[0]).abs() <= tol


@case
def test_chunking_does_not_change_the_result():
    from diet_engine.kernels._batch_ce_triton import batch_ce_loss_and_grads

    z, rows, t = _make(37, 50, 19, torch.float32)
    whole = batch_ce_loss_and_grads(z, rows, t, 0.8, 2.0, True, True, chunk_rows=37)
    parts = batch_ce_loss_and_grads(z, rows, t, 0.8, 2.0, True, True, chunk_rows=5)  # 7·5 + 2
    for a, b in zip(whole, parts, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@case
def test_upstream_gradient_and_partial_requires_grad():
    z, rows, t = _make(9, 13, 10, torch.float32)
    ref = _loss_and_grads(lambda *a: -2.5 * batch_cross_entropy_reference(*a), z, rows, t, 0.8, 2.0)
    ours = _loss_and_grads(lambda *a: -2.5 * _fused()(*a), z, rows, t, 0.8, 2.0)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)
    zz = z.clone().requires_grad_()  # rows frozen: only dz is computed
    _fused()(zz, rows, t, 0.8, 2.0).backward()
    torch.testing.assert_close(zz.grad, ref[1] / -2.5)
    rr = rows.clone().requires_grad_()  # features frozen: only drows
    _fused()(z, rr, t, 0.8, 2.0).backward()
    torch.testing.assert_close(rr.grad, ref[2] / -2.5)


@case
def test_second_backward_is_refused():
    z, rows, t = _make(4, 6, 8, torch.float32)
    z.requires_grad_()
    loss = _fused()(z, rows, t, 0.8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(_fused()(z, rows, t, 0.8), z, create_graph=True)


@case
def test_backend_argument_picks_triton(monkeypatch):
    monkeypatch.setenv("DIET_BATCH_CE", "reference")  # overrides "auto" only
    z, rows, t = _make(5, 9, 8, torch.float32)
    z.requires_grad_()
    got = batch_cross_entropy(z, rows, t, 0.8, 2.0, backend="triton")
    torch.testing.assert_close(got, _fused()(z, rows, t, 0.8, 2.0), rtol=0, atol=0)
    got.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):  # the fused op's autograd ran
        got.backward()
    ref = batch_cross_entropy(z, rows, t, 0.8, 2.0)  # "auto": the variable picks the reference
    ref.backward(retain_graph=True)
    ref.backward()  # the reference's autograd allows it
    torch.testing.assert_close(_fused()(z, rows, t), batch_cross_entropy_reference(z, rows, t, 0.0))


@case
def test_inputs_that_are_views_or_int32_targets():
    z, rows, t = _make(8, 12, 16, torch.float32)
    big = torch.zeros(24, 20, device=DEVICE)
    big[::2, 2:18] = rows  # rows as a strided view
    want = batch_cross_entropy_reference(z, rows, t, 0.8, 2.0)
    got = _fused()(z.T.contiguous().T, big[::2, 2:18], t.int(), 0.8, 2.0)
    torch.testing.assert_close(got, want)


@case
def test_custom_op_registration():
    from diet_engine.kernels._batch_ce_triton import _batch_ce_op

    z, rows, t = _make(7, 5, 9, torch.float32)
    for need in [(True, True), (True, False), (False, False)]:
        args = (z.clone().requires_grad_(need[0]), rows.clone().requires_grad_(need[1]), t)
        torch.library.opcheck(_batch_ce_op, (*args, 0.8, 2.0, *need))


@case
def test_composes_with_torch_compile(monkeypatch):
    monkeypatch.setenv("DIET_BATCH_CE", "triton")  # the public dispatcher, forced onto Triton
    z, rows, t = _make(10, 7, 12, torch.float32)
    backend = "aot_eager" if INTERPRETED else "inductor"  # no compiled Triton on CPU

    def step(z, rows, t):
        return batch_cross_entropy(torch.tanh(z), rows, t, 0.8, 2.0)  # a producer before it

    compiled = torch.compile(step, backend=backend, fullgraph=True)
    for _ in range(2):  # the second call runs the cached graph
        want = _loss_and_grads(lambda a, b, c, *_: step(a, b, c), z, rows, t, None, None)
        got = _loss_and_grads(lambda a, b, c, *_: compiled(a, b, c), z, rows, t, None, None)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


@case
def test_autocast_computes_in_the_autocast_dtype():
    z, rows, t = _make(6, 10, 16, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want = _loss_and_grads(batch_cross_entropy_reference, z, rows, t, 0.8, 2.0)
        got = _loss_and_grads(_fused(), z, rows, t, 0.8, 2.0)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(512, 4099, 1000), (300, 70_001, 64), (1031, 777, 4096)])
@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "chunked"])
def test_large_shapes_on_gpu(shape, dtype, chunked, monkeypatch):
    if chunked:
        _small_workspace(monkeypatch)
    _check_bar(*shape, dtype, 0.8)


@pytest.mark.skipif(INTERPRETED, reason="interpreted kernels are not compiled")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_gpus_without_one(dtype):
    """Ahead-of-time compile to sm_90 / sm_80 cubins: catches GPU-only compile errors on CPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import diet_engine.kernels._batch_ce_triton as backend

    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 6, 7, 8)}  # d % 16 == 0
    fwd = ASTSource(
        backend._batch_ce_fwd_kernel,
        {"z_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "t_ptr": "*i64", "part_ptr": "*fp32",
         "B": "i32", "M": "i32", "D": "i32", "stride_z": "i32", "stride_r": "i32", "scale": "fp32",
         "BLOCK_B": "constexpr", "BLOCK_M": "constexpr", "BLOCK_D": "constexpr",
         "UPCAST": "constexpr", "DOT_PRECISION": "constexpr"},
        constexprs={"BLOCK_B": 64, "BLOCK_M": 64, "BLOCK_D": 32, "UPCAST": False,
                    "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"},
        attrs=aligned,
    )  # fmt: skip
    chunk = ASTSource(
        backend._batch_ce_chunk_kernel,
        {"s_ptr": f"*{dtype}", "t_ptr": "*i64", "loss_ptr": "*fp32", "M": "i32", "stride_s": "i32",
         "scale": "fp32", "eps": "fp32", "grad_scale": "fp32", "BLOCK_M": "constexpr"},
        constexprs={"BLOCK_M": 4096},
    )  # fmt: skip
    for arch in (90, 80):
        for src in (fwd, chunk):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
            assert kernel.asm["cubin"], (arch, src.name)
