"""`Rows`: the optimizer state of a block of head rows, as the lazy optimizer reads and writes it.

The head store hands a block out as `RowBlock.rows` (`storage/head/base.py`) and the lazy
optimizer updates its tensors in place: `opt.catch_up(rows, t)`, `opt.step(rows, grad, t)`,
`opt.materialize(rows, T)`. The tuple holds references, not copies, so an update through it is an
update of the block. Only the fields an optimizer uses must be set: SGD reads `exp_avg` as its
momentum buffer (None when momentum is 0) and never reads `exp_avg_sq` (None is fine).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Rows(NamedTuple):
    """M rows of a head: weights, AdamW moments (or the SGD momentum buffer) and step stamps."""

    weight: torch.Tensor  # (M, d) fp32 or fp64
    exp_avg: torch.Tensor | None  # (M, d) AdamW first moment, or SGD momentum buffer; weight's dtype
    exp_avg_sq: torch.Tensor | None  # (M, d) AdamW second moment; unused by SGD (None allowed)
    step: torch.Tensor  # (M,) int64: the last optimizer step applied to each row (0: never)
