"""Learning-rate schedules as precomputed arrays indexed by step (dinov2's `CosineScheduler` style).

`lrs[t - 1]` is the learning rate of optimizer step t (t = 1 … T). The same array drives the
backbone optimizer and the head's lazy optimizer, which needs the whole schedule to catch rows up
across skipped steps.
"""

from __future__ import annotations

import numpy as np


def warmup_cosine(base_lr: float, total_steps: int, warmup_steps: int, final_lr: float = 0.0) -> np.ndarray:
    """Linear warm-up from base_lr/warmup_steps to base_lr, then cosine to final_lr. (T,) float64."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = int(min(max(warmup_steps, 0), total_steps))
    t = np.arange(1, total_steps + 1, dtype=np.float64)
    lrs = np.empty(total_steps, dtype=np.float64)
    w = t <= warmup_steps
    lrs[w] = base_lr * t[w] / max(warmup_steps, 1)
    rest = total_steps - warmup_steps
    if rest > 0:
        progress = (t[~w] - warmup_steps - 1) / max(rest - 1, 1)  # 0 … 1 over the decay
        lrs[~w] = final_lr + 0.5 * (base_lr - final_lr) * (1.0 + np.cos(np.pi * progress))
    return lrs
