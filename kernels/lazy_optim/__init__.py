"""Exact lazy AdamW / SGD for head rows (semantics in `api.py`, the formulas in `reference.py`).

Public API: `LazyAdamW`, `LazySGD`. Rows are passed as tensors (weight, exp_avg, exp_avg_sq,
step stamps) and updated in place.

Files: `api.py` (the classes, dispatch), `schedule_tables.py` (what depends only on the schedule),
`reference.py` (plain PyTorch definition), `chebyshev.py` (the AdamW catch-up sum as a short
series), `_numba.py` (CPU), `_triton.py` (CUDA), `paper.py` (the s-DIET multistep update).
"""

from diet_engine.kernels.lazy_optim.api import LazyAdamW, LazySGD

__all__ = ["LazyAdamW", "LazySGD"]
