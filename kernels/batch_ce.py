"""Batch cross-entropy: softmax over the step's candidate rows only (s-DIET, §5.1).

loss = cross_entropy(scale · Z Rᵀ, target, label_smoothing=ε)

Z (B, d) are the step's features, R (M, d) the candidate rows and target[i] the position in R of
sample i's own row. `batch_cross_entropy` dispatches to the fused Triton kernel on CUDA and to
the PyTorch reference elsewhere (or when DIET_BATCH_CE=reference).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def batch_cross_entropy_reference(
    z: torch.Tensor,  # (B, d)
    rows: torch.Tensor,  # (M, d)
    target: torch.Tensor,  # (B,) int64 positions in rows
    label_smoothing: float = 0.8,
    scale: float = 1.0,
) -> torch.Tensor:
    """The definition: materialises the (B, M) logits. Mean loss over the batch (a 0-d tensor)."""
    logits = scale * (z @ rows.T)  # (B, M)
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def batch_cross_entropy(
    z: torch.Tensor,
    rows: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.8,
    scale: float = 1.0,
) -> torch.Tensor:
    """Mean batch cross-entropy with autograd to both `z` and `rows`."""
    if os.environ.get("DIET_BATCH_CE", "auto") == "reference" or not z.is_cuda:
        return batch_cross_entropy_reference(z, rows, target, label_smoothing, scale)
    from kernels._batch_ce_triton import batch_cross_entropy_fused  # noqa: PLC0415

    return batch_cross_entropy_fused(z, rows, target, label_smoothing, scale)
