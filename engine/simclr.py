"""SimCLR pieces used by `train.method=simclr` (Chen et al. 2020): two views, projector, NT-Xent.

The memory baseline of the s-DIET paper (Fig. 3, Table 15) is SimCLR on the same backbone: every
sample is augmented twice, so a step runs the backbone on 2B images and keeps 2B sets of
activations for backward; that, not the loss, is what makes it ~2× s-DIET's footprint.

Layout convention: a two-view batch is (B, 2, C, H, W); `stack_views` turns it into (2B, C, H, W)
with all first views, then all second views, so sample i's positive is row i + B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TwoViews:
    """Wrap a per-sample transform: one image → (2, C, H, W), two independent augmentations."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, img) -> torch.Tensor:
        return torch.stack([self.transform(img), self.transform(img)])  # (2, C, H, W)

    def __repr__(self) -> str:
        return f"TwoViews({self.transform!r})"


def stack_views(x: torch.Tensor) -> torch.Tensor:
    """(B, V, C, H, W) → (V·B, C, H, W), view-major (all views 0, then all views 1, ...)."""
    if x.dim() != 5:
        raise ValueError(f"expected a multi-view batch (B, V, C, H, W), got shape {tuple(x.shape)}")
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])  # copies: (V·B, C, H, W)


class SimclrProjector(nn.Sequential):
    """SimCLR's 2-layer MLP g: Linear-BN-ReLU, Linear (the loss is computed on g(f(x)))."""

    def __init__(self, in_dim: int, hidden: int = 2048, out_dim: int = 128) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )


def nt_xent(z: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross-entropy) of view-major embeddings z (2B, p).

    Row i and row i + B are the two views of one sample. For each of the 2B anchors the positive is
    its other view and the 2B − 2 remaining rows are negatives; the loss is the mean over anchors.
    """
    n = z.shape[0]
    if n % 2:
        raise ValueError(f"NT-Xent needs an even number of rows (two views per sample), got {n}")
    b = n // 2
    z = F.normalize(z if z.dtype == torch.float64 else z.float(), dim=1)  # (2B, p), fp32 under autocast
    logits = z @ z.T / temperature  # (2B, 2B)
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, n), torch.arange(0, b)]).to(z.device)  # (2B,)
    return F.cross_entropy(logits, target)


def nt_xent_reference(z: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """The SimCLR paper's definition, one anchor at a time (slow; for tests).

    ℓ(i, j) = −log( exp(sim(z_i, z_j)/τ) / Σ_{k ≠ i} exp(sim(z_i, z_k)/τ) ),
    L = 1/(2B) Σ_k [ℓ(k, k+B) + ℓ(k+B, k)].
    """
    n = z.shape[0]
    b = n // 2
    total = z.new_zeros((), dtype=torch.float64)
    for i in range(n):
        j = (i + b) % n
        sims = torch.stack([F.cosine_similarity(z[i], z[k], dim=0) for k in range(n)]).double() / temperature
        denom = torch.logsumexp(torch.cat([sims[:i], sims[i + 1 :]]), dim=0)
        total = total + (denom - sims[j])
    return (total / n).to(z.dtype)
