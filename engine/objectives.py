"""Training objectives: what a step computes from (images, indices, labels).

* `DietObjective`: z = model(x); loss = head.loss(z, index, t) (full or batch CE on the DIET head).
Baselines for memory studies (SimCLR, supervised) plug in here with the same signature.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class DietObjective(nn.Module):
    """DIET: classify every sample as its own class through the head."""

    def loss(self, engine, x: torch.Tensor, index: np.ndarray, labels, t: int, upcoming, head) -> torch.Tensor:
        z = engine(x).float()  # (B, d); the head and its loss stay fp32 under autocast
        return head.loss(z, index, t, upcoming)


def build_objective(cfg, model, manifest, device) -> nn.Module:
    if cfg.train.method == "diet":
        return DietObjective().to(device)
    raise ValueError(f"train.method={cfg.train.method!r} is not available in this build")
