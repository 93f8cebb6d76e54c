"""Compute kernels: fused batch cross-entropy and the exact lazy optimizer for head rows.

Each kernel has a plain PyTorch reference (the readable definition), a CPU implementation
(numba) where it pays, and a Triton implementation for CUDA; a dispatcher picks by device.
This package does not import `engine` or `storage`.
"""

from diet_engine.kernels.batch_ce import batch_cross_entropy, batch_cross_entropy_reference
from diet_engine.kernels.lazy_optim import LazyAdamW, LazySGD
from diet_engine.kernels.rows import Rows

__all__ = [
    "batch_cross_entropy",
    "batch_cross_entropy_reference",
    "LazyAdamW",
    "LazySGD",
    "Rows",
]
