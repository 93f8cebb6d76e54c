"""Exact lazy AdamW / SGD for head rows (semantics in `api.py`, the formulas in `reference.py`).

Public API: `LazyAdamW`, `LazySGD` and `Rows` (the row state they update in place):
`opt.catch_up(rows, t)`, `opt.step(rows, grad, t)`, `opt.materialize(rows, T)`.

Files: `api.py` (the classes, dispatch), `schedule_tables.py` (what depends only on the schedule),
`reference.py` (plain PyTorch definition), `chebyshev.py` (the AdamW catch-up sum as a short
series), `_numba.py` (CPU), `_triton.py` (CUDA), `paper.py` (the s-DIET multistep update).
"""

from diet_engine.kernels.lazy_optim.api import LazyAdamW, LazySGD
from diet_engine.kernels.rows import Rows

__all__ = ["LazyAdamW", "LazySGD", "Rows"]
