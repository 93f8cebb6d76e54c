"""Exact lazy AdamW / SGD for head rows (see DESIGN.md, "Exact lazy optimizer").

Public API: `LazyAdamW`, `LazySGD`. Rows are passed as tensors (weight, exp_avg, exp_avg_sq,
step stamps) and updated in place.
"""

from kernels.lazy_optim.api import LazyAdamW, LazySGD

__all__ = ["LazyAdamW", "LazySGD"]
