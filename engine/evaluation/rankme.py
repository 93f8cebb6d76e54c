"""RankMe (Garrido et al. 2023): the effective rank of an embedding matrix.

RankMe(Z) = exp(−Σ_k p_k log p_k), p_k = σ_k / ‖σ‖₁ + ε, with σ the singular values of Z (n, K).
Ranges from 1 (collapsed) to min(n, K) (all singular values equal).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    s = torch.linalg.svdvals(z.double())  # (min(n, K),)
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))
