"""Batch cross-entropy: softmax over the step's candidate rows only (s-DIET, §5.1).

loss = cross_entropy(scale · Z Rᵀ, target, label_smoothing=ε)

Z (B, d) are the step's features, R (M, d) the candidate rows and target[i] the position in R of
sample i's own row. Label smoothing ε defaults to 0 (plain cross-entropy); DIET's ε = 0.8 is a
setting of the run's config, passed in by the head. `batch_cross_entropy` dispatches to the fused
Triton path (`kernels/_batch_ce_triton.py`: the (B, M) logits never exist in full) or to the
PyTorch reference, as its `backend=` argument says:
    auto (default)  Triton on CUDA tensors, the reference otherwise;
    reference       always the reference;
    triton          always Triton (CPU tensors need TRITON_INTERPRET=1; used by the tests).
The environment variable DIET_BATCH_CE (same values) overrides `backend="auto"` only, e.g.
DIET_BATCH_CE=reference to rule the fused path out of a run without changing code.
Targets must lie in [0, M): they are not checked on the device (that would cost a host sync).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_BACKENDS = ("auto", "reference", "triton")


def batch_cross_entropy_reference(
    z: torch.Tensor,  # (B, d)
    rows: torch.Tensor,  # (M, d)
    target: torch.Tensor,  # (B,) int64 positions in rows
    label_smoothing: float = 0.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """The definition: materialises the (B, M) logits. Mean loss over the batch (a 0-d tensor)."""
    logits = scale * (z @ rows.T)  # (B, M)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # softmax of half/bf16 logits in fp32; fp64 reference runs stay fp64
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def _check_inputs(z: torch.Tensor, rows: torch.Tensor, target: torch.Tensor, eps: float) -> None:
    """Shape, dtype and device checks that cost no host-device sync."""
    if z.dim() != 2 or rows.dim() != 2 or z.shape[1] != rows.shape[1]:
        raise ValueError(
            f"batch_cross_entropy: expected z (B, d) and rows (M, d) with the same d, "
            f"got z {tuple(z.shape)} and rows {tuple(rows.shape)}"
        )
    if z.shape[0] < 1 or rows.shape[0] < 1:
        raise ValueError(
            "batch_cross_entropy: expected B >= 1 and M >= 1, "
            f"got B={z.shape[0]}, M={rows.shape[0]}"
        )
    if target.shape != (z.shape[0],) or target.dtype.is_floating_point or target.is_complex():
        raise ValueError(
            f"batch_cross_entropy: expected target of shape ({z.shape[0]},) holding integer "
            f"positions in rows, got shape {tuple(target.shape)} and dtype {target.dtype}"
        )
    if not (z.device == rows.device == target.device):
        raise ValueError(
            f"batch_cross_entropy: z, rows and target must share a device, got {z.device}, "
            f"{rows.device} and {target.device}"
        )
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"batch_cross_entropy: label_smoothing must be in [0, 1], got {eps}")


def _resolve_backend(backend: str, z: torch.Tensor) -> str:
    """"reference" or "triton": the argument, DIET_BATCH_CE where it is "auto", then the device."""
    if backend not in _BACKENDS:
        raise ValueError(f"batch_cross_entropy: backend={backend!r}, expected one of {', '.join(_BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get("DIET_BATCH_CE", "auto")
        if backend not in _BACKENDS:
            raise ValueError(f"DIET_BATCH_CE={backend!r}: expected one of {', '.join(_BACKENDS)}")
    if backend == "auto":
        return "triton" if z.is_cuda else "reference"
    return backend


def batch_cross_entropy(
    z: torch.Tensor,  # (B, d)
    rows: torch.Tensor,  # (M, d)
    target: torch.Tensor,  # (B,) int positions in rows
    label_smoothing: float = 0.0,
    scale: float = 1.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean batch cross-entropy (fp32, 0-d) with autograd to both `z` and `rows`.

    `backend`: "auto" (Triton on CUDA, the reference elsewhere; DIET_BATCH_CE overrides it),
    "reference" or "triton" (see the module docstring).
    """
    _check_inputs(z, rows, target, label_smoothing)
    if _resolve_backend(backend, z) == "reference":
        return batch_cross_entropy_reference(z, rows, target, label_smoothing, scale)
    from diet_engine.kernels._batch_ce_triton import batch_cross_entropy_fused  # noqa: PLC0415

    return batch_cross_entropy_fused(z, rows, target, label_smoothing, scale)
